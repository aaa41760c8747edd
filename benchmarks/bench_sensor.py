"""The job-status sensor's tick with 1,000 open jobs, and the memory of planning millions of chunks.

    python -m benchmarks.bench_sensor [--jobs 1000] [--latency-ms 0,100] [--plan-chunks 200000,2000000]
    python -m benchmarks.bench_sensor --parts plan        # or: --parts status

Each part runs in a fresh Python process (so each peak RSS is that part's own) on throwaway
databases `lb_bench_<random>_*` of the embedded server under `.legal_batch/bench` (dropped at the
end; one benchmark run at a time), with a temporary `LEGAL_BATCH_HOME`.

1. status  The OpenAI batch emulator (`legal_batch_tests/emulators/openai_batch.py`, in the same
           process, over HTTP through the real `openai` SDK) holds `--jobs` batches — a quarter each
           validating, in_progress, finalizing and completed — and the database holds the matching
           `batch_jobs` rows (`pending`, one item each), as after a large submit. One tick of the
           job-status path is timed three ways, each from that same starting state:
           - `before_sensor`: the per-job loop the sensor ran before `PollsMany` (lock a job,
             `GET /batches/{id}`, record; a provider — an SDK client — built per job, as the sensor's
             `providers.named` does) with the sensor's bounds, max_jobs=50, time budget 40 s;
           - `before_all`: the same loop with no count bound (time budget 40 s);
           - `after`: `core.batch.poll_open_jobs` (no count bound, time budget 40 s): one batch listing
             (`GET /batches`, 100 a page) for every job, then each status recorded under its row lock.
           At each `--latency-ms`, added to every emulator answer for the network round trip to the
           service (0: this machine alone). Every recorded state is checked against the emulator's.
2. plan    `core.batch.plan` of the embeddings flow (`max_shards=None`, 50,000 records a shard, as
           OpenAI's limit) over each of `--plan-chunks` synthetic chunks (17 a case, 400 tokens each)
           in a fresh database: seconds, shards, and the peak RSS of the planning process.

Prints one `name=value` per line on stdout (progress on stderr) and writes them to
`benchmarks/results/sensor.json`. Timings are of this machine at this moment, including whatever
else runs on it (the load average is recorded); nothing here is a test.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # a stage runs this file as a script from the bench home
    sys.path.insert(0, str(ROOT))

from benchmarks.bench_embeddings import Bench, log, peak_rss_mb, rate  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "sensor.json"
FLOW = "embeddings"
MODEL = "text-embedding-3-small"
CHUNKS_PER_CASE = 17
TICK_BUDGET_S = 40.0  # the sensor's time budget (flows' job-status sensor)
SENSOR_MAX_JOBS = 50  # the sensor's count bound before PollsMany

Figures = dict[str, float | int | str]


def _conn():
    from legal_batch.db import connect

    return connect(os.environ["LEGAL_BATCH_DATABASE_URL"])


# -- 1. status ----------------------------------------------------------------------------------------

_EMULATOR_STATUSES = ("validating", "in_progress", "finalizing", "completed")
_LEDGER_STATES = {"validating": "pending", "in_progress": "running", "finalizing": "running",
                  "completed": "completed"}


def _open_jobs(conn, emulator, provider, count: int, home: Path) -> dict[int, str]:
    """`count` one-item shards, each `pending` with its own batch in the emulator; returns the state
    each job must be recorded in (job id → state)."""
    from legal_batch.core import ledger
    from legal_batch.providers.base import EmbeddingRequest

    plan = ledger.plan_shards(
        conn, flow=FLOW, provider="openai", model=MODEL, params={"n": count},
        candidate_sql="SELECT 'case:' || g, 'chunk-' || g, 400, 2000 FROM generate_series(1, %(n)s) g ORDER BY g",
        limits=ledger.ShardLimits(max_records=1, max_bytes=10**9))
    request = home / "request.jsonl"
    request.write_bytes(provider.format_line(EmbeddingRequest("chunk-0", "a paragraph of a judgment"),
                                             endpoint="embeddings", model=MODEL))
    template = provider.submit(request_file=request, endpoint="embeddings", model=MODEL,
                               client_token="lb-template", shard_key="template").provider_job_id
    jobs = conn.execute("SELECT id, shard_key, client_token FROM batch_jobs WHERE flow = %s ORDER BY id",
                        (FLOW,)).fetchall()
    assert len(jobs) == len(plan.shard_keys) == count
    expected: dict[int, str] = {}
    rows = []
    for number, (job_id, shard_key, token) in enumerate(jobs):
        batch_id = emulator.copy_batch(template, metadata={"client_token": token, "shard_key": shard_key})
        status = _EMULATOR_STATUSES[number % len(_EMULATOR_STATUSES)]
        if status == "completed":
            emulator.complete(batch_id)
        elif status != "validating":
            emulator.set_status(batch_id, status)
        expected[job_id] = _LEDGER_STATES[status]
        rows.append((batch_id, job_id))
    with conn.transaction(), conn.cursor() as cur:
        cur.executemany("UPDATE batch_jobs SET provider_job_id = %s, submitted_at = now() WHERE id = %s", rows)
        cur.execute("UPDATE batch_items SET state = 'submitted', attempts = 1 WHERE flow = %s", (FLOW,))
    return expected


def _reset(conn) -> None:
    """Every job back to `pending`, as the provider first reported it."""
    with conn.transaction():
        conn.execute("UPDATE batch_jobs SET state = 'pending', provider_status = 'validating', completed_count = NULL,"
                     " failed_count = NULL, output_location = NULL, error_location = NULL, finished_at = NULL,"
                     " last_error = NULL, updated_at = now() WHERE flow = %s", (FLOW,))
    conn.execute("VACUUM ANALYZE batch_jobs")


def _poll_before(conn, providers: Callable, *, flow: str, max_jobs: int | None, time_budget_s: float) -> list:
    """The job-status loop as it was before `PollsMany`, kept here to measure against: each job
    locked, polled alone and recorded, with the provider looked up per job."""
    from legal_batch.core import batch, ledger
    from legal_batch.core.quota import QuotaPolicy

    started = time.monotonic()
    polled = []
    states = ("submitting", "pending", "running")
    for listed in ledger.list_jobs(conn, flow=flow, states=states, limit=max_jobs):
        if time.monotonic() - started > time_budget_s:
            break
        with conn.transaction():
            job = ledger.lock_job(conn, listed.id, states=states)
            entry = None if job is None else batch._poll_locked(conn, providers(job.provider), job, QuotaPolicy())
        if entry is not None:
            polled.append(entry)
    return polled


def stage_status(params: dict) -> Figures:
    from legal_batch.core import batch
    from legal_batch.resources.providers import make_provider
    from legal_batch.settings import get_settings
    from legal_batch_tests.emulators.openai_batch import running_openai_emulator

    count = params["jobs"]
    figures: Figures = {"status_jobs": count}
    with running_openai_emulator(api_key="sk-bench-emulator-0123456789") as emulator, _conn() as conn:
        os.environ["OPENAI_API_KEY"] = emulator.api_key
        os.environ["OPENAI_BASE_URL"] = emulator.base_url
        settings = get_settings(fresh=True)

        def providers(name: str):  # what the sensor passes: `ProvidersResource.named`
            return make_provider(name, settings)

        started = time.perf_counter()
        expected = _open_jobs(conn, emulator, providers("openai"), count, Path(os.environ["LEGAL_BATCH_HOME"]))
        log(f"status setup: {count} batches and jobs in {time.perf_counter() - started:.1f} s")
        variants: dict[str, Callable[[], list]] = {
            "before_sensor": lambda: _poll_before(conn, providers, flow=FLOW, max_jobs=SENSOR_MAX_JOBS,
                                                  time_budget_s=TICK_BUDGET_S),
            "before_all": lambda: _poll_before(conn, providers, flow=FLOW, max_jobs=None,
                                               time_budget_s=TICK_BUDGET_S),
            "after": lambda: batch.poll_open_jobs(conn, providers, flow=FLOW, time_budget_s=TICK_BUDGET_S),
        }
        for latency_ms in params["latencies_ms"]:
            emulator.latency_s = latency_ms / 1000
            for variant, tick in variants.items():
                _reset(conn)
                calls_before = len(emulator.requests)
                started = time.perf_counter()
                polled = tick()
                seconds = time.perf_counter() - started
                calls = emulator.requests[calls_before:]
                recorded = dict(conn.execute("SELECT id, state FROM batch_jobs WHERE flow = %s", (FLOW,)).fetchall())
                wrong = [p.job.id for p in polled if recorded[p.job.id] != expected[p.job.id]]
                if wrong:
                    raise RuntimeError(f"{variant}: {len(wrong)} jobs recorded in the wrong state, e.g. job {wrong[0]}")
                name = f"status_{variant}_latency{latency_ms}ms"
                figures |= {f"{name}_seconds": round(seconds, 2), f"{name}_jobs_polled": len(polled),
                            f"{name}_api_calls": len(calls)}
                log(f"{name}: {len(polled)} of {count} jobs in {seconds:.2f} s, {len(calls)} API calls")
    return figures


# -- 2. plan ------------------------------------------------------------------------------------------

def _synthetic_chunks(url: str, chunks: int) -> None:
    """`chunks` chunks (17 a case, 400 tokens, short distinct texts) written by the server itself."""
    from legal_batch.db import connect

    cases = -(-chunks // CHUNKS_PER_CASE)
    with connect(url) as conn:
        conn.execute("INSERT INTO court_cases (id, neutral_citation, case_name, court, full_text)"
                     " SELECT md5('case' || g)::uuid, '[2024] BENCH ' || g, 'Case ' || g, 'Bench', 'text'"
                     " FROM generate_series(1, %s) g", (cases,))
        conn.execute("INSERT INTO case_chunks (case_id, chunk_index, chunk_type, chunk_text, char_start, char_end,"
                     " token_count, text_sha256)"
                     " SELECT md5('case' || (n / %s + 1))::uuid, n %% %s, 'body', 'paragraph ' || n, 0, 20, 400,"
                     "        md5('paragraph ' || n)"
                     " FROM generate_series(0, %s - 1) n", (CHUNKS_PER_CASE, CHUNKS_PER_CASE, chunks))
        conn.execute("VACUUM ANALYZE")


def stage_plan(params: dict) -> Figures:
    from legal_batch.core import batch, ledger

    if params.get("hold_all"):  # before: every shard's candidates listed before the first is recorded
        cut = ledger.cut_shards
        ledger.cut_shards = lambda candidates, limits: iter(list(cut(candidates, limits)))  # type: ignore[assignment]
    from legal_batch.flows.embeddings.flow import EmbeddingsFlow
    from legal_batch.providers.local import LocalProvider

    provider = LocalProvider(Path(os.environ["LEGAL_BATCH_HOME"]) / "local_provider", max_records_per_job=50_000)
    flow = EmbeddingsFlow(model=provider.default_model("embeddings"))
    rss_before = peak_rss_mb()
    with _conn() as conn:
        started = time.perf_counter()
        planned = batch.plan(conn, flow, provider, model=flow.model, max_shards=None)
        seconds = time.perf_counter() - started
    if planned.planned_items != params["chunks"]:
        raise RuntimeError(f"planned {planned.planned_items} of {params['chunks']} chunks")
    return {"chunks": planned.planned_items, "shards": len(planned.shard_keys), "seconds": round(seconds, 1),
            "chunks_per_s": rate(planned.planned_items, seconds), "peak_rss_mb": peak_rss_mb(),
            "rss_before_mb": rss_before}


STAGES: dict[str, Callable[[dict], Figures]] = {"status": stage_status, "plan": stage_plan}


# -- orchestration ------------------------------------------------------------------------------------

class SensorBench(Bench):
    SCRIPT = Path(__file__).resolve()


def run(args: argparse.Namespace) -> Figures:
    from legal_batch.db import connect

    parts = set(args.parts.split(","))
    figures: Figures = {"measured_at": datetime.now(UTC).isoformat(timespec="seconds"), "cpus": os.cpu_count() or 0,
                        "load_average_1m_at_start": round(os.getloadavg()[0], 2)}
    bench = SensorBench(keep=args.keep)
    try:
        if "status" in parts:
            url = bench.database("status", migrate=True)
            figures |= bench.stage("status", url, {"jobs": args.jobs,
                                                   "latencies_ms": [int(x) for x in args.latency_ms.split(",")]})
        if "plan" in parts:
            for chunks in (int(x) for x in args.plan_chunks.split(",")):
                url = bench.database(f"plan{chunks}", migrate=True)
                started = time.perf_counter()
                _synthetic_chunks(url, chunks)
                log(f"plan setup: {chunks} chunks in {time.perf_counter() - started:.1f} s")
                for variant in ("before", "after") if args.plan_before else ("after",):
                    with connect(url) as conn:  # from the same empty ledger each time
                        conn.execute("TRUNCATE batch_items, batch_jobs")
                        conn.execute("VACUUM ANALYZE")
                    measured = bench.stage("plan", url, {"chunks": chunks, "hold_all": variant == "before"})
                    figures |= {f"plan_{chunks}_{variant}_{k}": v for k, v in measured.items() if k != "chunks"}
    finally:
        bench.close()
    figures["load_average_1m_at_end"] = round(os.getloadavg()[0], 2)
    return figures


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=1_000, help="open jobs (and emulator batches) for the status tick")
    parser.add_argument("--latency-ms", default="0,100",
                        help="comma-separated delays added to every emulator answer (network round trip)")
    parser.add_argument("--plan-chunks", default="200000,2000000", help="comma-separated chunk counts to plan")
    parser.add_argument("--parts", default="status,plan", help="comma-separated subset of status,plan")
    parser.add_argument("--plan-before", action=argparse.BooleanOptionalAction, default=True,
                        help="also plan each size the way it was before streaming (every shard listed first)")
    parser.add_argument("--keep", action="store_true", help="keep the databases and home (for debugging)")
    parser.add_argument("--stage", choices=sorted(STAGES), help=argparse.SUPPRESS)
    parser.add_argument("--params", default="{}", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.stage:
        figures = STAGES[args.stage](json.loads(args.params))
        Path(args.out).write_text(json.dumps(figures))
        return
    figures = run(args)
    for name, value in figures.items():
        print(f"{name}={value}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(figures, indent=2) + "\n")
    log(f"figures written to {RESULTS}")


if __name__ == "__main__":
    main()
