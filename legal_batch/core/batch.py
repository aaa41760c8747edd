"""The shared batch machinery every flow runs through: plan → file → submit → poll → download → ingest.

Each stage is a plain function over a database connection, a flow and a provider; Dagster assets,
sensors and the CLI call these and nothing else. Every stage is idempotent: running it again after
a crash or twice in a row changes nothing that was already done.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import numpy as np
import orjson
import psycopg

from legal_batch.core import ledger, quota
from legal_batch.core.cost import price
from legal_batch.core.crash import crash_point
from legal_batch.core.flow import Flow, Item, Permanent
from legal_batch.core.jsonl import atomic_writer, iter_objects
from legal_batch.core.ledger import ItemState, JobState, PlanResult, Shard, ShardLimits
from legal_batch.core.quota import QuotaPolicy
from legal_batch.providers.base import (
    TERMINAL_STATES,
    BatchProvider,
    JobStatus,
    PollsMany,
    ProviderError,
    ProviderQuotaError,
    Result,
    SubmittedJob,
)

log = logging.getLogger("legal_batch")

_SUBMIT_LOCK = 0x4C42  # advisory lock namespace (first key) for "submitting shard <job id>"
_DOWNLOAD_LOCK = 0x4C43  # ... for "downloading the outputs of shard <job id>"
_PARTIAL_SUFFIXES = (".tmp", ".part")  # files still being written (jsonl.atomic_writer, downloads)


class ShardNotReady(RuntimeError):
    """The shard is not in a state this stage can act on; the message says what to do."""


class IngestInterrupted(RuntimeError):
    """The database connection dropped during a shard's ingest; it was rolled back and can be re-run."""


# -- plan ---------------------------------------------------------------------------------------------

def plan(conn: psycopg.Connection, flow: Flow, provider: BatchProvider, *, model: str,
         cap_records: int | None = None, max_shards: int | None = 100,
         policy: QuotaPolicy | None = None) -> PlanResult:
    """Cut new shards from the flow's candidates (see `ledger.plan_shards`), each within the
    provider's per-job limits and a share of its enqueued-token quota when it has one; waiting
    shards that can never fit the quota (planned before it was known) are split first."""
    policy = policy or QuotaPolicy()
    sql, params = flow.candidate_sql()
    limits = ShardLimits.of(provider.limits, cap_records=cap_records)
    if flow.endpoint != "embeddings":  # chat flows truncate their own prompts; the limit is for embeddings
        limits = dataclasses.replace(limits, max_input_tokens=10**9)
    found = quota.quota_for(conn, provider=provider.name, model=model, kind=provider.limits.quota_kind,
                            policy=policy)
    if found is not None and found.usable is not None and found.kind == "enqueued_tokens":
        limits = dataclasses.replace(limits, max_tokens=quota.shard_token_cap(found, policy),
                                     quota_tokens=found.usable, quota_hint=found.describe())
        split_oversized(conn, flow=flow.name, provider=provider, model=model, max_tokens=limits.max_tokens or 1,
                        usable=found.usable)
    return ledger.plan_shards(
        conn, flow=flow.name, provider=provider.name, model=model, candidate_sql=sql, params=params,
        limits=limits, max_shards=max_shards, job_params=flow.job_params(),
    )


def split_oversized(conn: psycopg.Connection, *, flow: str, provider: BatchProvider, model: str, max_tokens: int,
                    usable: int) -> list[str]:
    """Re-cut the flow's waiting shards to the quota as now known: a shard over the usable quota can
    never be submitted, and one much larger than a share of it (cut before the quota was learned
    or lowered) would leave the queue part-empty while it waits; both are split into shards of at
    most `max_tokens`."""
    new_keys: list[str] = []
    for job in ledger.list_jobs(conn, flow=flow, states=ledger.WAITING_JOB_STATES):
        tokens = job.est_input_tokens or 0
        if job.provider == provider.name and job.model == model and job.mode == "batch" \
                and (tokens > usable or tokens > max_tokens * 1.5) and job.request_count > 1:
            with conn.transaction():
                locked = ledger.get_job(conn, job.shard_key, for_update=True)
                if locked.state in ledger.WAITING_JOB_STATES:
                    new_keys += _split(conn, locked, provider, max_tokens)
    return new_keys


def _split(conn: psycopg.Connection, job: Shard, provider: BatchProvider, max_tokens: int) -> list[str]:
    keys = ledger.split_shard(conn, job, max_tokens=max_tokens, min_records=provider.limits.min_records_per_job)
    if job.input_location and not job.input_location.startswith(("s3://", "file-")):
        Path(job.input_location).unlink(missing_ok=True)
    log.warning("shard %s (%s tokens) is larger than the %s quota of %s/%s allows: split into %s",
                job.shard_key, job.est_input_tokens, job.provider, job.provider, job.model, ", ".join(keys))
    return keys


# -- request files ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class RequestFile:
    path: Path
    lines: int
    bytes: int
    est_input_tokens: int
    est_cost_usd: float
    realtime_cost_usd: float
    preview: str


def request_file_path(files_root: Path, flow: str, shard_key: str) -> Path:
    return files_root / "requests" / flow / f"{shard_key}.jsonl"


def write_request_file(conn: psycopg.Connection, flow: Flow, provider: BatchProvider, shard_key: str, *,
                       files_root: Path) -> RequestFile:
    """Write the shard's JSONL request file (streamed) and record it on the job.

    Concurrent writers of one shard take turns (the job's row lock, held until the file is renamed
    into place), so two processes never write the same file at once."""
    path = request_file_path(files_root, flow.name, shard_key)
    lines = size = 0
    preview = ""
    max_bytes = provider.limits.max_bytes_per_file
    with conn.transaction():  # holds the row lock and the server-side cursor
        job = ledger.get_job(conn, shard_key, for_update=True)
        if job.state == JobState.SPLIT:
            return RequestFile(path, 0, 0, 0, 0.0, 0.0, f"(split into {', '.join(job.split_into or [])})")
        if job.state not in ledger.WAITING_JOB_STATES:
            if not path.exists():
                raise ShardNotReady(f"shard {shard_key} is already {job.state} and its request file {path} is gone")
            return RequestFile(path, job.request_count, path.stat().st_size, job.est_input_tokens or 0,
                               float(job.est_cost_usd or 0), 0.0, "(already submitted)")
        with atomic_writer(path) as out:
            for request in flow.requests(conn, job.id):
                line = provider.format_line(request, endpoint=flow.endpoint, model=job.model)
                if lines == 0:
                    preview = line[:300].decode("utf-8", "replace")
                out.write(line)
                lines += 1
                size += len(line)
                if size > max_bytes:
                    raise ShardNotReady(
                        f"shard {shard_key}: request file passed the provider's {max_bytes} byte limit at line "
                        f"{lines}; lower LEGAL_BATCH_SHARD_MAX_RECORDS and plan again"
                    )
    if lines != job.request_count:
        raise ShardNotReady(
            f"shard {shard_key}: {lines} request lines for {job.request_count} ledger items — the source rows "
            "changed after planning; check the items of this job in batch_items"
        )
    crash_point("after_request_file")
    tokens = job.est_input_tokens or 0
    cost = price(job.model, input_tokens=tokens)
    with conn.transaction():
        ledger.update_job(conn, job.id, state=JobState.EXPORTED, input_location=str(path), input_bytes=size,
                          est_cost_usd=cost.batch_usd)
    return RequestFile(path, lines, size, tokens, float(cost.batch_usd), float(cost.realtime_usd), preview)


# -- submit -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SubmitOutcome:
    shard_key: str
    state: str
    """The job's state after the call, a plain str (it goes into Dagster metadata, which refuses enums)."""
    provider_job_id: str | None
    message: str


def submit_shard(conn: psycopg.Connection, flow: Flow, provider: BatchProvider, shard_key: str, *,
                 max_attempts: int = 3, policy: QuotaPolicy | None = None,
                 files_root: Path | None = None) -> SubmitOutcome:
    """Submit the shard's request file once. The job row is marked `submitting` (with the client
    token the provider echoes) before the provider call, so a crash in between is reconciled by
    `find_job`, never submitted twice. A session advisory lock on the job makes a concurrent
    submitter of the same shard step aside (the lock dies with a crashed process).

    A real-time shard (below the provider's minimum per job) is served here instead, its results
    kept under `files_root` for its ingest (see `_serve_realtime`)."""
    key = (_SUBMIT_LOCK << 32) + ledger.get_job(conn, shard_key).id
    if not conn.execute("SELECT pg_try_advisory_lock(%s)", (key,)).fetchone()[0]:
        return SubmitOutcome(shard_key, JobState.SUBMITTING.value, None, "another process is submitting this shard; skipped")
    try:
        return _submit_locked(conn, flow, provider, shard_key, max_attempts=max_attempts,
                              policy=policy or QuotaPolicy(), files_root=files_root)
    finally:
        conn.execute("SELECT pg_advisory_unlock(%s)", (key,))


def _submit_locked(conn: psycopg.Connection, flow: Flow, provider: BatchProvider, shard_key: str, *,
                   max_attempts: int, policy: QuotaPolicy, files_root: Path | None) -> SubmitOutcome:
    if ledger.get_job(conn, shard_key).mode == "realtime":
        return _serve_realtime(conn, flow, provider, shard_key, policy=policy, files_root=files_root)
    with conn.transaction():
        job = ledger.get_job(conn, shard_key, for_update=True)
        if job.state == JobState.PLANNED:
            raise ShardNotReady(f"shard {shard_key}: request file not written yet; materialize its request file")
        if job.state not in (JobState.EXPORTED, JobState.SUBMITTING):
            return SubmitOutcome(shard_key, job.state, job.provider_job_id,
                                 f"already submitted as {job.provider_job_id} ({job.state}); nothing to do")
        if job.next_submit_at is not None and job.next_submit_at > datetime.now(UTC):
            return SubmitOutcome(shard_key, job.state, None,
                                 f"held back after a quota refusal until {job.next_submit_at:%Y-%m-%d %H:%M:%S} UTC")
        if job.state == JobState.EXPORTED:
            admission = quota.admit(conn, job_id=job.id, flow=job.flow, provider=job.provider, model=job.model,
                                    tokens=job.est_input_tokens or 0, est_cost_usd=job.est_cost_usd or Decimal(0),
                                    kind=provider.limits.quota_kind, policy=policy)
            if admission.split_to is not None:
                keys = _split(conn, job, provider, admission.split_to)
                return SubmitOutcome(shard_key, JobState.SPLIT.value, None, f"{admission.reason} into {len(keys)} shards "
                                     f"({', '.join(keys)}); each is submitted when the quota has room")
            if not admission.ok:
                quota.hold(conn, job.id, admission.reason or "waiting")
                return SubmitOutcome(shard_key, job.state, None, f"{admission.reason}; not submitted yet")
        if job.state == JobState.SUBMITTING:
            found = provider.find_job(client_token=job.client_token)
            if found is not None:
                _record_submitted(conn, job, found)
                return SubmitOutcome(shard_key, found.status.state, found.provider_job_id,
                                     f"reconciled: the provider already had job {found.provider_job_id} "
                                     f"for token {job.client_token}; not submitted again")
        ledger.update_job(conn, job.id, state=JobState.SUBMITTING, submit_attempts=job.submit_attempts + 1)
    crash_point("after_job_row")
    try:
        submitted = provider.submit(request_file=Path(job.input_location or ""), endpoint=flow.endpoint,
                                    model=job.model, client_token=job.client_token, shard_key=shard_key)
    except ProviderQuotaError as exc:
        with conn.transaction():
            note = _requeue_for_quota(conn, provider, ledger.get_job(conn, shard_key, for_update=True), str(exc),
                                      retry_after=exc.retry_after, policy=policy)
        return SubmitOutcome(shard_key, JobState.EXPORTED.value, None, f"provider quota refused the job ({exc}); {note}")
    except ProviderError as exc:
        if exc.retryable:
            raise  # left `submitting`: the next attempt reconciles first
        with conn.transaction():
            ledger.update_job(conn, job.id, state=JobState.FAILED, last_error=f"submit refused: {exc}",
                              finished_at=datetime.now(UTC))
            retry, failed = ledger.release_items(conn, job.id, reason=f"shard {shard_key} refused at submit: {exc}",
                                                 max_attempts=max_attempts)
        return SubmitOutcome(shard_key, JobState.FAILED.value, None, f"provider refused the job: {exc}; {retry} items "
                             f"requeued for a later shard, {failed} failed after {max_attempts} attempts")
    crash_point("after_provider_accepted")
    with conn.transaction():
        _record_submitted(conn, job, submitted)
        if submitted.status.quota_exceeded:  # created, and already failed for the enqueued-token quota
            note = _requeue_for_quota(conn, provider, ledger.get_job(conn, shard_key, for_update=True),
                                      submitted.status.message or "token_limit_exceeded", policy=policy)
            return SubmitOutcome(shard_key, JobState.EXPORTED.value, None, f"provider job {submitted.provider_job_id} was "
                                 f"refused for quota ({submitted.status.message}); {note}")
    return SubmitOutcome(shard_key, submitted.status.state, submitted.provider_job_id,
                         f"submitted {job.request_count} requests as {submitted.provider_job_id}")


def admissible_shards(conn: psycopg.Connection, flow: str, providers: Callable[[str], BatchProvider], *,
                      policy: QuotaPolicy) -> list[str]:
    """The flow's waiting shards (oldest first) that the queue quota has room for now — the ones
    worth a submit run this round (`quota.admissible`) —, after re-cutting waiting shards to the
    quota as now known (`split_oversized`)."""
    pairs = conn.execute("SELECT DISTINCT provider, model FROM batch_jobs WHERE flow = %s AND state = ANY(%s)",
                         (flow, list(ledger.UNSUBMITTED_JOB_STATES))).fetchall()
    ready: list[str] = []
    for provider_name, model in pairs:
        provider = providers(provider_name)
        kind = provider.limits.quota_kind
        found = quota.quota_for(conn, provider=provider_name, model=model, kind=kind, policy=policy)
        if found is not None and found.kind == "enqueued_tokens" and found.usable is not None:
            split_oversized(conn, flow=flow, provider=provider, model=model,
                            max_tokens=quota.shard_token_cap(found, policy) or found.usable, usable=found.usable)
        ready += quota.admissible(conn, flow=flow, provider=provider_name, model=model, kind=kind, policy=policy)
    return ready


def _serve_realtime(conn: psycopg.Connection, flow: Flow, provider: BatchProvider, shard_key: str, *,
                    policy: QuotaPolicy, files_root: Path | None) -> SubmitOutcome:
    """A shard below the provider's minimum records per job (Bedrock: 100) is served by the real-time
    path instead of a batch job that would fail, at the real-time price. In one transaction its items
    become `submitted`, the answers are written to its local output file (`realtime.jsonl` in the
    shard's output folder) and the job ends `completed` with that file as its output; from there it
    is ingested like any other shard — the job-status sensor requests its ingest run, which
    materializes its outputs and results (one transaction, as for a batch job)."""
    if files_root is None:
        raise ShardNotReady(f"shard {shard_key} is served in real time: give files_root, the folder its results "
                            "are kept in until its ingest")
    with conn.transaction():
        job = ledger.get_job(conn, shard_key, for_update=True)
        if job.state not in (JobState.EXPORTED, JobState.SUBMITTING):
            return SubmitOutcome(shard_key, job.state, job.provider_job_id, f"already {job.state}; nothing to do")
        over = quota.budget_refusal(conn, flow=job.flow, extra_usd=price(
            job.model, input_tokens=job.est_input_tokens or 0, batch=False).batch_usd, policy=policy)
        if over is not None:
            quota.hold(conn, job.id, over)
            return SubmitOutcome(shard_key, job.state, None, f"{over}; not served yet")
        ledger.submit_items(conn, job.id)
        submitted_at = datetime.now(UTC)
        requests = list(flow.requests(conn, job.id))
        path = output_dir(files_root, job.flow, shard_key) / REALTIME_OUTPUT
        answered = errors = 0
        with atomic_writer(path) as out:
            for result in provider.realtime(requests, endpoint=flow.endpoint, model=job.model):
                out.write(_realtime_line(result))
                answered += result.error is None
                errors += result.error is not None
        ledger.update_job(conn, job.id, state=JobState.COMPLETED, provider_status="realtime", submitted_at=submitted_at,
                          finished_at=datetime.now(UTC), submit_attempts=job.submit_attempts + 1,
                          output_location=str(path), completed_count=answered, failed_count=errors,
                          next_submit_at=None, waiting_reason=None, waiting_since=None)
    return SubmitOutcome(shard_key, JobState.COMPLETED.value, None,
                         f"{job.request_count} requests are below the provider's minimum per batch job "
                         f"({provider.limits.min_records_per_job}): served in real time ({answered} answered, "
                         f"{errors} errors) into {path}; the shard's ingest writes the results")


REALTIME_OUTPUT = "realtime.jsonl"
"""The output file of a real-time shard, in its output folder."""


def _realtime_line(result: Result) -> bytes:
    vector = None if result.vector is None else np.ascontiguousarray(result.vector, dtype=np.float32)
    record = {"custom_id": result.custom_id, "vector": vector, "text": result.text,
              "finish_reason": result.finish_reason, "input_tokens": result.input_tokens,
              "output_tokens": result.output_tokens, "error": result.error, "retryable": result.retryable,
              "extra": result.extra}
    return orjson.dumps(record, option=orjson.OPT_SERIALIZE_NUMPY, default=str) + b"\n"


def iter_realtime_results(files: Iterable[Path]) -> Iterator[Result]:
    """The results of a real-time shard, read back line by line from its output file."""
    for path in files:
        for number, obj, problem in iter_objects(path):
            if obj is None:
                yield Result(None, path.name, number, error=problem)
                continue
            vector = obj.get("vector")
            yield Result(obj.get("custom_id"), path.name, number,
                         vector=None if vector is None else np.asarray(vector, dtype=np.float32),
                         text=obj.get("text"), finish_reason=obj.get("finish_reason"),
                         input_tokens=int(obj.get("input_tokens") or 0),
                         output_tokens=int(obj.get("output_tokens") or 0), error=obj.get("error"),
                         retryable=bool(obj.get("retryable", True)), extra=obj.get("extra") or {})


def _record_submitted(conn: psycopg.Connection, job: Shard, submitted: SubmittedJob) -> None:
    """Record the provider job on the shard (inside the caller's transaction) unless another process
    (a poller that found it by its token) already did and moved it on: a job never goes back."""
    if ledger.get_job(conn, job.shard_key, for_update=True).state not in (JobState.EXPORTED, JobState.SUBMITTING):
        return
    ledger.update_job(conn, job.id, provider_job_id=submitted.provider_job_id, state=submitted.status.state,
                      provider_status=submitted.status.raw_status, submitted_at=datetime.now(UTC),
                      input_location=submitted.input_location, next_submit_at=None, last_error=None,
                      waiting_reason=None, waiting_since=None)
    ledger.submit_items(conn, job.id)
    if submitted.status.state == "running":
        quota.note_accepted(conn, provider=job.provider, model=job.model)


# -- poll ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Polled:
    job: Shard
    status: JobStatus


def poll_open_jobs(conn: psycopg.Connection, providers: Callable[[str], BatchProvider], *, flow: str,
                   max_jobs: int | None = None, time_budget_s: float = 40.0,
                   policy: QuotaPolicy | None = None) -> list[Polled]:
    """Poll the flow's open jobs, least recently updated first, and record their status: at most
    `max_jobs` (None: all) and for at most about `time_budget_s` seconds — jobs not reached wait for
    the next call, and are then first.

    A provider that reports many jobs in one call (`PollsMany`: OpenAI and Azure list their batches,
    100 a page) is asked once for all of its jobs here — 1,000 open jobs cost ~10 calls, not 1,000.
    Each status is then recorded under the job's row lock, taken with SKIP LOCKED, and only if it
    moves the job forward (pending → running → finished) or, at the same step, if no other poller
    recorded the job since the status was fetched: a status fetched before another poller recorded
    a newer one never undoes it, and a job resubmitted meanwhile (new provider job) is not touched.
    A status that says what the ledger already says is returned without a write; the others are
    recorded `_RECORD_BATCH` jobs to a transaction (one commit each). Other providers, and jobs a
    listing did not show, are polled one at a time, each under its row lock in its own transaction.
    Returns every job whose status was recorded; terminal ones are ready for download and ingest."""
    deadline = time.monotonic() + time_budget_s
    policy = policy or QuotaPolicy()
    named: dict[str, BatchProvider] = {}

    def provider_for(name: str) -> BatchProvider:  # one client per provider for the whole call
        if name not in named:
            named[name] = providers(name)
        return named[name]

    listed = ledger.list_jobs(conn, flow=flow, states=_POLLED_STATES, limit=max_jobs)
    fetched = _poll_many(conn, listed, provider_for)
    polled: list[Polled] = []
    changed = []
    for entry in listed:
        answer = fetched.get(entry.id)
        if answer is not None and _unchanged(entry, answer[0]):
            polled.append(Polled(entry, answer[0]))  # nothing new to record: no lock, no write
        elif answer is not None:
            changed.append(entry)
    for start in range(0, len(changed), _RECORD_BATCH):  # fetched statuses: a commit per batch of jobs
        if time.monotonic() > deadline:
            return polled
        with conn.transaction():
            for entry in changed[start:start + _RECORD_BATCH]:
                job = ledger.lock_job(conn, entry.id, states=_POLLED_STATES)
                if job is None:
                    continue  # another poller holds it, or it left the open states
                provider = provider_for(job.provider)
                if job.provider_job_id == entry.provider_job_id:
                    status, asked_at = fetched[job.id]
                    recorded = _record_fetched(conn, provider, job, status, asked_at, policy)
                else:  # resubmitted since it was listed: ask about its new provider job
                    recorded = _poll_locked(conn, provider, job, policy)
                if recorded is not None:
                    polled.append(recorded)
    for entry in listed:  # polled one by one: providers without PollsMany, jobs a listing did not show
        if entry.id in fetched:
            continue
        if time.monotonic() > deadline:
            break
        with conn.transaction():
            job = ledger.lock_job(conn, entry.id, states=_POLLED_STATES)
            recorded = None if job is None else _poll_locked(conn, provider_for(job.provider), job, policy)
        if recorded is not None:
            polled.append(recorded)
    return polled


_POLLED_STATES = ledger.QUEUED_JOB_STATES
_RECORD_BATCH = 50
"""Fetched statuses recorded per transaction: each commit waits for the WAL flush (~1-2 ms)."""
_STEP = {JobState.SUBMITTING: 0, JobState.PENDING: 1, JobState.RUNNING: 2}
"""How far a job has come; every terminal state is step 3. A recorded status never lowers it."""
_LISTING_MARGIN = timedelta(hours=1)
"""How much earlier than our `submitted_at` a provider may have stamped a job's creation (clocks)."""


def _step(state: str) -> int:
    return 3 if state in TERMINAL_STATES else _STEP.get(state, 0)


def _poll_many(conn: psycopg.Connection, jobs: list[Shard], provider_for: Callable[[str], BatchProvider]
               ) -> dict[int, tuple[JobStatus, datetime]]:
    """Statuses of the jobs whose provider reports many at once (`PollsMany`), by job id, each with
    the database time just before it was asked."""
    by_provider: dict[str, list[Shard]] = {}
    for job in jobs:
        if job.provider_job_id is not None:
            by_provider.setdefault(job.provider, []).append(job)
    fetched: dict[int, tuple[JobStatus, datetime]] = {}
    for name, group in by_provider.items():
        provider = provider_for(name)
        if not isinstance(provider, PollsMany):
            continue
        stamps = [job.submitted_at for job in group if job.submitted_at is not None]
        created_after = min(stamps) - _LISTING_MARGIN if len(stamps) == len(group) else None
        asked_at = conn.execute("SELECT clock_timestamp()").fetchone()[0]
        statuses = provider.poll_many([job.provider_job_id or "" for job in group], created_after=created_after)
        for job in group:
            status = statuses.get(job.provider_job_id or "")
            if status is not None:
                fetched[job.id] = (status, asked_at)
    return fetched


def _unchanged(job: Shard, status: JobStatus) -> bool:
    """The status says what the job's row already says."""
    return (status.state == job.state and status.raw_status == job.provider_status and not status.quota_exceeded
            and status.completed == job.completed_count and status.failed == job.failed_count
            and (status.output_location or job.output_location) == job.output_location
            and (status.error_location or job.error_location) == job.error_location
            and (not status.message or status.message == job.last_error))


def _record_fetched(conn: psycopg.Connection, provider: BatchProvider, job: Shard, status: JobStatus,
                    asked_at: datetime, policy: QuotaPolicy) -> Polled | None:
    """Record a status fetched before the job's row lock was taken, unless it would move the job
    back: a lower step never, the same step only if nobody recorded the job since it was asked."""
    step, now = _step(status.state), _step(job.state)
    if step < now or (step == now and job.updated_at > asked_at):
        return None
    return _record_status(conn, provider, job, status, policy)


def _poll_locked(conn: psycopg.Connection, provider: BatchProvider, job: Shard,
                 policy: QuotaPolicy) -> Polled | None:
    if job.provider_job_id is None:
        found = provider.find_job(client_token=job.client_token)
        if found is None:
            return None  # a submit is in flight or crashed before the provider call; submit reconciles
        _record_submitted(conn, job, found)
        job = ledger.get_job(conn, job.shard_key)
    return _record_status(conn, provider, job, provider.poll(job.provider_job_id or ""), policy)


def _record_status(conn: psycopg.Connection, provider: BatchProvider, job: Shard, status: JobStatus,
                   policy: QuotaPolicy) -> Polled:
    """Record the provider's status of a row-locked job (inside the caller's transaction)."""
    if status.quota_exceeded:
        _requeue_for_quota(conn, provider, job, status.message or status.raw_status, policy=policy)
        return Polled(ledger.get_job(conn, job.shard_key), status)
    if status.state == "running" and job.state == JobState.PENDING:  # validated: the provider took it into its queue
        quota.note_accepted(conn, provider=job.provider, model=job.model)
    values: dict[str, object] = dict(
        state=status.state, provider_status=status.raw_status, completed_count=status.completed,
        failed_count=status.failed, output_location=status.output_location or job.output_location,
        error_location=status.error_location or job.error_location,
    )
    if status.message:
        values["last_error"] = status.message
    if status.terminal and job.finished_at is None:
        values["finished_at"] = datetime.now(UTC)
    ledger.update_job(conn, job.id, **values)
    return Polled(dataclasses.replace(job, **values), status)  # type: ignore[arg-type]


def _requeue_for_quota(conn: psycopg.Connection, provider: BatchProvider, job: Shard, message: str, *,
                       policy: QuotaPolicy, retry_after: float | None = None) -> str:
    """A shard the provider refused for quota only (an enqueued-token limit, jobs in progress, a 429
    on create): inside the caller's transaction, learn what the refusal says about the quota, and put
    the shard back in the queue under a new client token. Its items keep their attempts: a quota
    refusal is never an item failure. Returns what happens next, for the operator."""
    kind = provider.limits.quota_kind or "enqueued_tokens"
    learned = quota.record_refusal(conn, job_id=job.id, provider=job.provider, model=job.model, kind=kind,
                                   message=message, tokens=job.est_input_tokens or 0, policy=policy)
    retry_at = quota.refusal_backoff(job.quota_refusals + 1, learned=learned, retry_after=retry_after, policy=policy)
    when = "when the quota has room" if retry_at is None else f"after {retry_at:%H:%M:%S} UTC"
    refused = f"provider job {job.provider_job_id}" if job.provider_job_id else "the submission"
    ledger.update_job(
        conn, job.id, state=JobState.EXPORTED, provider_job_id=None, provider_status=None,
        client_token=ledger.new_client_token(), next_submit_at=retry_at, quota_refusals=job.quota_refusals + 1,
        last_error=f"{refused} refused for quota ({message}); requeued",
        waiting_reason=f"refused for quota; {learned.note}; next try {when}",
    )
    conn.execute(
        "UPDATE batch_jobs SET waiting_since = coalesce(waiting_since, now()) WHERE id = %s", (job.id,))
    ledger.unsubmit_items(conn, job.id)
    log.warning("shard %s: %s refused for quota; %s; requeued, next try %s", job.shard_key, refused, learned.note,
                when)
    return f"requeued, not failed; {learned.note}; next try {when}"


def status_of(job: Shard) -> JobStatus:
    """The last recorded provider status of a job."""
    return JobStatus(state=job.state if job.state in ledger.TERMINAL_JOB_STATES else "running",  # type: ignore[arg-type]
                     raw_status=job.provider_status or job.state, total=job.request_count,
                     completed=job.completed_count, failed=job.failed_count, output_location=job.output_location,
                     error_location=job.error_location, message=job.last_error)


# -- download -----------------------------------------------------------------------------------------

def output_dir(files_root: Path, flow: str, shard_key: str) -> Path:
    return files_root / "outputs" / flow / shard_key


def download_outputs(conn: psycopg.Connection, provider: BatchProvider, shard_key: str, *,
                     files_root: Path) -> list[Path]:
    """Fetch a terminal job's output and error files to local disk (again, if asked twice).

    Downloads of one shard take turns (a session advisory lock), so two processes never write the
    same file at once; the providers replace files atomically, so a reader never sees half a file."""
    key = (_DOWNLOAD_LOCK << 32) + ledger.get_job(conn, shard_key).id
    conn.execute("SELECT pg_advisory_lock(%s)", (key,))
    try:
        return _download_locked(conn, provider, shard_key, files_root=files_root)
    finally:
        conn.execute("SELECT pg_advisory_unlock(%s)", (key,))


def _download_locked(conn: psycopg.Connection, provider: BatchProvider, shard_key: str, *,
                     files_root: Path) -> list[Path]:
    job = ledger.get_job(conn, shard_key)
    if job.state == JobState.INGESTED:
        dest = output_dir(files_root, job.flow, shard_key)
        return sorted(dest.glob("*")) if dest.exists() else []
    if job.state not in ledger.TERMINAL_JOB_STATES:
        raise ShardNotReady(
            f"shard {shard_key}: provider job {job.provider_job_id} is {job.state}, not finished; the job-status "
            "sensor requests the download when it is"
        )
    if job.mode == "realtime":  # answered at submit: the output is already here
        output = Path(job.output_location) if job.output_location else None
        return [output] if output is not None and output.exists() else []
    if job.provider_job_id is None:
        return []  # refused at submit: nothing to download
    dest = output_dir(files_root, job.flow, shard_key)
    files = provider.download(job.provider_job_id, status_of(job), dest)
    crash_point("after_download")
    return files


# -- ingest -------------------------------------------------------------------------------------------

@dataclass
class IngestReport:
    shard_key: str
    provider_job_id: str | None
    already_ingested: bool = False
    rows_written: int = 0
    done: int = 0
    retryable: int = 0
    failed: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    actual_cost_usd: float = 0.0
    problems: list[str] = field(default_factory=list)
    """Lines that could not be tied to an item: malformed, unknown id, duplicates (file:line and why)."""

    def summary(self) -> str:
        if self.already_ingested:
            return f"shard {self.shard_key} was already ingested; nothing changed"
        text = (f"shard {self.shard_key} ({self.provider_job_id}): {self.done} done, {self.retryable} retryable, "
                f"{self.failed} failed, {self.rows_written} rows written")
        if self.problems:
            text += f"; {len(self.problems)} output lines unusable (first: {self.problems[0]})"
        return text


def ingest_shard(conn: psycopg.Connection, flow: Flow, provider: BatchProvider, shard_key: str, *,
                 files: list[Path], max_attempts: int = 3, on_progress: Callable[[int], None] | None = None
                 ) -> IngestReport:
    """Ingest a terminal shard in ONE transaction: results upserted and items closed together.

    Every item of the shard ends `done`, `retryable` (attempts left) or `failed` (with the reason:
    file, line, id and what was wrong). Running it again changes nothing. Files still being written
    (`*.tmp`, `*.part`) are skipped. If the database connection drops, the transaction is rolled
    back and `IngestInterrupted` says so: nothing of the shard was written, run the ingest again."""
    files = [path for path in files if not path.name.endswith(_PARTIAL_SUFFIXES)]
    try:
        with conn.transaction():
            job = ledger.get_job(conn, shard_key, for_update=True)
            report = IngestReport(shard_key, job.provider_job_id if job.mode == "batch" else "real time")
            if job.state == JobState.INGESTED:
                report.already_ingested = True
                return report
            if job.state not in ledger.TERMINAL_JOB_STATES:
                raise ShardNotReady(f"shard {shard_key}: job {job.provider_job_id} is {job.state}; ingest after it "
                                    "finishes")
            results = (iter_realtime_results(files) if job.mode == "realtime"
                       else provider.iter_results(files, endpoint=flow.endpoint))
            return _ingest_results(conn, flow, job, results, report, max_attempts=max_attempts,
                                   on_progress=on_progress)
    except Exception as exc:
        if not (conn.broken or isinstance(exc, psycopg.OperationalError)):
            raise
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise IngestInterrupted(
            f"ingest of shard {shard_key} was interrupted: the database connection failed ({detail}). The "
            "transaction was rolled back, so no result of this shard was written and its items are unchanged; "
            f"run the ingest again (`legal-batch {flow.name} ingest`, or re-execute the shard's ingest run — "
            "its retry policy does so by itself)") from exc


def _ingest_results(conn: psycopg.Connection, flow: Flow, job: Shard, results: Iterable[Result],
                    report: IngestReport, *, max_attempts: int,
                    on_progress: Callable[[int], None] | None = None) -> IngestReport:
    """Join results to the shard's items on custom id, write the valid ones through the flow's sink
    and close every item (inside the caller's transaction)."""
    items = {row[2]: Item(*row) for row in ledger.submitted_items(conn, job.id)}
    outcomes: dict[int, tuple[str, str | None]] = {}
    sink = flow.sink(conn, model=job.model)
    closer = _DoneItems(conn, job.id)
    count = 0
    try:
        for result in results:
            count += 1
            if on_progress is not None and count % 1000 == 0:
                on_progress(count)
            report.input_tokens += result.input_tokens
            report.output_tokens += result.output_tokens
            if result.custom_id is None:
                report.problems.append(f"{_where(result, job)}: {result.error or 'the line has no custom id'}")
                continue
            item = items.get(result.custom_id)
            if item is None:
                report.problems.append(f"{_where(result, job)}: unknown custom id {result.custom_id!r} (not a request "
                                       "of this shard)")
                continue
            if item.id in outcomes and outcomes[item.id][0] == ItemState.DONE:
                report.problems.append(f"{_where(result, job)}: duplicate result for {result.custom_id!r}; the first "
                                       "was kept")
                continue
            if result.error is not None:
                state = ItemState.RETRYABLE if result.retryable else ItemState.FAILED
                outcomes[item.id] = (state, f"{_where(result, job)}, {result.custom_id}: {result.error}")
                continue
            reason = sink.accept(item, result)
            if reason is None:
                outcomes[item.id] = _DONE
                closer.add(item.id)
            else:
                state = ItemState.FAILED if isinstance(reason, Permanent) else ItemState.RETRYABLE
                outcomes[item.id] = (state, f"{_where(result, job)}, {result.custom_id}: {reason}")
        report.rows_written = sink.finish()
    except BaseException:
        closer.stop()
        raise
    closed = closer.finish()
    missing_reason = f"no result for this request in the output of job {_job_label(job)} ({job.state})"
    if report.problems:
        missing_reason += f"; {len(report.problems)} output lines were unusable, e.g. {report.problems[0]}"
    for item in items.values():
        outcomes.setdefault(item.id, (ItemState.RETRYABLE, missing_reason))
    ledger.close_items(conn, job.id, {i: o for i, o in outcomes.items() if i not in closed}, max_attempts=max_attempts)
    sink.settle(job.id)
    crash_point("mid_ingest")
    counts = ledger.item_counts(conn, job.id)
    report.done = counts.get(ItemState.DONE, 0)
    report.retryable = counts.get(ItemState.RETRYABLE, 0)
    report.failed = counts.get(ItemState.FAILED, 0)
    cost = price(job.model, input_tokens=report.input_tokens, output_tokens=report.output_tokens,
                 batch=job.mode == "batch")
    report.actual_cost_usd = float(cost.batch_usd)
    ledger.update_job(
        conn, job.id, state=JobState.INGESTED, ingested_at=datetime.now(UTC), input_tokens=report.input_tokens,
        output_tokens=report.output_tokens, actual_cost_usd=cost.batch_usd, items_done=report.done,
        items_retryable=report.retryable, items_failed=report.failed,
        last_error=("; ".join(report.problems[:5]))[:2000] if report.problems else job.last_error,
    )
    return report


_DONE: tuple[str, str | None] = (ItemState.DONE, None)


def _where(result: Result, job: Shard) -> str:
    return f"{result.where} of job {_job_label(job)}"


def _job_label(job: Shard) -> str:
    """The provider job id, or for a shard served in real time its shard key."""
    return job.provider_job_id or f"{job.shard_key} (real time)"


class _DoneItems:
    """Closes accepted items (`done`) in batches from a helper thread while results are still being
    read — same connection, same transaction (statements take turns on the connection) — so this
    part of the ledger update overlaps parsing instead of following it. `done` is final within an
    ingest (a later line for the item is a duplicate), so closing early gives the rows that closing
    at the end would: state `done`, no error, `updated_at` = now()."""

    _BATCH = 5_000

    def __init__(self, conn: psycopg.Connection, job_id: int) -> None:
        self.conn = conn
        self.job_id = job_id
        self._closed: set[int] = set()
        self._pending: list[int] = []
        self._queue: queue.Queue[list[int] | None] = queue.Queue(maxsize=4)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="ledger-done-items", daemon=True)
        self._thread.start()

    def add(self, item_id: int) -> None:
        self._pending.append(item_id)
        if len(self._pending) >= self._BATCH:
            if self._error is not None:
                raise self._error
            self._closed.update(self._pending)
            self._queue.put(self._pending)
            self._pending = []

    def _run(self) -> None:
        try:
            while (ids := self._queue.get()) is not None:
                ledger.close_items_done(self.conn, self.job_id, ids)
        except BaseException as exc:  # surfaced to the caller in add() or finish()
            self._error = exc
            while self._queue.get() is not None:
                pass

    def stop(self) -> None:
        """End the helper without raising (the caller is already failing)."""
        if self._thread.is_alive():
            self._queue.put(None)
            self._thread.join()

    def finish(self) -> set[int]:
        """Wait for the helper; return the items it closed (the remaining `done` ones are not)."""
        self.stop()
        if self._error is not None:
            raise self._error
        return self._closed
