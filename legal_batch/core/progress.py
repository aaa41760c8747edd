"""Progress an operator can see: a flow's running totals from the ledger (items, tokens, spend), a
heartbeat that logs a long step at least every 10 s, and a watcher that reports an index build
from Postgres' own progress view while it runs. No Dagster imports: the assets and the status
sensor turn these into log lines and observations.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

import psycopg
from psycopg.rows import class_row

from legal_batch.core import cost, ledger
from legal_batch.core.ledger import ItemState, JobState

Log = Callable[[str], None]


@dataclass(frozen=True)
class FlowProgress:
    """A flow's totals over every shard in the ledger."""

    flow: str
    items_done: int
    items_open: int
    """Exported or submitted: in a request file or a provider job, not answered yet."""
    items_retryable: int
    items_failed: int
    jobs_open: int
    """Provider jobs planned, waiting or running (not yet finished or ingested)."""
    jobs_ingested: int
    input_tokens: int
    output_tokens: int
    est_cost_usd: Decimal
    """What the shards planned so far were estimated to cost at batch price."""
    actual_cost_usd: Decimal
    """What the finished jobs cost, from the tokens the provider reported."""
    realtime_equivalent_usd: Decimal
    """What the same tokens would have cost through the real-time API."""

    @property
    def items_total(self) -> int:
        return self.items_done + self.items_open + self.items_retryable + self.items_failed

    def metadata(self) -> dict[str, int | float]:
        """Numbers only, so the UI plots each of them over time."""
        return {
            "items_done": self.items_done, "items_open": self.items_open,
            "items_retryable": self.items_retryable, "items_failed": self.items_failed,
            "items_total": self.items_total, "jobs_open": self.jobs_open, "jobs_ingested": self.jobs_ingested,
            "input_tokens": self.input_tokens, "output_tokens": self.output_tokens,
            "est_cost_usd": float(self.est_cost_usd), "actual_cost_usd": float(self.actual_cost_usd),
            "realtime_equivalent_usd": float(self.realtime_equivalent_usd),
            "saved_usd": float(self.realtime_equivalent_usd - self.actual_cost_usd),
        }

    def line(self) -> str:
        return (f"{self.flow}: {self.items_done:,} of {self.items_total:,} items done, {self.items_open:,} open, "
                f"{self.items_retryable:,} retryable, {self.items_failed:,} failed; "
                f"{self.input_tokens + self.output_tokens:,} tokens; ${self.actual_cost_usd:.4f} spent "
                f"(est. ${self.est_cost_usd:.4f}; ${self.realtime_equivalent_usd:.4f} in real time)")


_OPEN_JOB_STATES = (*ledger.WAITING_JOB_STATES, *ledger.QUEUED_JOB_STATES, JobState.COMPLETED, JobState.PARTIAL)
"""Jobs counted as open in the totals: not submitted yet, at the provider, or finished with results to ingest."""


def flow_progress(conn: psycopg.Connection, flow: str) -> FlowProgress:
    """The flow's totals: items by state, jobs, tokens, estimated and actual spend, and the real-time
    price of the tokens used (each job's model at its list price)."""
    items = dict(conn.execute("SELECT state, count(*) FROM batch_items WHERE flow = %s GROUP BY state",
                              (flow,)).fetchall())
    jobs_open, jobs_ingested, est, actual = conn.execute(
        "SELECT count(*) FILTER (WHERE state = ANY(%s)), count(*) FILTER (WHERE state = %s),"
        " coalesce(sum(est_cost_usd), 0), coalesce(sum(actual_cost_usd), 0) FROM batch_jobs WHERE flow = %s",
        (list(_OPEN_JOB_STATES), JobState.INGESTED, flow),
    ).fetchone()
    realtime = Decimal(0)
    input_tokens = output_tokens = 0
    for model, tokens_in, tokens_out in conn.execute(
            "SELECT model, coalesce(sum(input_tokens), 0), coalesce(sum(output_tokens), 0) FROM batch_jobs"
            " WHERE flow = %s GROUP BY model", (flow,)).fetchall():
        input_tokens += int(tokens_in)
        output_tokens += int(tokens_out)
        realtime += cost.price(model, input_tokens=int(tokens_in), output_tokens=int(tokens_out)).realtime_usd
    return FlowProgress(
        flow=flow, items_done=items.get(ItemState.DONE, 0),
        items_open=sum(items.get(state, 0) for state in ledger.ITEM_OPEN_STATES),
        items_retryable=items.get(ItemState.RETRYABLE, 0), items_failed=items.get(ItemState.FAILED, 0),
        jobs_open=jobs_open, jobs_ingested=jobs_ingested, input_tokens=input_tokens, output_tokens=output_tokens,
        est_cost_usd=Decimal(est), actual_cost_usd=Decimal(actual), realtime_equivalent_usd=realtime,
    )


class Heartbeat:
    """Counts work done in a long step and logs it with its rate (and, once `expect` knows the total,
    an ETA) at most every `every_s` seconds: `beat(n)` after each piece of `n` units. Inside
    `ticking()` it also logs on time while no piece finishes (a slow batch), so a line comes at least
    every `every_s` seconds."""

    def __init__(self, log: Log, what: str, *, every_s: float = 10.0, total: int | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.log = log
        self.what = what
        self.every_s = every_s
        self.clock = clock
        self.total = total
        self.started = self.last = clock()
        self.done = 0
        self._lock = threading.Lock()

    def expect(self, total: int) -> None:
        """The units the step will do in all (for the ETA)."""
        self.total = total

    def beat(self, n: int = 1) -> None:
        with self._lock:
            self.done += n
            now = self.clock()
            if now - self.last >= self.every_s:
                self.last = now
                self.log(self.line(now))

    def line(self, now: float | None = None) -> str:
        elapsed = max((self.clock() if now is None else now) - self.started, 1e-9)
        rate = self.done / elapsed
        if self.total is None:
            return f"{self.what}: {self.done:,} so far in {elapsed:.0f} s ({rate:,.0f}/s)"
        left = max(self.total - self.done, 0)
        eta = f"ETA {_duration(left / rate)}" if rate > 0 else "ETA unknown yet"
        return (f"{self.what}: {self.done:,} of {self.total:,} in {elapsed:.0f} s ({rate:,.1f}/s), "
                f"{left:,} left, {eta}")

    @contextmanager
    def ticking(self) -> Iterator[Heartbeat]:
        """While the body runs, a thread checks every second whether a line is due."""
        stop = threading.Event()

        def tick() -> None:
            while not stop.wait(min(1.0, self.every_s / 4)):
                self.beat(0)

        ticker = threading.Thread(target=tick, name=f"heartbeat-{self.what}", daemon=True)
        ticker.start()
        try:
            yield self
        finally:
            stop.set()
            ticker.join(timeout=5)


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60} min"


@contextmanager
def watch_index_build(connect: Callable[[], AbstractContextManager[psycopg.Connection]], log: Log, *,
                      table: str, every_s: float = 10.0) -> Iterator[None]:
    """While the body runs, log every `every_s` seconds how far a `CREATE INDEX` on `table` has got,
    read from `pg_stat_progress_create_index` on a second connection (the building one is busy)."""
    stop = threading.Event()
    started = time.monotonic()

    def poll() -> None:
        if stop.wait(every_s):
            return  # done within the first interval: no second connection needed
        try:
            with connect() as conn:
                while True:
                    row = conn.execute(
                        "SELECT phase, tuples_done, tuples_total, blocks_done, blocks_total"
                        " FROM pg_stat_progress_create_index WHERE relid = to_regclass(%s)", (table,)).fetchone()
                    elapsed = time.monotonic() - started
                    if row is not None:
                        phase, tuples_done, tuples_total, blocks_done, blocks_total = row
                        done = (f"{tuples_done:,} of {tuples_total:,} rows" if tuples_total
                                else f"{blocks_done:,} of {blocks_total:,} blocks" if blocks_total
                                else f"{tuples_done:,} rows")
                        log(f"building the index on {table}: {phase}, {done}, {elapsed:.0f} s so far")
                    if stop.wait(every_s):
                        return
        except Exception as exc:  # the report is a courtesy: never fail the build over it
            log(f"cannot report the index build's progress: {str(exc).strip().splitlines()[0]}")

    watcher = threading.Thread(target=poll, name=f"index-progress-{table}", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        stop.set()
        watcher.join(timeout=5)


@dataclass(frozen=True)
class JobChange:
    """A job row as it stands after a change (any `batch_jobs` update moves `updated_at`)."""

    id: int
    shard_key: str
    state: str
    provider: str
    model: str
    provider_status: str | None
    provider_job_id: str | None
    request_count: int
    items_done: int | None
    items_retryable: int | None
    items_failed: int | None
    actual_cost_usd: Decimal | None
    updated_at: datetime

    @property
    def position(self) -> tuple[str, int]:
        """Where a reader that has seen this change resumes (see `jobs_changed_since`)."""
        return self.updated_at.isoformat(), self.id


def jobs_changed_since(conn: psycopg.Connection, flow: str, after: tuple[str, int] | None, *,
                       limit: int = 200) -> list[JobChange]:
    """The flow's jobs changed after `after` (a `JobChange.position`; None: from the start), oldest
    change first, at most `limit`: a reader keeps the last one's position and calls again."""
    since, last_id = after if after is not None else ("-infinity", 0)
    with conn.cursor(row_factory=class_row(JobChange)) as cur:
        return cur.execute(
            "SELECT id, shard_key, state, provider, model, provider_status, provider_job_id, request_count,"
            " items_done, items_retryable, items_failed, actual_cost_usd, updated_at FROM batch_jobs"
            " WHERE flow = %s AND (updated_at, id) > (%s::timestamptz, %s) ORDER BY updated_at, id LIMIT %s",
            (flow, since, last_id, limit)).fetchall()
