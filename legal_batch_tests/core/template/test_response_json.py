"""JSON extraction from model output as models actually write it."""

from __future__ import annotations

import pytest

from legal_batch.core.template.response_json import extract_json_object, parse_response

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
        "typographic quotes inside a typographic string are kept",
        "{“summary”: “The judge called it „unfair“ and the parties’ view «weak»”}",
        "",
        {"summary": "The judge called it „unfair“ and the parties’ view «weak»"},
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
    (
        "unescaped ASCII quotes inside a value",
        '{"summary": "He said "stop" and left", "n": 1}',
        "",
        {"summary": 'He said "stop" and left', "n": 1},
    ),
    (
        "unescaped ASCII quotes followed by a comma and prose",
        '{"summary": "He said "stop", then left", "note": "see "Art. 5": it applies"}',
        "",
        {"summary": 'He said "stop", then left', "note": 'see "Art. 5": it applies'},
    ),
    (
        "typographic quote then comma and prose inside a typographic string",
        "{“summary”: “He said “stop”, then left”}",
        "",
        {"summary": "He said “stop”, then left"},
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
