"""Further vector sinks (`LEGAL_BATCH_EMBEDDINGS_SINKS=pgvector,chroma`, `--sink`): every vector lands
first in the vector table in the ledger's Postgres (with the ledger, in the ingest transaction); each
further sink (Chroma, Weaviate) then gets a copy, and `sink_vectors` records which chunk (and which
text of it) each sink holds.

- **At ingest** (`replicate(..., job_id=)`, inside the ingest transaction, after the items are
  closed): the chunks of the shard's texts are written to every further sink, then recorded. A
  chunk a sink did not store (refused, or the sink unreachable) is not done: its item goes back to
  `retryable` naming the sink and why (`failed` when the sink refuses it for good, or after
  `LEGAL_BATCH_MAX_ATTEMPTS`). Its vector stays in the vector table, so it is never requested again:
  the next pass writes it to the sink from there and closes the item.
- **Before planning** (`replicate(...)` without a job, batch by batch in short transactions, so a
  long fill keeps its progress and blocks nothing): every vector a sink lacks is written (a sink
  added later is filled; chunks served from the cache reach every sink), and vectors of chunks that
  are gone or whose text changed are deleted from the sinks. A sink that cannot be reached is left
  for a later pass: nothing done is undone for it.
- **A crash** between a sink's write and the ledger's commit leaves the sink ahead of
  `sink_vectors`; ids are deterministic, so the next run writes the same ids again (upsert): no
  duplicate, nothing lost.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import psycopg

from legal_batch.core import ledger
from legal_batch.core.crash import crash_point
from legal_batch.core.user_tables import CaseSource, VectorTable
from legal_batch.sinks.base import VectorRecord, VectorSink, as_array, chunk_metadata, vector_id

if TYPE_CHECKING:
    from legal_batch.settings import Settings

FLOW = "embeddings"
PRIMARY = "pgvector"
"""The sink that is the vector table in the ledger's Postgres: always written (the ledger's record of
what is embedded); named in the list, it is also indexed (HNSW) and searched."""
_BATCH = 256


def further_sinks(names: Sequence[str]) -> tuple[str, ...]:
    """The sinks written besides the vector table, in order."""
    return tuple(name for name in names if name != PRIMARY)


@dataclass
class Replication:
    """What one pass wrote to (and deleted from) the further sinks, and what they did not take."""

    written: dict[str, int] = field(default_factory=dict)
    """Vectors written, per sink (its `where`)."""
    deleted: dict[str, int] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)
    """Chunk (`<case id>:<chunk index>`) → why a sink did not store it (the sink named)."""
    unavailable: dict[str, str] = field(default_factory=dict)
    """Sink name → why it could not be opened (at ingest its chunks are in `refused` too)."""

    def line(self) -> str:
        parts = [f"{count:,} vectors written to {where}" for where, count in self.written.items() if count]
        parts += [f"{count:,} deleted from {where}" for where, count in self.deleted.items() if count]
        if self.refused:
            example = next(iter(self.refused.values()))
            parts.append(f"{len(self.refused):,} chunks not stored in every sink, not done (e.g. {example})")
        parts += [f"the {name} sink cannot be reached ({reason}): its vectors wait for a later pass"
                  for name, reason in self.unavailable.items()]
        return "; ".join(parts) or "every sink up to date"


def open_sinks(names: Sequence[str], *, model: str, dimensions: int, settings: Settings,
               strict: bool = True) -> tuple[list[VectorSink], dict[str, str]]:
    """Open the further sinks among `names`. `strict`: a sink that cannot be opened raises (a one-line
    `UserError` for a setting or a collection of another dimension); else it is returned in the
    second value with the reason, for its chunks to stay retryable."""
    from legal_batch.sinks.registry import open_sink

    opened: list[VectorSink] = []
    unavailable: dict[str, str] = {}
    for name in further_sinks(names):
        try:
            opened.append(open_sink(name, model=model, dimensions=dimensions, settings=settings))
        except Exception as exc:
            if strict:
                for sink in opened:
                    sink.close()
                raise
            unavailable[name] = _first_line(exc)
    return opened, unavailable


def check_sinks(names: Sequence[str], *, model: str, dimensions: int, settings: Settings,
                reachable: bool = True) -> dict[str, str]:
    """At start, before any request: every further sink is configured and holds (or will hold)
    vectors of this dimension, else one line (`UserError`) says which and why. `reachable`: a sink
    that cannot be reached is such a line too; else it is returned with the reason (its chunks will
    wait for it, retryable)."""
    from legal_batch.core.errors import UserError
    from legal_batch.sinks.base import SinkError
    from legal_batch.sinks.registry import open_sink

    unavailable: dict[str, str] = {}
    for name in further_sinks(names):
        try:
            open_sink(name, model=model, dimensions=dimensions, settings=settings).close()
        except SinkError as exc:
            if reachable:
                raise UserError(str(exc)) from None
            unavailable[name] = _first_line(exc)
    return unavailable


def replicate(conn: psycopg.Connection, *, names: Sequence[str], model: str, table: VectorTable,
              source: CaseSource, settings: Settings, max_attempts: int = 3,
              job_id: int | None = None) -> Replication:
    """Bring the further sinks among `names` up to date (see the module docstring): with `job_id`, the
    chunks of that shard's texts, inside the caller's (ingest) transaction; without, every chunk and
    the deletions, in transactions of its own (`conn` in autocommit)."""
    from legal_batch.sinks.registry import sink_target

    report = Replication()
    names = further_sinks(names)
    if not names:
        return report
    sinks, unavailable = open_sinks(names, model=model, dimensions=table.dimensions, settings=settings,
                                    strict=False)
    report.unavailable = unavailable
    refused: dict[str, tuple[str, bool]] = {}
    locked: list[str] = []
    try:
        if job_id is not None:  # done means every sink has it: this shard's chunks wait for the sink
            for name, reason in unavailable.items():
                target = sink_target(name, model=model, dimensions=table.dimensions, settings=settings)
                for key in _missing(conn, target=target, model=model, table=table, job_id=job_id):
                    refused.setdefault(key, (f"not stored in the {name} sink: {reason}", True))
        stored: set[str] = set()
        for sink in sinks:
            written = 0
            if sink.one_writer:  # e.g. an embedded Chroma: concurrent ingests take turns (until their commit)
                conn.execute("SELECT pg_advisory_lock(hashtext(%s))" if job_id is None
                             else "SELECT pg_advisory_xact_lock(hashtext(%s))", (f"legal_batch:sink:{sink.where}",))
                if job_id is None:
                    locked.append(sink.where)
            for records in _batches(conn, sink, model=model, table=table, source=source, job_id=job_id):
                failures = _write(sink, records)
                crash_point("after_sink_write")
                kept = [record for record in records if record.id not in failures]
                with conn.transaction():
                    _record(conn, sink.where, model, kept)
                written += len(kept)
                stored.update(record.id for record in kept)
                for key, (reason, retryable) in failures.items():
                    refused.setdefault(key, (f"not stored in the {sink.name} sink: {reason}", retryable))
            report.written[sink.where] = written
            if job_id is None:
                report.deleted[sink.where] = _delete_gone(conn, sink, model)
        report.refused = {key: reason for key, (reason, _) in refused.items()}
        with conn.transaction():
            if refused:
                ledger.reopen_subjects(conn, FLOW, [(key, reason) for key, (reason, retryable) in refused.items()
                                                    if retryable], max_attempts=max_attempts)
                ledger.fail_subjects(conn, FLOW, [(key, reason) for key, (reason, retryable) in refused.items()
                                                  if not retryable])
            ledger.close_reopened_subjects(conn, FLOW, sorted(stored - set(refused)))
    finally:
        for where in locked:
            conn.execute("SELECT pg_advisory_unlock(hashtext(%s))", (f"legal_batch:sink:{where}",))
        for sink in sinks:
            sink.close()
    return report


def _write(sink: VectorSink, records: list[VectorRecord]) -> dict[str, tuple[str, bool]]:
    """Write one batch; the ids not stored → (why, whether writing again may succeed); every id of the
    batch when the sink fails as a whole (unreachable mid-write, a client error)."""
    try:
        return {failure.id: (failure.reason, failure.retryable) for failure in sink.upsert(records)}
    except Exception as exc:
        reason = f"{sink.where}: {_first_line(exc)}"
        return {record.id: (reason, True) for record in records}


def _scope(job_id: int | None) -> str:
    """The chunks to look at: those of the texts a shard's done items were made from, or all."""
    if job_id is None:
        return "case_chunks"
    return ("(SELECT c.* FROM case_chunks c WHERE c.text_sha256 IN (SELECT o.text_sha256 FROM batch_items i"
            "  JOIN case_chunks o ON o.case_id = split_part(i.subject_key, ':', 1)::uuid"
            "   AND o.chunk_index = split_part(i.subject_key, ':', 2)::int"
            "  WHERE i.job_id = %(job)s AND i.state = %(done)s))")


def _batches(conn: psycopg.Connection, sink: VectorSink, *, model: str, table: VectorTable, source: CaseSource,
             job_id: int | None) -> Iterator[list[VectorRecord]]:
    """The chunks with a vector (made from their current text) in the vector table that `sink` lacks
    (or holds for another text), with their vector, text and metadata, `_BATCH` at a time, in key
    order: a page per query from the last key (each its own statement, so the caller may commit
    between pages)."""
    cases, scope, relation = source.select("id", "neutral_citation"), _scope(job_id), table.relation
    page_sql = (
        "SELECT c.case_id::text, c.chunk_index, e.embedding, c.chunk_text, c.chunk_type, k.neutral_citation"
        f" FROM {scope} AS c"
        f" JOIN {relation} e ON e.case_id = c.case_id AND e.chunk_index = c.chunk_index"
        "  AND e.model = %(model)s AND (e.text_sha256 IS NULL OR e.text_sha256 = c.text_sha256)"
        f" LEFT JOIN {cases} AS k ON k.id = c.case_id"
        " WHERE (c.case_id, c.chunk_index) > (%(after_case)s::uuid, %(after_index)s::int)"
        "  AND NOT EXISTS (SELECT 1 FROM sink_vectors s WHERE s.target = %(target)s AND s.model = %(model)s"
        "  AND s.case_id = c.case_id AND s.chunk_index = c.chunk_index AND s.text_sha256 = c.text_sha256)"
        " ORDER BY c.case_id, c.chunk_index LIMIT %(page)s")
    after: tuple[str, int] = ("00000000-0000-0000-0000-000000000000", -1)
    while True:
        rows = conn.execute(page_sql, {"model": model, "target": sink.where, "job": job_id,
                                       "done": ledger.ItemState.DONE, "after_case": after[0],
                                       "after_index": after[1], "page": _BATCH}).fetchall()
        if not rows:
            return
        yield [VectorRecord(case_id, index, as_array(vector), text, chunk_metadata(
            record_id=case_id, chunk_index=index, model=model, text=text, chunk_type=chunk_type, citation=citation))
            for case_id, index, vector, text, chunk_type, citation in rows]
        after = (rows[-1][0], rows[-1][1])


def _missing(conn: psycopg.Connection, *, target: str, model: str, table: VectorTable, job_id: int | None
             ) -> list[str]:
    """Chunks of the shard's texts with a vector that `target` (a sink that could not be opened) does
    not hold."""
    scope, relation = _scope(job_id), table.relation
    rows = conn.execute(
        f"SELECT c.case_id::text, c.chunk_index FROM {scope} AS c"
        f" JOIN {relation} e ON e.case_id = c.case_id AND e.chunk_index = c.chunk_index AND e.model = %(model)s"
        " WHERE NOT EXISTS (SELECT 1 FROM sink_vectors s WHERE s.target = %(target)s AND s.model = %(model)s"
        "  AND s.case_id = c.case_id AND s.chunk_index = c.chunk_index AND s.text_sha256 = c.text_sha256)",
        {"model": model, "job": job_id, "target": target, "done": ledger.ItemState.DONE}).fetchall()
    return [vector_id(case_id, index) for case_id, index in rows]


def _record(conn: psycopg.Connection, target: str, model: str, records: list[VectorRecord]) -> None:
    if not records:
        return
    conn.execute(
        "INSERT INTO sink_vectors (target, model, case_id, chunk_index, text_sha256)"
        " SELECT %s, %s, k.case_id, k.chunk_index, k.sha FROM unnest(%s::uuid[], %s::int[], %s::text[])"
        "  AS k (case_id, chunk_index, sha)"
        " ON CONFLICT (target, model, case_id, chunk_index) DO UPDATE"
        " SET text_sha256 = excluded.text_sha256, written_at = now()",
        (target, model, [r.record_id for r in records], [r.chunk_index for r in records],
         [str(r.metadata.get("text_sha256")) for r in records]))


def _delete_gone(conn: psycopg.Connection, sink: VectorSink, model: str) -> int:
    """Delete from the sink the vectors of chunks that are gone or whose text changed."""
    rows = conn.execute(
        "SELECT s.case_id::text, s.chunk_index FROM sink_vectors s WHERE s.target = %s AND s.model = %s"
        " AND NOT EXISTS (SELECT 1 FROM case_chunks c WHERE c.case_id = s.case_id AND c.chunk_index = s.chunk_index"
        "  AND c.text_sha256 = s.text_sha256)", (sink.where, model)).fetchall()
    if not rows:
        return 0
    try:
        sink.delete([vector_id(case_id, index) for case_id, index in rows])
    except Exception:  # the sink is unreachable: the rows stay, the next pass deletes them
        return 0
    conn.execute(  # (autocommit: its own transaction)
        "DELETE FROM sink_vectors s USING unnest(%s::uuid[], %s::int[]) AS k (case_id, chunk_index)"
        " WHERE s.target = %s AND s.model = %s AND s.case_id = k.case_id AND s.chunk_index = k.chunk_index",
        ([r[0] for r in rows], [r[1] for r in rows], sink.where, model))
    return len(rows)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@dataclass(frozen=True)
class SinkVerdict:
    """`legal-batch verify` on one further sink: what it holds against the ledger."""

    where: str
    model: str
    stored: int | None
    """Vectors in the sink (None: it could not be opened)."""
    expected: int
    """Chunks with a vector of this model in the vector table (done in the ledger)."""
    wrong_dimensions: int = 0
    not_unit_norm: int = 0
    problem: str | None = None

    @property
    def ok(self) -> bool:
        return (self.problem is None and self.stored == self.expected and not self.wrong_dimensions
                and not self.not_unit_norm)

    def line(self) -> str:
        if self.problem is not None:
            return f"{self.where} ({self.model}): {self.problem}"
        text = f"{self.where} ({self.model}): {self.stored:,} vectors, {self.expected:,} chunks done in the ledger"
        if self.wrong_dimensions or self.not_unit_norm:
            text += (f"; of a sample, {self.wrong_dimensions} of the wrong dimension, {self.not_unit_norm} not of "
                     "unit norm")
        return text


def verify_sinks(conn: psycopg.Connection, *, names: Sequence[str], table: VectorTable, settings: Settings,
                 sample: int = 200) -> list[SinkVerdict]:
    """For every further sink named in `names` (the configured ones) and every model embedded: its
    count against the ledger's done chunks, and the dimension and norm of a sample of its vectors."""
    wanted = list(dict.fromkeys(further_sinks(names)))
    relation = table.relation
    models = [row[0] for row in conn.execute(f"SELECT DISTINCT model FROM {relation} ORDER BY 1")]
    verdicts: list[SinkVerdict] = []
    for model in models:
        expected = conn.execute(
            f"SELECT count(*) FROM {relation} e JOIN case_chunks c ON c.case_id = e.case_id"
            " AND c.chunk_index = e.chunk_index WHERE e.model = %s", (model,)).fetchone()[0]
        keys = [vector_id(case_id, index) for case_id, index in conn.execute(
            f"SELECT case_id::text, chunk_index FROM {relation} WHERE model = %s ORDER BY random() LIMIT %s",
            (model, sample))]
        for name in wanted:
            try:
                sinks, _ = open_sinks([name], model=model, dimensions=table.dimensions, settings=settings)
            except Exception as exc:
                verdicts.append(SinkVerdict(name, model, None, expected, problem=f"cannot be opened: {_first_line(exc)}"))
                continue
            sink = sinks[0]
            try:
                vectors = sink.vectors(keys)
                wrong = sum(1 for v in vectors.values() if v.shape != (table.dimensions,))
                off = sum(1 for v in vectors.values() if abs(float(np.linalg.norm(v)) - 1) > 1e-3)
                verdicts.append(SinkVerdict(sink.where, model, sink.count(), expected, wrong, off))
            finally:
                sink.close()
    return verdicts
