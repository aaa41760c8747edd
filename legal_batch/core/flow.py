"""What a flow (embeddings, headnotes, template) tells the shared batch machinery.

A flow names its candidates (SQL), turns a shard's items into requests, and accepts results into
its sink. Everything else — shards, files, submit, poll, download, ingest, the ledger — is shared.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol

import psycopg

from legal_batch.providers.base import Endpoint, Request, Result


@dataclass(frozen=True)
class Item:
    """A ledger item of the shard being ingested."""

    id: int
    subject_key: str
    custom_id: str


class Permanent(str):
    """A rejection reason that asking again with the same request cannot fix: the item fails at once
    (with the reason) instead of being retried."""


class ResultSink(Protocol):
    """Receives a shard's valid results inside the ingest transaction."""

    def accept(self, item: Item, result: Result) -> str | None:
        """Take the result, or return why it is unusable: the item is retried, or failed at once when
        the reason is `Permanent`."""
        ...

    def finish(self) -> int:
        """Write what was accepted (same transaction); return the number of result rows written."""
        ...

    def settle(self, job_id: int) -> None:
        """After the shard's items are closed (same transaction): copy the results to further stores,
        if the flow has any, and reopen the items a store did not take."""
        ...


class Flow(Protocol):
    name: str
    endpoint: Endpoint

    def candidate_sql(self) -> tuple[str, dict]:
        """SQL selecting `subject_key, custom_id, tokens, size_bytes` of every candidate, and params."""
        ...

    def job_params(self) -> dict:
        """The per-run options (JSON) the shard's requests and results depend on — e.g. overwrite
        and its cut-off. Stored on every job row it plans (`batch_jobs.params`); the process that
        writes, submits or ingests the shard later builds the flow from them, never from its own
        settings or environment."""
        ...

    def requests(self, conn: psycopg.Connection, job_id: int) -> Iterator[Request]:
        """The requests of a shard's items, streamed."""
        ...

    def sink(self, conn: psycopg.Connection, *, model: str) -> ResultSink: ...
