"""How fully the submit gate uses a provider's enqueued-token quota: a fast-clock simulation.

    python -m benchmarks.bench_quota [--quota 3000000] [--shards-worth 30] [--margin 0.05]

No sleeping and no provider: a simulated OpenAI-style batch service with an enqueued-token quota,
driven through the real scheduler code — `core.batch.plan`, `write_request_file`, `submit_shard`
(the quota gate, `core.quota.admit`), `poll_open_jobs`, `download_outputs`, `ingest_shard` and
`admissible_shards` — on a throwaway database of the embedded Postgres under `.legal_batch/bench`.

The simulated service (one model, one organisation):
- counts the input tokens of every unfinished batch (created, not yet completed) against the quota;
  a batch that would pass it is created and then `failed` with `token_limit_exceeded` and OpenAI's
  message ("... Limit: N enqueued tokens ...", or without the figure with `--quota-unstated`);
- finishes each accepted batch `--turnaround` seconds (× uniform jitter ±`--jitter`) after it was
  created, whatever its size — work is shared over what is queued, so the service's throughput is
  the queued tokens / turnaround, and the **quota-limited maximum** is quota / turnaround tokens/s
  (the `--rate` parameter: turnaround = quota / rate).

The scheduler side runs as the sensors do: one round per `--tick` seconds of simulated time (poll
every open job, ingest each finished one, submit what the gate admits). The quota starts unknown
(nothing configured): it is learned from the first refusal(s).

Prints `name=value` lines, last `quota_utilisation=<ratio>` = (corpus tokens / time from the first
submission to the last ingest) / (quota / turnaround). Ideal scheduling cannot reach 1.0: the gate
keeps `--margin` of the quota free, and the last batches drain a part-empty queue; both are shown.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

from legal_batch.core import batch, ledger
from legal_batch.core.flow import Item
from legal_batch.core.quota import QuotaPolicy, queued
from legal_batch.db import connect, embedded, upgrade
from legal_batch.providers.base import (
    EmbeddingRequest,
    JobStatus,
    ProviderLimits,
    Request,
    Result,
    SubmittedJob,
)

ROOT = Path(__file__).resolve().parents[1]
BENCH_HOME = ROOT / ".legal_batch" / "bench"
FLOW = "simulated"
MODEL = "text-embedding-3-small"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0


@dataclass
class SimBatch:
    id: str
    token: str
    shard: str
    custom_ids: list[str]
    tokens: int
    created: float
    done_at: float | None
    status: str = "validating"
    message: str | None = None


@dataclass
class SimService:
    """An OpenAI-style batch service with an enqueued-token quota, on a simulated clock."""

    clock: Clock
    quota: int
    turnaround: float
    jitter: float
    states_limit: bool
    rng: random.Random
    batches: dict[str, SimBatch] = field(default_factory=dict)
    refusals: int = 0
    refusals_after_known: int = 0
    known: bool = False
    peak_enqueued: int = 0
    busy_token_seconds: float = 0.0
    _last: float = 0.0

    def enqueued(self) -> int:
        return sum(b.tokens for b in self.batches.values() if b.status in ("validating", "in_progress"))

    def advance(self, until: float) -> None:
        """Move to `until`: batches whose turnaround has passed complete (at their own instant)."""
        for sim in sorted(self.batches.values(), key=lambda b: b.done_at or 0):
            if sim.status in ("validating", "in_progress") and sim.done_at is not None and sim.done_at <= until:
                sim.status = "completed"
        self.busy_token_seconds += self.enqueued() * (until - self._last)
        self._last = until
        self.clock.now = until

    def create(self, *, token: str, shard: str, custom_ids: list[str], tokens: int) -> SimBatch:
        sim = SimBatch(f"batch_{uuid.uuid4().hex[:16]}", token, shard, custom_ids, tokens, self.clock.now, None)
        if self.enqueued() + tokens > self.quota:
            self.refusals += 1
            if self.known:
                self.refusals_after_known += 1
            stated = f" Limit: {self.quota:,} enqueued tokens." if self.states_limit else ""
            sim.status = "failed"
            sim.message = (f"token_limit_exceeded: Enqueued token limit reached for {MODEL} in organization "
                           f"org-sim.{stated} Please try again once some in_progress batches have been completed.")
        else:
            sim.done_at = self.clock.now + self.turnaround * self.rng.uniform(1 - self.jitter, 1 + self.jitter)
        self.batches[sim.id] = sim
        self.peak_enqueued = max(self.peak_enqueued, self.enqueued())
        return sim


class SimProvider:
    """The `BatchProvider` face of `SimService` (named `openai`: an enqueued-token quota)."""

    name = "openai"

    def __init__(self, service: SimService) -> None:
        self.service = service
        self.limits = ProviderLimits(max_records_per_job=50_000, max_bytes_per_file=200_000_000,
                                     max_embedding_inputs_per_job=50_000, quota_kind="enqueued_tokens")

    def default_model(self, endpoint: str) -> str:
        return MODEL

    def format_line(self, request: Request, *, endpoint: str, model: str) -> bytes:
        assert isinstance(request, EmbeddingRequest)
        return json.dumps({"custom_id": request.custom_id, "tokens": int(request.text)}).encode() + b"\n"

    def submit(self, *, request_file: Path, endpoint: str, model: str, client_token: str,
               shard_key: str) -> SubmittedJob:
        lines = [json.loads(line) for line in request_file.read_bytes().splitlines()]
        sim = self.service.create(token=client_token, shard=shard_key, custom_ids=[x["custom_id"] for x in lines],
                                  tokens=sum(x["tokens"] for x in lines))
        return SubmittedJob(sim.id, str(request_file), self.poll(sim.id))

    def find_job(self, *, client_token: str) -> SubmittedJob | None:
        for sim in self.service.batches.values():
            if sim.token == client_token:
                return SubmittedJob(sim.id, "", self.poll(sim.id))
        return None

    def poll(self, provider_job_id: str) -> JobStatus:
        sim = self.service.batches[provider_job_id]
        if sim.status == "failed":
            return JobStatus("failed", "failed", message=sim.message, quota_exceeded=True)
        if sim.status == "completed":
            return JobStatus("completed", "completed", total=len(sim.custom_ids), completed=len(sim.custom_ids),
                             failed=0, output_location=sim.id)
        return JobStatus("running", "in_progress", total=len(sim.custom_ids))

    def download(self, provider_job_id: str, status: JobStatus, dest: Path) -> list[Path]:
        dest.mkdir(parents=True, exist_ok=True)
        path = dest / "output.jsonl"
        path.write_text("".join(f"{cid}\n" for cid in self.service.batches[provider_job_id].custom_ids))
        return [path]

    def iter_results(self, files: Sequence[Path], *, endpoint: str) -> Iterator[Result]:
        for path in files:
            with path.open() as lines:
                for number, line in enumerate(lines, start=1):
                    yield Result(custom_id=line.strip(), source=path.name, line_no=number, text="ok")

    def cancel(self, provider_job_id: str) -> None:
        raise NotImplementedError

    def realtime(self, requests: Iterable[Request], *, endpoint: str, model: str) -> Iterator[Result]:
        raise NotImplementedError


class _Sink:
    def __init__(self) -> None:
        self.rows = 0

    def accept(self, item: Item, result: Result) -> str | None:
        self.rows += 1
        return None

    def finish(self) -> int:
        return self.rows


class SimFlow:
    """Records of a given token count in `sim_records`; results go nowhere (the ledger is what counts)."""

    name = FLOW
    endpoint = "embeddings"
    model = MODEL

    def candidate_sql(self) -> tuple[str, dict]:
        return ("SELECT r.key, 'rec-' || r.key, r.tokens, 64 FROM sim_records r"
                " WHERE NOT EXISTS (SELECT 1 FROM batch_items i WHERE i.flow = %(flow)s AND i.subject_key = r.key"
                "   AND i.state <> 'retryable') ORDER BY r.id", {"flow": FLOW})

    def requests(self, conn: psycopg.Connection, job_id: int) -> Iterator[Request]:
        rows = conn.execute("SELECT i.custom_id, r.tokens FROM batch_items i JOIN sim_records r ON r.key = i.subject_key"
                            " WHERE i.job_id = %s AND i.state IN ('exported', 'submitted') ORDER BY i.id",
                            (job_id,)).fetchall()
        for custom_id, tokens in rows:
            yield EmbeddingRequest(custom_id, str(tokens))

    def job_params(self) -> dict:
        return {}

    def sink(self, conn: psycopg.Connection, *, model: str) -> _Sink:
        return _Sink()


def simulate(conn: psycopg.Connection, files: Path, args: argparse.Namespace) -> dict[str, float]:
    rng = random.Random(args.seed)
    clock = Clock()
    turnaround = args.quota / args.rate
    service = SimService(clock, args.quota, turnaround, args.jitter, not args.quota_unstated, rng)
    provider = SimProvider(service)
    flow = SimFlow()
    policy = QuotaPolicy(margin=args.margin, shards_per_quota=args.shards_per_quota, retry_after_s=0.0)
    total_tokens = int(args.quota * args.shards_worth)
    records = total_tokens // args.record_tokens
    conn.execute("CREATE TABLE sim_records (id bigserial PRIMARY KEY, key text UNIQUE, tokens int)")
    conn.execute("INSERT INTO sim_records (key, tokens) SELECT 'r' || g, %s FROM generate_series(1, %s) g",
                 (args.record_tokens, records))
    total_tokens = records * args.record_tokens
    log(f"{records:,} records, {total_tokens:,} tokens = {total_tokens / args.quota:.0f}× the quota; "
        f"turnaround {turnaround:,.0f} s; tick {args.tick:.0f} s")

    def plan() -> None:
        batch.plan(conn, flow, provider, model=MODEL, max_shards=None, policy=policy)

    def submit_round() -> None:
        while True:
            ready = batch.admissible_shards(conn, FLOW, lambda _: provider, policy=policy)
            progressed = False
            for key in ready:
                job = ledger.get_job(conn, key)
                if job.state == "planned":
                    batch.write_request_file(conn, flow, provider, key, files_root=files)
                outcome = batch.submit_shard(conn, flow, provider, key, policy=policy)
                if outcome.state not in ("exported", "planned"):
                    progressed = True
            if not progressed:
                return

    started = time.perf_counter()
    plan()
    first_submit = clock.now
    last_ingest = 0.0
    ticks = 0
    while True:
        submit_round()
        if conn.execute("SELECT count(*) FROM provider_quotas").fetchone()[0] and not service.known:
            service.known = True
            log(f"quota learned after {service.refusals} refusal(s) at t={clock.now:,.0f} s: " + ", ".join(
                f"{v:,} ({s})" for v, s in conn.execute("SELECT limit_value, source FROM provider_quotas")))
        service.advance(clock.now + args.tick)
        ticks += 1
        batch.poll_open_jobs(conn, lambda _: provider, flow=FLOW, max_jobs=1000, time_budget_s=1e9, policy=policy)
        for job in ledger.list_jobs(conn, flow=FLOW, states=("completed", "partial", "failed", "cancelled",
                                                              "expired")):
            paths = batch.download_outputs(conn, provider, job.shard_key, files_root=files)
            batch.ingest_shard(conn, flow, provider, job.shard_key, files=paths)
            last_ingest = clock.now
        open_or_waiting = ledger.list_jobs(conn, flow=FLOW, states=("planned", "exported", "submitting", "pending",
                                                                    "running"))
        if not open_or_waiting:
            if conn.execute("SELECT count(*) FROM batch_items WHERE flow = %s AND state = 'retryable'",
                            (FLOW,)).fetchone()[0]:
                plan()
                continue
            break
        if ticks % 200 == 0:
            q = queued(conn, provider="openai", model=MODEL)
            log(f"t={clock.now:,.0f} s: {q.tokens:,} tokens queued in {q.jobs} jobs, "
                f"{len(open_or_waiting)} shards open or waiting")
    elapsed = time.perf_counter() - started
    items = dict(conn.execute("SELECT state, count(*) FROM batch_items WHERE flow = %s GROUP BY state",
                              (FLOW,)).fetchall())
    makespan = last_ingest - first_submit
    maximum = args.quota / turnaround
    achieved = total_tokens / makespan
    shards = conn.execute("SELECT count(*) FROM batch_jobs WHERE flow = %s AND state = 'ingested'",
                          (FLOW,)).fetchone()[0]
    return {
        "records": records,
        "corpus_tokens": total_tokens,
        "quota_tokens": args.quota,
        "margin": args.margin,
        "shards_ingested": shards,
        "simulated_hours": round(makespan / 3600, 2),
        "ideal_hours": round(total_tokens / maximum / 3600, 2),
        "wall_seconds": round(elapsed, 1),
        "refusals_to_learn": service.refusals - service.refusals_after_known,
        "refusals_after_known": service.refusals_after_known,
        "learned_limit": conn.execute("SELECT max(limit_value) FROM provider_quotas").fetchone()[0],
        "items_failed": items.get("failed", 0),
        "items_done": items.get("done", 0),
        "peak_enqueued_ratio": round(service.peak_enqueued / args.quota, 4),
        "mean_queue_fill": round(service.busy_token_seconds / (service._last * args.quota), 4),
        "quota_utilisation": round(achieved / maximum, 4),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quota", type=int, default=3_000_000, help="enqueued-token quota (tier 1: 3,000,000)")
    parser.add_argument("--rate", type=float, default=3_000_000 / 7200,
                        help="quota-limited maximum, tokens/s (turnaround = quota / rate; default: 2 h)")
    parser.add_argument("--shards-worth", type=float, default=30, help="corpus size in quotas")
    parser.add_argument("--record-tokens", type=int, default=400, help="tokens per request (a chunk)")
    parser.add_argument("--tick", type=float, default=60.0, help="seconds between scheduler rounds (sensor interval)")
    parser.add_argument("--jitter", type=float, default=0.2, help="turnaround jitter, ± share")
    parser.add_argument("--margin", type=float, default=0.05, help="LEGAL_BATCH_QUOTA_MARGIN")
    parser.add_argument("--shards-per-quota", type=int, default=4, help="LEGAL_BATCH_SHARDS_PER_QUOTA")
    parser.add_argument("--quota-unstated", action="store_true", help="refusals do not state the limit")
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args(argv)

    BENCH_HOME.mkdir(parents=True, exist_ok=True)
    started_server = not embedded.is_running(BENCH_HOME)  # stopped again at the end
    admin_url = embedded.start(BENCH_HOME)
    name = f"lb_bench_quota_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    base, _, query = admin_url.partition("?")
    url = f"{base.rsplit('/', 1)[0]}/{name}" + (f"?{query}" if query else "")
    try:
        upgrade(url)
        with connect(url) as conn, tempfile.TemporaryDirectory() as files:
            figures = simulate(conn, Path(files), args)
    finally:
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        if started_server:
            embedded.stop(BENCH_HOME)
    for key, value in figures.items():
        print(f"{key}={value}")


if __name__ == "__main__":
    main()
