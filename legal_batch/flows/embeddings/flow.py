"""The embeddings flow's own logic: chunk judgments, name candidate chunks, request lines, and the
pgvector sink (binary COPY through a staging table, then upsert), overlapped with parsing."""

from __future__ import annotations

import math
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import psycopg

from legal_batch.core import ledger
from legal_batch.core.chunking import chunk_text
from legal_batch.core.flow import Item
from legal_batch.providers.base import EmbeddingRequest, Endpoint, Request, Result

FLOW = "embeddings"
_CHUNK_LOCK = 0x4C42_0C4B  # advisory lock key: "chunking court_cases for embeddings"
_COPY_BATCH = 2_000
_QUEUED = 2


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

    A case whose text is empty or contains NUL characters gets a failed ledger item with the reason.
    Concurrent chunkers (two runs at once) take turns per batch under an advisory lock, so a case is
    chunked once."""
    cases = chunks = rejected = 0
    while limit_cases is None or cases < limit_cases:
        take = batch_cases if limit_cases is None else min(batch_cases, limit_cases - cases)
        with conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_CHUNK_LOCK,))
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
            with conn.cursor().copy(
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

    def job_params(self) -> dict:
        return {"dimensions": self.dimensions}

    @classmethod
    def for_job(cls, *, model: str, params: dict) -> EmbeddingsFlow:
        """The flow a shard was planned with (`job_params` as stored on its job row)."""
        return cls(model=model, dimensions=int(params["dimensions"]))

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
    """Validates vectors and writes them with binary COPY, `_COPY_BATCH` rows at a time, in a writer
    thread so that database work overlaps result parsing.

    Accepted vectors are copied into a float32 block; the writer encodes a whole block as binary COPY
    tuples with numpy (no per-row Python work) and, when none of the block's keys has a row yet (the
    usual first ingest), COPYs it straight into `case_embeddings`; otherwise into a staging table
    followed by an upsert, so re-ingest stays an upsert. Nothing else may write the same keys in the
    meantime (the ledger gives each chunk to one open job): a concurrent writer of the same key would
    make the COPY fail with a unique violation, rolling back the whole ingest, never half of it.
    Memory: at most `_QUEUED + 2` blocks of `_COPY_BATCH` vectors (about 8 MB each at 1024 dims) and
    the COPY stream being sent (the same size), whatever the size of the output file."""

    def __init__(self, conn: psycopg.Connection, *, model: str, dimensions: int) -> None:
        self.conn = conn
        self.model = model
        self.dimensions = dimensions
        self.rows = 0
        self._block = self._new_block()
        self._case_ids: list[str] = []
        self._chunk_indexes: list[int] = []
        self._queue: queue.Queue[tuple[np.ndarray, list[str], list[int]] | None] = queue.Queue(maxsize=_QUEUED)
        self._spare: queue.SimpleQueue[np.ndarray] = queue.SimpleQueue()
        self._error: BaseException | None = None
        conn.execute(
            "CREATE TEMP TABLE IF NOT EXISTS stage_embeddings (case_id uuid, chunk_index int,"
            f" embedding vector({dimensions})) ON COMMIT DROP"
        )
        self._thread = threading.Thread(target=self._write, name="embedding-writer", daemon=True)
        self._thread.start()

    def _new_block(self) -> np.ndarray:
        return np.empty((_COPY_BATCH, self.dimensions), dtype=np.float32)

    def accept(self, item: Item, result: Result) -> str | None:
        vector = result.vector
        if vector is None:
            return "result has no vector"
        if vector.ndim != 1 or vector.shape[0] != self.dimensions:
            return f"vector has {vector.shape[0] if vector.ndim == 1 else vector.shape} components, expected {self.dimensions}"
        energy = float(np.dot(vector, vector))  # one pass; NaN, inf, zeros (or an overflow) fail the test
        if not 0.0 < energy < math.inf:
            if not np.isfinite(vector).all():
                return "vector contains NaN or infinite components"
            if not vector.any():
                return "vector is all zeros"
        case_id, _, chunk_index = item.subject_key.partition(":")
        row = len(self._case_ids)
        self._block[row] = vector
        self._chunk_indexes.append(int(chunk_index))
        self._case_ids.append(case_id)
        if row + 1 >= _COPY_BATCH:
            self._hand_over()
        return None

    def _hand_over(self) -> None:
        if self._error is not None:
            raise RuntimeError(f"writing embeddings failed: {self._error}") from self._error
        self._queue.put((self._block, self._case_ids, self._chunk_indexes))
        try:
            self._block = self._spare.get_nowait()
        except queue.Empty:
            self._block = self._new_block()
        self._case_ids, self._chunk_indexes = [], []

    def _write(self) -> None:
        try:
            while (batch := self._queue.get()) is not None:
                block, case_ids, chunk_indexes = batch
                with self.conn.cursor() as cur:
                    if self._any_exists(cur, case_ids, chunk_indexes):
                        self._copy(cur, "stage_embeddings", block, case_ids, chunk_indexes, model=None)
                        cur.execute(
                            "INSERT INTO case_embeddings (case_id, chunk_index, model, embedding)"
                            " SELECT case_id, chunk_index, %s, embedding FROM stage_embeddings"
                            " ON CONFLICT (case_id, chunk_index, model) DO UPDATE"
                            " SET embedding = excluded.embedding, created_at = now()",
                            (self.model,),
                        )
                        self.rows += cur.rowcount
                        cur.execute("TRUNCATE stage_embeddings")
                    else:
                        self.rows += self._copy(cur, "case_embeddings", block, case_ids, chunk_indexes,
                                                model=self.model)
                self._spare.put(block)
        except BaseException as exc:  # surfaced to the caller in accept() or finish()
            self._error = exc
            while self._queue.get() is not None:
                pass

    def _any_exists(self, cur: psycopg.Cursor, case_ids: list[str], chunk_indexes: list[int]) -> bool:
        return bool(cur.execute(
            "SELECT EXISTS (SELECT 1 FROM case_embeddings e"
            " JOIN unnest(%s::uuid[], %s::int[]) AS k (case_id, chunk_index) USING (case_id, chunk_index)"
            " WHERE e.model = %s)",
            (case_ids, chunk_indexes, self.model),
        ).fetchone()[0])

    @staticmethod
    def _copy(cur: psycopg.Cursor, table: str, block: np.ndarray, case_ids: list[str], chunk_indexes: list[int],
              *, model: str | None) -> int:
        columns = "case_id, chunk_index, embedding" if model is None else "case_id, chunk_index, model, embedding"
        with cur.copy(f"COPY {table} ({columns}) FROM STDIN WITH (FORMAT BINARY)") as copy:
            copy.write(binary_copy_data(case_ids, chunk_indexes, block[: len(case_ids)], model=model))
        return cur.rowcount

    def finish(self) -> int:
        if self._case_ids:
            self._hand_over()
        self._queue.put(None)
        self._thread.join()
        if self._error is not None:
            raise RuntimeError(f"writing embeddings failed: {self._error}") from self._error
        return self.rows


_COPY_SIGNATURE = b"PGCOPY\n\xff\r\n\x00" + bytes(8)  # signature, flags, header extension length
_COPY_TRAILER = b"\xff\xff"


def binary_copy_data(case_ids: list[str], chunk_indexes: list[int], vectors: np.ndarray, *,
                     model: str | None = None) -> memoryview:
    """A whole `COPY ... (case_id, chunk_index[, model], embedding) FROM STDIN WITH (FORMAT BINARY)`
    stream (header, tuples, trailer) built with numpy in one buffer: no Python work per row.

    `case_ids` are canonical uuid strings, `vectors` a (rows, dims) array (cast to float32, as
    pgvector stores them). The `vector` wire format is dims (uint16), 0 (uint16), then the floats, all
    big-endian."""
    rows, dims = vectors.shape
    if len(case_ids) != rows or len(chunk_indexes) != rows:
        raise ValueError(f"{len(case_ids)} case ids and {len(chunk_indexes)} chunk indexes for {rows} vectors")
    uuids = bytes.fromhex("".join(case_ids).replace("-", ""))
    if len(uuids) != 16 * rows:
        raise ValueError(f"case ids are not canonical uuids: {case_ids[:3]}...")
    name = b"" if model is None else model.encode()
    fields: list[tuple] = [("fields", ">i2"), ("uuid_len", ">i4"), ("uuid", "V16"), ("index_len", ">i4"),
                           ("index", ">i4")]
    if model is not None:
        fields += [("model_len", ">i4"), ("model", f"S{len(name)}")] if name else [("model_len", ">i4")]
    fields += [("vector_len", ">i4"), ("dims", ">u2"), ("unused", ">u2"), ("vector", ">f4", (dims,))]
    row = np.dtype(fields)
    stream = np.empty(len(_COPY_SIGNATURE) + rows * row.itemsize + len(_COPY_TRAILER), dtype=np.uint8)
    stream[: len(_COPY_SIGNATURE)] = np.frombuffer(_COPY_SIGNATURE, dtype=np.uint8)
    stream[len(stream) - len(_COPY_TRAILER):] = np.frombuffer(_COPY_TRAILER, dtype=np.uint8)
    tuples = stream[len(_COPY_SIGNATURE): len(stream) - len(_COPY_TRAILER)].view(row)
    tuples["fields"] = 3 if model is None else 4
    tuples["uuid_len"] = 16
    tuples["uuid"] = np.frombuffer(uuids, dtype="V16")
    tuples["index_len"] = 4
    tuples["index"] = chunk_indexes
    if model is not None:
        tuples["model_len"] = len(name)
        if name:
            tuples["model"] = name
    tuples["vector_len"] = 4 + 4 * dims
    tuples["dims"] = dims
    tuples["unused"] = 0
    tuples["vector"] = vectors
    return memoryview(stream)


DONE_WITHOUT_RESULT_SQL = (
    "SELECT i.subject_key FROM batch_items i JOIN batch_jobs j ON j.id = i.job_id"
    " WHERE i.flow = 'embeddings' AND i.state = 'done' AND NOT EXISTS (SELECT 1 FROM case_embeddings e"
    "  WHERE e.case_id = split_part(i.subject_key, ':', 1)::uuid"
    "  AND e.chunk_index = split_part(i.subject_key, ':', 2)::int AND e.model = j.model)"
)


HNSW_INDEX = "case_embeddings_hnsw"
HNSW_INDEX_SQL = (
    f"CREATE INDEX IF NOT EXISTS {HNSW_INDEX} ON case_embeddings"
    " USING hnsw (embedding vector_cosine_ops) WITH (m = 16, ef_construction = 64)"
)


def ensure_vector_index(conn: psycopg.Connection, *, maintenance_work_mem: str = "1GB") -> float | None:
    """Build the HNSW cosine index once no embedding shard is in flight; seconds taken, or None when
    it already exists or loads are still running.

    Inserting into an existing HNSW index costs a graph search per row (measured here: ~80 vectors/s
    against ~7,000/s without it), so bulk loads go in first and the index is built once, with a large
    `maintenance_work_mem` (114 s instead of 456 s for 50K vectors). Later small increments are
    maintained by the index as usual."""
    exists = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (HNSW_INDEX,)).fetchone()[0]
    if exists:
        return None
    open_jobs = conn.execute(
        "SELECT count(*) FROM batch_jobs WHERE flow = %s AND state NOT IN ('ingested', 'failed', 'cancelled')",
        (FLOW,)).fetchone()[0]
    if open_jobs:
        return None
    started = time.monotonic()
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(hashtext('legal_batch:hnsw'))")
        conn.execute(f"SET LOCAL maintenance_work_mem = '{maintenance_work_mem}'")
        conn.execute(HNSW_INDEX_SQL)
    return time.monotonic() - started
