"""Paragraph-aware chunking of judgments under a token budget (tiktoken `cl100k_base`).

Chunks are contiguous slices of the judgment (`text[char_start:char_end]`), cut at paragraph
boundaries where possible (blank-line, single-newline and CRLF layouts; see `core.segmentation`); a
paragraph longer than the budget is cut between sentences, and a sentence longer than the budget
between words (between characters in CJK text). Each chunk after the first starts with up to
`overlap_tokens` of the previous chunk's tail, from the first sentence start in it (else the first
word start): a chunk never starts or ends inside a word. A chunk holds one section of the judgment
(`chunk_type`: header, facts, issues, reasoning, order, footnotes, or body when nothing says which).

Bad input has an outcome, never an error: HTML or XML left in the text is read as what it marks up
(`core.markup`: tags and comments removed, `<p>` a paragraph break, `&amp;` an ampersand) — the
chunk's text is then its part of the judgment without the markup, and `char_start`/`char_end` still
locate it in the original; empty paragraphs and paragraphs without a letter or digit (`* * *`,
`—`) start no chunk; a text with no letter or digit at all has no chunks; a judgment of a few words
is one chunk; a paragraph or sentence of any length is cut at word ends in time linear in its length.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, replace
from functools import cached_property

from legal_batch.core.markup import plain_text
from legal_batch.core.segmentation import (
    SectionType,
    sections,
    sentence_start,
    sentences,
    word_end,
    word_start,
)
from legal_batch.core.tokens import encoding

ChunkType = SectionType


@dataclass(frozen=True)
class Chunk:
    """One chunk of a judgment, as stored in `case_chunks`."""

    chunk_index: int
    chunk_type: ChunkType
    text: str
    char_start: int
    char_end: int
    token_count: int

    @cached_property
    def sha256(self) -> str:
        """Of `text` (UTF-8), hex; computed once and pickled with the chunk (a worker process hashes)."""
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class _Unit:
    start: int
    end: int
    tokens: int
    section: ChunkType


def _units(text: str, max_tokens: int) -> Iterator[_Unit]:
    """Paragraphs with a letter or digit, any over `max_tokens` cut between sentences (or words)."""
    enc = encoding("cl100k_base")
    for start, end, section in sections(text):
        if not _has_word(text, start, end):
            continue
        tokens = len(enc.encode_ordinary(text[start:end]))
        if tokens <= max_tokens:
            yield _Unit(start, end, tokens, section)
            continue
        for piece_start, piece_end, piece_tokens in _sentence_groups(text, start, end, max_tokens):
            yield _Unit(piece_start, piece_end, piece_tokens, section)


def _sentence_groups(text: str, start: int, end: int, max_tokens: int) -> Iterator[tuple[int, int, int]]:
    """`text[start:end]` as consecutive runs of whole sentences of at most `max_tokens` tokens each; a
    sentence over the budget on its own is cut between words."""
    enc = encoding("cl100k_base")
    group_start: int | None = None
    group_end = group_tokens = 0
    for s, e in sentences(text, start, end):
        tokens = len(enc.encode_ordinary(text[s:e])) + 1  # + the break before it
        if group_start is not None and group_tokens + tokens > max_tokens:
            yield group_start, group_end, len(enc.encode_ordinary(text[group_start:group_end]))
            group_start = None
        if tokens > max_tokens:
            yield from _word_pieces(text, s, e, max_tokens)
            continue
        if group_start is None:
            group_start, group_tokens = s, 0
        group_end = e
        group_tokens += tokens
    if group_start is not None:
        yield group_start, group_end, len(enc.encode_ordinary(text[group_start:group_end]))


def _has_word(text: str, start: int, end: int) -> bool:
    return any(c.isalnum() for c in text[start:end])


def _word_pieces(text: str, start: int, end: int, max_tokens: int) -> Iterator[tuple[int, int, int]]:
    """`text[start:end]` cut into pieces of at most `max_tokens` tokens, each ending at a word end
    (any character boundary in CJK text; a token boundary inside a single giant "word").

    Each piece is found in a window of the text ahead (widened while it holds fewer than
    `max_tokens` tokens), so a sentence of any length costs time linear in its length."""
    enc = encoding("cl100k_base")
    pos = start
    window = max_tokens * 8
    while pos < end:
        stop = min(end, pos + window)
        tokens = enc.encode_ordinary(text[pos:stop])
        if len(tokens) <= max_tokens:
            if stop == end:
                yield pos, end, len(tokens)
                return
            window *= 2
            continue
        head = enc.decode_bytes(tokens[:max_tokens]).decode("utf-8", errors="ignore")
        cut = word_end(text, pos + max(len(head), 1), pos)
        yield pos, cut, len(enc.encode_ordinary(text[pos:cut]))
        pos = cut
        while pos < end and text[pos].isspace():
            pos += 1


def _tail_start(text: str, start: int, end: int, tokens: list[int], units: list[_Unit], overlap_tokens: int) -> int:
    """Where the last `overlap_tokens` of `tokens` (the tokens of `text[start:end]`, a chunk made of
    `units`) begin, moved on to the first sentence start after it (else the first word start)."""
    if overlap_tokens <= 0:
        return end
    if len(tokens) <= overlap_tokens:
        return start
    # bytes of the last `overlap_tokens` tokens → where they start in characters (cheaper than
    # decoding offsets for the whole piece)
    enc = encoding("cl100k_base")
    tail_bytes = len(enc.decode_bytes(tokens[-overlap_tokens:]))
    raw = text[start:end].encode("utf-8")
    tail = start + len(raw[: len(raw) - tail_bytes].decode("utf-8", errors="ignore"))
    sentence = _sentence_start(text, tail, end, units)
    return sentence if sentence is not None else word_start(text, tail, end)


def _sentence_start(text: str, pos: int, end: int, units: list[_Unit]) -> int | None:
    """The first sentence or paragraph start in `text[pos:end]`, found in the chunk's own units
    (paragraphs, or runs of whole sentences) where `pos` lies in them."""
    if not units or pos < units[0].start:
        return sentence_start(text, pos, end)  # in the chunk's own overlap: look the paragraphs up
    for n, unit in enumerate(units):
        if unit.start >= pos:
            return unit.start
        if unit.end <= pos:
            continue
        window = max(unit.start, pos - 300)
        if window > unit.start:
            space = text.find(" ", window, pos)
            window = space + 1 if space != -1 else window
        for s, _ in sentences(text, window, unit.end):
            if s >= pos:
                return s
        return units[n + 1].start if n + 1 < len(units) else None
    return None


def chunk_text(text: str, *, max_tokens: int = 512, overlap_tokens: int = 64) -> list[Chunk]:
    """Cut `text` into chunks of at most about `max_tokens` tokens, paragraph-aware, with overlap
    (none when it has no letter or digit; markup read as the module docstring says)."""
    if max_tokens <= overlap_tokens:
        raise ValueError(f"max_tokens ({max_tokens}) must exceed overlap_tokens ({overlap_tokens})")
    plain = plain_text(text)
    chunks = _chunks(plain.text, max_tokens=max_tokens, overlap_tokens=overlap_tokens)
    if not plain.changed:
        return chunks
    return [replace(chunk, char_start=plain.original_start(chunk.char_start),
                    char_end=plain.original_end(chunk.char_end)) for chunk in chunks]


def _chunks(text: str, *, max_tokens: int, overlap_tokens: int) -> list[Chunk]:
    enc = encoding("cl100k_base")
    chunks: list[Chunk] = []
    group: list[_Unit] = []
    budget = max_tokens
    last_tokens: list[int] = []
    last_units: list[_Unit] = []
    """The tokens and units of the last chunk made (its tail starts the next one)."""

    def flush() -> None:
        nonlocal group, budget, last_tokens, last_units
        if not group:
            return
        start = group[0].start
        if chunks and overlap_tokens:
            start = min(start, _tail_start(text, chunks[-1].char_start, chunks[-1].char_end, last_tokens,
                                           last_units, overlap_tokens))
        end = group[-1].end
        body = text[start:end]
        last_tokens = enc.encode_ordinary(body)
        chunks.append(
            Chunk(
                chunk_index=len(chunks),
                chunk_type=group[0].section,
                text=body,
                char_start=start,
                char_end=end,
                token_count=len(last_tokens),
            )
        )
        last_units, group = group, []
        budget = max_tokens - overlap_tokens

    for unit in _units(text, max_tokens - overlap_tokens):
        if group and (sum(u.tokens for u in group) + unit.tokens > budget or unit.section != group[-1].section):
            flush()
        group.append(unit)
    flush()
    return chunks
