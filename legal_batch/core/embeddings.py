"""The embeddings flow's own logic: chunk judgments, name candidate chunks, request lines, and the
pgvector sink (binary COPY through a staging table, then upsert), overlapped with parsing."""

from __future__ import annotations

import queue
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import psycopg

from legal_batch.core import ledger
from legal_batch.core.chunking import chunk_text
from legal_batch.core.flow import Item
from legal_batch.providers.base import EmbeddingRequest, Endpoint, Request, Result

FLOW = "embeddings"
_COPY_BATCH = 2_000


@dataclass(frozen=True)
class ChunkSync:
    cases: int
    chunks: int
    rejected: int


def case_subject(case_id: str) -> str:
    return f"case:{case_id}"


def sync_chunks(conn: psycopg.Connection, *, max_tokens: int, overlap_tokens: int, limit_cases: int | None = None,
                batch_cases: int = 200, on_progress: Callable[[int], None] | None = None) -> ChunkSync:
    """Chunk every case that has no chunks yet (and no recorded failure), committing per batch.

    A case whose text is empty or contains NUL characters gets a failed ledger item with the reason."""
    cases = chunks = rejected = 0
    while limit_cases is None or cases < limit_cases:
        take = batch_cases if limit_cases is None else min(batch_cases, limit_cases - cases)
        rows = conn.execute(
            "SELECT k.id::text, k.full_text FROM court_cases k"
            " WHERE NOT EXISTS (SELECT 1 FROM case_chunks c WHERE c.case_id = k.id)"
            "   AND NOT EXISTS (SELECT 1 FROM batch_items i WHERE i.flow = %s AND i.subject_key = 'case:' || k.id"
            "                   AND i.state = 'failed')"
            " ORDER BY k.id LIMIT %s",
            (FLOW, take),
        ).fetchall()
        if not rows:
            break
        failures: list[tuple[str, str]] = []
        with conn.transaction(), conn.cursor().copy(
            "COPY case_chunks (case_id, chunk_index, chunk_type, chunk_text, char_start, char_end, token_count,"
            " text_sha256) FROM STDIN"
        ) as copy:
            for case_id, text in rows:
                reason = _unusable(text)
                pieces = [] if reason else chunk_text(text, max_tokens=max_tokens, overlap_tokens=overlap_tokens)
                if not reason and not pieces:
                    reason = "full_text has no words to embed"
                if reason:
                    failures.append((case_subject(case_id), f"court_cases.id={case_id}: {reason}; fix the text "
                                     "and delete this batch_items row to retry"))
                    continue
                for piece in pieces:
                    copy.write_row((case_id, piece.chunk_index, piece.chunk_type, piece.text, piece.char_start,
                                    piece.char_end, piece.token_count, piece.sha256))
                chunks += len(pieces)
        if failures:
            with conn.transaction():
                rejected += ledger.record_failed_subjects(conn, FLOW, failures)
        cases += len(rows)
        if on_progress is not None:
            on_progress(len(rows))
    return ChunkSync(cases, chunks, rejected)


def _unusable(text: str | None) -> str | None:
    if text is None or not text.strip():
        return "full_text is empty"
    if "\x00" in text:
        return f"full_text contains a NUL character at offset {text.index(chr(0))}"
    return None


class EmbeddingsFlow:
    """Subjects are chunks (`<case_id>:<chunk_index>`), results are rows of `case_embeddings`."""

    name = FLOW
    endpoint: Endpoint = "embeddings"

    def __init__(self, *, model: str, dimensions: int = 1024, limit_cases: int | None = None) -> None:
        self.model = model
        self.dimensions = dimensions
        self.limit_cases = limit_cases

    def candidate_sql(self) -> tuple[str, dict]:
        sql = (
            "SELECT c.case_id::text || ':' || c.chunk_index, 'chunk-' || c.case_id || '-' || c.chunk_index,"
            "       c.token_count, octet_length(c.chunk_text) + 300"
            " FROM case_chunks c"
            " WHERE NOT EXISTS (SELECT 1 FROM case_embeddings e WHERE e.case_id = c.case_id"
            "                   AND e.chunk_index = c.chunk_index AND e.model = %(model)s)"
            "   AND NOT EXISTS (SELECT 1 FROM batch_items i WHERE i.flow = %(flow)s"
            "                   AND i.subject_key = c.case_id::text || ':' || c.chunk_index"
            "                   AND i.state IN ('exported', 'submitted', 'failed'))"
        )
        if self.limit_cases is not None:
            sql += " AND c.case_id IN (SELECT id FROM court_cases ORDER BY id LIMIT %(limit)s)"
        sql += " ORDER BY c.case_id, c.chunk_index"
        return sql, {"model": self.model, "flow": FLOW, "limit": self.limit_cases}

    def requests(self, conn: psycopg.Connection, job_id: int) -> Iterator[Request]:
        with conn.cursor(name=f"requests_{job_id}") as cur:
            cur.itersize = 2_000
            cur.execute(
                "SELECT i.custom_id, c.chunk_text FROM batch_items i JOIN case_chunks c"
                "  ON c.case_id = split_part(i.subject_key, ':', 1)::uuid"
                " AND c.chunk_index = split_part(i.subject_key, ':', 2)::int"
                " WHERE i.job_id = %s AND i.state IN ('exported', 'submitted') ORDER BY i.id",
                (job_id,),
            )
            for custom_id, text in cur:
                yield EmbeddingRequest(custom_id, text)

    def sink(self, conn: psycopg.Connection, *, model: str) -> EmbeddingSink:
        return EmbeddingSink(conn, model=model, dimensions=self.dimensions)


class EmbeddingSink:
    """Validates vectors and writes them with binary COPY into a staging table, upserting every
    `_COPY_BATCH` rows, in a writer thread so that database work overlaps result parsing."""

    def __init__(self, conn: psycopg.Connection, *, model: str, dimensions: int) -> None:
        self.conn = conn
        self.model = model
        self.dimensions = dimensions
        self.rows = 0
        self._batch: list[tuple[uuid.UUID, int, np.ndarray]] = []
        self._queue: queue.Queue[list | None] = queue.Queue(maxsize=4)
        self._error: BaseException | None = None
        conn.execute(
            "CREATE TEMP TABLE IF NOT EXISTS stage_embeddings (case_id uuid, chunk_index int,"
            f" embedding vector({dimensions})) ON COMMIT DROP"
        )
        self._thread = threading.Thread(target=self._write, name="embedding-writer", daemon=True)
        self._thread.start()

    def accept(self, item: Item, result: Result) -> str | None:
        vector = result.vector
        if vector is None:
            return "result has no vector"
        if vector.ndim != 1 or vector.shape[0] != self.dimensions:
            return f"vector has {vector.shape[0] if vector.ndim == 1 else vector.shape} components, expected {self.dimensions}"
        if not np.isfinite(vector).all():
            return "vector contains NaN or infinite components"
        if not vector.any():
            return "vector is all zeros"
        case_id, _, chunk_index = item.subject_key.partition(":")
        self._batch.append((uuid.UUID(case_id), int(chunk_index), vector))
        if len(self._batch) >= _COPY_BATCH:
            self._hand_over()
        return None

    def _hand_over(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"writing embeddings failed: {self._error}") from self._error
        self._queue.put(self._batch)
        self._batch = []

    def _write(self) -> None:
        try:
            while (batch := self._queue.get()) is not None:
                with self.conn.cursor() as cur:
                    with cur.copy("COPY stage_embeddings (case_id, chunk_index, embedding) FROM STDIN"
                                  " WITH (FORMAT BINARY)") as copy:
                        copy.set_types(["uuid", "int4", "vector"])
                        for row in batch:
                            copy.write_row(row)
                    cur.execute(
                        "INSERT INTO case_embeddings (case_id, chunk_index, model, embedding)"
                        " SELECT case_id, chunk_index, %s, embedding FROM stage_embeddings"
                        " ON CONFLICT (case_id, chunk_index, model) DO UPDATE"
                        " SET embedding = excluded.embedding, created_at = now()",
                        (self.model,),
                    )
                    self.rows += cur.rowcount
                    cur.execute("TRUNCATE stage_embeddings")
        except BaseException as exc:  # surfaced to the caller in finish()
            self._error = exc
            while self._queue.get() is not None:
                pass

    def finish(self) -> int:
        if self._batch:
            self._hand_over()
        self._queue.put(None)
        self._thread.join()
        if self._error is not None:
            raise RuntimeError(f"writing embeddings failed: {self._error}") from self._error
        return self.rows


DONE_WITHOUT_RESULT_SQL = (
    "SELECT i.subject_key FROM batch_items i JOIN batch_jobs j ON j.id = i.job_id"
    " WHERE i.flow = 'embeddings' AND i.state = 'done' AND NOT EXISTS (SELECT 1 FROM case_embeddings e"
    "  WHERE e.case_id = split_part(i.subject_key, ':', 1)::uuid"
    "  AND e.chunk_index = split_part(i.subject_key, ':', 2)::int AND e.model = j.model)"
)
