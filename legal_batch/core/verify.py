"""The nothing-lost invariant, proven from the database alone (`legal-batch verify`).

Checks, per flow:
- every item is in exactly one state, and an open item (`exported`/`submitted`) belongs to a job
  that is itself open in the matching phase — never to a job already ingested or refused;
- every `done` item has its result row, written by its own job (the flow says where and how to
  tell: `done_without_result_sql`);
- `failed` and `retryable` items carry a reason;
- no two jobs share a provider job id, and an open job's items add up to its request count;
- an ingested job's outcome counts add up to its request count, and the provider's total, when
  reported, equals it.
Structural guarantees (one row per subject, one job per shard) are database constraints.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import psycopg

from legal_batch.core import ledger
from legal_batch.core.ledger import ItemState, JobState


@dataclass(frozen=True)
class Violation:
    flow: str
    rule: str
    count: int
    examples: list[str]
    repair: str


@dataclass
class VerifyReport:
    checked_items: dict[str, int] = field(default_factory=dict)
    checked_jobs: dict[str, int] = field(default_factory=dict)
    violations: list[Violation] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.violations


_RULES: list[tuple[str, str, str]] = [
    (
        "open item in a job that is not open",
        "SELECT i.subject_key || ' (' || i.state || ', job ' || j.shard_key || ' ' || j.state || ')'"
        " FROM batch_items i JOIN batch_jobs j ON j.id = i.job_id"
        " WHERE i.flow = %(flow)s AND ((i.state = %(exported)s AND j.state <> ALL(%(unsubmitted)s))"
        "   OR (i.state = %(submitted)s AND j.state <> ALL(%(accepted)s)))",
        "run the flow's ingest for that shard (`legal-batch <flow> ingest`); an ingested job's leftovers are "
        "released by re-running ingest after resetting the job state to its provider status",
    ),
    (
        "open item without a job",
        "SELECT subject_key FROM batch_items WHERE flow = %(flow)s AND state = ANY(%(open)s) AND job_id IS NULL",
        f"UPDATE batch_items SET state = '{ItemState.RETRYABLE}' for these rows; the planner picks them up again",
    ),
    (
        "failed or retryable item without a reason",
        "SELECT subject_key FROM batch_items WHERE flow = %(flow)s AND state = ANY(%(without_result)s)"
        " AND (last_error IS NULL OR last_error = '')",
        "inspect the job's error file; these items can be retried safely",
    ),
    (
        "open job whose items do not add up to its request count",
        "SELECT j.shard_key || ': ' || j.request_count || ' requests, ' || count(i.id) || ' open items'"
        " FROM batch_jobs j LEFT JOIN batch_items i ON i.job_id = j.id AND i.state = ANY(%(open)s)"
        " WHERE j.flow = %(flow)s AND (j.state = ANY(%(unsubmitted)s) OR j.state = ANY(%(queued)s))"
        " GROUP BY j.id HAVING count(i.id) <> j.request_count",
        "an item was moved or deleted behind the pipeline's back; cancel the job and re-plan",
    ),
    (
        "ingested job whose outcomes do not add up",
        "SELECT shard_key || ': ' || request_count || ' requests, ' || coalesce(items_done, 0) || ' done + '"
        " || coalesce(items_retryable, 0) || ' retryable + ' || coalesce(items_failed, 0) || ' failed'"
        " FROM batch_jobs WHERE flow = %(flow)s AND state = %(ingested)s"
        " AND coalesce(items_done, 0) + coalesce(items_retryable, 0) + coalesce(items_failed, 0) <> request_count",
        "re-ingest is a no-op; investigate the ingest logs of that shard",
    ),
    (
        "provider total differs from the ledger's request count",
        "SELECT shard_key || ': provider says ' || completed_count + failed_count || ', ledger ' || request_count"
        " FROM batch_jobs WHERE flow = %(flow)s AND state IN (%(completed)s, %(ingested)s)"
        " AND completed_count IS NOT NULL AND failed_count IS NOT NULL"
        " AND provider_status NOT IN ('expired', 'cancelled', 'Expired', 'Stopped', 'PartiallyCompleted')"
        " AND completed_count + failed_count <> request_count",
        "the provider processed a different file than recorded: compare the request file with the job's input",
    ),
]
_STATES = {
    "exported": ItemState.EXPORTED, "submitted": ItemState.SUBMITTED, "open": list(ledger.ITEM_OPEN_STATES),
    "without_result": list(ledger.ITEM_CLOSED_WITHOUT_RESULT_STATES),
    "unsubmitted": list(ledger.UNSUBMITTED_JOB_STATES), "queued": list(ledger.QUEUED_JOB_STATES),
    "accepted": list(ledger.ACCEPTED_JOB_STATES), "completed": JobState.COMPLETED, "ingested": JobState.INGESTED,
}
"""The ledger states the rules name, bound as parameters (`%(open)s`...)."""


@dataclass(frozen=True)
class Stale:
    """Results that no longer match the source text they were made from."""

    flow: str
    count: int
    examples: list[str]
    repair: str


_STALE_REPAIR = {
    "embeddings": "run the embeddings flow (`legal-batch embeddings run`): changed cases are chunked again and "
                  "only their changed chunks are requested; removed cases' vectors go",
    "headnotes": "regenerate them with LEGAL_BATCH_HEADNOTE_REGENERATE_STALE=true `legal-batch headnotes run`, or "
                 "keep them",
}


def stale_results(conn: psycopg.Connection, flows: Mapping[str, str | None], *, examples: int = 5) -> list[Stale]:
    """Per flow, the results its `stale_result_sql` finds (one line each): vectors whose text hash no
    longer matches the source, headnotes whose judgment changed. Not a ledger violation — the next
    run (or an explicit regeneration) brings them up to date."""
    found = []
    for flow, stale_sql in flows.items():
        if not stale_sql:
            continue
        rows = conn.execute(stale_sql).fetchall()
        if rows:
            found.append(Stale(flow, len(rows), [str(r[0]) for r in rows[:examples]],
                               _STALE_REPAIR.get(flow, f"run the {flow} flow again")))
    return found


def verify(conn: psycopg.Connection, flows: Mapping[str, str | None], *, examples: int = 5) -> VerifyReport:
    """Check every rule for each flow; `flows` maps a flow name to its done-without-result SQL (or None)."""
    report = VerifyReport()
    for flow, missing_sql in flows.items():
        report.checked_items[flow] = conn.execute(
            "SELECT count(*) FROM batch_items WHERE flow = %s", (flow,)).fetchone()[0]
        report.checked_jobs[flow] = conn.execute(
            "SELECT count(*) FROM batch_jobs WHERE flow = %s", (flow,)).fetchone()[0]
        rules = list(_RULES)
        if missing_sql:
            rules.append(("done item without its result row", missing_sql,
                          f"run the {flow} flow again: subjects without a result are candidates again and get "
                          "re-requested; a result kept from before the job (e.g. an older headnote) is replaced "
                          "by an overwrite run"))
        for rule, sql, repair in rules:
            rows = conn.execute(sql, {"flow": flow, **_STATES}).fetchall()
            if rows:
                report.violations.append(Violation(flow, rule, len(rows), [str(r[0]) for r in rows[:examples]],
                                                   repair))
    return report
