"""Where records to embed come from, when not our own `court_cases`: one small protocol, one module
per source.

A source streams candidate records (id, text, metadata, a change marker) a bounded number of pages
per call, resuming from an opaque cursor, so a sensor tick does bounded work; records it cannot use
are reported with their key, never silently dropped. A source may write each record's outcome back
(its own status attribute), once the vector is stored. The ledger stays in Postgres whatever the
source.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol

MetadataValue = str | int | float | bool


@dataclass(frozen=True)
class SourceRecord:
    id: str
    """Stable id of the record in its source (e.g. the DynamoDB key, encoded)."""
    text: str
    metadata: Mapping[str, MetadataValue] = field(default_factory=dict)

    @property
    def change_marker(self) -> str:
        """sha256 of the text: a record whose marker is unchanged needs no new vector."""
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class SourceProblem:
    id: str
    """The record's id (its key), so its owner can find and fix it."""
    reason: str


@dataclass
class SourcePage:
    """What one bounded call read."""

    records: list[SourceRecord] = field(default_factory=list)
    problems: list[SourceProblem] = field(default_factory=list)
    cursor: str | None = None
    """Where the next call resumes; None once the scan has reached the end."""
    pages: int = 0
    scanned: int = 0
    throttled: bool = False
    """The source refused reads beyond its own retries: the call stopped early, the cursor resumes it."""


@dataclass(frozen=True)
class StatusUpdate:
    """A record's outcome, to write back: done (with the model) or failed (with the reason)."""

    id: str
    model: str | None = None
    error: str | None = None
    retryable: bool = False
    """With an error: a later run may succeed (the source marks it for another read)."""


@dataclass
class StatusReport:
    written: int = 0
    not_written: list[SourceProblem] = field(default_factory=list)
    """Updates the source refused or throttled beyond its retries: write them again later."""


class RecordSource(Protocol):
    name: str

    def scan(self, *, cursor: str | None = None, page_budget: int = 10) -> SourcePage:
        """Candidate records of at most `page_budget` pages from `cursor` (None: the beginning)."""
        ...

    def write_status(self, updates: Iterable[StatusUpdate], *, at: datetime | None = None) -> StatusReport:
        """Write each record's outcome back to the source."""
        ...
