"""Pull the JSON object out of real model output.

Models wrap JSON in prose and markdown fences, continue after an assistant prefill such as
``{``, use typographic quotes (“ ” ‘ ’ „ « ») as string delimiters, leave trailing commas and
raw newlines in strings. :func:`extract_json_object` tries each ``{`` in turn, each reading
parsed as strict JSON:

1. as written;
2. with the lossless fixes only: a comma right before ``}`` or ``]`` dropped, raw control
   characters inside strings escaped;
3. with those fixes and every typographic quote read as an ASCII quote, the only characters the
   repair ever replaces.

The repair never guesses which quote is text: reading 3 is exactly the response with
typographic quotes as ASCII quotes, so it has that reading's structure or fails to parse. A
typographic quote used as text (an apostrophe, „quoted“ words) in a response that needs reading
3, an unescaped ASCII quote inside a string, or ``NaN``/``Infinity`` (not JSON numbers) make the
response ``json_failed``, never an object with keys or values made of the structure around them.
Truncated output is reported as such, never half-parsed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

import orjson

__all__ = ["ParsedResponse", "extract_json_object", "parse_response"]

# Quotes a model may use where JSON needs `"`; the repair reads each of them as `"`.
_TYPOGRAPHIC_QUOTES = frozenset("“”„‟‘’‚‛«»‹›〝〞＂")
_AS_ASCII_QUOTES = str.maketrans(dict.fromkeys(_TYPOGRAPHIC_QUOTES, '"'))
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
    # One character for one: indexes into `as_ascii` are indexes into `text`.
    as_ascii = text.translate(_AS_ASCII_QUOTES)
    while start != -1:
        strict_end = _balanced_end(text, start)
        if strict_end is not None:
            for candidate in (text[start:strict_end], _repair(text, start)[0] or ""):
                data = _loads(candidate)
                if data is not None:
                    return data, ""
        repaired, repaired_end = _repair(as_ascii, start)
        end = strict_end
        if (repaired is not None and repaired_end is not None
                and _may_end_at(text, start, repaired_end, strict_end)):
            data = _loads(repaired)
            if data is not None:
                return data, ""
            end = repaired_end
        if end is None:
            # Everything after `start` sits inside an object that never closes.
            if text.rstrip().rstrip("`").rstrip().endswith("}"):
                return None, ("JSON object never closes though the response ends with '}' "
                              "(an unescaped quote in a string?)")
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


def _may_end_at(text: str, start: int, end: int, strict_end: int | None) -> bool:
    """Whether the repaired object, ``text[start:end]``, may end there.

    Not before the end of the object the ASCII quotes alone delimit (``strict_end``), and not on
    a ``}`` inside a string that ASCII quotes open and close: there a typographic quote read as a
    delimiter (an apostrophe before `` }``) would cut the object short and drop the rest.
    """
    if strict_end is not None and end < strict_end:
        return False
    closing = end - 1
    in_string = escaped = False
    for index in range(start, len(text)):
        char = text[index]
        if index >= closing and not in_string:
            return True
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
                if index > closing:
                    return False
        elif char == '"':
            in_string = True
    return True


def _repair(text: str, start: int) -> tuple[str | None, int | None]:
    """The object starting at ``start`` of ``text`` (as written, or with typographic quotes read
    as ASCII quotes), with the lossless fixes a strict parser needs and nothing else.

    Strings are delimited exactly as JSON delimits them (every unescaped ``"`` opens or closes
    one). Inside strings raw control characters are escaped; outside them a comma right before
    ``}`` or ``]`` is dropped. No quote is escaped, moved or guessed at, so the result has the
    structure of the reading it came from, or fails to parse.

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
            if char == '"':
                in_string = True
                out.append(char)
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
        elif char == '"':
            in_string = False
            out.append(char)
        elif char < " ":
            out.append(orjson.dumps(char).decode()[1:-1])
        else:
            out.append(char)
        index += 1
    return None, None


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
