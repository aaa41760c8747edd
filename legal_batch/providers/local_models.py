"""The deterministic offline "models" behind the `local` provider: embeddings, headnotes, JSON."""

from __future__ import annotations

import hashlib
import re

from legal_batch.core.lexical import embed

__all__ = ["embed", "extractive_headnote", "schema_shaped"]

_CITATION = re.compile(r"Neutral citation:\s*(\[\d{4}\]\s+[A-Z]+\s+\d+)")
_PARTIES = re.compile(r"BETWEEN\s*\n(.+?)\s*\(.*?\n\s*and\s*\n(.+?)\s*\(", re.S)
_CATCHWORDS = re.compile(r"Catchwords:\s*(.+)")
_COURT_LINE = re.compile(r"^([A-Z ,'&-]*\b(?:COURT|TRIBUNAL)\b[A-Z ,'&-]*)$", re.M)
_HEADER = re.compile(r"^(Court|Case name):\s*(.+)$", re.M)
_REGION = re.compile(r"\s+OF THE HONG KONG SPECIAL ADMINISTRATIVE REGION$", re.I)
_SMALL_WORDS = frozenset({"of", "the", "and", "in", "for", "on", "at", "to"})
_NUMBERED = re.compile(r"^\s*(\d+)\.\s+(.+)$", re.S)
_ORDER_HEADING = re.compile(r"^(?:ORDERS?|DISPOSITION|CONCLUSION|RESULT)\s*$")
_OPENER = re.compile(
    r"^(?:in my view,?|in my judgment,?|it is common ground that|it follows that|i accept that|accordingly,?"
    r"|for these reasons,?|in the result,?|the evidence shows that|counsel for .{1,80}? (?:submitted|argued) that)\s+",
    re.IGNORECASE,
)
_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z(])")


def _court_name(text: str) -> str | None:
    """The court from the judgment's heading line (e.g. "Court of Appeal"), else from a `Court:` line."""
    line = _COURT_LINE.search(text)
    if line is None:
        header = dict(_HEADER.findall(text))
        return header.get("Court")
    words = _REGION.sub("", line.group(1).strip()).split()
    return " ".join(w.lower() if i and w.lower() in _SMALL_WORDS else w.capitalize() for i, w in enumerate(words))


def _parties(text: str) -> str | None:
    found = _PARTIES.search(text)
    if found:
        return f"{found.group(1).strip()} v {found.group(2).strip()}"
    return dict(_HEADER.findall(text)).get("Case name")


def _clean(sentence: str) -> str:
    """A sentence without its discourse opener ("In my view, ..."), capitalised."""
    sentence = re.sub(r"\s+", " ", sentence).strip()
    while (stripped := _OPENER.sub("", sentence, count=1)) != sentence:
        sentence = stripped
    return sentence[:1].upper() + sentence[1:]


def _distinct_sentences(paragraphs: list[str], count: int) -> list[str]:
    picked: list[str] = []
    seen: set[str] = set()
    for paragraph in paragraphs:
        for sentence in _SENTENCE.split(paragraph):
            cleaned = _clean(sentence)
            key = cleaned.lower().rstrip(".")
            if len(cleaned) < 12 or key in seen:
                continue
            seen.add(key)
            picked.append(cleaned if cleaned.endswith((".", "!", "?")) else cleaned + ".")
            if len(picked) >= count:
                return picked
    return picked


def _numbered_paragraphs(blocks: list[str]) -> list[str]:
    return [m.group(2) for block in blocks if (m := _NUMBERED.match(block))]


def _holding(blocks: list[str], count: int = 2) -> str:
    """The leading distinct sentences of the order section, or failing one, of the last paragraphs."""
    heading = next((i for i in range(len(blocks) - 1, -1, -1) if _ORDER_HEADING.match(blocks[i].strip())), None)
    paragraphs = _numbered_paragraphs(blocks[heading + 1:]) if heading is not None else []
    if not paragraphs:
        paragraphs = _numbered_paragraphs(blocks)[-2:] or [blocks[-1] if blocks else ""]
    return " ".join(_distinct_sentences(paragraphs, count))[:700]


def extractive_headnote(text: str) -> str:
    """A headnote built from the judgment's own words: citation — court — parties, catchwords, held
    (the leading distinct sentences of the order) and a summary (the first distinct facts)."""
    blocks = [b for b in re.split(r"\n\s*\n", text) if b.strip() and not b.lstrip().startswith("[…")]
    citation = _CITATION.search(text)
    catchwords = _CATCHWORDS.search(text)
    head = " — ".join(part for part in (citation.group(1) if citation else None, _court_name(text), _parties(text))
                      if part)
    lines = [head] if head else []
    if catchwords:
        lines.append(f"Catchwords: {catchwords.group(1).strip()}")
    lines.append(f"Held: {_holding(blocks)}")
    facts = _distinct_sentences(_numbered_paragraphs(blocks)[:6], 2)
    if facts:
        lines.append(f"Summary: {' '.join(facts)}"[:800])
    return "\n".join(lines)


def schema_shaped(schema: dict, text: str) -> object:
    """A deterministic value of the JSON Schema's shape, drawn from `text` where a string is needed."""
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "string")
    if "enum" in schema:
        options = schema["enum"]
        digest = int(hashlib.sha256(text.encode()).hexdigest(), 16)
        return options[digest % len(options)]
    if kind == "object" or "properties" in schema:
        return {name: schema_shaped(sub, text) for name, sub in (schema.get("properties") or {}).items()}
    if kind == "array":
        return [schema_shaped(schema.get("items") or {"type": "string"}, text)]
    if kind == "integer":
        return len(text) % 100
    if kind == "number":
        return round((len(text) % 1000) / 10, 1)
    if kind == "boolean":
        return len(text) % 2 == 0
    words = text.split()
    return " ".join(words[:12])
