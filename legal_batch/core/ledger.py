"""The ledger: `batch_jobs` (one row per shard / provider job) and `batch_items` (one row per subject).

Rules that make "nothing lost, nothing paid twice" true:
- a subject is a candidate only with no done result and no open item (`exported` or `submitted`);
  `(flow, subject_key)` is unique, so a subject can never sit in two open jobs;
- shards are cut under an advisory lock per flow, so concurrent planners cannot claim the same items;
- the job row (with the client token the provider echoes) is written before the provider call;
- ingest of a shard is one transaction that writes results and closes items together.
"""

from __future__ import annotations

import hashlib
import re
import uuid
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, fields
from datetime import datetime
from decimal import Decimal
from enum import StrEnum

import psycopg
from psycopg.rows import class_row
from psycopg.types.json import Jsonb

from legal_batch.core.errors import QuotaTooSmall
from legal_batch.providers.base import ProviderLimits


class JobState(StrEnum):
    """A shard's provider job, from planning to ingest (`batch_jobs.state`)."""

    PLANNED = "planned"        # items claimed; request file not written yet
    EXPORTED = "exported"      # request file written; waiting for the gate (quota, budget, back-off)
    SUBMITTING = "submitting"  # the provider call is under way (or crashed: reconciled by client token)
    PENDING = "pending"        # accepted, validating
    RUNNING = "running"
    COMPLETED = "completed"
    PARTIAL = "partial"
    FAILED = "failed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"
    INGESTED = "ingested"      # results written and items closed (one transaction)
    SPLIT = "split"            # cut into smaller shards to fit the queue quota; holds no items


class ItemState(StrEnum):
    """One request subject's state in the ledger (`batch_items.state`)."""

    EXPORTED = "exported"
    SUBMITTED = "submitted"
    DONE = "done"
    RETRYABLE = "retryable"
    FAILED = "failed"


ITEM_OPEN_STATES = (ItemState.EXPORTED, ItemState.SUBMITTED)
"""An item in one of these is in flight: never a candidate again until its job is ingested."""
WAITING_JOB_STATES = (JobState.PLANNED, JobState.EXPORTED)
"""Shards not yet handed to the provider."""
UNSUBMITTED_JOB_STATES = (*WAITING_JOB_STATES, JobState.SUBMITTING)
"""Shards a submitter acts on (`submitting`: reconciled by client token first)."""
QUEUED_JOB_STATES = (JobState.SUBMITTING, JobState.PENDING, JobState.RUNNING)
"""Shards in the provider's queue (what its queue quota counts, what the status sensor polls)."""
TERMINAL_JOB_STATES = (JobState.COMPLETED, JobState.PARTIAL, JobState.FAILED, JobState.CANCELLED, JobState.EXPIRED)
"""Finished at the provider; ready for download and ingest."""
ACCEPTED_JOB_STATES = (JobState.PENDING, JobState.RUNNING, *TERMINAL_JOB_STATES)
"""Accepted by the provider and not ingested yet: where a `submitted` item belongs."""
UNINGESTED_JOB_STATES = (*QUEUED_JOB_STATES, *TERMINAL_JOB_STATES)
"""Handed to the provider and not ingested yet: the cost is committed but not recorded as actual spend."""
SETTLED_JOB_STATES = (JobState.INGESTED, JobState.FAILED, JobState.CANCELLED)
"""Jobs the ledger is finished with: ingested, refused at submit or failed at the provider, or cancelled."""
ITEM_CLOSED_WITHOUT_RESULT_STATES = (ItemState.RETRYABLE, ItemState.FAILED)
"""Closed without a result: to be planned again (`retryable`) or given up on (`failed`)."""
ITEM_CLAIMABLE_STATES = (ItemState.RETRYABLE, ItemState.DONE)
"""An item a new shard may take over (a retry, or a done subject requested again, e.g. to overwrite)."""
ITEM_NOT_CANDIDATE_STATES = (*ITEM_OPEN_STATES, ItemState.FAILED)
"""A subject with an item in one of these is not a candidate: in flight, or failed for good."""


def sql_in(states: Iterable[JobState | ItemState]) -> str:
    """`('exported', 'submitted')`: a state group as an SQL list, for SQL kept as a constant where a
    parameter cannot go. Only the ledger's own states are accepted, so no value reaches the SQL."""
    members = list(states)
    if not members or not all(isinstance(s, JobState | ItemState) for s in members):
        raise ValueError(f"not a group of ledger states: {members!r}")
    return "(" + ", ".join(f"'{s.value}'" for s in members) + ")"


@dataclass(frozen=True)
class Candidate:
    """A subject that needs a request: its key, request id and size estimates."""

    subject_key: str
    custom_id: str
    tokens: int
    size_bytes: int


@dataclass(frozen=True)
class Shard:
    """A shard: a set of items sent as one provider job (or served in real time), and that job's state —
    one row of `batch_jobs`, keyed by `shard_key` (its Dagster partition)."""

    id: int
    flow: str
    provider: str
    model: str
    mode: str
    """`batch` (a provider job) or `realtime` (a set below the provider's minimum per job)."""
    shard_key: str
    client_token: str
    provider_job_id: str | None
    state: str
    provider_status: str | None
    input_location: str | None
    output_location: str | None
    error_location: str | None
    request_count: int
    completed_count: int | None
    failed_count: int | None
    items_done: int | None
    items_retryable: int | None
    items_failed: int | None
    input_bytes: int | None
    est_input_tokens: int | None
    input_tokens: int | None
    output_tokens: int | None
    est_cost_usd: Decimal | None
    actual_cost_usd: Decimal | None
    submit_attempts: int
    next_submit_at: datetime | None
    last_error: str | None
    created_at: datetime
    submitted_at: datetime | None
    finished_at: datetime | None
    ingested_at: datetime | None
    updated_at: datetime
    waiting_reason: str | None
    """Why the shard is not submitted yet (quota full, budget reached, back-off after a refusal)."""
    waiting_since: datetime | None
    quota_refusals: int
    """How many times the provider refused this shard for quota (never counted as an item attempt)."""
    split_into: list[str] | None
    params: dict | None
    """The per-run options the shard's requests and results depend on (`Flow.job_params`), stored
    when it is planned; None for shards planned before they were kept."""
    ingest_failures: int
    """Ingest runs of this shard that failed; the job-status sensor retries up to a bound."""


_JOB_COLUMNS = ", ".join(f.name for f in fields(Shard))


@dataclass(frozen=True)
class ShardLimits:
    """What one shard may hold: the provider's per-job limits, optionally capped lower."""

    max_records: int
    max_bytes: int
    min_records: int = 1
    max_inputs: int | None = None
    max_input_tokens: int = 8191
    max_tokens: int | None = None
    """Most input tokens per shard (a share of the provider's enqueued-token quota), if it has one."""
    quota_tokens: int | None = None
    """The usable enqueued-token quota: a single request above it can never be submitted."""
    quota_hint: str = ""
    """Names the quota and its setting in the error for such a request."""

    @classmethod
    def of(cls, limits: ProviderLimits, *, cap_records: int | None = None) -> ShardLimits:
        records = limits.max_records_per_job
        if limits.max_embedding_inputs_per_job is not None:
            records = min(records, limits.max_embedding_inputs_per_job)
        if cap_records is not None:
            records = min(records, cap_records)
        # keep 5% of the file limit for the JSON envelope estimate's error
        return cls(
            max_records=records,
            max_bytes=int(limits.max_bytes_per_file * 0.95),
            min_records=limits.min_records_per_job,
            max_input_tokens=limits.max_input_tokens,
        )


def _lock_key(flow: str) -> int:
    return zlib.crc32(f"legal_batch:plan:{flow}".encode()) & 0x7FFFFFFF


def lock_planning(conn: psycopg.Connection, flow: str) -> None:
    """Hold the flow's planning lock until the caller's transaction ends: no shard is cut meanwhile,
    so the open items the caller sees stay the open items (e.g. while chunks are replaced)."""
    conn.execute("SELECT pg_advisory_xact_lock(%s)", (_lock_key(flow),))


def cut_shards(candidates: Iterable[Candidate], limits: ShardLimits) -> Iterator[list[Candidate]]:
    """Greedy packing in candidate order: a new shard when records, bytes or tokens would overflow."""
    shard: list[Candidate] = []
    size = tokens = 0
    max_tokens = limits.max_tokens if limits.max_tokens is not None else float("inf")
    for candidate in candidates:
        if shard and (len(shard) >= limits.max_records or size + candidate.size_bytes > limits.max_bytes
                      or tokens + candidate.tokens > max_tokens):
            yield shard
            shard, size, tokens = [], 0, 0
        shard.append(candidate)
        size += candidate.size_bytes
        tokens += candidate.tokens
    if shard:
        yield shard


@dataclass(frozen=True)
class PlanResult:
    shard_keys: list[str]
    planned_items: int
    rejected_items: int


def plan_shards(
    conn: psycopg.Connection,
    *,
    flow: str,
    provider: str,
    model: str,
    candidate_sql: str,
    params: dict,
    limits: ShardLimits,
    max_shards: int | None = None,
    job_params: dict | None = None,
) -> PlanResult:
    """Cut the flow's current candidates into new shards, recording jobs and items in one transaction.

    `candidate_sql` selects `subject_key, custom_id, tokens, size_bytes` of every candidate (in a
    stable order). Candidates over the model's input-token limit are recorded as failed items.
    `job_params` (the flow's per-run options, JSON) is stored on every new job row.
    Runs under an advisory transaction lock per flow: a concurrent planner waits, then sees these
    items as open and skips them. Candidates stream from a server-side cursor and each shard is
    recorded as soon as it is cut, so memory stays flat however many candidates there are.
    """
    shard_keys: list[str] = []
    planned = rejected = 0
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_lock_key(flow),))
        existing = conn.execute("SELECT count(*) FROM batch_jobs WHERE flow = %s", (flow,)).fetchone()[0]
        too_big: list[Candidate] = []

        def fitting() -> Iterator[Candidate]:
            with conn.cursor(name=f"plan_{flow}") as cur:  # server-side: candidates stream
                cur.itersize = 5_000
                for row in cur.execute(candidate_sql, params):
                    candidate = Candidate(*row)
                    if limits.quota_tokens is not None and candidate.tokens > limits.quota_tokens:
                        raise QuotaTooSmall(
                            f"request {candidate.custom_id} ({candidate.subject_key}) needs {candidate.tokens:,} "
                            f"input tokens, more than the usable {limits.quota_hint} of {limits.quota_tokens:,}; "
                            "raise the quota (the provider's limits page is the truth) or make requests smaller "
                            "(LEGAL_BATCH_CHUNK_MAX_TOKENS). Nothing was planned and nothing was marked failed.")
                    if candidate.tokens > limits.max_input_tokens:
                        too_big.append(candidate)
                    else:
                        yield candidate

        # Shard by shard as the candidates stream in: memory holds one shard, however many there are.
        # The cursor's snapshot is taken when it opens, so the items claimed below do not change
        # which candidates it returns.
        for shard in cut_shards(fitting(), limits):
            if max_shards is not None and len(shard_keys) >= max_shards:
                break
            mode = "realtime" if len(shard) < limits.min_records else "batch"
            existing += 1
            digest = hashlib.sha256()
            for c in shard:
                digest.update(c.custom_id.encode())
            shard_key = f"{flow}-{existing:05d}-{digest.hexdigest()[:8]}"
            job_id = _insert_job(conn, flow=flow, provider=provider, model=model, mode=mode, shard_key=shard_key,
                                 requests=len(shard), tokens=sum(c.tokens for c in shard), params=job_params)
            _claim_items(conn, flow, job_id, shard)
            shard_keys.append(shard_key)
            planned += len(shard)
        if too_big:
            rejected = _record_rejected(conn, flow, too_big, limits.max_input_tokens)
    return PlanResult(shard_keys, planned, rejected)


def _insert_job(conn: psycopg.Connection, *, flow: str, provider: str, model: str, mode: str, shard_key: str,
                requests: int, tokens: int, params: dict | None) -> int:
    return conn.execute(
        "INSERT INTO batch_jobs (flow, provider, model, mode, shard_key, client_token, state, request_count,"
        " est_input_tokens, params) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING id",
        (flow, provider, model, mode, shard_key, new_client_token(), JobState.PLANNED, requests, tokens,
         None if params is None else Jsonb(params)),
    ).fetchone()[0]


def split_shard(conn: psycopg.Connection, job: Shard, *, max_tokens: int, min_records: int = 1) -> list[str]:
    """Split a shard that was never accepted by the provider (`planned` or `exported`) into shards of
    at most `max_tokens` input tokens each (inside the caller's transaction). Its items move to the
    new shards unchanged — same state, same attempts —, the new shards start `planned` (their request
    files are written again) with the original's per-run options (`params`), and the original ends
    `split`, naming them. Returns the new shard keys."""
    if job.state not in UNSUBMITTED_JOB_STATES or job.provider_job_id is not None:
        raise ValueError(f"shard {job.shard_key} is {job.state} with job {job.provider_job_id}: only a shard the "
                         "provider never accepted can be split")
    rows = conn.execute("SELECT id, coalesce(input_tokens, 0) FROM batch_items WHERE job_id = %s AND state = ANY(%s)"
                        " ORDER BY id", (job.id, list(ITEM_OPEN_STATES))).fetchall()
    pieces: list[list[tuple[int, int]]] = [[]]
    tokens = 0
    for item_id, item_tokens in rows:
        if pieces[-1] and tokens + item_tokens > max_tokens:
            pieces.append([])
            tokens = 0
        pieces[-1].append((item_id, item_tokens))
        tokens += item_tokens
    keys: list[str] = []
    for number, piece in enumerate(p for p in pieces if p):
        key = f"{job.shard_key}-p{number + 1}"
        new_id = _insert_job(conn, flow=job.flow, provider=job.provider, model=job.model,
                             mode="realtime" if len(piece) < min_records else "batch", shard_key=key,
                             requests=len(piece), tokens=sum(t for _, t in piece), params=job.params)
        conn.execute("UPDATE batch_items SET job_id = %s, state = %s, updated_at = now()"
                     " WHERE id = ANY(%s)", (new_id, ItemState.EXPORTED, [i for i, _ in piece]))
        keys.append(key)
    update_job(conn, job.id, state=JobState.SPLIT, split_into=keys, waiting_reason=None, next_submit_at=None,
               last_error=f"split into {len(keys)} shards of at most {max_tokens:,} tokens to fit the provider's "
                          f"queue quota: {', '.join(keys)}")
    return keys


def new_client_token() -> str:
    """The token the provider echoes back (metadata / clientRequestToken / job name): Bedrock-name-safe,
    unique per submission attempt, so a fresh database never adopts another installation's job."""
    return "lb-" + uuid.uuid4().hex[:24]


def _claim_items(conn: psycopg.Connection, flow: str, job_id: int, shard: list[Candidate]) -> None:
    conn.execute(
        "CREATE TEMP TABLE IF NOT EXISTS plan_items (subject_key text, custom_id text, tokens int) ON COMMIT DROP"
    )
    conn.execute("TRUNCATE plan_items")
    with conn.cursor().copy("COPY plan_items (subject_key, custom_id, tokens) FROM STDIN") as copy:
        for c in shard:
            copy.write_row((c.subject_key, c.custom_id, c.tokens))
    claimed = conn.execute(
        "INSERT INTO batch_items (flow, subject_key, custom_id, job_id, state, input_tokens)"
        " SELECT %(flow)s, subject_key, custom_id, %(job)s, %(exported)s, tokens FROM plan_items"
        " ON CONFLICT (flow, subject_key) DO UPDATE SET job_id = excluded.job_id, state = %(exported)s,"
        "   custom_id = excluded.custom_id, input_tokens = excluded.input_tokens, updated_at = now()"
        " WHERE batch_items.state = ANY(%(claimable)s)",
        {"flow": flow, "job": job_id, "exported": ItemState.EXPORTED, "claimable": list(ITEM_CLAIMABLE_STATES)},
    ).rowcount
    if claimed != len(shard):
        raise RuntimeError(
            f"shard of job {job_id}: claimed {claimed} of {len(shard)} items; another process holds the rest. "
            "Nothing was recorded; run the planner again."
        )


def _record_rejected(conn: psycopg.Connection, flow: str, rejected: list[Candidate], limit: int) -> int:
    with conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO batch_items (flow, subject_key, custom_id, state, last_error, input_tokens)"
            " VALUES (%(flow)s, %(subject)s, %(custom_id)s, %(failed)s, %(reason)s, %(tokens)s)"
            " ON CONFLICT (flow, subject_key) DO UPDATE SET state = %(failed)s, last_error = excluded.last_error,"
            "  job_id = NULL, updated_at = now() WHERE batch_items.state = ANY(%(claimable)s)",
            [
                {"flow": flow, "subject": c.subject_key, "custom_id": c.custom_id, "failed": ItemState.FAILED,
                 "reason": f"{c.tokens} tokens exceed the model's input limit of {limit}; lower the chunk size "
                           "(LEGAL_BATCH_CHUNK_MAX_TOKENS) and re-chunk this record",
                 "tokens": c.tokens, "claimable": list(ITEM_CLAIMABLE_STATES)}
                for c in rejected
            ],
        )
    return len(rejected)


def record_failed_subjects(conn: psycopg.Connection, flow: str, failures: Iterable[tuple[str, str]]) -> int:
    """Mark subjects that cannot be requested at all (e.g. empty text) as failed with a reason."""
    rows = [{"flow": flow, "subject": key, "reason": reason, "failed": ItemState.FAILED} for key, reason in failures]
    if not rows:
        return 0
    with conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO batch_items (flow, subject_key, custom_id, state, last_error)"
            " VALUES (%(flow)s, %(subject)s, %(subject)s, %(failed)s, %(reason)s)"
            " ON CONFLICT (flow, subject_key) DO UPDATE SET state = %(failed)s, last_error = excluded.last_error,"
            "  updated_at = now()"
            " WHERE batch_items.state <> %(failed)s OR batch_items.last_error <> excluded.last_error",
            rows,
        )
    return len(rows)


def record_served_subjects(conn: psycopg.Connection, flow: str, subjects_sql: str, params: dict) -> int:
    """Close subjects whose result was written without a request (e.g. a vector from the cache) as
    `done`, with no job; `subjects_sql` selects their `subject_key, custom_id, tokens`. An open item
    is never touched. Returns how many were closed."""
    return conn.execute(
        "INSERT INTO batch_items (flow, subject_key, custom_id, state, input_tokens)"
        f" SELECT %(_flow)s, s.subject_key, s.custom_id, %(_done)s, s.tokens FROM ({subjects_sql}) AS s"
        "   (subject_key, custom_id, tokens)"
        " ON CONFLICT (flow, subject_key) DO UPDATE SET state = %(_done)s, job_id = NULL, last_error = NULL,"
        "   custom_id = excluded.custom_id, input_tokens = excluded.input_tokens, updated_at = now()"
        " WHERE batch_items.state <> ALL(%(_open)s)",
        {**params, "_flow": flow, "_done": ItemState.DONE, "_open": list(ITEM_OPEN_STATES)},
    ).rowcount


def reopen_subjects(conn: psycopg.Connection, flow: str, reopened: Iterable[tuple[str, str]], *,
                    max_attempts: int) -> int:
    """Done (or still retryable) subjects whose result did not reach every store (e.g. a further vector
    sink refused it): back to `retryable` with the reason, counting an attempt; `failed` (saying so)
    once attempts reach `max_attempts`. The result is kept where it is: finishing it needs no request."""
    rows = list(reopened)
    if not rows:
        return 0
    return conn.execute(
        "UPDATE batch_items i SET state = CASE WHEN i.attempts >= %(max)s THEN %(failed)s ELSE %(retryable)s END,"
        " last_error = CASE WHEN i.attempts >= %(max)s"
        "   THEN r.reason || ' (gave up after ' || i.attempts || ' attempts)' ELSE r.reason END,"
        " attempts = i.attempts + 1, updated_at = now()"
        " FROM unnest(%(keys)s::text[], %(reasons)s::text[]) AS r (subject_key, reason)"
        " WHERE i.flow = %(flow)s AND i.subject_key = r.subject_key AND i.state = ANY(%(claimable)s)",
        {"max": max_attempts, "failed": ItemState.FAILED, "retryable": ItemState.RETRYABLE,
         "keys": [key for key, _ in rows], "reasons": [reason for _, reason in rows], "flow": flow,
         "claimable": list(ITEM_CLAIMABLE_STATES)}).rowcount


def fail_subjects(conn: psycopg.Connection, flow: str, failures: Iterable[tuple[str, str]]) -> int:
    """Done (or retryable) subjects whose result a store refuses for good: `failed` with the reason."""
    rows = list(failures)
    if not rows:
        return 0
    return conn.execute(
        "UPDATE batch_items i SET state = %s, last_error = r.reason, updated_at = now()"
        " FROM unnest(%s::text[], %s::text[]) AS r (subject_key, reason)"
        " WHERE i.flow = %s AND i.subject_key = r.subject_key AND i.state = ANY(%s)",
        (ItemState.FAILED, [key for key, _ in rows], [reason for _, reason in rows], flow,
         list(ITEM_CLAIMABLE_STATES))).rowcount


def close_reopened_subjects(conn: psycopg.Connection, flow: str, subject_keys: list[str]) -> int:
    """Retryable subjects whose result every store now holds: `done`."""
    if not subject_keys:
        return 0
    return conn.execute(
        "UPDATE batch_items SET state = %s, last_error = NULL, updated_at = now()"
        " WHERE flow = %s AND subject_key = ANY(%s) AND state = %s",
        (ItemState.DONE, flow, subject_keys, ItemState.RETRYABLE)).rowcount


def submitted_items(conn: psycopg.Connection, job_id: int) -> list[tuple[int, str, str]]:
    """(id, subject key, custom id) of a shard's items waiting for its results."""
    return conn.execute("SELECT id, subject_key, custom_id FROM batch_items WHERE job_id = %s AND state = %s",
                        (job_id, ItemState.SUBMITTED)).fetchall()


def close_items_done(conn: psycopg.Connection, job_id: int, item_ids: list[int]) -> None:
    """A shard's items whose result was written: `done`."""
    conn.execute("UPDATE batch_items SET state = %s, last_error = NULL, updated_at = now()"
                 " WHERE id = ANY(%s) AND job_id = %s AND state = %s",
                 (ItemState.DONE, item_ids, job_id, ItemState.SUBMITTED))


def close_items(conn: psycopg.Connection, job_id: int, outcomes: dict[int, tuple[str, str | None]], *,
                max_attempts: int) -> None:
    """Close a shard's submitted items with their outcome (item id → (state, reason)); a `retryable`
    one out of attempts becomes `failed`, saying so."""
    conn.execute("CREATE TEMP TABLE IF NOT EXISTS item_outcomes (id bigint, state text, error text) ON COMMIT DROP")
    conn.execute("TRUNCATE item_outcomes")
    with conn.cursor().copy("COPY item_outcomes (id, state, error) FROM STDIN") as copy:
        for item_id, (state, error) in outcomes.items():
            copy.write_row((item_id, str(state), error))
    conn.execute(
        "UPDATE batch_items i SET state = CASE WHEN o.state = %(retryable)s AND i.attempts >= %(max)s"
        "   THEN %(failed)s ELSE o.state END,"
        " last_error = CASE WHEN o.state = %(retryable)s AND i.attempts >= %(max)s"
        "   THEN o.error || ' (gave up after ' || i.attempts || ' attempts)' ELSE o.error END,"
        " updated_at = now()"
        " FROM item_outcomes o WHERE i.id = o.id AND i.job_id = %(job)s AND i.state = %(submitted)s",
        {"retryable": ItemState.RETRYABLE, "failed": ItemState.FAILED, "submitted": ItemState.SUBMITTED,
         "max": max_attempts, "job": job_id},
    )


def item_counts(conn: psycopg.Connection, job_id: int) -> dict[str, int]:
    """A shard's items by state."""
    return dict(conn.execute("SELECT state, count(*) FROM batch_items WHERE job_id = %s GROUP BY state",
                             (job_id,)).fetchall())


def forget_subjects(conn: psycopg.Connection, flow: str, subject_keys: list[str]) -> int:
    """Delete the closed items (done, retryable, failed) of subjects that no longer exist as they
    were — e.g. chunks of a case whose text changed: their history no longer describes them, and
    their replacements start with a clean slate. Open items are never deleted."""
    if not subject_keys:
        return 0
    return conn.execute(
        "DELETE FROM batch_items WHERE flow = %s AND subject_key = ANY(%s) AND state <> ALL(%s)",
        (flow, subject_keys, list(ITEM_OPEN_STATES)),
    ).rowcount


# -- jobs --------------------------------------------------------------------------------------------

def get_job(conn: psycopg.Connection, shard_key: str, *, for_update: bool = False) -> Shard:
    sql = f"SELECT {_JOB_COLUMNS} FROM batch_jobs WHERE shard_key = %s" + (" FOR UPDATE" if for_update else "")
    with conn.cursor(row_factory=class_row(Shard)) as cur:
        row = cur.execute(sql, (shard_key,)).fetchone()
    if row is None:
        raise LookupError(f"no shard {shard_key!r} in the ledger (batch_jobs); run the planner first")
    return row


def lock_job(conn: psycopg.Connection, job_id: int, *, states: Iterable[str]) -> Shard | None:
    """The job, row-locked for the caller's transaction, if it is in one of `states` and no other
    transaction holds it (`FOR UPDATE SKIP LOCKED`); None otherwise."""
    sql = f"SELECT {_JOB_COLUMNS} FROM batch_jobs WHERE id = %s AND state = ANY(%s) FOR UPDATE SKIP LOCKED"
    with conn.cursor(row_factory=class_row(Shard)) as cur:
        return cur.execute(sql, (job_id, list(states))).fetchone()


def list_jobs(conn: psycopg.Connection, *, flow: str | None = None, states: Iterable[str] | None = None,
              limit: int | None = None) -> list[Shard]:
    sql = f"SELECT {_JOB_COLUMNS} FROM batch_jobs WHERE (%(flow)s::text IS NULL OR flow = %(flow)s)"
    params: dict = {"flow": flow}
    if states is not None:
        sql += " AND state = ANY(%(states)s)"
        params["states"] = list(states)
    sql += " ORDER BY updated_at, id"
    if limit is not None:
        sql += " LIMIT %(limit)s"
        params["limit"] = limit
    with conn.cursor(row_factory=class_row(Shard)) as cur:
        return cur.execute(sql, params).fetchall()


def update_job(conn: psycopg.Connection, job_id: int, **values: object) -> None:
    allowed = {f.name for f in fields(Shard)} - {"id", "flow", "shard_key", "created_at"}
    unknown = set(values) - allowed
    if unknown:
        raise ValueError(f"not batch_jobs columns: {sorted(unknown)}")
    if isinstance(values.get("params"), dict):
        values["params"] = Jsonb(values["params"])
    assignments = ", ".join(f"{name} = %({name})s" for name in values)
    conn.execute(
        f"UPDATE batch_jobs SET {assignments}, updated_at = now() WHERE id = %(_id)s", {**values, "_id": job_id}
    )


def record_ingest_failure(conn: psycopg.Connection, job: Shard, *, reason: str) -> Shard | None:
    """Count one failed ingest run of `job` (`ingest_failures` + 1) and say why in `last_error` —
    unless another process counted it first (the count moved since `job` was read): None then."""
    with conn.cursor(row_factory=class_row(Shard)) as cur:
        return cur.execute(
            f"UPDATE batch_jobs SET ingest_failures = ingest_failures + 1, last_error = %s, updated_at = now()"
            f" WHERE id = %s AND ingest_failures = %s AND state <> %s RETURNING {_JOB_COLUMNS}",
            (reason, job.id, job.ingest_failures, JobState.INGESTED),
        ).fetchone()


def submit_items(conn: psycopg.Connection, job_id: int) -> None:
    """The job's `exported` items become `submitted`, each counting one more attempt."""
    conn.execute("UPDATE batch_items SET state = %s, attempts = attempts + 1, updated_at = now()"
                 " WHERE job_id = %s AND state = %s", (ItemState.SUBMITTED, job_id, ItemState.EXPORTED))


def unsubmit_items(conn: psycopg.Connection, job_id: int) -> None:
    """The job's `submitted` items go back to `exported` with the attempt taken back (the provider
    refused the job for quota: never an item failure)."""
    conn.execute("UPDATE batch_items SET state = %s, attempts = greatest(attempts - 1, 0), updated_at = now()"
                 " WHERE job_id = %s AND state = %s", (ItemState.EXPORTED, job_id, ItemState.SUBMITTED))


def release_items(conn: psycopg.Connection, job_id: int, *, reason: str, max_attempts: int) -> tuple[int, int]:
    """Every open item of a job that produced nothing becomes retryable (or failed past the bound)."""
    rows = conn.execute(
        "UPDATE batch_items SET state = CASE WHEN attempts >= %(max)s THEN %(failed)s ELSE %(retryable)s END,"
        " last_error = %(reason)s, updated_at = now()"
        " WHERE job_id = %(job)s AND state = ANY(%(open)s) RETURNING state",
        {"max": max_attempts, "reason": reason, "job": job_id, "open": list(ITEM_OPEN_STATES),
         "failed": ItemState.FAILED, "retryable": ItemState.RETRYABLE},
    ).fetchall()
    failed = sum(1 for (s,) in rows if s == ItemState.FAILED)
    return len(rows) - failed, failed


# -- reports -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class LedgerSummary:
    jobs_by_state: dict[str, int]
    items_by_state: dict[str, int]
    est_cost_usd: Decimal
    actual_cost_usd: Decimal


def summary(conn: psycopg.Connection, flow: str) -> LedgerSummary:
    jobs = dict(conn.execute("SELECT state, count(*) FROM batch_jobs WHERE flow = %s GROUP BY state", (flow,)).fetchall())
    items = dict(conn.execute("SELECT state, count(*) FROM batch_items WHERE flow = %s GROUP BY state", (flow,)).fetchall())
    est, actual = conn.execute(
        "SELECT coalesce(sum(est_cost_usd), 0), coalesce(sum(actual_cost_usd), 0) FROM batch_jobs WHERE flow = %s",
        (flow,),
    ).fetchone()
    return LedgerSummary(jobs, items, est, actual)


@dataclass(frozen=True)
class FailureGroup:
    reason: str
    """The reason with its particulars (file:line, ids, numbers) taken out, to group by."""
    count: int
    example: str
    """One item's full reason: file:line, custom id, provider job."""
    subject_key: str


_PARTICULARS = [
    (re.compile(r"^\S+:\d+ of job \S+, \S+: "), ""),          # "<file>:<line> of job <id>, <custom id>: "
    (re.compile(r" \(gave up after \d+ attempts\)$"), ""),
    (re.compile(r"\b[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\b"), "<id>"),
    (re.compile(r"\d{1,3}(?:,\d{3})+|\d{4,}"), "N"),  # counts and ids; short codes (HTTP 500) stay
]


def failed_items(conn: psycopg.Connection, flow: str, *, since: datetime,
                 state: ItemState = ItemState.FAILED) -> list[FailureGroup]:
    """The items of `flow` that ended `failed` (or `state`) since `since`, grouped by reason (most first)."""
    groups: dict[str, list] = {}
    with conn.transaction(), conn.cursor(name=f"failed_{flow}") as cur:
        cur.itersize = 5_000
        cur.execute("SELECT subject_key, coalesce(last_error, '') FROM batch_items WHERE flow = %s"
                    " AND state = %s AND updated_at >= %s ORDER BY id", (flow, str(state), since))
        for subject_key, error in cur:
            reason = error
            for pattern, replacement in _PARTICULARS:
                reason = pattern.sub(replacement, reason)
            entry = groups.setdefault(reason[:300], [0, error, subject_key])
            entry[0] += 1
    return sorted((FailureGroup(r, c, e, k) for r, (c, e, k) in groups.items()), key=lambda g: -g.count)
