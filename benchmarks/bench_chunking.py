"""Chunking on every core: `sync_chunks` with one worker and with all of them, against the
tokenizer's own limit on all cores.

    python -m benchmarks.bench_chunking [--cases 3000] [--workers N] [--repeat 1]

1. seed: `--cases` demo judgments (`core.seed.seed_demo_cases`) into a throwaway database.
2. chunk: `flows.embeddings.sync_chunks` from nothing chunked, with `workers=1` (in this process,
   no pool) and with `--workers` (default: one per CPU) — everything a pass does: hashing, the
   tokenizer, writing `case_chunks`/`chunked_cases`, the ledger. The tables are emptied before each
   run (not timed).
3. limit: `core.chunking.chunk_text` alone over the same texts (read 200 at a time, nothing written,
   no hashing, no ledger) on one core (in process) and on a pool of `--workers` processes: the
   tokenizer-bound ceiling chunking on this machine can reach. `ratio` = chunking rate with all
   workers / the tokenizer on all cores; `tokenizer_speedup` = what the extra cores gave the
   tokenizer alone at that moment (below the worker count when other work shares the CPUs).

Each measured run is a fresh Python process (`--stage`), so its peak RSS is its own; with a pool the
workers' peak RSS is reported apart (`worker_peak_rss_mb`: the largest worker). Prints
`stage=chunk workers=1 rate=…`, `stage=chunk workers=N rate=… speedup=…`,
`limit=tokenizer_one_core rate=…`, `limit=tokenizer_all_cores rate=… ratio=…` and `name=value` lines; writes
`benchmarks/results/chunking.json`. Runs on the embedded server under `.legal_batch/bench` (the
database is dropped at the end). Timings are of this machine at this moment (the load average is
recorded); nothing here is a test.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from datetime import UTC, datetime
from functools import partial
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import throwaway  # noqa: E402
from benchmarks.bench_embeddings import Bench, peak_rss_mb  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "chunking.json"
Figures = dict[str, float | int | str]


class ChunkBench(Bench):
    SCRIPT = Path(__file__).resolve()


def _conn():
    from legal_batch.db import connect

    return connect(os.environ["LEGAL_BATCH_DATABASE_URL"])


def _children_peak_rss_mb() -> float:
    return round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1)


def stage_seed(params: dict) -> Figures:
    from legal_batch.core.seed import seed_demo_cases

    with _conn() as conn:
        started = time.perf_counter()
        seed_demo_cases(conn, cases=params["cases"])
        seconds = time.perf_counter() - started
        chars = conn.execute("SELECT coalesce(sum(length(full_text)), 0) FROM court_cases").fetchone()[0]
    return {"seed_seconds": round(seconds, 1), "corpus_mb": round(chars / 1e6, 1)}


def stage_chunk(params: dict) -> Figures:
    from legal_batch.flows.embeddings.flow import sync_chunks

    with _conn() as conn:
        conn.execute("TRUNCATE case_chunks, chunked_cases CASCADE")
        conn.execute("DELETE FROM batch_items WHERE flow = 'embeddings'")
        conn.execute("VACUUM ANALYZE case_chunks")
        started = time.perf_counter()
        synced = sync_chunks(conn, max_tokens=512, overlap_tokens=64, workers=params["workers"])
        seconds = time.perf_counter() - started
    return {"cases": synced.cases, "chunks": synced.chunks, "seconds": round(seconds, 2),
            "rate": round(synced.cases / seconds, 1), "peak_rss_mb": peak_rss_mb(),
            "worker_peak_rss_mb": _children_peak_rss_mb() if params["workers"] > 1 else 0.0}


def stage_limit(params: dict) -> Figures:
    from legal_batch.core.chunk_pool import ChunkPool
    from legal_batch.core.chunking import chunk_text

    chunk = partial(chunk_text, max_tokens=512, overlap_tokens=64)
    cases = chunks = 0
    seconds = 0.0
    with _conn() as conn, ChunkPool(params["workers"]) as pool:
        pool.submit(chunk, ["Warm up. " * 50] * params["workers"] * 4).result()  # workers up, tokenizer loaded
        with conn.transaction(), conn.cursor(name="texts") as cur:  # 200 texts at a time, two batches in the pool
            cur.execute("SELECT full_text FROM court_cases ORDER BY id")
            started = time.perf_counter()
            sent = [pool.submit(chunk, [r[0] for r in rows]) for rows in (cur.fetchmany(200), cur.fetchmany(200))
                    if rows]
            while sent:
                done = sent.pop(0).result()
                cases, chunks = cases + len(done), chunks + sum(len(pieces) for pieces in done)
                if texts := [row[0] for row in cur.fetchmany(200)]:
                    sent.append(pool.submit(chunk, texts))
            seconds = time.perf_counter() - started
    return {"cases": cases, "chunks": chunks, "seconds": round(seconds, 2), "rate": round(cases / seconds, 1),
            "peak_rss_mb": peak_rss_mb()}


STAGES = {"seed": stage_seed, "chunk": stage_chunk, "limit": stage_limit}


def run(args: argparse.Namespace) -> Figures:
    workers = args.workers or os.cpu_count() or 1
    figures: Figures = {"measured_at": datetime.now(UTC).isoformat(timespec="seconds"), "cpus": os.cpu_count() or 0,
                        "load_average_1m_at_start": round(os.getloadavg()[0], 2), "cases": args.cases}
    bench = ChunkBench(keep=args.keep)
    try:
        url = bench.database("chunking", migrate=True)
        figures |= bench.stage("seed", url, {"cases": args.cases})
        for count in (1, workers):
            runs = [bench.stage("chunk", url, {"workers": count}) for _ in range(args.repeat)]
            best = max(runs, key=lambda r: r["rate"])
            figures |= {f"chunk_w{count}_{key}": value for key, value in best.items()}
            figures[f"chunk_w{count}_peak_rss_mb"] = max(r["peak_rss_mb"] for r in runs)
        for count, name in ((1, "one_core"), (workers, "all_cores")):
            limit = max((bench.stage("limit", url, {"workers": count}) for _ in range(args.repeat)),
                        key=lambda r: r["rate"])
            figures |= {f"tokenizer_{name}_{key}": value for key, value in limit.items()}
    finally:
        bench.close()
    figures["workers"] = workers
    figures["speedup"] = round(float(figures[f"chunk_w{workers}_rate"]) / float(figures["chunk_w1_rate"]), 2)
    figures["ratio"] = round(float(figures[f"chunk_w{workers}_rate"]) / float(figures["tokenizer_all_cores_rate"]), 2)
    figures["tokenizer_speedup"] = round(float(figures["tokenizer_all_cores_rate"])
                                         / float(figures["tokenizer_one_core_rate"]), 2)
    figures["load_average_1m_at_end"] = round(os.getloadavg()[0], 2)
    return figures


def report(figures: Figures) -> None:
    workers = figures["workers"]
    one, many = "chunk_w1", f"chunk_w{workers}"
    print(f"stage=chunk workers=1 rate={figures[f'{one}_rate']} peak_rss_mb={figures[f'{one}_peak_rss_mb']}")
    print(f"stage=chunk workers={workers} rate={figures[f'{many}_rate']} speedup={figures['speedup']} "
          f"peak_rss_mb={figures[f'{many}_peak_rss_mb']} worker_peak_rss_mb={figures[f'{many}_worker_peak_rss_mb']}")
    print(f"limit=tokenizer_one_core workers=1 rate={figures['tokenizer_one_core_rate']}")
    print(f"limit=tokenizer_all_cores workers={workers} rate={figures['tokenizer_all_cores_rate']} "
          f"ratio={figures['ratio']} speedup={figures['tokenizer_speedup']}")
    for name, value in figures.items():
        print(f"{name}={value}")
    throwaway.write_results(RESULTS, figures)


def main(argv: list[str] | None = None) -> None:
    parser = throwaway.parser(__doc__ or "", STAGES)
    parser.add_argument("--cases", type=int, default=3_000, help="demo judgments to chunk")
    parser.add_argument("--workers", type=int, default=None, help="the pool's size (default: one per CPU)")
    parser.add_argument("--repeat", type=int, default=1, help="runs of each measurement; the fastest counts")
    args = parser.parse_args(argv)
    if not throwaway.ran_stage(args, STAGES):
        report(run(args))


if __name__ == "__main__":
    main()
