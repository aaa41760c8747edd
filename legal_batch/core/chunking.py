"""Paragraph-aware chunking of judgments under a token budget (tiktoken `cl100k_base`).

Chunks are contiguous slices of the judgment (`text[char_start:char_end]`), cut at paragraph
boundaries where possible; a paragraph longer than the budget is cut at token boundaries. Each
chunk after the first starts with up to `overlap_tokens` of the previous chunk's tail.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

from legal_batch.core.tokens import encoding

ChunkType = Literal["header", "facts", "reasoning", "order", "body"]

_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n+")
_HEADING = re.compile(r"^[A-Z][A-Z0-9 ,.'&()\-:]{2,80}$")
_SENTENCE_START = re.compile(r"[.!?;:]\s+(\S)")
_NUMBERED = re.compile(r"^\d{1,4}\.\s")
_SECTION_TYPES: tuple[tuple[re.Pattern[str], ChunkType], ...] = (
    (re.compile(r"\b(ORDER|ORDERS|DISPOSITION|CONCLUSION|COSTS|SENTENCE|RESULT)\b"), "order"),
    (re.compile(r"\b(FACTS|BACKGROUND|EVIDENCE|HISTORY|CIRCUMSTANCES)\b"), "facts"),
    (
        re.compile(r"\b(DISCUSSION|ANALYSIS|REASONS|REASONING|ISSUES?|LAW|GROUNDS?|SUBMISSIONS|APPEAL|DECISION)\b"),
        "reasoning",
    ),
)


@dataclass(frozen=True)
class Chunk:
    """One chunk of a judgment, as stored in `case_chunks`."""

    chunk_index: int
    chunk_type: ChunkType
    text: str
    char_start: int
    char_end: int
    token_count: int

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class _Unit:
    start: int
    end: int
    tokens: int
    section: ChunkType


def _paragraphs(text: str) -> Iterator[tuple[int, int]]:
    pos = 0
    for match in _PARAGRAPH_BREAK.finditer(text):
        if match.start() > pos:
            yield pos, match.start()
        pos = match.end()
    if pos < len(text):
        yield pos, len(text)


_JUDGMENT_START = re.compile(r"^(JUDGMENT|REASONS FOR (JUDGMENT|DECISION|VERDICT|SENTENCE)|DECISION|RULING)$")


def _section_of(paragraph: str, current: ChunkType, started: bool) -> tuple[ChunkType, bool]:
    """(section of this paragraph, whether the body has started).

    Everything before the body (court, parties, coram, citation) is the header; the body starts at a
    `JUDGMENT`-style heading or the first numbered paragraph. In the body a heading names the section."""
    line = paragraph.strip()
    is_heading = bool(_HEADING.match(line))
    if not started:
        if is_heading and _JUDGMENT_START.match(line):
            return "header", True
        if not _NUMBERED.match(line):
            return "header", False
        started = True
        current = "body"
    if is_heading:
        for pattern, kind in _SECTION_TYPES:
            if pattern.search(line):
                return kind, started
        return "body", started
    return current, started


def _units(text: str, max_tokens: int) -> Iterator[_Unit]:
    """Paragraphs, with any paragraph over `max_tokens` cut at token boundaries."""
    enc = encoding("cl100k_base")
    section: ChunkType = "header"
    started = False
    for start, end in _paragraphs(text):
        paragraph = text[start:end]
        section, started = _section_of(paragraph, section, started)
        tokens = enc.encode_ordinary(paragraph)
        if len(tokens) <= max_tokens:
            yield _Unit(start, end, len(tokens), section)
            continue
        offsets = _token_char_offsets(paragraph, tokens)
        for i in range(0, len(tokens), max_tokens):
            piece_start = start + offsets[i]
            piece_end = start + offsets[i + max_tokens] if i + max_tokens < len(tokens) else end
            if piece_end > piece_start:
                yield _Unit(piece_start, piece_end, min(max_tokens, len(tokens) - i), section)


def _token_char_offsets(paragraph: str, tokens: list[int]) -> list[int]:
    """Character offset where each token starts (a token inside a multi-byte char maps to that char)."""
    enc = encoding("cl100k_base")
    _, offsets = enc.decode_with_offsets(tokens)
    return [min(o, len(paragraph)) for o in offsets]


def _tail_start(text: str, start: int, end: int, overlap_tokens: int) -> int:
    """Where the last `overlap_tokens` tokens of `text[start:end]` begin."""
    if overlap_tokens <= 0:
        return end
    piece = text[start:end]
    enc = encoding("cl100k_base")
    tokens = enc.encode_ordinary(piece)
    if len(tokens) <= overlap_tokens:
        return start
    # bytes of the last `overlap_tokens` tokens → where they start in characters (cheaper than
    # decoding offsets for the whole piece)
    tail_bytes = sum(len(enc.decode_single_token_bytes(t)) for t in tokens[-overlap_tokens:])
    raw = piece.encode("utf-8")
    tail = start + len(raw[: len(raw) - tail_bytes].decode("utf-8", errors="ignore"))
    sentence = _SENTENCE_START.search(text, tail, end)
    return sentence.start(1) if sentence else tail


def chunk_text(text: str, *, max_tokens: int = 512, overlap_tokens: int = 64) -> list[Chunk]:
    """Cut `text` into chunks of at most about `max_tokens` tokens, paragraph-aware, with overlap."""
    if max_tokens <= overlap_tokens:
        raise ValueError(f"max_tokens ({max_tokens}) must exceed overlap_tokens ({overlap_tokens})")
    enc = encoding("cl100k_base")
    chunks: list[Chunk] = []
    group: list[_Unit] = []
    budget = max_tokens

    def flush() -> None:
        nonlocal group, budget
        if not group:
            return
        start = group[0].start
        if chunks and overlap_tokens:
            start = min(start, _tail_start(text, chunks[-1].char_start, chunks[-1].char_end, overlap_tokens))
        end = group[-1].end
        body = text[start:end]
        chunks.append(
            Chunk(
                chunk_index=len(chunks),
                chunk_type=group[0].section,
                text=body,
                char_start=start,
                char_end=end,
                token_count=len(enc.encode_ordinary(body)),
            )
        )
        group = []
        budget = max_tokens - overlap_tokens

    for unit in _units(text, max_tokens - overlap_tokens):
        if group and (sum(u.tokens for u in group) + unit.tokens > budget or unit.section != group[-1].section):
            flush()
        group.append(unit)
    flush()
    return chunks
