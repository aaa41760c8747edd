"""The deterministic offline "models" behind the `local` provider: embeddings, headnotes, JSON."""

from __future__ import annotations

import hashlib
import re

from legal_batch.core.lexical import embed

__all__ = ["embed", "extractive_headnote", "schema_shaped"]

_CITATION = re.compile(r"Neutral citation:\s*(\[\d{4}\]\s+[A-Z]+\s+\d+)")
_PARTIES = re.compile(r"BETWEEN\s*\n(.+?)\s*\(.*?\n\s*and\s*\n(.+?)\s*\(", re.S)
_CATCHWORDS = re.compile(r"Catchwords:\s*(.+)")
_COURT = re.compile(r"^(.*?(COURT|TRIBUNAL)[^\n]*)$", re.M)


def _order_sentences(text: str, count: int = 2) -> str:
    """The leading sentences of the order (or, failing that, of the last numbered paragraphs)."""
    marker = text.rfind("\nORDER")
    tail = text[marker:] if marker >= 0 else text[-2000:]
    sentences = re.findall(r"\d+\.\s+([^\n]+)", tail) or [tail.strip()]
    picked = " ".join(sentences[:count])
    return re.sub(r"\s+", " ", picked)[:600]


def extractive_headnote(text: str) -> str:
    """A headnote built from the judgment's own words: citation, court, parties, catchwords, held."""
    citation = _CITATION.search(text)
    parties = _PARTIES.search(text)
    catchwords = _CATCHWORDS.search(text)
    court = _COURT.search(text)
    lines = []
    head = " — ".join(
        part
        for part in (
            citation.group(1) if citation else None,
            court.group(1).strip().title() if court else None,
            f"{parties.group(1).strip()} v {parties.group(2).strip()}" if parties else None,
        )
        if part
    )
    if head:
        lines.append(head)
    if catchwords:
        lines.append(f"Catchwords: {catchwords.group(1).strip()}")
    lines.append(f"Held: {_order_sentences(text)}")
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
