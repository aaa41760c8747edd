"""Pull the JSON object out of real model output.

Models wrap JSON in prose and markdown fences, continue after an assistant prefill such as
``{``, use typographic quotes (“ ” ‘ ’ „ « ») as string delimiters and leave trailing commas.
:func:`extract_json_object` tries each ``{`` in turn: first as strict JSON, then through a
repair pass that fixes those habits. Truncated output is reported as such, never half-parsed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

import orjson

__all__ = ["ParsedResponse", "extract_json_object", "parse_response"]

# Quotes a model may use where JSON needs `"`.
_TYPOGRAPHIC_QUOTES = frozenset("“”„‟‘’‚‛«»‹›")
_FENCE = re.compile(r"```[A-Za-z]*[ \t]*\n?(.*?)```", re.DOTALL)
_SNIPPET_CHARS = 80


@dataclass(frozen=True)
class ParsedResponse:
    """One model response after JSON extraction.

    ``data`` is the object found (``None`` when ``parse_status`` is ``"json_failed"``);
    ``error`` says why nothing usable was found.
    """

    data: dict[str, Any] | None
    parse_status: Literal["success", "json_failed"]
    error: str | None


def parse_response(text: str | None, *, prefill: str = "") -> ParsedResponse:
    """Extract the response's JSON object, with a readable error when there is none."""
    if text is None or not (prefill + text).strip():
        return ParsedResponse(None, "json_failed", "empty response")
    data, problem = _extract(_with_prefill(text, prefill))
    if data is not None:
        return ParsedResponse(data, "success", None)
    return ParsedResponse(None, "json_failed", f"{problem}: {_snippet(text)}")


def extract_json_object(text: str, *, prefill: str = "") -> dict[str, Any] | None:
    """Return the first complete JSON object in ``text``, or ``None``.

    ``prefill`` is what the assistant turn was seeded with (e.g. ``"{"``); the response is read
    as its continuation unless the model repeated it. Objects inside a truncated or malformed
    outer object are never returned in its place.
    """
    data, _ = _extract(_with_prefill(text, prefill))
    return data


def _with_prefill(text: str, prefill: str) -> str:
    if not prefill or text.lstrip().startswith(prefill.strip()):
        return text
    return prefill + text


def _extract(text: str) -> tuple[dict[str, Any] | None, str]:
    data, problem = _first_object(text)
    if data is None:
        for body in _FENCE.findall(text):
            fenced, _ = _first_object(body)
            if fenced is not None:
                return fenced, ""
    return data, problem


def _first_object(text: str) -> tuple[dict[str, Any] | None, str]:
    start = text.find("{")
    if start == -1:
        return None, "no JSON object in response"
    while start != -1:
        strict_end = _balanced_end(text, start)
        if strict_end is not None:
            data = _loads(text[start:strict_end])
            if data is not None:
                return data, ""
        repaired, repaired_end = _repair(text, start)
        if repaired is not None:
            data = _loads(repaired)
            if data is not None:
                return data, ""
        end = repaired_end or strict_end
        if end is None:
            # Everything after `start` sits inside an object that never closes.
            return None, "JSON object never closes (truncated output? raise the output token limit)"
        start = text.find("{", end)
    return None, "malformed JSON object in response"


def _balanced_end(text: str, start: int) -> int | None:
    """Index just past the ``}`` closing the ``{`` at ``start``; braces in strings don't count."""
    depth = 0
    in_string = escaped = False
    for index in range(start, len(text)):
        char = text[index]
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return index + 1
    return None


def _repair(text: str, start: int) -> tuple[str | None, int | None]:
    """Rewrite the object starting at ``start`` into strict JSON.

    - Outside a string, an ASCII or typographic quote opens one and becomes ``"``.
    - Inside a string, an ASCII or typographic quote closes it (and becomes ``"``) only where
      JSON could continue after it (see :func:`_closes_string`); otherwise it is text: an ASCII
      quote is escaped, a typographic one kept as it is. The closing quotes of valid JSON
      always pass that test, so they are left as they are.
    - Raw control characters inside strings are escaped; a comma before ``}`` or ``]`` is dropped.

    Returns the repaired object text and the index just past it, or ``(None, None)`` when the
    object never closes.
    """
    out: list[str] = []
    depth = 0
    in_string = False
    index = start
    while index < len(text):
        char = text[index]
        if not in_string:
            if char == '"' or char in _TYPOGRAPHIC_QUOTES:
                in_string = True
                out.append('"')
            elif char == "," and _next_significant(text, index + 1)[0] in {"}", "]"}:
                pass
            else:
                out.append(char)
                if char == "{":
                    depth += 1
                elif char == "}":
                    depth -= 1
                    if depth == 0:
                        return "".join(out), index + 1
        elif char == "\\":
            out.append(text[index : index + 2])
            index += 1
        elif char == '"' or char in _TYPOGRAPHIC_QUOTES:
            if _closes_string(text, index + 1):
                out.append('"')
                in_string = False
            else:
                out.append('\\"' if char == '"' else char)
        elif char < " ":
            out.append(orjson.dumps(char).decode()[1:-1])
        else:
            out.append(char)
        index += 1
    return None, None


def _closes_string(text: str, index: int) -> bool:
    """Whether a quote just before ``index`` can end a JSON string.

    True when what follows is the end, ``}``/``]``, ``,`` then a value or key, or ``:`` then a
    value; after a valid JSON string that is always the case.
    """
    char, index = _next_significant(text, index)
    if char in {"", "}", "]"}:
        return True
    if char == ",":
        following, index = _next_significant(text, index + 1)
        return following in {"}", "]"} or _starts_value(text, index)
    if char == ":":
        return _starts_value(text, _next_significant(text, index + 1)[1])
    return False


def _starts_value(text: str, index: int) -> bool:
    char = text[index : index + 1]
    return bool(char) and (
        char in '"{[-'
        or char in _TYPOGRAPHIC_QUOTES
        or char.isdigit()
        or text.startswith(("true", "false", "null"), index)
    )


def _next_significant(text: str, index: int) -> tuple[str, int]:
    """The first non-whitespace character at or after ``index`` ('' at the end), and its index."""
    while index < len(text) and text[index].isspace():
        index += 1
    return text[index : index + 1], index


def _loads(candidate: str) -> dict[str, Any] | None:
    try:
        data = orjson.loads(candidate)
    except orjson.JSONDecodeError:
        return None
    return data if isinstance(data, dict) else None


def _snippet(text: str) -> str:
    flat = " ".join(text.split())
    return repr(flat if len(flat) <= _SNIPPET_CHARS else flat[: _SNIPPET_CHARS - 1] + "…")
