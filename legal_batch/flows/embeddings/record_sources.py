"""Records from a source other than files (`--source dynamodb`, `LEGAL_BATCH_EMBEDDINGS_SOURCE`) read into
the corpus before each chunking pass, and their outcome written back.

- **Read** (`pull`): a bounded number of pages (`LEGAL_BATCH_DYNAMODB_PAGES_PER_PASS`) from the
  cursor where the last pass stopped (`source_cursors`; at the end the next pass starts over, so new
  items and items marked for another read are found). Each record becomes a case of `court_cases`
  (id: uuid5 of the source and the record's key; `case_name` the key, `court` the source) — from
  there chunking, change detection, the vector cache and the sinks treat it like any judgment. A
  record whose text changed is chunked again; one read again with its text unchanged (its status
  cleared in the source) gets its status written again, with no new request. Records without usable
  text are written back `FAILED` with the reason (their key named) and counted; the rest go on.
- **Write back** (`write_back`): a record whose chunks are all done (in every sink) gets `SUCCESS`
  with the model and a timestamp; one with a failed item `FAILED` with the reason. Written after the
  ledger committed, recorded in `source_records` for the text it was written for; a write the source
  refused or throttled is tried again by the next pass.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg.types.json import Jsonb

from legal_batch.core.errors import UserError
from legal_batch.core.ledger import ItemState
from legal_batch.core.user_tables import text_sha256

if TYPE_CHECKING:
    from legal_batch.settings import Settings
    from legal_batch.sources.base import SourceProblem

FLOW = "embeddings"
RECORD_NAMESPACE = uuid.UUID("0b9f3a7e-51c2-5d8e-8f0a-72656364736c")
"""uuid5 namespace of the case ids of source records: `<source>:<record id>` → the same case every pass."""
_WRITE_BACK_BATCH = 5_000


def record_source_names() -> list[str]:
    from legal_batch.sources.registry import SOURCES

    return list(SOURCES)


def check_source_name(name: str | None, *, setting: str = "LEGAL_BATCH_EMBEDDINGS_SOURCE") -> str | None:
    """`name` if it is a registered record source (or None); else one line naming the choices."""
    if name is None or not name.strip():
        return None
    name = name.strip().lower()
    if name not in record_source_names():
        raise UserError(f"{setting}={name!r} is not a record source: use one of {', '.join(record_source_names())}, "
                        "or leave it unset to embed the corpus (court_cases) only")
    return name


def open_source(name: str, settings: Settings) -> Any:
    """The named source, configured by its settings (one line when one is missing)."""
    if settings.source_table:
        raise UserError(f"the {name} source reads records into court_cases, but LEGAL_BATCH_SOURCE_TABLE="
                        f"{settings.source_table!r} makes chunking read your table: unset one of them")
    if name == "dynamodb":
        if not settings.dynamodb_table:
            raise UserError("the dynamodb source needs LEGAL_BATCH_DYNAMODB_TABLE (the table of records to embed); "
                            "set it, or drop --source dynamodb / LEGAL_BATCH_EMBEDDINGS_SOURCE")
        from legal_batch.sources.dynamodb import DynamoDBSource

        try:
            return DynamoDBSource(settings.dynamodb_table, text_attribute=settings.dynamodb_text_attribute,
                                  status_attribute=settings.dynamodb_status_attribute,
                                  page_size=settings.dynamodb_page_size)
        except Exception as exc:
            if isinstance(exc, UserError):
                raise
            raise UserError(f"dynamodb table {settings.dynamodb_table!r} cannot be read ({_first_line(exc)}): check "
                            "LEGAL_BATCH_DYNAMODB_TABLE, AWS_REGION and credentials (AWS_ENDPOINT_URL_DYNAMODB for "
                            "a local endpoint)") from exc
    raise UserError(f"unknown record source {name!r}: one of {', '.join(record_source_names())}")


def source_label(name: str, source: Any) -> str:
    """How records of this source are named in our tables: `dynamodb:<table>`."""
    return f"{name}:{getattr(source, 'table', name)}"


def record_case_id(label: str, record_id: str) -> uuid.UUID:
    return uuid.uuid5(RECORD_NAMESPACE, f"{label}:{record_id}")


@dataclass
class Pulled:
    """What one read pass did."""

    source: str = ""
    pages: int = 0
    scanned: int = 0
    records: int = 0
    changed: int = 0
    """Records new, or whose text changed since the last read."""
    problems: list[SourceProblem] = field(default_factory=list)
    throttled: bool = False
    complete: bool = False
    """The scan reached the end of the table (the next pass starts over)."""

    def line(self) -> str:
        text = (f"{self.source}: read {self.records:,} records ({self.changed:,} new or changed) from "
                f"{self.pages:,} pages")
        if self.problems:
            text += f"; {len(self.problems):,} unusable, marked FAILED (e.g. {self.problems[0].reason})"
        if self.throttled:
            text += "; throttled, the next pass resumes from the cursor"
        elif not self.complete:
            text += "; more to read, the next pass resumes from the cursor"
        return text


def pull(conn: psycopg.Connection, name: str, settings: Settings, *, source: Any | None = None) -> Pulled:
    """Read one bounded pass of the source into `court_cases` (see the module docstring)."""
    source = source or open_source(name, settings)
    label = source_label(name, source)
    report = Pulled(source=label)
    row = conn.execute("SELECT cursor FROM source_cursors WHERE source = %s", (label,)).fetchone()
    cursor = row[0] if row else None
    budget = settings.dynamodb_pages_per_pass
    while report.pages < budget:
        page = source.scan(cursor=cursor, page_budget=min(10, budget - report.pages))
        report.pages += page.pages
        report.scanned += page.scanned
        with conn.transaction():
            report.changed += _store(conn, label, page.records)
            conn.execute(
                "INSERT INTO source_cursors (source, cursor, scanned) VALUES (%s, %s, %s)"
                " ON CONFLICT (source) DO UPDATE SET cursor = excluded.cursor,"
                "  scanned = source_cursors.scanned + excluded.scanned, updated_at = now()",
                (label, page.cursor, page.scanned))
        report.records += len(page.records)
        if page.problems:
            report.problems.extend(page.problems)
            source.write_failed(page.problems)
        cursor = page.cursor
        if page.throttled:
            report.throttled = True
            break
        if cursor is None:
            report.complete = True
            break
    return report


def _store(conn: psycopg.Connection, label: str, records: list) -> int:
    """Upsert records as cases (the text only moves `updated_at` when it changed); returns how many
    are new or changed."""
    if not records:
        return 0
    rows = [(str(record_case_id(label, r.id)), r.id, r.text, text_sha256(r.text), Jsonb(dict(r.metadata)))
            for r in records]
    changed = conn.execute(
        "INSERT INTO court_cases AS c (id, case_name, court, full_text)"
        " SELECT k.id, k.record_id, %s, k.text FROM unnest(%s::uuid[], %s::text[], %s::text[]) AS k (id, record_id, text)"
        " ON CONFLICT (id) DO UPDATE SET full_text = excluded.full_text, case_name = excluded.case_name,"
        "  court = excluded.court, updated_at = now()"
        " WHERE c.full_text IS DISTINCT FROM excluded.full_text",
        (label, [r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows])).rowcount
    with conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO source_records (case_id, source, record_id, text_sha256, metadata) VALUES (%s, %s, %s, %s, %s)"
            " ON CONFLICT (case_id) DO UPDATE SET text_sha256 = excluded.text_sha256, metadata = excluded.metadata,"
            "  status = NULL, status_sha256 = NULL, read_at = now()",  # read again: the source has no final status
            [(case_id, label, record_id, sha, metadata) for case_id, record_id, _, sha, metadata in rows])
    return changed


@dataclass
class WrittenBack:
    succeeded: int = 0
    failed: int = 0
    not_written: list[SourceProblem] = field(default_factory=list)

    def line(self) -> str:
        text = f"statuses written back: {self.succeeded:,} SUCCESS, {self.failed:,} FAILED"
        if self.not_written:
            text += (f"; {len(self.not_written):,} not written (e.g. {self.not_written[0].reason}), tried again "
                     "next pass")
        return text


def write_back(conn: psycopg.Connection, name: str, settings: Settings, *, model: str, targets: Sequence[str] = (),
               source: Any | None = None) -> WrittenBack:
    """Write the outcome of every record whose chunks all ended (see the module docstring): SUCCESS
    only when each chunk is done and in every further sink of `targets` (`sink_vectors`, for its
    current text)."""
    from legal_batch.sources.base import StatusUpdate

    source = source or open_source(name, settings)
    label = source_label(name, source)
    report = WrittenBack()
    while True:
        rows = conn.execute(_OUTCOMES_SQL, {"source": label, "flow": FLOW, "limit": _WRITE_BACK_BATCH,
                                            "done": ItemState.DONE, "failed": ItemState.FAILED, "model": model,
                                            "targets": list(targets), "n_targets": len(targets)}).fetchall()
        updates, written = [], []
        for case_id, record_id, sha, chunks, done, failure in rows:
            if failure is not None:
                updates.append(StatusUpdate(record_id, error=failure))
            elif chunks > 0 and done >= chunks:
                updates.append(StatusUpdate(record_id, model=model))
            else:
                continue
            written.append((case_id, record_id, sha, "FAILED" if failure is not None else "SUCCESS"))
        if not updates:
            return report
        answer = source.write_status(updates)
        refused = {problem.id for problem in answer.not_written}
        report.not_written.extend(answer.not_written)
        kept = [row for row in written if row[1] not in refused]
        report.succeeded += sum(1 for row in kept if row[3] == "SUCCESS")
        report.failed += sum(1 for row in kept if row[3] == "FAILED")
        with conn.transaction():
            conn.execute(
                "UPDATE source_records r SET status = k.status, status_sha256 = k.sha, status_at = now()"
                " FROM unnest(%s::uuid[], %s::text[], %s::text[]) AS k (case_id, sha, status)"
                " WHERE r.case_id = k.case_id",
                ([row[0] for row in kept], [row[2] for row in kept], [row[3] for row in kept]))
        if len(rows) < _WRITE_BACK_BATCH or not kept:  # what is left waits for its chunks (or the source)
            return report


_OUTCOMES_SQL = """
WITH pending AS (
    SELECT r.case_id, r.record_id, r.text_sha256, s.chunks FROM source_records r
    JOIN chunked_cases s ON s.case_id = r.case_id AND s.text_sha256 = r.text_sha256
    WHERE r.source = %(source)s AND (r.status IS NULL OR r.status_sha256 IS DISTINCT FROM r.text_sha256)),
outcomes AS (
    SELECT p.case_id, p.record_id, p.text_sha256, p.chunks,
        (SELECT count(*) FROM generate_series(0, p.chunks - 1) AS n JOIN batch_items i
          ON i.flow = %(flow)s AND i.subject_key = p.case_id::text || ':' || n.n WHERE i.state = %(done)s
          AND %(n_targets)s = (SELECT count(*) FROM sink_vectors s JOIN case_chunks c ON c.case_id = s.case_id
                               AND c.chunk_index = s.chunk_index AND c.text_sha256 = s.text_sha256
                               WHERE s.case_id = p.case_id AND s.chunk_index = n.n AND s.model = %(model)s
                               AND s.target = ANY(%(targets)s))) AS done,
        (SELECT min(i.last_error) FROM batch_items i WHERE i.flow = %(flow)s AND i.state = %(failed)s
          AND i.subject_key IN (SELECT 'case:' || p.case_id::text UNION ALL
                                SELECT p.case_id::text || ':' || n FROM generate_series(0, p.chunks - 1) AS n))
          AS failure
    FROM pending p)
SELECT case_id, record_id, text_sha256, chunks, done, failure FROM outcomes
WHERE failure IS NOT NULL OR (chunks > 0 AND done >= chunks)
ORDER BY case_id LIMIT %(limit)s
"""


def has_more(conn: psycopg.Connection, name: str, settings: Settings, *, rescan_after_s: float) -> str | None:
    """The planner sensor's question: is there more of the source to read (a scan under way, or the
    last one ended more than `rescan_after_s` ago)? A marker that changes with every pass (so each
    pass is a new planning run), or None."""
    row = conn.execute(
        "SELECT cursor IS NOT NULL OR updated_at < now() - make_interval(secs => %s), updated_at FROM source_cursors"
        " WHERE source LIKE %s ORDER BY updated_at DESC LIMIT 1", (rescan_after_s, f"{name}:%")).fetchone()
    if row is None:
        return f"{name}: never read"
    return f"{name}: read at {row[1].isoformat()}" if row[0] else None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
