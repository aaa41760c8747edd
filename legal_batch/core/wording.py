"""Small helpers for the sentences the CLI and the assets print."""

from __future__ import annotations


def plural(count: int, noun: str, nouns: str | None = None) -> str:
    """`1 job`, `0 jobs`, `2 jobs`; an irregular plural goes in `nouns` (`plural(n, "entry", "entries")`)."""
    return f"{count} {noun if count == 1 else nouns or noun + 's'}"
