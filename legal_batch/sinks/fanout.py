"""Several sinks at once (`LEGAL_BATCH_EMBEDDINGS_SINKS=pgvector,chroma`): a `ResultSink` for the ingest
that hands every result to the flow's own transactional sink and, in batches, to each further
(non-transactional) `VectorSink`.

Order: the further sinks are written while results are read, before the flow's sink finishes and
before the ledger commits; their ids are deterministic, so a crash between their write and the
commit is healed by running the ingest again. An item is done only when every sink has it: after
`finish()`, `rejected` maps the ledger item id of every chunk a further sink did not store to the
reason (naming the sink), for the ingest to leave those items retryable — the vector is stored in
the cache by then, so the retry does not pay the provider again.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import psycopg

from legal_batch.core.flow import Item, ResultSink
from legal_batch.providers.base import Result
from legal_batch.sinks.base import VectorRecord, VectorSink, chunk_metadata, split_vector_id

BATCH = 500


@dataclass(frozen=True)
class ChunkDetails:
    text: str
    chunk_type: str | None = None
    citation: str | None = None


Describe = Callable[[Sequence[str]], Mapping[str, ChunkDetails]]
"""Subject keys (`<case id>:<chunk index>`) → their chunk text, type and citation."""


def describe_case_chunks(conn: psycopg.Connection) -> Describe:
    """Chunk text and type from `case_chunks`, the citation from `court_cases` (on the search path)."""

    def describe(keys: Sequence[str]) -> Mapping[str, ChunkDetails]:
        pairs = [split_vector_id(key) for key in keys]
        rows = conn.execute(
            "SELECT c.case_id::text || ':' || c.chunk_index, c.chunk_text, c.chunk_type, k.neutral_citation"
            " FROM unnest(%s::uuid[], %s::int[]) AS w (case_id, chunk_index)"
            " JOIN case_chunks c USING (case_id, chunk_index) LEFT JOIN court_cases k ON k.id = c.case_id",
            ([p[0] for p in pairs], [p[1] for p in pairs])).fetchall()
        return {key: ChunkDetails(text, chunk_type, citation) for key, text, chunk_type, citation in rows}

    return describe


class FanOutSink:
    """See the module docstring. `primary` is the flow's own sink (its answers decide what the further
    sinks get); `sinks` are the further ones, written in batches of `batch`."""

    def __init__(self, primary: ResultSink, sinks: Sequence[VectorSink], *, model: str, describe: Describe,
                 batch: int = BATCH) -> None:
        self.primary = primary
        self.sinks = list(sinks)
        self.model = model
        self.describe = describe
        self.batch = batch
        self.rejected: dict[int, str] = {}
        self._pending: list[tuple[Item, np.ndarray]] = []

    def accept(self, item: Item, result: Result) -> str | None:
        reason = self.primary.accept(item, result)
        if reason is None and self.sinks:
            self._pending.append((item, np.array(result.vector, dtype=np.float32)))
            if len(self._pending) >= self.batch:
                self._flush()
        return reason

    def finish(self) -> int:
        self._flush()
        return self.primary.finish()

    def _flush(self) -> None:
        pending, self._pending = self._pending, []
        if not pending:
            return
        details = self.describe([item.subject_key for item, _ in pending])
        by_key = {item.subject_key: item for item, _ in pending}
        records = []
        for item, vector in pending:
            found = details.get(item.subject_key)
            if found is None:
                self.rejected[item.id] = f"{item.subject_key}: no chunk text to store with the vector"
                continue
            record_id, index = split_vector_id(item.subject_key)
            records.append(VectorRecord(record_id, index, vector, found.text, chunk_metadata(
                record_id=record_id, chunk_index=index, model=self.model, text=found.text,
                chunk_type=found.chunk_type, citation=found.citation)))
        for sink in self.sinks:
            try:
                failures = [(f.id, f.reason) for f in sink.upsert(records)]
            except Exception as exc:  # unreachable mid-ingest: every record of the batch, with the sink named
                text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                failures = [(record.id, f"{sink.where}: {text}") for record in records]
            for record_id, reason in failures:
                item = by_key.get(record_id)
                if item is not None:
                    self.rejected.setdefault(item.id, f"not stored in the {sink.name} sink: {reason}")

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
