"""The validation schema: a JSON Schema turned into a pydantic model at run time.

Supported keywords: ``type`` (string, number, integer, boolean, array, object, null, or a
list of them), ``properties``, ``required``, ``items``, ``enum``, ``const``, ``anyOf``/``oneOf``,
local ``$ref`` (``#/$defs/...``, ``#/definitions/...``), and the constraints ``minLength``,
``maxLength``, ``pattern``, ``minimum``, ``maximum``, ``exclusiveMinimum``,
``exclusiveMaximum``, ``minItems``, ``maxItems``. Other keywords are ignored, as are keys in
a response that the schema does not declare.
"""

from __future__ import annotations

import functools
import json
import keyword
import operator
import re
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import jsonschema
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    ValidationError,
    create_model,
)

from legal_batch.flows.template.errors import TemplateError

__all__ = [
    "load_schema",
    "result_columns",
    "schema_to_model",
    "validate_response",
    "validate_schema",
]

_MODEL_CONFIG = ConfigDict(extra="ignore", protected_namespaces=(), regex_engine="python-re")

# JSON Schema constraint keyword -> pydantic Field argument.
_CONSTRAINTS = {
    "minLength": "min_length",
    "maxLength": "max_length",
    "pattern": "pattern",
    "minimum": "ge",
    "maximum": "le",
    "exclusiveMinimum": "gt",
    "exclusiveMaximum": "lt",
    "minItems": "min_length",
    "maxItems": "max_length",
}

_MAX_LISTED_ERRORS = 5


def load_schema(path: str | Path) -> dict[str, Any]:
    """Read a JSON Schema file and check it with :func:`validate_schema`.

    Raises ``TemplateError`` naming the file when it is missing, not JSON, or not a usable schema.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise TemplateError(f"cannot read schema file {path}: {exc.strerror or exc}") from exc
    try:
        schema = json.loads(text)
    except json.JSONDecodeError as exc:
        raise TemplateError(
            f"schema file {path} is not valid JSON: {exc.msg} at line {exc.lineno}, column {exc.colno}"
        ) from exc
    try:
        validate_schema(schema)
    except TemplateError as exc:
        raise TemplateError(f"schema file {path}: {exc}") from exc
    return schema


def validate_schema(schema: dict[str, Any]) -> None:
    """Check that ``schema`` is a JSON Schema object with top-level ``properties``.

    Checks against the JSON Schema metaschema named by ``$schema`` (latest draft when absent).
    Raises ``TemplateError`` saying what is wrong and where.
    """
    if not isinstance(schema, dict):
        raise TemplateError(f"schema must be a JSON object, got {type(schema).__name__}")
    validator = jsonschema.validators.validator_for(schema)
    try:
        validator.check_schema(schema)
    except jsonschema.SchemaError as exc:
        where = "/".join(str(part) for part in exc.absolute_path) or "(top level)"
        raise TemplateError(f"not a valid JSON Schema at {where}: {exc.message}") from exc
    properties = schema.get("properties")
    if not isinstance(properties, dict) or not properties:
        raise TemplateError(
            'schema has no "properties": declare one property per result field, '
            'e.g. {"type": "object", "properties": {"summary": {"type": "string"}}}'
        )
    top_type = schema.get("type", "object")
    if top_type != "object":
        raise TemplateError(f'schema "type" must be "object" (one object per row), got {top_type!r}')


def result_columns(schema: Mapping[str, Any]) -> list[str]:
    """Top-level field names in schema order: one result column each."""
    return list(schema["properties"])


def schema_to_model(schema: dict[str, Any], *, name: str = "TemplateResult") -> type[BaseModel]:
    """Build a pydantic model validating one response object against ``schema``.

    Required properties must be present; optional ones default to ``None``. Fields are keyed by
    alias, so dump with ``by_alias=True`` (as :func:`validate_response` does) to get the
    schema's property names back.
    """
    validate_schema(schema)
    return _Builder(schema).object_model(schema, name)


def validate_response(model: type[BaseModel], data: object) -> tuple[dict[str, Any] | None, str | None]:
    """Validate one parsed response.

    Returns ``(values, None)`` with JSON-ready values keyed by schema property name, or
    ``(None, error)`` where ``error`` lists the failing fields, e.g.
    ``"verdict: Input should be 'upheld' or 'reversed' (got 'maybe'); summary: Field required"``.
    """
    try:
        instance = model.model_validate(data)
    except ValidationError as exc:
        return None, _describe_errors(exc)
    return instance.model_dump(mode="json", by_alias=True), None


def _describe_errors(exc: ValidationError) -> str:
    errors = exc.errors(include_url=False)
    parts = []
    for error in errors[:_MAX_LISTED_ERRORS]:
        where = ".".join(str(part) for part in error["loc"]) or "(response)"
        text = f"{where}: {error['msg'].removeprefix('Value error, ')}"
        if error["type"] not in {"missing", "model_type", "dict_type"}:
            text += f" (got {_short_repr(error.get('input'))})"
        parts.append(text)
    if len(errors) > _MAX_LISTED_ERRORS:
        parts.append(f"and {len(errors) - _MAX_LISTED_ERRORS} more")
    return "; ".join(parts)


def _short_repr(value: object, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _reject_bool(value: object) -> object:
    # JSON Schema: true/false are not numbers, while pydantic would read them as 1/0.
    if isinstance(value, bool):
        raise ValueError("Input should be a number, not a boolean")
    return value


def _compact_number(value: float) -> int | float:
    # Whole numbers dump as `3`, not `3.0`, as the model most likely wrote them.
    return int(value) if value.is_integer() and abs(value) < 2**53 else value


_Int = Annotated[int, BeforeValidator(_reject_bool)]
_Number = Annotated[float, BeforeValidator(_reject_bool), PlainSerializer(_compact_number, when_used="json")]


class _Builder:
    """Walks one schema, resolving local ``$ref``s and naming nested models uniquely."""

    def __init__(self, root: dict[str, Any]) -> None:
        self._root = root
        self._resolving: list[str] = []
        self._names: set[str] = set()

    def object_model(self, schema: Mapping[str, Any], name: str) -> type[BaseModel]:
        model_name = self._unique(name)
        required = set(schema.get("required", []))
        fields: dict[str, Any] = {}
        for prop, subschema in schema.get("properties", {}).items():
            annotation = self.annotation(subschema, f"{model_name}_{_camel(prop)}")
            info: dict[str, Any] = {"alias": prop}
            if isinstance(subschema, Mapping) and isinstance(subschema.get("description"), str):
                info["description"] = subschema["description"]
            attribute = _attribute_name(prop, taken=fields.keys())
            if prop in required:
                fields[attribute] = (annotation, Field(**info))
            else:
                fields[attribute] = (annotation | None, Field(None, **info))
        return create_model(model_name, __config__=_MODEL_CONFIG, **fields)

    def annotation(self, schema: object, name: str) -> Any:
        if schema is True or schema == {}:
            return Any
        if not isinstance(schema, Mapping):
            raise TemplateError(f"{name}: unsupported schema {schema!r}")
        if "$ref" in schema:
            return self._ref(schema["$ref"], name)
        if "const" in schema:
            return _literal([schema["const"]], name)
        if "enum" in schema:
            return _literal(schema["enum"], name)
        for key in ("anyOf", "oneOf"):
            if key in schema:
                options = [self.annotation(sub, f"{name}{i}") for i, sub in enumerate(schema[key])]
                return _union(options)
        declared = schema.get("type")
        if declared is None:
            return Any
        types = declared if isinstance(declared, list) else [declared]
        options = [self._single_type(kind, schema, name) for kind in types if kind != "null"]
        if not options:
            return type(None)
        result = _union(options)
        return result | None if "null" in types else result

    def _single_type(self, kind: str, schema: Mapping[str, Any], name: str) -> Any:
        if kind == "string":
            return _constrained(str, schema)
        if kind == "integer":
            return _constrained(_Int, schema)
        if kind == "number":
            return _constrained(_Number, schema)
        if kind == "boolean":
            return bool
        if kind == "array":
            item = self.annotation(schema.get("items", True), f"{name}Item")
            return _constrained(list[item], schema)
        if kind == "object":
            if schema.get("properties"):
                return self.object_model(schema, name)
            return dict[str, Any]
        raise TemplateError(f"{name}: unsupported type {kind!r}")

    def _ref(self, ref: str, name: str) -> Any:
        match = re.fullmatch(r"#/(\$defs|definitions)/(.+)", ref)
        if not match:
            raise TemplateError(f"{name}: only local references like #/$defs/Name are supported, got {ref!r}")
        if ref in self._resolving:
            raise TemplateError(f"{name}: recursive reference {ref!r} is not supported")
        target = self._root.get(match.group(1), {}).get(match.group(2))
        if target is None:
            raise TemplateError(f"{name}: reference {ref!r} points to nothing")
        self._resolving.append(ref)
        try:
            return self.annotation(target, _camel(match.group(2)))
        finally:
            self._resolving.pop()

    def _unique(self, name: str) -> str:
        candidate, counter = name, 2
        while candidate in self._names:
            candidate, counter = f"{name}{counter}", counter + 1
        self._names.add(candidate)
        return candidate


def _union(options: list[Any]) -> Any:
    return functools.reduce(operator.or_, options)


def _literal(values: object, name: str) -> Any:
    if not isinstance(values, list) or not values:
        raise TemplateError(f"{name}: enum must be a non-empty list")
    if not all(value is None or isinstance(value, (str, int, float, bool)) for value in values):
        raise TemplateError(f"{name}: enum values must be strings, numbers, booleans or null")
    return Literal[tuple(values)]


def _constrained(base: Any, schema: Mapping[str, Any]) -> Any:
    constraints = {arg: schema[key] for key, arg in _CONSTRAINTS.items() if key in schema}
    return Annotated[base, Field(**constraints)] if constraints else base


def _attribute_name(prop: str, *, taken: Collection[str]) -> str:
    """A Python attribute for ``prop``; the property name itself stays the alias."""

    def usable(name: str) -> bool:
        return (
            name.isidentifier()
            and not keyword.iskeyword(name)
            and not name.startswith(("_", "model_"))
            and not hasattr(BaseModel, name)
            and name not in taken
        )

    if usable(prop):
        return prop
    return next(f"field_{n}" for n in range(len(taken) + 1) if usable(f"field_{n}"))


def _camel(text: str) -> str:
    words = re.findall(r"[A-Za-z0-9]+", text)
    return "".join(word[:1].upper() + word[1:] for word in words) or "Field"
