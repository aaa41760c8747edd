"""The pgvector sink: `case_embeddings(case_id, chunk_index, model, embedding vector(N))` in the ledger's
own Postgres, written inside the caller's transaction (so it commits or rolls back with the ledger).

Writes are what the embeddings flow's ingest does: a block of vectors is sent with binary COPY
(`binary_copy_data`, no Python work per row) into a session staging table, then upserted on
(case_id, chunk_index, model), so writing a chunk again replaces its vector (and, where the table has a
`text_sha256` column, the hash of the text it encodes, from the record's metadata). Each `upsert` call runs
in a savepoint: a block Postgres refuses (e.g. a chunk with no `case_chunks` row) is reported for
each of its records and leaves the rest of the caller's transaction intact. The chunk text and the
case's citation stay in `case_chunks` and `court_cases`; search joins them back.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING

import numpy as np
import psycopg
from psycopg import sql

from legal_batch.core.vector_copy import binary_copy_data
from legal_batch.sinks.base import (
    DimensionMismatch,
    SearchHit,
    SinkError,
    VectorRecord,
    WriteFailure,
    as_array,
    batches,
    screen,
    split_vector_id,
    vector_id,
)

if TYPE_CHECKING:
    from legal_batch.settings import Settings

TRANSACTIONAL = True
DEFAULT_TABLE = "case_embeddings"
_BLOCK = 2_000


def target(*, model: str, dimensions: int, settings: Settings) -> str:
    """What the sink writes to, known without connecting."""
    return getattr(settings, "embeddings_table", None) or DEFAULT_TABLE


def open_sink(*, model: str, dimensions: int, settings: Settings, conn: psycopg.Connection | None = None
              ) -> PgvectorSink:
    if conn is None:
        raise SinkError("the pgvector sink writes through the ledger's Postgres connection; open it with conn=")
    table = getattr(settings, "embeddings_table", None) or DEFAULT_TABLE
    return PgvectorSink(conn, model=model, dimensions=dimensions, table=table)


class PgvectorSink:
    """See the module docstring. `table` (`name` on the search path, or `schema.name`) must have the
    columns of `case_embeddings`."""

    name = "pgvector"
    transactional = TRANSACTIONAL
    one_writer = False

    def __init__(self, conn: psycopg.Connection, *, model: str, dimensions: int, table: str = DEFAULT_TABLE) -> None:
        self.conn = conn
        self.model = model
        self.dimensions = dimensions
        self.table = table
        self.where = table
        self._table = sql.Identifier(*table.split("."))
        stored = stored_dimensions(conn, table)
        if stored != dimensions:
            raise DimensionMismatch(
                f"pgvector table {table} holds vector({stored}) embeddings, not {dimensions}: set "
                f"LEGAL_BATCH_EMBEDDING_DIMENSIONS={stored}, or store {dimensions}-dimensional vectors in a table of "
                "that dimension")
        self._stage = f"legal_batch_sink_stage_{dimensions}"
        self._has_hash = bool(conn.execute(
            "SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass(%s) AND attname = 'text_sha256'"
            " AND NOT attisdropped", (table,)).fetchone())

    def upsert(self, records: Sequence[VectorRecord]) -> list[WriteFailure]:
        good, failures = screen(records, self.dimensions, f"pgvector {self.table}")
        keyed: dict[tuple[str, int], VectorRecord] = {}  # the last record of an id wins, as in a row-by-row upsert
        for record in good:
            case_id = _uuid(record.record_id)
            if case_id is None:
                failures.append(WriteFailure(record.id, f"pgvector {self.table}: record id {record.record_id!r} is "
                                             "not a case id (uuid)", retryable=False))
            else:
                keyed[(str(case_id), int(record.chunk_index))] = record
        for block in batches(list(keyed.values()), _BLOCK):
            try:
                self._write(block)
            except psycopg.errors.IntegrityError as exc:
                reason = f"pgvector {self.table}: {str(exc).strip().splitlines()[0]}"
                failures.extend(WriteFailure(record.id, reason, retryable=False) for record in block)
        return failures

    def _write(self, block: Sequence[VectorRecord]) -> None:
        case_ids = [str(_uuid(record.record_id)) for record in block]
        indexes = [int(record.chunk_index) for record in block]
        vectors = np.stack([np.asarray(record.vector, dtype=np.float32) for record in block])
        stage = sql.Identifier(self._stage)
        with self.conn.transaction(), self.conn.cursor() as cur:
            cur.execute(sql.SQL("CREATE TEMP TABLE IF NOT EXISTS {} (case_id uuid, chunk_index int, embedding vector({}))"
                                ).format(stage, sql.Literal(self.dimensions)))
            with cur.copy(sql.SQL("COPY {} (case_id, chunk_index, embedding) FROM STDIN WITH (FORMAT BINARY)"
                                  ).format(stage)) as copy:
                copy.write(binary_copy_data(case_ids, indexes, vectors))
            if self._has_hash:  # the text hash is stored with each vector where the table has the column
                cur.execute(sql.SQL(
                    "INSERT INTO {} (case_id, chunk_index, model, embedding, text_sha256)"
                    " SELECT s.case_id, s.chunk_index, %s, s.embedding, h.sha FROM {} s"
                    " LEFT JOIN unnest(%s::uuid[], %s::int[], %s::text[]) AS h (case_id, chunk_index, sha)"
                    "   USING (case_id, chunk_index)"
                    " ON CONFLICT (case_id, chunk_index, model) DO UPDATE"
                    " SET embedding = excluded.embedding, text_sha256 = excluded.text_sha256, created_at = now()"
                ).format(self._table, stage),
                    (self.model, case_ids, indexes, [record.metadata.get("text_sha256") for record in block]))
            else:
                cur.execute(sql.SQL(
                    "INSERT INTO {} (case_id, chunk_index, model, embedding)"
                    " SELECT case_id, chunk_index, %s, embedding FROM {}"
                    " ON CONFLICT (case_id, chunk_index, model) DO UPDATE"
                    " SET embedding = excluded.embedding, created_at = now()").format(self._table, stage),
                    (self.model,))
            cur.execute(sql.SQL("TRUNCATE {}").format(stage))

    def delete(self, ids: Iterable[str]) -> int:
        case_ids, indexes = self._keys(ids)
        if not case_ids:
            return 0
        return self.conn.execute(sql.SQL(
            "DELETE FROM {} e USING unnest(%s::uuid[], %s::int[]) AS k (case_id, chunk_index)"
            " WHERE e.case_id = k.case_id AND e.chunk_index = k.chunk_index AND e.model = %s"
        ).format(self._table), (case_ids, indexes, self.model)).rowcount

    def count(self) -> int:
        return self.conn.execute(sql.SQL("SELECT count(*) FROM {} WHERE model = %s").format(
            self._table), (self.model,)).fetchone()[0]

    def contains(self, ids: Sequence[str]) -> set[str]:
        case_ids, indexes = self._keys(ids)
        if not case_ids:
            return set()
        rows = self.conn.execute(sql.SQL(
            "SELECT e.case_id::text, e.chunk_index FROM {} e"
            " JOIN unnest(%s::uuid[], %s::int[]) AS k (case_id, chunk_index) USING (case_id, chunk_index)"
            " WHERE e.model = %s").format(self._table), (case_ids, indexes, self.model)).fetchall()
        stored = {vector_id(case_id, index) for case_id, index in rows}
        # answer in the caller's spelling of each id (a uuid may be written in upper case)
        return {value for value in ids if _canonical(value) in stored}

    def vectors(self, ids: Sequence[str]) -> dict[str, np.ndarray]:
        case_ids, indexes = self._keys(ids)
        if not case_ids:
            return {}
        rows = self.conn.execute(sql.SQL(
            "SELECT e.case_id::text, e.chunk_index, e.embedding FROM {} e"
            " JOIN unnest(%s::uuid[], %s::int[]) AS k (case_id, chunk_index) USING (case_id, chunk_index)"
            " WHERE e.model = %s").format(self._table), (case_ids, indexes, self.model)).fetchall()
        stored = {vector_id(case_id, index): as_array(vector) for case_id, index, vector in rows}
        return {value: stored[_canonical(value)] for value in ids if _canonical(value) in stored}

    def search(self, vector: np.ndarray, *, k: int = 5) -> list[SearchHit]:
        with self.conn.transaction():
            # the index returns at most ef_search rows: at least k of them (pgvector allows up to 1,000)
            self.conn.execute(sql.SQL("SET LOCAL hnsw.ef_search = {}").format(min(max(100, int(k)), 1_000)))
            rows = self.conn.execute(sql.SQL(
                "SELECT e.case_id::text, e.chunk_index, 1 - (e.embedding <=> %(q)s), c.chunk_type, c.chunk_text,"
                "       c.text_sha256, k.neutral_citation, k.case_name, k.court"
                " FROM {} e"
                " LEFT JOIN case_chunks c ON c.case_id = e.case_id AND c.chunk_index = e.chunk_index"
                " LEFT JOIN court_cases k ON k.id = e.case_id"
                " WHERE e.model = %(model)s ORDER BY e.embedding <=> %(q)s LIMIT %(k)s"
            ).format(self._table),
                {"q": np.asarray(vector, dtype=np.float32), "model": self.model, "k": k}).fetchall()
        hits = []
        for case_id, index, score, chunk_type, text, sha, citation, case_name, court in rows:
            metadata = {"case_id": case_id, "chunk_index": index, "chunk_type": chunk_type, "citation": citation,
                        "model": self.model, "text_sha256": sha, "case_name": case_name, "court": court}
            hits.append(SearchHit(vector_id(case_id, index), case_id, index, float(score), text or "",
                                  {key: value for key, value in metadata.items() if value is not None}))
        return hits

    def close(self) -> None:
        """The connection belongs to the caller; nothing to release."""

    @staticmethod
    def _keys(ids: Iterable[str]) -> tuple[list[str], list[int]]:
        case_ids: list[str] = []
        indexes: list[int] = []
        for value in ids:
            record_id, index = split_vector_id(value)
            parsed = _uuid(record_id)
            if parsed is not None:
                case_ids.append(str(parsed))
                indexes.append(index)
        return case_ids, indexes


def stored_dimensions(conn: psycopg.Connection, table: str = DEFAULT_TABLE) -> int:
    """The N of the table's `embedding vector(N)` column; a `SinkError` when there is no such table."""
    row = conn.execute(
        "SELECT a.atttypmod FROM pg_attribute a WHERE a.attrelid = to_regclass(%s) AND a.attname = 'embedding'"
        " AND NOT a.attisdropped", (table,)).fetchone()
    if row is None:
        raise SinkError(f"pgvector table {table} (with an embedding vector column) does not exist: run "
                        "`legal-batch db upgrade`, or name an existing table")
    return int(row[0])


def _uuid(value: str) -> uuid.UUID | None:
    try:
        return uuid.UUID(value)
    except (ValueError, AttributeError, TypeError):
        return None


def _canonical(value: str) -> str:
    record_id, index = split_vector_id(value)
    parsed = _uuid(record_id)
    return vector_id(str(parsed) if parsed else record_id, index)
