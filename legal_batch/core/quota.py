"""Provider queue quotas and the spend cap: the one gate every submission goes through.

Providers cap what may be queued, per model: OpenAI and Azure OpenAI count the **input tokens of
unfinished batches** (a batch over the limit is created and then fails with `token_limit_exceeded`);
Bedrock counts **jobs in progress** (`ServiceQuotaExceededException` on create). The gate keeps the
sum over our open jobs of one provider/model as close to the quota as it can without passing it:

- the quota is configured (`QuotaPolicy.configured`) or learned from refusals — the limit a refusal
  states (OpenAI: "Limit: 3,000,000 enqueued tokens"), else an upper bound from what was queued when
  it was refused (halving the shard when nothing else was queued) — and kept in `provider_quotas`,
  shared by every process;
- `admit` runs inside the transaction that marks a shard `submitting`, under an advisory lock per
  provider/model, so concurrent submitters (sensor, CLI, two runs) never over-fill the queue;
- a refusal is never an item failure: the shard goes back to the queue (`record_refusal`);
- a shard that can never fit is split (`ledger.split_shard`), and planning cuts shards to a share of
  the quota so several are in flight and the queue refills as each one finishes;
- the spend cap (`QuotaPolicy.budget_usd`) is checked at the same gate: actual spend plus the
  estimate of what is in flight plus this shard must stay within it.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Literal

import psycopg

from legal_batch.core.cost import price
from legal_batch.core.errors import UserError
from legal_batch.core.ledger import (
    QUEUED_JOB_STATES,
    UNINGESTED_JOB_STATES,
    UNSUBMITTED_JOB_STATES,
    WAITING_JOB_STATES,
    JobState,
)

QuotaKind = Literal["enqueued_tokens", "jobs"]
QuotaSource = Literal["configured", "stated", "learned"]

_GATE_LOCK = 0x4C44  # advisory lock namespace for "admitting a job to provider/model"


class BudgetExceeded(UserError):
    """A run's estimate exceeds what is left of the spend cap; nothing was submitted."""

    def __init__(self, message: str) -> None:
        super().__init__(message, exit_code=3)


@dataclass(frozen=True)
class QuotaPolicy:
    """How the gate decides. Built from settings (`Settings.quota_policy()`)."""

    configured: Mapping[str, int] = field(default_factory=dict)
    """Limits by `provider/model` or by `provider` (every model of it)."""
    setting_names: Mapping[str, str] = field(default_factory=dict)
    """Which setting configures each key above (named in messages)."""
    margin: float = 0.05
    """Share of an enqueued-token quota kept free: our token counts and the provider's may differ."""
    shards_per_quota: int = 4
    """Shards are cut to at most quota / this, so several are in flight and one finishing frees room."""
    budget_usd: Mapping[str, Decimal] = field(default_factory=dict)
    """Spend caps: key `*` for all flows together, else a flow name."""
    budget_setting: str = "LEGAL_BATCH_BUDGET_USD"
    retry_after_s: float = 60.0
    """Back-off after a refusal that taught us nothing new (someone else's use of the same quota)."""

    def configured_limit(self, provider: str, model: str) -> tuple[int, str] | None:
        for key in (f"{provider}/{model}", provider):
            if key in self.configured:
                return self.configured[key], self.setting_names.get(key, "LEGAL_BATCH_QUOTAS")
        return None


@dataclass(frozen=True)
class Quota:
    provider: str
    model: str
    kind: QuotaKind
    limit: int | None
    source: QuotaSource | None
    setting: str | None
    margin: float

    @property
    def usable(self) -> int | None:
        """What we let ourselves fill: the limit less the margin (tokens), or the limit (jobs)."""
        if self.limit is None:
            return None
        if self.kind == "jobs":
            return self.limit
        return max(1, int(self.limit * (1 - self.margin)))

    def describe(self) -> str:
        if self.limit is None:
            return f"{self.provider} {self.kind.replace('_', ' ')} quota for {self.model}: unknown (learned on refusal)"
        origin = {"configured": f"set by {self.setting}", "stated": "stated by the provider",
                  "learned": "learned from refusals"}.get(self.source or "", "")
        unit = "enqueued tokens" if self.kind == "enqueued_tokens" else "jobs in progress"
        return f"{self.provider} quota for {self.model}: {self.limit:,} {unit} ({origin})"


def _lock_key(provider: str, model: str) -> int:
    return (_GATE_LOCK << 32) + (zlib.crc32(f"{provider}/{model}".encode()) & 0x7FFFFFFF)


def quota_for(conn: psycopg.Connection, *, provider: str, model: str, kind: QuotaKind | None,
              policy: QuotaPolicy) -> Quota | None:
    """The quota in force for a provider/model: a limit the provider stated, if lower than the
    configured one; else the configured one; else what was learned; None when the provider has no
    queue quota at all."""
    if kind is None:
        return None
    row = conn.execute("SELECT limit_value, source FROM provider_quotas WHERE provider = %s AND model = %s"
                       " AND kind = %s", (provider, model, kind)).fetchone()
    configured = policy.configured_limit(provider, model)
    if row is not None and row[0] is not None and (
            configured is None or (row[1] == "stated" and row[0] < configured[0])):
        return Quota(provider, model, kind, int(row[0]), row[1], None, policy.margin)
    if configured is not None:
        return Quota(provider, model, kind, configured[0], "configured", configured[1], policy.margin)
    return Quota(provider, model, kind, None, None, None, policy.margin)


@dataclass(frozen=True)
class Queued:
    tokens: int
    jobs: int


def queued(conn: psycopg.Connection, *, provider: str, model: str, excluding_job: int | None = None) -> Queued:
    """What our open batch jobs of this provider/model hold in the provider's queue (every flow)."""
    tokens, jobs = conn.execute(
        "SELECT coalesce(sum(est_input_tokens), 0), count(*) FROM batch_jobs WHERE provider = %s AND model = %s"
        " AND mode = 'batch' AND state = ANY(%s) AND id <> %s",
        (provider, model, list(QUEUED_JOB_STATES), excluding_job or -1)).fetchone()
    return Queued(int(tokens), int(jobs))


def shard_token_cap(quota: Quota | None, policy: QuotaPolicy) -> int | None:
    """Most tokens a new shard should hold: a share of the usable quota (tokens quotas only)."""
    if quota is None or quota.kind != "enqueued_tokens" or quota.usable is None:
        return None
    return max(1, quota.usable // max(1, policy.shards_per_quota))


# -- the gate -----------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Admission:
    ok: bool
    reason: str | None = None
    split_to: int | None = None
    """Set when the shard can never fit: split it into shards of at most this many tokens."""


def admit(conn: psycopg.Connection, *, job_id: int, flow: str, provider: str, model: str, tokens: int,
          est_cost_usd: Decimal, kind: QuotaKind | None, policy: QuotaPolicy) -> Admission:
    """May this shard go to the provider now? Call inside the transaction that marks it `submitting`:
    the advisory lock taken here is held until that commit, so the next submitter counts it."""
    conn.execute("SELECT pg_advisory_xact_lock(%s)", (_lock_key(provider, model),))
    over = budget_refusal(conn, flow=flow, extra_usd=est_cost_usd, policy=policy)
    if over is not None:
        return Admission(False, over)
    quota = quota_for(conn, provider=provider, model=model, kind=kind, policy=policy)
    if quota is None or quota.usable is None:
        return Admission(True)
    now = queued(conn, provider=provider, model=model, excluding_job=job_id)
    if quota.kind == "jobs":
        if now.jobs >= quota.usable:
            return Admission(False, f"waiting for quota: {now.jobs} of {quota.limit} {provider} jobs in progress "
                                    f"for {model}")
        return Admission(True)
    if tokens > quota.usable:
        return Admission(False, f"{tokens:,} tokens exceed the usable quota of {quota.usable:,}: split",
                         split_to=shard_token_cap(quota, policy))
    if now.tokens + tokens > quota.usable:
        return Admission(False, f"waiting for quota: {now.tokens:,} of {quota.limit:,} enqueued tokens in use for "
                                f"{provider}/{model}, this shard needs {tokens:,}")
    return Admission(True)


def admissible(conn: psycopg.Connection, *, flow: str, provider: str, model: str, kind: QuotaKind | None,
               policy: QuotaPolicy) -> list[str]:
    """The waiting shards of a flow (oldest first) that the gate would let through now, greedily —
    what a submitter should try this round; `admit` decides for real under the lock. Shards that
    must be split are included (submitting them splits them)."""
    quota = quota_for(conn, provider=provider, model=model, kind=kind, policy=policy)
    now = queued(conn, provider=provider, model=model)
    tokens, jobs = now.tokens, now.jobs
    waiting = conn.execute(
        "SELECT shard_key, coalesce(est_input_tokens, 0), mode, next_submit_at FROM batch_jobs"
        " WHERE flow = %s AND provider = %s AND model = %s AND state = ANY(%s) ORDER BY id",
        (flow, provider, model, list(UNSUBMITTED_JOB_STATES))).fetchall()
    chosen: list[str] = []
    clock = datetime.now(UTC)
    for shard_key, shard_tokens, mode, next_submit_at in waiting:
        if next_submit_at is not None and next_submit_at > clock:
            continue
        if mode != "batch" or quota is None or quota.usable is None:
            chosen.append(shard_key)
            continue
        if quota.kind == "jobs":
            if jobs < quota.usable:
                chosen.append(shard_key)
                jobs += 1
        elif shard_tokens > quota.usable:
            chosen.append(shard_key)  # to be split
        elif tokens + shard_tokens <= quota.usable:
            chosen.append(shard_key)
            tokens += shard_tokens
    return chosen


def hold(conn: psycopg.Connection, job_id: int, reason: str, *, retry_at: datetime | None = None) -> None:
    """Record why a shard waits (and since when); it stays `exported`, its items untouched."""
    conn.execute(
        "UPDATE batch_jobs SET waiting_reason = %s, waiting_since = coalesce(waiting_since, now()),"
        " next_submit_at = %s, updated_at = now() WHERE id = %s", (reason, retry_at, job_id))


# -- learning from refusals ---------------------------------------------------------------------------

_NUMBER = r"(\d[\d,_]*(?:\.\d+)?)\s*([KMB]\b)?"
_STATED = [
    re.compile(r"limit:\s*" + _NUMBER, re.I),                       # OpenAI: "Limit: 3,000,000 enqueued tokens."
    re.compile(r"(?:quota|limit) (?:of|is)\s*" + _NUMBER, re.I),    # Azure: "the configured limit of 30K for the
]                                                                  # deployment"; Bedrock: "reached the quota of 20"
_SUFFIX = {"k": 1_000, "m": 1_000_000, "b": 1_000_000_000}


def stated_limit(message: str) -> int | None:
    """The limit a refusal message states — OpenAI's "Limit: 3,000,000 enqueued tokens", Azure's
    "surpassed the configured limit of 30K for the deployment", Bedrock's "has reached the quota of
    20" —; None when it states none."""
    for pattern in _STATED:
        match = pattern.search(message or "")
        if match:
            value = float(match.group(1).replace(",", "").replace("_", ""))
            value *= _SUFFIX.get((match.group(2) or "").lower(), 1)
            if value >= 1:
                return int(value)
    return None


@dataclass(frozen=True)
class Learned:
    quota: Quota
    changed: bool
    note: str


def record_refusal(conn: psycopg.Connection, *, job_id: int, provider: str, model: str, kind: QuotaKind,
                   message: str, tokens: int, policy: QuotaPolicy) -> Learned:
    """Learn what a quota refusal of one shard says about the quota and store it (shared by every
    process). The limit it states wins; else, for a token quota, the limit is below what was queued
    with this shard (halved when nothing else was queued); for a jobs quota, it is what was open."""
    before = quota_for(conn, provider=provider, model=model, kind=kind, policy=policy)
    others = queued(conn, provider=provider, model=model, excluding_job=job_id)
    stated = stated_limit(message)
    source: QuotaSource
    if stated is not None:
        limit, source = stated, "stated"
    elif kind == "jobs":
        limit, source = max(1, others.jobs), "learned"
    elif others.tokens == 0:
        limit, source = max(1, tokens // 2), "learned"  # alone and refused: at most half of it fits
    else:
        limit, source = max(1, others.tokens + tokens - 1), "learned"
    known = before.limit if before is not None else None
    if source == "learned" and known is not None and known <= limit:
        limit, source = known, (before.source or "learned")  # nothing new: keep the tighter figure
        if source == "configured":
            source = "learned"
    conn.execute(
        "INSERT INTO provider_quotas (provider, model, kind, limit_value, source, refusals, last_refusal,"
        " last_refusal_at) VALUES (%s, %s, %s, %s, %s, 1, %s, now())"
        " ON CONFLICT (provider, model, kind) DO UPDATE SET limit_value = excluded.limit_value,"
        " source = excluded.source, refusals = provider_quotas.refusals + 1, last_refusal = excluded.last_refusal,"
        " last_refusal_at = now(), updated_at = now()",
        (provider, model, kind, limit, source, (message or "")[:1000]))
    after = quota_for(conn, provider=provider, model=model, kind=kind, policy=policy)
    assert after is not None
    changed = after.limit != known
    note = (f"{after.describe()}" if changed else
            f"the quota stays at {after.limit:,}" if after.limit else "the quota is still unknown")
    return Learned(after, changed, note)


def note_accepted(conn: psycopg.Connection, *, provider: str, model: str) -> None:
    """The provider accepted a job of ours. A limit we only guessed (`learned`: halved, or bounded
    from a refusal that stated no figure) may be too low — the queue would then stay part-empty
    for ever —, so while our queue stands at that guess, raise it by an eighth: the next refusal,
    if any, bounds it again (additive increase, bounded decrease). Stated and configured limits
    are never probed."""
    row = conn.execute("SELECT kind, limit_value FROM provider_quotas WHERE provider = %s AND model = %s"
                       " AND source = 'learned' AND limit_value IS NOT NULL FOR UPDATE", (provider, model)).fetchone()
    if row is None:
        return
    kind, limit = row
    now = queued(conn, provider=provider, model=model)
    used = now.jobs if kind == "jobs" else now.tokens
    if used >= 0.9 * limit * (1 if kind == "jobs" else 0.95):
        raised = limit + (1 if kind == "jobs" else max(1, limit // 8))
        conn.execute("UPDATE provider_quotas SET limit_value = %s, updated_at = now() WHERE provider = %s"
                     " AND model = %s AND kind = %s", (raised, provider, model, kind))


def refusal_backoff(job_refusals: int, *, learned: Learned, retry_after: float | None,
                    policy: QuotaPolicy) -> datetime | None:
    """When a refused shard may be tried again: at once (the gate now knows the quota and waits
    for room by itself) when the refusal taught us something; else after `retry_after` or a
    back-off doubling from `policy.retry_after_s` up to 15 minutes."""
    if learned.changed and not retry_after:
        return None
    delay = retry_after or min(policy.retry_after_s * 2 ** max(0, job_refusals - 1), 900.0)
    return datetime.now(UTC) + timedelta(seconds=delay)


# -- the spend cap ------------------------------------------------------------------------------------

def committed_usd(conn: psycopg.Connection, *, flow: str | None) -> Decimal:
    """Actual spend of ingested jobs plus the estimate of jobs submitted and not yet ingested."""
    value = conn.execute(
        "SELECT coalesce(sum(CASE WHEN state = %(ingested)s THEN coalesce(actual_cost_usd, est_cost_usd, 0)"
        "  WHEN state = ANY(%(uningested)s) AND (mode = 'batch' AND provider_job_id IS NOT NULL"
        "                                    OR state = %(submitting)s)"
        "  THEN coalesce(est_cost_usd, 0) ELSE 0 END), 0)"
        " FROM batch_jobs WHERE (%(flow)s::text IS NULL OR flow = %(flow)s)",
        {"ingested": JobState.INGESTED, "uningested": list(UNINGESTED_JOB_STATES),
         "submitting": JobState.SUBMITTING, "flow": flow}).fetchone()[0]
    return Decimal(value)


def budget_refusal(conn: psycopg.Connection, *, flow: str, extra_usd: Decimal, policy: QuotaPolicy) -> str | None:
    """Why spending `extra_usd` more would pass a cap, or None."""
    for scope in ("*", flow):
        cap = policy.budget_usd.get(scope)
        if cap is None:
            continue
        spent = committed_usd(conn, flow=None if scope == "*" else flow)
        if spent + extra_usd > cap:
            which = "all flows" if scope == "*" else f"flow {flow}"
            return (f"waiting for budget: ${spent:.4f} spent or in flight + ${extra_usd:.4f} for this shard would "
                    f"pass the cap of ${cap:f} for {which} ({policy.budget_setting}); raise it to continue")
    return None


def unsubmitted_estimate(conn: psycopg.Connection, *, flow: str) -> tuple[int, Decimal]:
    """Shards not yet submitted and their estimated batch cost."""
    total = Decimal(0)
    count = 0
    for model, tokens, est, mode in conn.execute(
            "SELECT model, coalesce(est_input_tokens, 0), est_cost_usd, mode FROM batch_jobs"
            " WHERE flow = %s AND state = ANY(%s)", (flow, list(UNSUBMITTED_JOB_STATES))):
        count += 1
        total += est if est is not None else price(model, input_tokens=int(tokens), batch=mode == "batch").batch_usd
    return count, total


def check_run_budget(conn: psycopg.Connection, *, flow: str, policy: QuotaPolicy) -> None:
    """Refuse a run whose unsubmitted estimate exceeds what is left of a cap, before any request."""
    shards, estimate = unsubmitted_estimate(conn, flow=flow)
    if not shards:
        return
    for scope in ("*", flow):
        cap = policy.budget_usd.get(scope)
        if cap is None:
            continue
        spent = committed_usd(conn, flow=None if scope == "*" else flow)
        if spent + estimate > cap:
            raise BudgetExceeded(
                f"{policy.budget_setting}={cap:f}: {shards} {flow} shards waiting to be submitted are estimated at "
                f"${estimate:.4f}, but only ${max(cap - spent, Decimal(0)):.4f} of the cap is left (${spent:.4f} "
                "spent or in flight); raise the cap, or run fewer records with --limit. Nothing was submitted.")


# -- the operator's view ------------------------------------------------------------------------------

@dataclass(frozen=True)
class QueueView:
    provider: str
    model: str
    kind: QuotaKind | None
    limit: int | None
    source: str | None
    enqueued_tokens: int
    jobs_in_progress: int
    waiting_shards: int
    waiting_tokens: int
    waiting_reason: str | None
    waiting_since: datetime | None
    tokens_per_s: float | None
    """Our own pace over the last 6 hours: tokens of jobs finished / time since the first of them was submitted."""
    refusals: int

    @property
    def eta(self) -> timedelta | None:
        if not self.tokens_per_s:
            return None
        return timedelta(seconds=(self.waiting_tokens + self.enqueued_tokens) / self.tokens_per_s)

    def line(self) -> str:
        unit = "jobs" if self.kind == "jobs" else "tokens"
        used = self.jobs_in_progress if self.kind == "jobs" else self.enqueued_tokens
        limit = f"{self.limit:,}" if self.limit else "unknown"
        text = (f"{self.provider}/{self.model}: {used:,} of {limit} {unit} queued ({self.source or 'no quota'}"
                f"{f', {self.refusals} refusals' if self.refusals else ''}); {self.waiting_shards} shards "
                f"({self.waiting_tokens:,} tokens) waiting")
        reason = self.waiting_reason or ("waiting for room in the queue" if self.waiting_shards and self.limit
                                         else None)
        if reason:
            since = f" since {self.waiting_since:%Y-%m-%d %H:%M:%S} UTC" if self.waiting_since else ""
            text += f" — {reason}{since}"
        eta = self.eta
        if eta is not None:
            text += f"; finish expected in ~{_human(eta)} at {self.tokens_per_s:,.0f} tokens/s"
        return text


def _human(delta: timedelta) -> str:
    seconds = int(delta.total_seconds())
    if seconds < 120:
        return f"{seconds} s"
    if seconds < 7200:
        return f"{seconds // 60} min"
    return f"{seconds / 3600:.1f} h"


def queue_views(conn: psycopg.Connection, *, kinds: Mapping[str, QuotaKind | None], policy: QuotaPolicy,
                flow: str | None = None) -> list[QueueView]:
    """One line per provider/model with open or waiting batch work (or a stored quota)."""
    pairs = conn.execute(
        "SELECT DISTINCT provider, model FROM batch_jobs WHERE mode = 'batch' AND state = ANY(%s)"
        " AND (%s::text IS NULL OR flow = %s)"
        " UNION SELECT provider, model FROM provider_quotas ORDER BY 1, 2",
        ([*WAITING_JOB_STATES, *QUEUED_JOB_STATES], flow, flow)).fetchall()
    views: list[QueueView] = []
    for provider, model in pairs:
        kind = kinds.get(provider)
        quota = quota_for(conn, provider=provider, model=model, kind=kind, policy=policy)
        now = queued(conn, provider=provider, model=model)
        shards, tokens, since = conn.execute(
            "SELECT count(*), coalesce(sum(est_input_tokens), 0), min(waiting_since) FROM batch_jobs"
            " WHERE provider = %s AND model = %s AND state = ANY(%s)",
            (provider, model, list(WAITING_JOB_STATES))).fetchone()
        reason = conn.execute(
            "SELECT waiting_reason FROM batch_jobs WHERE provider = %s AND model = %s AND state = ANY(%s)"
            " AND waiting_reason IS NOT NULL ORDER BY updated_at DESC LIMIT 1",
            (provider, model, list(WAITING_JOB_STATES))).fetchone()
        done_tokens, first = conn.execute(
            "SELECT coalesce(sum(est_input_tokens), 0), min(submitted_at) FROM batch_jobs"
            " WHERE provider = %s AND model = %s AND mode = 'batch' AND finished_at > now() - interval '6 hours'",
            (provider, model)).fetchone()
        pace = None
        if first is not None and done_tokens:
            elapsed = (datetime.now(UTC) - first).total_seconds()
            pace = float(done_tokens) / elapsed if elapsed > 0 else None
        refusals = conn.execute("SELECT coalesce(sum(refusals), 0) FROM provider_quotas WHERE provider = %s"
                                " AND model = %s", (provider, model)).fetchone()[0]
        views.append(QueueView(
            provider, model, kind, quota.limit if quota else None, quota.source if quota else None, now.tokens,
            now.jobs, int(shards), int(tokens), reason[0] if reason else None, since, pace, int(refusals)))
    return views
