"""JSON extraction from model output as models actually write it."""

from __future__ import annotations

import pytest

from legal_batch.flows.template.response_json import extract_json_object, parse_response
from legal_batch.flows.template.results import result_columns_for
from legal_batch.flows.template.schema import schema_to_model

# (id, response text, prefill, expected object or None)
CASES = [
    ("plain object", '{"verdict": "upheld", "score": 3}', "", {"verdict": "upheld", "score": 3}),
    ("continues after prefill", '"verdict": "upheld"}', "{", {"verdict": "upheld"}),
    ("prefill repeated by the model", '{"verdict": "upheld"}', "{", {"verdict": "upheld"}),
    (
        "continues after a longer prefill",
        'The appeal is dismissed."}',
        '{"summary": "',
        {"summary": "The appeal is dismissed."},
    ),
    (
        "prose before and after",
        'Here is the analysis you asked for:\n{"verdict": "reversed"}\nLet me know if you need more.',
        "",
        {"verdict": "reversed"},
    ),
    (
        "markdown json fence",
        'Sure.\n```json\n{\n  "verdict": "upheld",\n  "costs": true\n}\n```\n',
        "",
        {"verdict": "upheld", "costs": True},
    ),
    (
        "braces inside strings do not count",
        '{"quote": "the clause {a} and } stray", "n": 1} trailing {',
        "",
        {"quote": "the clause {a} and } stray", "n": 1},
    ),
    (
        "escaped quotes and backslashes",
        r'{"quote": "he said \"no {way}\" \\ then left", "n": 2}',
        "",
        {"quote": 'he said "no {way}" \\ then left', "n": 2},
    ),
    (
        "typographic double quotes as delimiters",
        "{“verdict”: “upheld”, “court”: “Court of Appeal”}",
        "",
        {"verdict": "upheld", "court": "Court of Appeal"},
    ),
    (
        "typographic single quotes as delimiters",
        "{‘verdict’: ‘upheld’, ‘n’: 2}",
        "",
        {"verdict": "upheld", "n": 2},
    ),
    (
        "typographic quotes inside a valid ASCII string are untouched",
        '{"summary": "the court’s “narrow” reading, ‘obiter’", "ok": true}',
        "",
        {"summary": "the court’s “narrow” reading, ‘obiter’", "ok": True},
    ),
    (
        "mixed ASCII and typographic delimiters",
        '{“verdict": "upheld”, "n": 1}',
        "",
        {"verdict": "upheld", "n": 1},
    ),
    ("mixed delimiters, odd number of ASCII quotes", '{"verdict”: “upheld”}', "", {"verdict": "upheld"}),
    (
        "typographic quotes around keys, ASCII around values",
        '{“verdict”: "upheld", ‘court’: "Court of Appeal"}',
        "",
        {"verdict": "upheld", "court": "Court of Appeal"},
    ),
    (
        "braces and a colon inside typographic strings",
        "{“note”: “use {braces} and } : here”, “n”: 1}",
        "",
        {"note": "use {braces} and } : here", "n": 1},
    ),
    (
        "typographic delimiters and a trailing comma",
        "Answer:\n{“verdict”: “upheld”, “judges”: [“A”, “B”,],}\nDone.",
        "",
        {"verdict": "upheld", "judges": ["A", "B"]},
    ),
    ("low-9 and guillemet delimiters", "{„verdict“: «upheld»}", "", {"verdict": "upheld"}),
    (
        "typographic quotes as text, a trailing comma and a raw newline in ASCII strings",
        '{"summary": "the court’s “narrow”\nreading", "n": 1,}',
        "",
        {"summary": "the court’s “narrow”\nreading", "n": 1},
    ),
    (
        "trailing commas in objects and arrays",
        '{"parties": ["A", "B",], "meta": {"court": "X",},}',
        "",
        {"parties": ["A", "B"], "meta": {"court": "X"}},
    ),
    (
        "raw newline inside a string",
        '{"summary": "line one\nline two"}',
        "",
        {"summary": "line one\nline two"},
    ),
    ("two objects: the first wins", '{"n": 1}\n{"n": 2}', "", {"n": 1}),
    (
        "arrays of nested objects",
        '{"parties": [{"name": "A", "roles": [{"r": "claimant"}]}, {"name": "B", "roles": []}]}',
        "",
        {"parties": [{"name": "A", "roles": [{"r": "claimant"}]}, {"name": "B", "roles": []}]},
    ),
    (
        "braces in prose before the object",
        'Fill in {verdict} as asked:\n{"verdict": "upheld"}',
        "",
        {"verdict": "upheld"},
    ),
    (
        "unclosed brace in prose, object in a fence",
        'Format {verdict, score:\n```json\n{"verdict": "upheld"}\n```',
        "",
        {"verdict": "upheld"},
    ),
    ("truncated object", '{"summary": "The appeal is', "", None),
    ("truncated after complete inner objects", '{"parties": [{"name": "A"}, {"name": "B', "", None),
    ("prefill then truncated", '"summary": "The appeal', "{", None),
    ("plain text", "I cannot determine the verdict from this judgment.", "", None),
    ("empty", "", "", None),
    ("top-level array is not an object", "[1, 2, 3]", "", None),
    ("malformed beyond repair", '{"verdict": upheld because reasons}', "", None),
]


@pytest.mark.parametrize(("text", "prefill", "expected"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_extract_json_object(text: str, prefill: str, expected: dict | None) -> None:
    assert extract_json_object(text, prefill=prefill) == expected


# (id, response text, prefill): responses built to fool the repair into a success. Each is
# json_failed: no number that JSON lacks, no key or value made of the structure around it, no
# object cut short where a typographic quote is read as a delimiter.
HOSTILE = [
    ("NaN", '{"a": NaN, "b": "x"}', ""),
    ("NaN between strings", '{"a": "x", "b": NaN, "c": "y"}', ""),
    ("NaN after a prefill", '"a": NaN, "b": "x"}', "{"),
    ("Infinity", '{"score": Infinity}', ""),
    ("-Infinity", '{"score": -Infinity, "n": 1}', ""),
    ("lower-case nan", '{"verdict": "upheld", "score": nan}', ""),
    ("NaN in an array", '{"a": 1, "b": [NaN]}', ""),
    ("NaN beside a valid inner object", '{"outer": {"b": 1}, "a": NaN}', ""),
    ("NaN in a fence", 'Here:\n```json\n{"a": NaN, "b": "x"}\n```', ""),
    ("NaN with typographic delimiters", "{“a”: NaN, “b”: “x”}", ""),
    ("unescaped quotes inside a value", '{"summary": "He said "stop" and left", "n": 1}', ""),
    ("unescaped quote then a comma and prose", '{"summary": "He said "stop", then left"}', ""),
    ("unescaped quote then a colon", '{"note": "see "Art. 5": it applies"}', ""),
    ("unescaped quote then a comma and a key", '{"summary": "cites "x", "y": "z"}', ""),
    ("unescaped quote then a comma and a value", '{"summary": "He said "stop", "n": 1}', ""),
    ("typographic quote then a comma inside a typographic string", "{“summary”: “He said “stop”, then left”}", ""),
    ("typographic quotes as text inside a typographic string",
     "{“summary”: “The judge called it „unfair“ and the parties’ view «weak»”}", ""),
    ("apostrophe inside a typographic key", "{“court’s view”: “upheld”}", ""),
    ("apostrophe inside a single-quoted value", "{‘verdict’: ‘the court’s view’}", ""),
    ("typographic delimiters around an unescaped ASCII quote", '{"summary": “He said "stop", then left”}', ""),
    ("apostrophe then a brace inside an ASCII string", '{"note": "the parties’ }", "x": NaN}', ""),
    ("apostrophe then a brace, object never closes",
     '{"note": "the parties’ }", "x": {"y": 1}, "z": "cut off}', ""),
    ("apostrophe inside an ASCII string, a trailing comma and NaN", '{"summary": "the court’s view", "n": NaN,}', ""),
]


@pytest.mark.parametrize(("text", "prefill"), [c[1:] for c in HOSTILE], ids=[c[0] for c in HOSTILE])
def test_responses_built_to_fool_the_repair_are_json_failed(text: str, prefill: str) -> None:
    parsed = parse_response(text, prefill=prefill)
    assert (parsed.data, parsed.parse_status) == (None, "json_failed")
    assert parsed.error and (parsed.error.startswith(("malformed JSON object", "JSON object never closes")))


def test_a_hostile_response_is_not_written_as_a_success_with_optional_fields() -> None:
    model = schema_to_model({"type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "string"}}})
    row = result_columns_for('{"a": NaN, "b": "x"}', None, model, ["a", "b"])
    assert (row["llm_parse_status"], row["llm_a"], row["llm_b"]) == ("json_failed", None, None)


def test_an_unescaped_quote_is_not_called_truncation() -> None:
    parsed = parse_response('{"summary": "He said "stop", "n": 1}')
    assert parsed.error is not None and "unescaped quote" in parsed.error and "truncated" not in parsed.error


def test_valid_json_is_returned_exactly_as_parsed() -> None:
    text = '{"a": "x\\u201cy", "b": [1.5, null, false], "c": {"d": "\\"quoted\\""}}'
    assert extract_json_object(text) == {"a": "x“y", "b": [1.5, None, False], "c": {"d": '"quoted"'}}


def test_parse_response_success() -> None:
    parsed = parse_response('"verdict": "upheld"}', prefill="{")
    assert (parsed.data, parsed.parse_status, parsed.error) == ({"verdict": "upheld"}, "success", None)


@pytest.mark.parametrize(
    ("text", "expected_error"),
    [
        ("", "empty response"),
        (None, "empty response"),
        ("No JSON here, sorry.", "no JSON object in response: 'No JSON here, sorry.'"),
        ('{"summary": "cut off', "JSON object never closes"),
        ('{"verdict": upheld because reasons}', "malformed JSON object"),
    ],
)
def test_parse_response_failure_says_why(text: str | None, expected_error: str) -> None:
    parsed = parse_response(text)
    assert parsed.data is None
    assert parsed.parse_status == "json_failed"
    assert parsed.error is not None and parsed.error.startswith(expected_error)


def test_parse_response_error_quotes_a_short_snippet() -> None:
    parsed = parse_response("word " * 200)
    assert parsed.error is not None and len(parsed.error) < 150
