"""The embeddings flow's own logic: chunk judgments (again when their text changed), name candidate
chunks (one request per distinct text, none for a text in flight or in the vector cache), request
lines, and the pgvector sink (binary COPY, through a staging table and an upsert when rows exist),
overlapped with parsing; the vector table it writes is the vector cache's first part.

Cases come from the source the settings name (`core.user_tables.CaseSource`: the built-in
`court_cases` by default) and vectors go to the vector table they name (`VectorTable`:
`case_embeddings` by default); both travel with each shard planned (`job_params`).
"""

from __future__ import annotations

import math
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import psycopg
from psycopg import sql

from legal_batch.core import ledger, vector_cache
from legal_batch.core.chunk_pool import SUB_BATCH, ChunkPool, Pending, WorkerDied
from legal_batch.core.chunking import Chunk
from legal_batch.core.crash import crash_point
from legal_batch.core.flow import Item
from legal_batch.core.user_tables import CaseSource, VectorTable, stored_type
from legal_batch.core.vector_cache import CacheKey, Savings
from legal_batch.core.vector_copy import binary_copy_data
from legal_batch.flows.embeddings.chunk_work import (
    HEADNOTE_CHUNK,
    CaseText,
    PreparedCase,
    numbered,
    prepare_case,
)
from legal_batch.flows.embeddings.replicas import PRIMARY, Replication, check_sinks, further_sinks, replicate
from legal_batch.providers.base import EmbeddingRequest, Endpoint, Request, Result

if TYPE_CHECKING:
    from legal_batch.flows.embeddings.record_sources import WrittenBack
    from legal_batch.settings import Settings

FLOW = "embeddings"
_CHUNK_LOCK = 0x4C42_0C4B  # advisory lock key: "chunking court_cases for embeddings"
_COPY_BATCH = 2_000
_QUEUED = 2
POOL_ATTEMPTS = 3
"""Times a batch of cases is sent to the chunking pool before a worker dying on it is an error."""


@dataclass
class ChunkSync:
    """What one chunking pass did."""

    cases: int = 0
    """Cases chunked now: new, or whose text (or headnote) changed."""
    chunks: int = 0
    """Chunk rows written (a chunk whose text did not change keeps its row and its vectors)."""
    rejected: int = 0
    """Cases whose text cannot be embedded (empty, NUL characters, no words): a failed item says why."""
    changed: int = 0
    """Of `cases`, those chunked before whose text or headnote changed."""
    chunks_replaced: int = 0
    """Chunks of changed cases removed (with their vectors and closed ledger items)."""
    removed_cases: int = 0
    """Cases gone from the source whose chunks and vectors were removed."""
    deferred: int = 0
    """Changed or removed cases left for a later pass because some of their chunks are in flight."""
    served: Savings = field(default_factory=Savings)
    """Chunks of changed cases that took their vector from the vector cache."""
    worker_restarts: int = 0
    """Times the chunking pool was started again after a worker process died (its batch was redone)."""


class ChunkingFailed(RuntimeError):
    """Chunking workers kept dying on one batch of cases; the message names them."""


def case_subject(case_id: str) -> str:
    return f"case:{case_id}"


def _headnote_sha256_sql(alias: str = "k") -> str:
    return (f"CASE WHEN btrim(coalesce({alias}.headnote, '')) = '' THEN NULL"
            f" ELSE encode(sha256(convert_to({alias}.headnote, 'UTF8')), 'hex') END")


def sync_chunks(conn: psycopg.Connection, *, max_tokens: int, overlap_tokens: int, limit_cases: int | None = None,
                batch_cases: int = 200, on_progress: Callable[[int], None] | None = None,
                on_total: Callable[[int], None] | None = None, source: CaseSource | None = None,
                table: VectorTable | None = None, cache: CacheKey | None = None, workers: int = 1) -> ChunkSync:
    """Bring `case_chunks` in line with the source, committing per batch of cases.

    - A new case is chunked; its judgment's chunks are followed by its headnote's (`chunk_type`
      `headnote`), if it has one. The hash of the text and of the headnote chunked is recorded
      (`chunked_cases`).
    - A case whose text or headnote hash differs is chunked again. A chunk whose text is unchanged at
      the same index keeps its row and its vectors; the others are removed with their vectors (in
      `table`) and their closed ledger items, in the transaction that writes the new chunks, which
      also gives new chunks whose text is in the vector cache (`cache`) their vector back — e.g. a
      paragraph that moved. Headnotes written from the old text are flagged stale.
    - A case gone from the source loses its chunks and vectors (not while the source is empty: an
      empty source is more likely a misconfiguration than a deleted corpus).
    - A case with a chunk in flight (an open ledger item) waits for a later pass.
    - A case whose text is empty or contains NUL characters gets a failed ledger item with the reason;
      it is tried again when its text changes.

    The tokenizer's work (and hashing) runs in `workers` processes (`core.chunk_pool`; 1: in this
    process): while they chunk the next batch, this process writes the last one — at most two
    batches in flight. All reads and writes stay here, and a case's chunks are written in one
    transaction: a worker that dies loses nothing (the pool is started again and the batch sent
    again, `POOL_ATTEMPTS` times at most, then `ChunkingFailed`), and a process killed mid-way
    leaves whole batches, which the next pass does not chunk again.

    `on_total` is told how many cases this pass will look at, `on_progress` how many each batch
    committed. Hashing every judgment (in the database) is what a pass costs when nothing changed.
    Concurrent chunkers take turns per batch under an advisory lock (and the planning lock), so a
    case is chunked once and never while a shard is being cut."""
    source = source or CaseSource()
    table = table or VectorTable()
    result = ChunkSync()
    result.removed_cases, deferred_removals = _remove_deleted_cases(conn, source, table, cache)
    result.deferred += deferred_removals
    clause = (f" AND k.id IN (SELECT id FROM {source.select('id')} AS s ORDER BY id LIMIT %(limit)s)"
              if limit_cases is not None else "")
    cases, text_hash, headnote_hash = (source.select("id", "full_text", "headnote"), source.text_sha256_sql("k"),
                                       _headnote_sha256_sql("k"))
    conn.execute("CREATE TEMP TABLE IF NOT EXISTS chunk_work (case_id uuid PRIMARY KEY)")
    conn.execute("TRUNCATE chunk_work")
    total = conn.execute(
        f"INSERT INTO chunk_work (case_id) SELECT k.id FROM {cases} AS k LEFT JOIN chunked_cases s ON s.case_id = k.id"
        f" WHERE (s.case_id IS NULL OR s.text_sha256 <> {text_hash}"
        f"        OR s.headnote_sha256 IS DISTINCT FROM {headnote_hash}){clause}",
        {"limit": limit_cases},
    ).rowcount
    if on_total is not None:
        on_total(total)
    spec = _ChunkSpec(source, max_tokens, overlap_tokens)
    with ChunkPool(workers if total > SUB_BATCH else 1) as pool:  # a few cases: not worth starting processes
        batches = _work_batches(conn, batch_cases)
        sent: deque[_SentBatch] = deque()
        if (ids := next(batches, None)) is not None:
            sent.append(_SentBatch(ids, spec.read(conn, ids)))
            sent[-1].send(pool)
        committed = 0
        while sent:
            batch = sent[0]
            try:
                prepared = {case.case_id: case for case in batch.pending.result()}
            except WorkerDied as exc:
                batch.attempts += 1
                if batch.attempts >= POOL_ATTEMPTS:
                    raise ChunkingFailed(
                        f"chunking workers died {batch.attempts} times on the batch of cases {', '.join(batch.ids)} "
                        f"({exc}); nothing of this batch was written. Look for a case whose text makes a worker run "
                        "out of memory (dmesg), or set LEGAL_BATCH_CHUNK_WORKERS=1 to chunk in one process") from exc
                pool.restart()
                result.worker_restarts += 1
                for waiting in sent:
                    waiting.send(pool)
                continue
            sent.popleft()
            if (ids := next(batches, None)) is not None:
                sent.append(_SentBatch(ids, spec.read(conn, ids)))
                sent[-1].send(pool)
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (_CHUNK_LOCK,))
                ledger.lock_planning(conn, FLOW)
                done = _chunk_batch(conn, batch.ids, prepared, spec=spec, table=table, cache=cache, result=result)
                if committed:
                    crash_point("mid_chunking")
            committed += 1
            if on_progress is not None and done:
                on_progress(done)
    if result.chunks or result.chunks_replaced:
        refresh_statistics(conn, "case_chunks", "chunked_cases")
    return result


def refresh_statistics(conn: psycopg.Connection, *tables: str, changed_share: float = 0.2) -> list[str]:
    """ANALYZE those of `tables` that changed by more than `changed_share` of their rows since their
    statistics were taken (or never had any). A bulk load outruns autovacuum: with statistics of an
    empty table the planner joins a block of 2,000 keys by scanning the whole table, once per block.
    Returns the tables analyzed."""
    analyzed = []
    for table in tables:
        row = conn.execute(
            "SELECT s.n_mod_since_analyze, c.reltuples FROM pg_stat_user_tables s JOIN pg_class c ON c.oid = s.relid"
            " WHERE s.relid = to_regclass(%s)", (table,)).fetchone()
        if row is None:
            continue
        modified, tuples = row
        if tuples < 0 or modified > max(1_000, changed_share * tuples):
            conn.execute(sql.SQL("ANALYZE {}").format(sql.SQL(table)))
            analyzed.append(table)
    return analyzed


def _work_batches(conn: psycopg.Connection, size: int) -> Iterator[list[str]]:
    """The case ids of `chunk_work`, in order, `size` at a time."""
    after: str | None = None
    while True:
        ids = [row[0] for row in conn.execute(
            "SELECT case_id::text FROM chunk_work WHERE %(after)s::uuid IS NULL OR case_id > %(after)s::uuid"
            " ORDER BY case_id LIMIT %(size)s", {"after": after, "size": size})]
        if not ids:
            return
        yield ids
        after = ids[-1]


@dataclass(frozen=True)
class _ChunkSpec:
    source: CaseSource
    max_tokens: int
    overlap_tokens: int

    def read(self, conn: psycopg.Connection, ids: list[str]) -> list[CaseText]:
        """The cases of `ids` to send to the chunking pool (none with a chunk in flight: they wait)."""
        in_flight = _in_flight_cases(conn)
        return [CaseText(case_id, text, headnote, seen, old_text, old_note, self.max_tokens, self.overlap_tokens)
                for case_id, text, headnote, old_text, old_note, seen in self.rows(conn, ids)
                if case_id not in in_flight]

    def rows(self, conn: psycopg.Connection, ids: list[str]) -> list[tuple]:
        cases = self.source.select("id", "full_text", "headnote")
        return conn.execute(
            "SELECT k.id::text, k.full_text, k.headnote, s.text_sha256, s.headnote_sha256, s.case_id IS NOT NULL"
            f" FROM {cases} AS k LEFT JOIN chunked_cases s ON s.case_id = k.id"
            " WHERE k.id = ANY(%s::uuid[]) ORDER BY k.id",
            (ids,),
        ).fetchall()


@dataclass
class _SentBatch:
    ids: list[str]
    cases: list[CaseText]
    attempts: int = 0
    pending: Pending[PreparedCase] = field(default_factory=Pending)

    def send(self, pool: ChunkPool) -> None:
        self.pending = pool.submit(prepare_case, self.cases)


def _in_flight_cases(conn: psycopg.Connection) -> set[str]:
    return {row[0] for row in conn.execute(
        "SELECT DISTINCT split_part(subject_key, ':', 1) FROM batch_items WHERE flow = %s"
        " AND state = ANY(%s) AND subject_key NOT LIKE 'case:%%'", (FLOW, list(ledger.ITEM_OPEN_STATES)))}


def prepare_chunks(conn: psycopg.Connection, flow: EmbeddingsFlow, *, max_tokens: int, overlap_tokens: int,
                   workers: int = 1, on_progress: Callable[[int], None] | None = None,
                   on_total: Callable[[int], None] | None = None) -> dict:
    """Before planning: chunk the source (`sync_chunks`, on `workers` processes), then serve every
    chunk whose text is in the vector cache (`EmbeddingsFlow.serve_from_cache`) and bring further
    sinks and a record source up to date. Returns the figures (asset metadata): `chunking` says what
    chunking did, `summary_note` (for the run's summary) what changed and what the cache saved, if
    anything."""
    notes = []
    if flow.further_sinks:  # a collection of another dimension: one line before any request
        check_sinks(flow.sinks, model=flow.model, dimensions=flow.dimensions, settings=flow.settings,
                    reachable=False)
    pulled = None
    if flow.record_source is not None:
        from legal_batch.flows.embeddings.record_sources import pull

        pulled = pull(conn, flow.record_source, flow.settings)
        notes.append(pulled.line())
    synced = sync_chunks(conn, max_tokens=max_tokens, overlap_tokens=overlap_tokens, limit_cases=flow.limit_cases,
                         on_progress=on_progress, on_total=on_total, source=flow.source, table=flow.table,
                         cache=flow.cache, workers=workers)
    served = synced.served + flow.serve_from_cache(conn)
    replicated = None
    if flow.further_sinks:  # batch by batch, each committed (a long fill keeps its progress)
        replicated = flow.replicate(conn)
        notes.append(replicated.line())
    if flow.record_source is not None:
        notes.append(flow.write_back(conn).line())
    chunking = (f"chunked {synced.cases} cases ({synced.changed} changed) into {synced.chunks} new chunks; "
                f"{synced.chunks_replaced} chunks replaced, {synced.removed_cases} removed cases cleared, "
                f"{synced.rejected} rejected, {synced.deferred} waiting for chunks in flight; {served.line()}")
    if synced.worker_restarts:
        chunking += f"; a chunking worker died and its batch was redone ({synced.worker_restarts}×)"
    if synced.changed or synced.removed_cases:
        notes.append(f"{synced.changed} changed cases chunked again ({synced.chunks_replaced} chunks replaced), "
                     f"{synced.removed_cases} removed cases cleared")
    if served.requests:
        notes.append(served.line())
    return {"chunking": chunking, "summary_note": "; ".join(notes),"cases_chunked": synced.cases, "cases_changed": synced.changed, "chunks_written": synced.chunks,
            "chunks_replaced": synced.chunks_replaced, "cases_removed": synced.removed_cases,
            "cases_rejected": synced.rejected, "cases_deferred": synced.deferred,
            "chunk_worker_restarts": synced.worker_restarts,
            "cache_requests_saved": served.requests, "cache_tokens_saved": served.tokens,
            "cache_usd_saved": float(served.usd),
            **({} if pulled is None else {"source_records_read": pulled.records, "source_records_changed": pulled.changed,
                                          "source_records_unusable": len(pulled.problems)}),
            **({} if replicated is None else {"sink_vectors_written": sum(replicated.written.values()),
                                              "sink_vectors_refused": len(replicated.refused)})}


@dataclass(frozen=True)
class _Old:
    chunk_index: int
    chunk_type: str
    char_start: int
    char_end: int
    sha256: str


def _chunk_batch(conn: psycopg.Connection, ids: list[str], prepared: dict[str, PreparedCase], *, spec: _ChunkSpec,
                 table: VectorTable, cache: CacheKey | None, result: ChunkSync) -> int:
    """Write one batch of chunked cases (inside the caller's transaction, under the chunking lock);
    returns the cases looked at.

    `prepared` is what the pool made of each case as it was when read; a case recorded differently
    since (another chunker got there first), or not sent (it was in flight then), is read and
    prepared again here."""
    cases = spec.source.select("id")
    rows = conn.execute(
        "SELECT k.id::text, s.text_sha256, s.headnote_sha256, s.case_id IS NOT NULL"
        f" FROM {cases} AS k LEFT JOIN chunked_cases s ON s.case_id = k.id"
        " WHERE k.id = ANY(%s::uuid[]) ORDER BY k.id",
        (ids,),
    ).fetchall()
    in_flight_cases = _in_flight_cases(conn)
    old_chunks: dict[str, list[_Old]] = {}
    for case_id, *old in conn.execute(
            "SELECT case_id::text, chunk_index, chunk_type, char_start, char_end, text_sha256 FROM case_chunks"
            " WHERE case_id = ANY(%s::uuid[]) ORDER BY case_id, chunk_index", (ids,)):
        old_chunks.setdefault(case_id, []).append(_Old(*old))
    failures: list[tuple[str, str]] = []
    usable: list[str] = []
    gone: list[tuple[str, int]] = []
    moved: list[tuple[str, int, str, int, int]] = []
    written: list[tuple[str, Chunk, str]] = []
    recorded: list[tuple[str, str, str | None, int]] = []
    stale_text: list[tuple[str, str]] = []
    changed_here = False
    for case_id, old_text_sha, old_headnote_sha, seen in rows:
        if case_id in in_flight_cases:
            result.deferred += 1
            continue
        case = prepared.get(case_id)
        if case is None or case.recorded != (seen, old_text_sha, old_headnote_sha):
            case = _prepare_here(conn, spec, case_id)
            if case is None:
                continue  # gone from the source meanwhile
        if case.unchanged:
            continue  # chunked meanwhile by another process
        text_sha, note_sha = case.text_sha256, case.headnote_sha256
        recorded_note_sha = note_sha
        old = old_chunks.get(case_id, [])
        reason = case.reason
        if reason is None and seen and text_sha == old_text_sha:  # only the headnote changed
            body = [o for o in old if o.chunk_type != HEADNOTE_CHUNK]
            pieces: list[Chunk] | None = None
        else:
            body = []
            pieces = [] if reason else list(case.body or ())
        if reason:
            failures.append((case_subject(case_id), f"{spec.source.name} id={case_id}: {reason}; correct the text: "
                             "the case is chunked again when it changes"))
            pieces, note_sha = [], None
        else:
            usable.append(case_id)
        if pieces is not None and note_sha is not None:
            pieces += numbered(case.headnote, start=len(pieces))
        elif pieces is None:
            pieces = [Chunk(o.chunk_index, o.chunk_type, "", o.char_start, o.char_end, 0) for o in body]
            if note_sha is not None:
                pieces += numbered(case.headnote, start=len(body))
        new_by_index = {piece.chunk_index: piece for piece in pieces}
        body_indexes = {o.chunk_index for o in body}
        old_by_index = {o.chunk_index: o for o in old}
        for o in old:
            piece = new_by_index.get(o.chunk_index)
            if piece is not None and (o.chunk_index in body_indexes or piece.sha256 == o.sha256):
                if o.chunk_index not in body_indexes and (piece.chunk_type, piece.char_start, piece.char_end) != (
                        o.chunk_type, o.char_start, o.char_end):
                    moved.append((case_id, o.chunk_index, piece.chunk_type, piece.char_start, piece.char_end))
                continue
            gone.append((case_id, o.chunk_index))
        for piece in pieces:
            old_piece = old_by_index.get(piece.chunk_index)
            if old_piece is None or (piece.chunk_index not in body_indexes and old_piece.sha256 != piece.sha256):
                written.append((case_id, piece, piece.sha256))
        if seen or old:
            result.changed += 1
            changed_here = True
            if seen and text_sha != old_text_sha:
                stale_text.append((case_id, text_sha))
        result.cases += 1
        recorded.append((case_id, text_sha, recorded_note_sha, len(pieces)))
    if gone:
        _remove_chunks(conn, gone, table=table, cache=cache)
        result.chunks_replaced += len(gone)
    for case_id, index, kind, start, end in moved:
        conn.execute("UPDATE case_chunks SET chunk_type = %s, char_start = %s, char_end = %s"
                     " WHERE case_id = %s AND chunk_index = %s", (kind, start, end, case_id, index))
    if written:
        ledger.forget_subjects(conn, FLOW, [f"{case_id}:{piece.chunk_index}" for case_id, piece, _ in written])
        with conn.cursor().copy(
            "COPY case_chunks (case_id, chunk_index, chunk_type, chunk_text, char_start, char_end, token_count,"
            " text_sha256) FROM STDIN"
        ) as copy:
            for case_id, piece, sha in written:
                copy.write_row((case_id, piece.chunk_index, piece.chunk_type, piece.text, piece.char_start,
                                piece.char_end, piece.token_count, sha))
        result.chunks += len(written)
    if usable:
        ledger.forget_subjects(conn, FLOW, [case_subject(case_id) for case_id in usable])
    if failures:
        result.rejected += ledger.record_failed_subjects(conn, FLOW, failures)
    if recorded:
        with conn.cursor() as cur:
            cur.executemany(
                "INSERT INTO chunked_cases (case_id, text_sha256, headnote_sha256, chunks) VALUES (%s, %s, %s, %s)"
                " ON CONFLICT (case_id) DO UPDATE SET text_sha256 = excluded.text_sha256,"
                "  headnote_sha256 = excluded.headnote_sha256, chunks = excluded.chunks, chunked_at = now()",
                recorded)
    if stale_text:
        flag_stale_headnotes(conn, stale_text)
    if cache is not None and changed_here:
        result.served = result.served + vector_cache.serve(conn, cache, table=table.relation, flow=FLOW,
                                                           case_ids=[case_id for case_id, *_ in recorded])
    return len(rows)


def _prepare_here(conn: psycopg.Connection, spec: _ChunkSpec, case_id: str) -> PreparedCase | None:
    """Read one case again and chunk it in this process (None: it is gone from the source)."""
    rows = spec.rows(conn, [case_id])
    if not rows:
        return None
    _, text, headnote, old_text, old_note, seen = rows[0]
    return prepare_case(CaseText(case_id, text, headnote, seen, old_text, old_note, spec.max_tokens,
                                 spec.overlap_tokens))


def _remove_chunks(conn: psycopg.Connection, keys: list[tuple[str, int]], *, table: VectorTable,
                   cache: CacheKey | None) -> None:
    """Remove chunks with their vectors (in `table`, any model) and their closed ledger items, after
    caching their vectors (`cache`) for a chunk of the same text elsewhere."""
    case_ids = [case_id for case_id, _ in keys]
    indexes = [index for _, index in keys]
    if cache is not None:
        vector_cache.stash(conn, cache, table=table.relation, case_ids=case_ids, chunk_indexes=indexes)
    for relation in (table.relation, "case_chunks"):
        conn.execute(f"DELETE FROM {relation} t USING unnest(%s::uuid[], %s::int[]) AS k (case_id, chunk_index)"
                     " WHERE t.case_id = k.case_id AND t.chunk_index = k.chunk_index", (case_ids, indexes))
    ledger.forget_subjects(conn, FLOW, [f"{case_id}:{index}" for case_id, index in keys])


def _remove_deleted_cases(conn: psycopg.Connection, source: CaseSource, table: VectorTable,
                          cache: CacheKey | None) -> tuple[int, int]:
    """Chunks, vectors and closed items of cases no longer in the source (their vectors kept in the
    vector cache: a case imported again takes them back): (cases removed, deferred because a chunk is
    in flight). Nothing when the source is empty."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_CHUNK_LOCK,))
        ledger.lock_planning(conn, FLOW)
        cases = source.select("id")
        if not conn.execute(f"SELECT EXISTS (SELECT 1 FROM {cases} AS k)").fetchone()[0]:
            return 0, 0
        missing = conn.execute(
            "SELECT c.case_id::text, EXISTS (SELECT 1 FROM batch_items i WHERE i.flow = %s"
            "   AND i.state = ANY(%s) AND i.subject_key LIKE c.case_id::text || ':%%')"
            " FROM (SELECT case_id FROM chunked_cases UNION SELECT DISTINCT case_id FROM case_chunks) AS c"
            f" WHERE NOT EXISTS (SELECT 1 FROM {cases} AS k WHERE k.id = c.case_id)",
            (FLOW, list(ledger.ITEM_OPEN_STATES))).fetchall()
        removed = [case_id for case_id, in_flight in missing if not in_flight]
        if removed:
            keys = conn.execute("SELECT case_id::text, chunk_index FROM case_chunks WHERE case_id = ANY(%s::uuid[])",
                                (removed,)).fetchall()
            _remove_chunks(conn, [(case_id, index) for case_id, index in keys], table=table, cache=cache)
            conn.execute("DELETE FROM chunked_cases WHERE case_id = ANY(%s::uuid[])", (removed,))
            ledger.forget_subjects(conn, FLOW, [case_subject(case_id) for case_id in removed])
    return len(removed), len(missing) - len(removed)


def flag_stale_headnotes(conn: psycopg.Connection, changed: list[tuple[str, str]]) -> int:
    """Flag the headnotes of cases whose text is now `(case_id, text_sha256)` as stale where they were
    written from another text (or before that was recorded). Regenerated only when asked
    (`LEGAL_BATCH_HEADNOTE_REGENERATE_STALE`)."""
    return conn.execute(
        "UPDATE case_headnotes h SET stale_since = now()"
        " FROM unnest(%s::uuid[], %s::text[]) AS c (case_id, text_sha256)"
        " WHERE h.case_id = c.case_id AND h.stale_since IS NULL"
        "   AND h.text_sha256 IS DISTINCT FROM c.text_sha256",
        ([case_id for case_id, _ in changed], [sha for _, sha in changed]),
    ).rowcount


def has_unchunked_cases(conn: psycopg.Connection, source: CaseSource | None = None) -> bool:
    """Cheap (no hashing): a case of the source never chunked, or a chunked case gone from it. Edited
    cases are found by the next chunking pass."""
    cases = (source or CaseSource()).select("id")
    return bool(conn.execute(
        f"SELECT EXISTS (SELECT 1 FROM {cases} AS k WHERE NOT EXISTS"
        "  (SELECT 1 FROM chunked_cases s WHERE s.case_id = k.id))"
        f" OR EXISTS (SELECT 1 FROM chunked_cases s WHERE NOT EXISTS (SELECT 1 FROM {cases} AS k"
        "  WHERE k.id = s.case_id))"
    ).fetchone()[0])


class EmbeddingsFlow:
    """Subjects are chunks (`<case_id>:<chunk_index>`), results are rows of the vector table."""

    name = FLOW
    endpoint: Endpoint = "embeddings"

    def __init__(self, *, model: str, dimensions: int = 1024, limit_cases: int | None = None,
                 provider: str | None = None, source: CaseSource | None = None,
                 table: VectorTable | None = None, sinks: Sequence[str] = (PRIMARY,),
                 record_source: str | None = None, settings: Settings | None = None) -> None:
        """`provider` names the vector cache's provider (None: no cache); `source` and `table` default to
        the built-in `court_cases` and `case_embeddings`; `sinks` are the vector sinks to write
        (`flows.embeddings.replicas`; the vector table is always written), `record_source` a source
        read into the corpus before chunking (`dynamodb`), `settings` what their connections use
        (default: the process's)."""
        self.model = model
        self.dimensions = dimensions
        self.limit_cases = limit_cases
        self.provider = provider
        self.source = source or CaseSource()
        self.table = table or VectorTable(dimensions=dimensions)
        self.sinks = tuple(sinks) or (PRIMARY,)
        self.record_source = record_source
        self._settings = settings

    @property
    def settings(self) -> Settings:
        from legal_batch.settings import get_settings

        return self._settings or get_settings()

    @property
    def further_sinks(self) -> tuple[str, ...]:
        return further_sinks(self.sinks)

    @property
    def indexed(self) -> bool:
        """Whether the vector table is a sink to search (then it gets its HNSW index)."""
        return PRIMARY in self.sinks

    @property
    def cache(self) -> CacheKey | None:
        return None if self.provider is None else CacheKey(self.provider, self.model, self.dimensions)

    def job_params(self) -> dict:
        params: dict = {"dimensions": self.dimensions}
        if self.table.table is not None:
            params["table"] = self.table.table
        if self.sinks != (PRIMARY,):
            params["sinks"] = list(self.sinks)
        if self.record_source is not None:
            params["record_source"] = self.record_source
        return params

    @classmethod
    def for_job(cls, *, model: str, params: dict, provider: str | None = None,
                source: CaseSource | None = None, settings: Settings | None = None) -> EmbeddingsFlow:
        """The flow a shard was planned with (`job_params` as stored on its job row)."""
        dimensions = int(params["dimensions"])
        return cls(model=model, dimensions=dimensions, provider=provider, source=source,
                   table=VectorTable(params.get("table"), dimensions), sinks=params.get("sinks") or (PRIMARY,),
                   record_source=params.get("record_source"), settings=settings)

    def candidate_sql(self) -> tuple[str, dict]:
        """Chunks with no vector (of this model) and no open or failed item, one per distinct text:
        none whose text is in flight in another item (it is served from the vector cache when that
        item's result is ingested) or already in the cache (served before planning)."""
        clause = ("" if self.provider is None else
                  "   AND NOT EXISTS (SELECT 1 FROM vector_cache v WHERE v.provider = %(provider)s"
                  "                   AND v.model = %(model)s AND v.dimensions = %(dims)s"
                  "                   AND v.text_sha256 = c.text_sha256)")
        if self.limit_cases is not None:
            clause += f" AND c.case_id IN (SELECT id FROM {self.source.select('id')} AS k ORDER BY id LIMIT %(limit)s)"
        relation = self.table.relation
        sql = (
            "WITH in_flight AS (SELECT DISTINCT o.text_sha256 FROM batch_items i JOIN case_chunks o"
            "   ON o.case_id = split_part(i.subject_key, ':', 1)::uuid"
            "  AND o.chunk_index = split_part(i.subject_key, ':', 2)::int"
            "  WHERE i.flow = %(flow)s AND i.state = ANY(%(open)s) AND i.subject_key NOT LIKE 'case:%%')"
            " SELECT subject_key, custom_id, tokens, size_bytes FROM ("
            "  SELECT DISTINCT ON (c.text_sha256) c.case_id, c.chunk_index,"
            "   c.case_id::text || ':' || c.chunk_index AS subject_key,"
            "   'chunk-' || c.case_id || '-' || c.chunk_index AS custom_id,"
            "   c.token_count AS tokens, octet_length(c.chunk_text) + 300 AS size_bytes"
            "  FROM case_chunks c"
            f" WHERE NOT EXISTS (SELECT 1 FROM {relation} e WHERE e.case_id = c.case_id"
            "                   AND e.chunk_index = c.chunk_index AND e.model = %(model)s)"
            "   AND NOT EXISTS (SELECT 1 FROM batch_items i WHERE i.flow = %(flow)s"
            "                   AND i.subject_key = c.case_id::text || ':' || c.chunk_index"
            "                   AND i.state = ANY(%(not_candidate)s))"
            "   AND NOT EXISTS (SELECT 1 FROM in_flight f WHERE f.text_sha256 = c.text_sha256)"
            f"{clause}"
            "  ORDER BY c.text_sha256, c.case_id, c.chunk_index) AS c"
            " ORDER BY c.case_id, c.chunk_index"
        )
        return sql, {"model": self.model, "flow": FLOW, "limit": self.limit_cases, "provider": self.provider,
                     "dims": self.dimensions, "open": list(ledger.ITEM_OPEN_STATES),
                     "not_candidate": list(ledger.ITEM_NOT_CANDIDATE_STATES)}

    def write_back(self, conn: psycopg.Connection) -> WrittenBack:
        """Write each record's outcome back to the record source (nothing without one)."""
        from legal_batch.flows.embeddings.record_sources import WrittenBack, write_back

        if self.record_source is None:
            return WrittenBack()
        return write_back(conn, self.record_source, self.settings, model=self.model, targets=self.sink_targets())

    def sink_targets(self) -> list[str]:
        """What each further sink writes to (`sink_vectors.target`)."""
        from legal_batch.sinks.registry import sink_target

        return [sink_target(name, model=self.model, dimensions=self.dimensions, settings=self.settings)
                for name in self.further_sinks]

    def serve_from_cache(self, conn: psycopg.Connection) -> Savings:
        """Before planning: every chunk without a vector whose text is in the vector cache takes its
        vector from it (one transaction); nothing without a provider to key the cache by."""
        if self.cache is None:
            return Savings()
        with conn.transaction():
            ledger.lock_planning(conn, FLOW)
            return vector_cache.serve(conn, self.cache, table=self.table.relation, flow=FLOW)

    def requests(self, conn: psycopg.Connection, job_id: int) -> Iterator[Request]:
        with conn.cursor(name=f"requests_{job_id}") as cur:
            cur.itersize = 2_000
            cur.execute(
                "SELECT i.custom_id, c.chunk_text FROM batch_items i JOIN case_chunks c"
                "  ON c.case_id = split_part(i.subject_key, ':', 1)::uuid"
                " AND c.chunk_index = split_part(i.subject_key, ':', 2)::int"
                " WHERE i.job_id = %s AND i.state = ANY(%s) ORDER BY i.id",
                (job_id, list(ledger.ITEM_OPEN_STATES)),
            )
            for custom_id, text in cur:
                yield EmbeddingRequest(custom_id, text)

    def sink(self, conn: psycopg.Connection, *, model: str) -> EmbeddingSink:
        cache = None if self.provider is None else CacheKey(self.provider, model, self.dimensions)
        return EmbeddingSink(conn, model=model, dimensions=self.dimensions, table=self.table.relation, cache=cache,
                             replicas=self if self.further_sinks else None)

    def replicate(self, conn: psycopg.Connection, *, model: str | None = None, job_id: int | None = None
                  ) -> Replication:
        """Bring the further sinks up to date (`replicas.replicate`), inside the caller's transaction."""
        settings = self.settings
        return replicate(conn, names=self.sinks, model=model or self.model, table=self.table, source=self.source,
                         settings=settings, max_attempts=settings.max_attempts, job_id=job_id)


class EmbeddingSink:
    """Validates vectors and writes them with binary COPY, `_COPY_BATCH` rows at a time, in a writer
    thread so that database work overlaps result parsing.

    Accepted vectors are copied into a float32 block; the writer looks up, in one statement, the text
    hashes of the block's chunks (stored with each vector: `legal-batch verify` compares it with the
    source) and whether any of its keys has a row, encodes the whole block as binary COPY tuples with
    numpy (no per-row Python work) and, when none of the block's keys has a row yet (the usual first
    ingest), COPYs it straight into the vector
    table (`table`); otherwise into a staging table followed by an upsert, so re-ingest stays an
    upsert. The vector table is the vector cache's first part (a vector is written once, with the
    hash of its text); with a `cache` key `finish` gives chunks of the same texts waiting for them
    (duplicates not requested) their vector (`vector_cache.serve`).
    Nothing else may write the same keys in the meantime (the ledger gives each chunk to one open
    job): a concurrent writer of the same key would make the COPY fail with a unique violation,
    rolling back the whole ingest, never half of it.
    Memory: at most `_QUEUED + 2` blocks of `_COPY_BATCH` vectors (about 8 MB each at 1024 dims) and
    the COPY stream being sent (the same size), whatever the size of the output file."""

    def __init__(self, conn: psycopg.Connection, *, model: str, dimensions: int, table: str = "case_embeddings",
                 cache: CacheKey | None = None, replicas: EmbeddingsFlow | None = None) -> None:
        self.conn = conn
        self.replicas = replicas
        self.replication: Replication | None = None
        """What `settle` wrote to the further sinks (with `replicas`: the flow that names them)."""
        self.model = model
        self.dimensions = dimensions
        self.table = table
        self.cache = cache
        self.rows = 0
        self.served = Savings()
        """Chunks of the same texts as this ingest's that took their vector from the cache."""
        self._hashes: set[str] = set()
        self._block = self._new_block()
        self._case_ids: list[str] = []
        self._chunk_indexes: list[int] = []
        self._queue: queue.Queue[tuple[np.ndarray, list[str], list[int]] | None] = queue.Queue(maxsize=_QUEUED)
        self._spare: queue.SimpleQueue[np.ndarray] = queue.SimpleQueue()
        self._error: BaseException | None = None
        refresh_statistics(conn, table, "case_chunks")  # the vector table grows shard by shard
        self.half = stored_type(conn, table) == "halfvec"
        """The table stores `halfvec`: vectors are sent as float16 (`binary_copy_data(half=True)`)."""
        storage = "halfvec" if self.half else "vector"
        conn.execute(
            "CREATE TEMP TABLE IF NOT EXISTS stage_embeddings (case_id uuid, chunk_index int, text_sha256 text,"
            f" embedding {storage}({dimensions})) ON COMMIT DROP"
        )
        self._created_at = bool(conn.execute(
            "SELECT EXISTS (SELECT 1 FROM pg_attribute WHERE attrelid = to_regclass(%s) AND attname = 'created_at'"
            " AND NOT attisdropped)", (table,)).fetchone()[0])
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
                    hashes, exists = self._block_facts(cur, case_ids, chunk_indexes, table=self.table,
                                                       model=self.model)
                    if exists:
                        self._copy(cur, "stage_embeddings", block, case_ids, chunk_indexes, model=None,
                                   hashes=hashes, half=self.half)
                        table, clause = self.table, ", created_at = now()" if self._created_at else ""
                        cur.execute(
                            f"INSERT INTO {table} (case_id, chunk_index, model, embedding, text_sha256)"
                            " SELECT case_id, chunk_index, %s, embedding, text_sha256 FROM stage_embeddings"
                            " ON CONFLICT (case_id, chunk_index, model) DO UPDATE"
                            f" SET embedding = excluded.embedding, text_sha256 = excluded.text_sha256{clause}",
                            (self.model,),
                        )
                        self.rows += cur.rowcount
                        cur.execute("TRUNCATE stage_embeddings")
                    else:
                        self.rows += self._copy(cur, self.table, block, case_ids, chunk_indexes,
                                                model=self.model, hashes=hashes, half=self.half)
                    if self.cache is not None and hashes is not None:
                        self._hashes.update(hashes)  # `finish` serves chunks of the same texts
                self._spare.put(block)
        except BaseException as exc:  # surfaced to the caller in accept() or finish()
            self._error = exc
            while self._queue.get() is not None:
                pass

    @staticmethod
    def _block_facts(cur: psycopg.Cursor, case_ids: list[str], chunk_indexes: list[int], *, table: str,
                     model: str) -> tuple[list[str] | None, bool]:
        """In one statement: the block's text hashes in block order (None if a chunk is missing: then
        none is stored) and whether any of its keys already has a row (then the block is upserted)."""
        hashes, exists = cur.execute(
            "SELECT array_agg(c.text_sha256 ORDER BY k.n), coalesce(bool_or(e.case_id IS NOT NULL), false)"
            " FROM unnest(%s::uuid[], %s::int[]) WITH ORDINALITY AS k (case_id, chunk_index, n)"
            " LEFT JOIN case_chunks c ON c.case_id = k.case_id AND c.chunk_index = k.chunk_index"
            f" LEFT JOIN {table} e ON e.case_id = k.case_id AND e.chunk_index = k.chunk_index"
            "  AND e.model = %s",
            (case_ids, chunk_indexes, model),
        ).fetchone()
        complete = hashes is not None and all(sha is not None and len(sha) == 64 for sha in hashes)
        return (hashes if complete else None), bool(exists)

    @staticmethod
    def _copy(cur: psycopg.Cursor, table: str, block: np.ndarray, case_ids: list[str], chunk_indexes: list[int],
              *, model: str | None, hashes: list[str] | None = None, half: bool = False) -> int:
        columns = "case_id, chunk_index" + ("" if model is None else ", model") + \
            ("" if hashes is None else ", text_sha256") + ", embedding"
        with cur.copy(f"COPY {table} ({columns}) FROM STDIN WITH (FORMAT BINARY)") as copy:
            copy.write(binary_copy_data(case_ids, chunk_indexes, block[: len(case_ids)], model=model,
                                        hashes=hashes, half=half))
        return cur.rowcount

    def finish(self) -> int:
        if self._case_ids:
            self._hand_over()
        self._queue.put(None)
        self._thread.join()
        if self._error is not None:
            raise RuntimeError(f"writing embeddings failed: {self._error}") from self._error
        if self.cache is not None and self._hashes:
            self.served = vector_cache.serve(self.conn, self.cache, table=self.table, flow=FLOW,
                                             hashes=sorted(self._hashes))
        return self.rows

    def settle(self, job_id: int) -> None:
        """Copy the shard's vectors (and those served for the same texts) to the further sinks; a chunk
        one did not store goes back to retryable (see `replicas`)."""
        if self.replicas is not None:
            self.replication = self.replicas.replicate(self.conn, model=self.model, job_id=job_id)


DONE_WITHOUT_RESULT_SQL = (
    "SELECT i.subject_key FROM batch_items i LEFT JOIN batch_jobs j ON j.id = i.job_id"
    f" WHERE i.flow = 'embeddings' AND i.state IN {ledger.sql_in([ledger.ItemState.DONE])}"
    " AND i.subject_key NOT LIKE 'case:%%'"
    " AND NOT EXISTS (SELECT 1 FROM embedding_sink e"
    "  WHERE e.case_id = split_part(i.subject_key, ':', 1)::uuid"
    "  AND e.chunk_index = split_part(i.subject_key, ':', 2)::int AND (j.model IS NULL OR e.model = j.model))"
)
"""Done chunk items without their vector in the vector table in use (`embedding_sink`, see
`core.user_tables`); an item served from the vector cache (no job) needs a vector of any model."""


def stale_result_sql(source: CaseSource | None = None) -> str:
    """Vectors (in the table in use) whose text no longer matches the source, one line each: their
    case's text or headnote changed since it was chunked, their chunk is gone, or their chunk's text
    is not the one they were made from. For `legal-batch verify`; the next chunking pass (any
    `legal-batch embeddings run`) replaces them."""
    source = source or CaseSource()
    return (
        "WITH changed AS MATERIALIZED (SELECT s.case_id,"
        f"   s.text_sha256 <> {source.text_sha256_sql('k')} AS text_changed,"
        f"   s.headnote_sha256 IS DISTINCT FROM {_headnote_sha256_sql('k')} AS headnote_changed"
        f"  FROM chunked_cases s JOIN {source.select('id', 'full_text', 'headnote')} AS k ON k.id = s.case_id)"
        " SELECT e.case_id || ':' || e.chunk_index || ' (' || e.model || '): ' || CASE"
        "  WHEN c.case_id IS NULL THEN 'its chunk no longer exists'"
        "  WHEN e.text_sha256 IS NOT NULL AND e.text_sha256 <> c.text_sha256 THEN 'made from another text than its chunk'"
        "  WHEN NOT EXISTS (SELECT 1 FROM " + source.select("id") + " AS k WHERE k.id = e.case_id)"
        "   THEN 'its case is no longer in the source'"
        "  WHEN c.chunk_type = 'headnote' THEN 'the headnote changed since it was chunked'"
        "  ELSE 'the judgment text changed since it was chunked' END"
        " FROM embedding_sink e"
        " LEFT JOIN case_chunks c ON c.case_id = e.case_id AND c.chunk_index = e.chunk_index"
        " LEFT JOIN changed d ON d.case_id = e.case_id"
        " WHERE c.case_id IS NULL OR (e.text_sha256 IS NOT NULL AND e.text_sha256 <> c.text_sha256)"
        "  OR (c.chunk_type <> 'headnote' AND d.text_changed) OR (c.chunk_type = 'headnote' AND d.headnote_changed)"
        "  OR NOT EXISTS (SELECT 1 FROM " + source.select("id") + " AS k WHERE k.id = e.case_id)"
        " ORDER BY e.case_id, e.chunk_index"
    )


HNSW_INDEX = "case_embeddings_hnsw"
HNSW_M = 16
HNSW_EF_CONSTRUCTION = 64
HNSW_INDEX_SQL = (
    f"CREATE INDEX IF NOT EXISTS {HNSW_INDEX} ON case_embeddings"
    f" USING hnsw (embedding vector_cosine_ops) WITH (m = {HNSW_M}, ef_construction = {HNSW_EF_CONSTRUCTION})"
)
HNSW_MAX_DIMENSIONS = 2_000
"""pgvector indexes `vector` columns of at most 2,000 dimensions; larger ones (text-embedding-3-large's
3,072) are indexed as `halfvec` (up to 4,000), and searched with the same cast."""
HNSW_BUILD_MEMORY_FLOOR_MB = 64
HNSW_BUILD_MEMORY_SHARE = 0.25
"""The build's `maintenance_work_mem` is never above this share of the machine's physical memory."""
_HNSW_NEIGHBOR_BYTES = 16  # a neighbour in the build's graph: relative pointer (8) + distance (4), aligned
_HNSW_ELEMENT_BYTES = 160  # an element's header, heap TIDs, level and neighbour-list headers, lock, value header


def hnsw_index_sql(table: VectorTable) -> str:
    """The HNSW cosine index of a vector table of ours: on `embedding` with `vector_cosine_ops`, or
    `halfvec_cosine_ops` for a `halfvec` column; a `vector` column above 2,000 dimensions is indexed
    as `embedding::halfvec(N)`."""
    if table.table is None and table.storage == "vector" and table.dimensions <= HNSW_MAX_DIMENSIONS:
        return HNSW_INDEX_SQL
    if table.storage == "halfvec":
        column, ops = "embedding", "halfvec_cosine_ops"
    elif table.dimensions <= HNSW_MAX_DIMENSIONS:
        column, ops = "embedding", "vector_cosine_ops"
    else:
        column, ops = f"(embedding::halfvec({table.dimensions}))", "halfvec_cosine_ops"
    return (f"CREATE INDEX IF NOT EXISTS {table.index_name} ON {table.relation}"
            f" USING hnsw ({column} {ops}) WITH (m = {HNSW_M}, ef_construction = {HNSW_EF_CONSTRUCTION})")


def hnsw_graph_bytes(rows: int, *, dimensions: int, bytes_per_component: int, m: int = HNSW_M) -> int:
    """What pgvector's in-memory HNSW build needs to hold the whole graph of `rows` vectors: each
    element's value (`dimensions` × `bytes_per_component` + 8 bytes of header), its layer-0 neighbour list
    (2 × `m` neighbours; upper layers add ~1/(m-1) of that) and its fixed overhead. When the graph
    outgrows `maintenance_work_mem` pgvector goes on on disk, many times slower (its README: "a notice
    is shown when the graph no longer fits into maintenance_work_mem")."""
    neighbors = 2 * m + m // max(m - 1, 1)
    return rows * (dimensions * bytes_per_component + 8 + neighbors * _HNSW_NEIGHBOR_BYTES + _HNSW_ELEMENT_BYTES)


def hnsw_build_memory_mb(graph_bytes: int, *, physical_bytes: int, share: float = HNSW_BUILD_MEMORY_SHARE,
                         floor_mb: int = HNSW_BUILD_MEMORY_FLOOR_MB) -> int:
    """`maintenance_work_mem` (MB) for an HNSW build: the graph with a quarter more for headroom,
    at least `floor_mb` (Postgres's default), never above `share` of `physical_bytes` (nor below the
    floor, on a machine with less memory than that)."""
    wanted = math.ceil(graph_bytes * 1.25 / (1 << 20))
    cap = int(physical_bytes * share) >> 20
    return max(floor_mb, min(wanted, cap))


def physical_memory_bytes() -> int:
    """This machine's physical memory (the embedded server's; a server elsewhere may have more)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 4 << 30


@dataclass(frozen=True)
class IndexBuildPlan:
    """The session settings of one HNSW build, and what they were sized from."""

    rows: int
    graph_mb: int
    maintenance_work_mem_mb: int
    parallel_workers: int
    """`max_parallel_maintenance_workers` for the build: cores − 1 (the leader works too), bounded
    by the server's `max_parallel_workers` and `max_worker_processes`."""

    def describe(self) -> str:
        return (f"maintenance_work_mem={self.maintenance_work_mem_mb}MB (graph of {self.rows:,} vectors ≈ "
                f"{self.graph_mb:,} MB), max_parallel_maintenance_workers={self.parallel_workers}")


def plan_index_build(conn: psycopg.Connection, table: VectorTable, *, physical_bytes: int | None = None,
                     cores: int | None = None) -> IndexBuildPlan:
    """Size the HNSW build for the table's rows and this machine: see `hnsw_graph_bytes` and `hnsw_build_memory_mb`. A `maintenance_work_mem` the server
    already has above that is kept."""
    relation = table.relation
    rows = conn.execute(f"SELECT count(*) FROM {relation}").fetchone()[0]  # vectors are out of line: cheap
    graph = hnsw_graph_bytes(rows, dimensions=table.dimensions, bytes_per_component=(
        2 if table.storage == "halfvec" or table.dimensions > HNSW_MAX_DIMENSIONS else 4))
    memory = hnsw_build_memory_mb(graph, physical_bytes=physical_bytes or physical_memory_bytes())
    current, processes, parallel = conn.execute(
        "SELECT pg_size_bytes(current_setting('maintenance_work_mem')) >> 20,"
        " current_setting('max_worker_processes')::int, current_setting('max_parallel_workers')::int").fetchone()
    workers = max(0, min((cores or os.cpu_count() or 1) - 1, processes, parallel))
    return IndexBuildPlan(rows, math.ceil(graph / (1 << 20)), max(memory, int(current)), workers)


def ensure_vector_index(conn: psycopg.Connection, *, table: VectorTable | None = None,
                        log: Callable[[str], None] | None = None) -> float | None:
    """Build the HNSW cosine index once no embedding shard is in flight; seconds taken, or None when
    the table has one already, is not ours to index (a table of yours that existed), or loads are
    still running.

    Inserting into an existing HNSW index costs a graph search per row (measured here: ~80 vectors/s
    against ~7,000/s without it), so bulk loads go in first and the index is built once, with
    `maintenance_work_mem` sized to hold the whole graph (`plan_index_build`; a graph that does not
    fit is built on disk, 4× slower already at 50K vectors) and parallel workers on the other cores.
    `log` gets the settings chosen. Later small increments are maintained by the index as usual."""
    table = table or VectorTable()
    exists = conn.execute(
        "SELECT EXISTS (SELECT 1 FROM pg_index i JOIN pg_class x ON x.oid = i.indexrelid JOIN pg_am a"
        " ON a.oid = x.relam WHERE i.indrelid = to_regclass(%s) AND a.amname = 'hnsw')",
        (table.relation,)).fetchone()[0]
    if exists or not table.owned(conn):
        return None
    open_jobs = conn.execute(
        "SELECT count(*) FROM batch_jobs WHERE flow = %s AND state <> ALL(%s)",
        (FLOW, list(ledger.SETTLED_JOB_STATES))).fetchone()[0]
    if open_jobs:
        return None
    started = time.monotonic()
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(hashtext('legal_batch:hnsw'))")
        plan = plan_index_build(conn, table)
        if log is not None:
            log(f"building the HNSW index on {table.name}: {plan.describe()}")
        conn.execute(f"SET LOCAL maintenance_work_mem = '{int(plan.maintenance_work_mem_mb)}MB'")
        conn.execute(f"SET LOCAL max_parallel_maintenance_workers = {int(plan.parallel_workers)}")
        conn.execute(hnsw_index_sql(table))
    return time.monotonic() - started
