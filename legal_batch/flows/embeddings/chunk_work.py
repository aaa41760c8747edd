"""The CPU part of chunking one case, run in a chunking worker process (`core.chunk_pool`): hash its
text and headnote, and chunk what changed. Pure: the main process reads the rows, sends `CaseText`s
and writes what comes back (`flow.sync_chunks`); a worker imports only this and `core.chunking`.
"""

from __future__ import annotations

from dataclasses import dataclass

from legal_batch.core.chunking import Chunk, chunk_text
from legal_batch.core.user_tables import text_sha256

HEADNOTE_CHUNK = "headnote"
"""`chunk_type` of the chunks made from a case's headnote (after the judgment's own chunks)."""


@dataclass(frozen=True)
class CaseText:
    """A case to chunk, with what was recorded when it was last chunked (`chunked_cases`)."""

    case_id: str
    text: str | None
    headnote: str | None
    seen: bool
    """Chunked before."""
    old_text_sha256: str | None
    old_headnote_sha256: str | None
    max_tokens: int
    overlap_tokens: int

    @property
    def recorded(self) -> tuple[bool, str | None, str | None]:
        return self.seen, self.old_text_sha256, self.old_headnote_sha256


@dataclass(frozen=True)
class PreparedCase:
    """What chunking a `CaseText` gave; `recorded` is what it was decided against."""

    case_id: str
    recorded: tuple[bool, str | None, str | None]
    text_sha256: str
    headnote_sha256: str | None
    reason: str | None
    """Why the text cannot be embedded (empty, NUL characters, no words), else None."""
    body: list[Chunk] | None
    """The judgment's chunks; None when its text is unchanged (only the headnote changed) or unusable."""
    headnote: list[Chunk]
    """The headnote's chunks, numbered from 0 (`numbered` puts them after the body)."""

    @property
    def unchanged(self) -> bool:
        seen, old_text, old_headnote = self.recorded
        return seen and self.text_sha256 == old_text and self.headnote_sha256 == old_headnote


def headnote_sha256(headnote: str | None) -> str | None:
    """The hash recorded for a case's headnote: None when it has none (or only blanks)."""
    return text_sha256(headnote) if headnote is not None and headnote.strip() else None


def unusable(text: str | None) -> str | None:
    if text is None or not text.strip():
        return "full_text is empty"
    if "\x00" in text:
        return f"full_text contains a NUL character at offset {text.index(chr(0))}"
    return None


def prepare_case(case: CaseText) -> PreparedCase:
    """Hash the case's text and headnote; chunk the judgment if it is new or changed and usable, and
    the headnote if it has one. Chunk hashes are computed here too (they travel with the chunks)."""
    text_sha, note_sha = text_sha256(case.text), headnote_sha256(case.headnote)
    prepared = PreparedCase(case.case_id, case.recorded, text_sha, note_sha, None, None, [])
    if prepared.unchanged:
        return prepared
    reason = unusable(case.text)
    body: list[Chunk] | None = None
    if reason is None and not (case.seen and text_sha == case.old_text_sha256):
        body = chunk_text(case.text or "", max_tokens=case.max_tokens, overlap_tokens=case.overlap_tokens)
        if not body:
            reason, body = "full_text has no words to embed", None
    headnote: list[Chunk] = []
    if reason is None and note_sha is not None and case.headnote is not None:
        headnote = numbered(chunk_text(case.headnote, max_tokens=case.max_tokens, overlap_tokens=0), start=0)
    for piece in (*(body or ()), *headnote):
        _ = piece.sha256
    return PreparedCase(case.case_id, case.recorded, text_sha, note_sha, reason, body, headnote)


def numbered(pieces: list[Chunk], *, start: int) -> list[Chunk]:
    """Headnote pieces as chunks of type `headnote`, numbered from `start` (offsets are in the headnote)."""
    return [Chunk(start + n, HEADNOTE_CHUNK, p.text, p.char_start, p.char_end, p.token_count)
            for n, p in enumerate(pieces)]
