"""JSON Schema → pydantic model: what validates, what doesn't, and what the user is told."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from legal_batch.flows.template.errors import TemplateError
from legal_batch.flows.template.schema import (
    load_schema,
    result_columns,
    schema_to_model,
    validate_response,
    validate_schema,
)

JUDGMENT_SCHEMA = {
    "type": "object",
    "properties": {
        "verdict": {"type": "string", "enum": ["upheld", "reversed", "remitted"]},
        "summary": {"type": "string", "description": "Two sentences."},
        "damages": {"type": "number"},
        "judges": {"type": "integer"},
        "costs_awarded": {"type": "boolean"},
        "parties": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string"},
                    "role": {"enum": ["claimant", "defendant"]},
                },
                "required": ["name", "role"],
            },
        },
        "court": {
            "type": "object",
            "properties": {"name": {"type": "string"}, "level": {"type": "integer"}},
            "required": ["name"],
        },
        "citations": {"type": "array", "items": {"type": "string"}},
        "dissent": {"type": ["string", "null"]},
    },
    "required": ["verdict", "summary", "dissent"],
}

VALID = {
    "verdict": "upheld",
    "summary": "The appeal fails.",
    "damages": 1250.5,
    "judges": 3,
    "costs_awarded": True,
    "parties": [{"name": "Smith", "role": "claimant"}],
    "court": {"name": "Court of Appeal", "level": 2},
    "citations": ["[2020] UKSC 1"],
    "dissent": None,
}


@pytest.fixture(scope="module")
def model():
    return schema_to_model(JUDGMENT_SCHEMA)


def test_result_columns_follow_schema_order() -> None:
    assert result_columns(JUDGMENT_SCHEMA) == [
        "verdict",
        "summary",
        "damages",
        "judges",
        "costs_awarded",
        "parties",
        "court",
        "citations",
        "dissent",
    ]


def test_valid_response_round_trips(model) -> None:
    assert validate_response(model, VALID) == (VALID, None)


def test_optional_fields_default_to_none_and_extra_keys_are_ignored(model) -> None:
    values, error = validate_response(
        model, {"verdict": "reversed", "summary": "s", "dissent": "Lord X", "confidence": 0.9}
    )
    assert error is None
    assert values == {
        "verdict": "reversed",
        "summary": "s",
        "damages": None,
        "judges": None,
        "costs_awarded": None,
        "parties": None,
        "court": None,
        "citations": None,
        "dissent": "Lord X",
    }


def test_nullable_required_field_must_be_present(model) -> None:
    _, error = validate_response(model, {"verdict": "upheld", "summary": "s"})
    assert error == "dissent: Field required"


@pytest.mark.parametrize(
    ("change", "expected_error"),
    [
        ({"verdict": "maybe"}, "verdict: Input should be 'upheld', 'reversed' or 'remitted' (got 'maybe')"),
        ({"damages": "a lot"}, "damages: "),
        ({"damages": True}, "damages: Input should be a number, not a boolean (got True)"),
        ({"judges": 2.5}, "judges: "),
        ({"summary": 42}, "summary: Input should be a valid string (got 42)"),
        ({"parties": [{"name": "Smith", "role": "judge"}]}, "parties.0.role: Input should be 'claimant' or"),
        ({"parties": [{"role": "claimant"}]}, "parties.0.name: Field required"),
        ({"court": {"level": 1}}, "court.name: Field required"),
        ({"citations": "[2020] UKSC 1"}, "citations: Input should be a valid list"),
    ],
)
def test_invalid_values_name_the_failing_field(model, change: dict, expected_error: str) -> None:
    values, error = validate_response(model, {**VALID, **change})
    assert values is None
    assert error is not None and error.startswith(expected_error)


def test_error_lists_every_failing_field(model) -> None:
    _, error = validate_response(model, {"verdict": "maybe", "judges": "three"})
    assert error is not None
    for field in ("verdict", "summary", "dissent", "judges"):
        assert f"{field}:" in error


def test_numbers_accept_integers_and_keep_them_integers(model) -> None:
    values, _ = validate_response(model, {**VALID, "damages": 1000})
    assert values is not None and values["damages"] == 1000 and isinstance(values["damages"], int)


def test_property_names_that_are_not_python_names_still_work() -> None:
    schema = {
        "type": "object",
        "properties": {
            "case name": {"type": "string"},
            "class": {"type": "string"},
            "model_name": {"type": "string"},
            "json": {"type": "string"},
            "_id": {"type": "integer"},
        },
        "required": ["case name", "class"],
    }
    model = schema_to_model(schema)
    data = {"case name": "A v B", "class": "civil", "model_name": "m", "json": "j", "_id": 7}
    assert validate_response(model, data) == (data, None)
    assert validate_response(model, {"class": "civil"}) == (None, "case name: Field required")


def test_local_refs_and_any_of() -> None:
    schema = {
        "type": "object",
        "$defs": {
            "Party": {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}
        },
        "properties": {
            "parties": {"type": "array", "items": {"$ref": "#/$defs/Party"}},
            "outcome": {"anyOf": [{"type": "string"}, {"type": "integer"}]},
        },
    }
    model = schema_to_model(schema)
    data = {"parties": [{"name": "A"}], "outcome": 3}
    assert validate_response(model, data) == (data, None)
    assert validate_response(model, {"parties": [{}]})[1] == "parties.0.name: Field required"


def test_string_and_number_constraints() -> None:
    schema = {
        "type": "object",
        "properties": {
            "code": {"type": "string", "pattern": "^[A-Z]{3}$", "maxLength": 3},
            "score": {"type": "number", "minimum": 0, "maximum": 1},
        },
    }
    model = schema_to_model(schema)
    assert validate_response(model, {"code": "ABC", "score": 0.5})[1] is None
    assert validate_response(model, {"code": "abc"})[1].startswith("code:")
    assert validate_response(model, {"score": 2})[1].startswith("score:")


def test_a_non_object_response_is_rejected(model) -> None:
    values, error = validate_response(model, ["upheld"])
    assert values is None and error is not None


@pytest.mark.parametrize(
    ("schema", "expected"),
    [
        ({"type": "object"}, 'no "properties"'),
        ({"type": "object", "properties": {}}, 'no "properties"'),
        ({"type": "array", "properties": {"a": {"type": "string"}}}, '"type" must be "object"'),
        (
            {"type": "object", "properties": {"a": {"type": "text"}}},
            "not a valid JSON Schema at properties/a/type",
        ),
        ({"properties": {"a": {"type": "string"}}, "required": "a"}, "not a valid JSON Schema at required"),
        (["not", "an", "object"], "schema must be a JSON object"),
    ],
)
def test_invalid_schemas_are_explained(schema: object, expected: str) -> None:
    with pytest.raises(TemplateError, match=expected.replace("(", r"\(")):
        validate_schema(schema)  # type: ignore[arg-type]


def test_recursive_ref_is_refused() -> None:
    schema = {
        "type": "object",
        "$defs": {"Node": {"type": "object", "properties": {"child": {"$ref": "#/$defs/Node"}}}},
        "properties": {"root": {"$ref": "#/$defs/Node"}},
    }
    with pytest.raises(TemplateError, match="recursive reference"):
        schema_to_model(schema)


def test_load_schema_reads_a_file(tmp_path: Path) -> None:
    path = tmp_path / "schema.json"
    path.write_text(json.dumps(JUDGMENT_SCHEMA), encoding="utf-8")
    assert load_schema(path) == JUDGMENT_SCHEMA


def test_load_schema_names_the_file_when_json_is_broken(tmp_path: Path) -> None:
    path = tmp_path / "schema.json"
    path.write_text('{"type": "object", "properties": {', encoding="utf-8")
    with pytest.raises(TemplateError, match=r"schema file .*schema\.json is not valid JSON: .* line 1"):
        load_schema(path)


def test_load_schema_names_the_file_when_schema_is_invalid(tmp_path: Path) -> None:
    path = tmp_path / "schema.json"
    path.write_text('{"type": "object"}', encoding="utf-8")
    with pytest.raises(TemplateError, match=r"schema file .*schema\.json: .*no \"properties\""):
        load_schema(path)


def test_load_schema_missing_file(tmp_path: Path) -> None:
    with pytest.raises(TemplateError, match="cannot read schema file"):
        load_schema(tmp_path / "absent.json")
