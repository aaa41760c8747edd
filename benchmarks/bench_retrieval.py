"""Retrieval quality of the local embeddings on real judgments: recall@1/5/10, MRR and nDCG@10.

    python -m benchmarks.bench_retrieval [--corpus-dir /work/shared/corpora] [--corpora us_opinions,zh_judgments]
                                         [--chunk-tokens 512] [--overlap-tokens 64] [--json]

A corpus is `<name>.jsonl` (one judgment a line: `id`, `case_name`, `citation`, `court`,
`decision_date`, `full_text`) with `<name>_queries.jsonl` (`query`, `expected_id` — or any query
file `legal-batch eval` reads) beside it. Each corpus goes into its own throwaway database
`lb_retrieval_<random>_<name>` on the embedded Postgres under `.legal_batch/bench` (dropped at the
end), with a temporary `LEGAL_BATCH_HOME`, in a fresh Python process:

1. load     the judgments into `court_cases` (`core.corpus_import`, what `legal-batch cases import`
            runs; or with `--loader insert`, plain INSERTs of the raw records under the same ids);
2. embed    the whole local flow through the Dagster definitions (`driver.FlowDriver`: chunk,
            plan, request files, submit, poll, ingest, index) with the `local` provider;
3. query    `flows.embeddings.evaluation` — what `legal-batch eval` runs: each query embedded by the
            provider's real-time path and searched in the pgvector sink, cases ranked by their best chunk.

Figures per corpus (as `legal-batch eval` defines them, cut-off 10): `recall_at_1/5/10`, `mrr`,
`ndcg_at_10`, queries not embedded, the chunk-type distribution, chunks and tokens embedded (the
tokens spent), failed items. Output: a table on stdout (progress on stderr) and the figures as JSON
in `benchmarks/results/retrieval.json` (git-ignored); `--json` prints the JSON instead of the table.
The code measured is the checkout this file sits in (its root is put first on the child's
`PYTHONPATH`).
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH_HOME = ROOT / ".legal_batch" / "bench"
RESULTS = ROOT / "benchmarks" / "results" / "retrieval.json"
DEFAULT_CORPUS_DIR = Path("/work/shared/corpora")


def log(message: str) -> None:
    print(f"[retrieval {datetime.now():%H:%M:%S}] {message}", file=sys.stderr, flush=True)


# -- the stage (runs in its own process; environment: LEGAL_BATCH_HOME, LEGAL_BATCH_DATABASE_URL) ---------

def _load(conn, corpus: Path) -> tuple[int, str]:
    """The corpus's judgments into `court_cases` (cases loaded, loader): with `core.corpus_import`
    (what `legal-batch cases import` runs), or with plain INSERTs under the ids it would give."""
    from legal_batch.core import corpus_import

    if os.environ.get("BENCH_RETRIEVAL_LOADER") != "insert":
        conn.autocommit = True
        report = corpus_import.import_cases(conn, corpus_import.find_sources(corpus))
        conn.autocommit = False
        loaded = conn.execute("SELECT count(*) FROM court_cases").fetchone()[0]
        if report.exit_code:
            log(f"the importer skipped records of {corpus.name}: {report}")
        return loaded, "core.corpus_import"
    rows = 0
    with corpus.open(encoding="utf-8") as lines, conn.transaction():
        for line in lines:
            if not line.strip():
                continue
            record = json.loads(line)
            conn.execute(
                "INSERT INTO court_cases (id, neutral_citation, case_name, court, decision_date, full_text)"
                " VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (id) DO NOTHING",
                (corpus_import.case_id(record["id"])[0], record.get("citation"), record.get("case_name"),
                 record.get("court"), record.get("decision_date"), record["full_text"]),
            )
            rows += 1
    return rows, "INSERT"


def stage(params: dict) -> dict:
    import legal_batch
    from legal_batch.db import connect
    from legal_batch.definitions import FLOWS_BY_NAME, defs
    from legal_batch.driver import FlowDriver
    from legal_batch.flows.embeddings.evaluation import evaluate, read_queries
    from legal_batch.providers.local import LocalProvider
    from legal_batch.settings import get_settings
    from legal_batch.sinks.pgvector import PgvectorSink

    log(f"code under test: {Path(legal_batch.__file__).parent}")
    corpus = Path(params["corpus"])
    queries = read_queries(params["queries"])
    if queries.bad_lines:
        raise RuntimeError(f"bad lines in the query file: {', '.join(map(str, queries.bad_lines))}")
    url = os.environ["LEGAL_BATCH_DATABASE_URL"]
    started = time.perf_counter()
    with connect(url) as conn:
        cases, loader = _load(conn, corpus)
    loaded = time.perf_counter()
    run = FlowDriver(FLOWS_BY_NAME["embeddings"], defs, flow="embeddings", echo=log).run(wait=True,
                                                                                      poll_interval=0.05)
    if run.failed_runs:
        raise RuntimeError(f"Dagster runs failed: {run.failed_runs}")
    embedded = time.perf_counter()
    settings = get_settings()
    provider = LocalProvider(settings.home_dir / "local_provider", dimensions=settings.embedding_dimensions)
    model = provider.default_model("embeddings")
    with connect(url) as conn:
        sink = PgvectorSink(conn, model=model, dimensions=settings.embedding_dimensions)
        evaluation = evaluate(queries, provider=provider, model=model, sink=sink, k=10)
        types = dict(conn.execute("SELECT chunk_type, count(*) FROM case_chunks GROUP BY 1 ORDER BY 2 DESC").fetchall())
        chunks, tokens = conn.execute("SELECT count(*), coalesce(sum(token_count), 0) FROM case_chunks").fetchone()
        vectors = conn.execute("SELECT count(*) FROM case_embeddings WHERE model = %s", (model,)).fetchone()[0]
        failed = dict(conn.execute("SELECT flow, count(*) FROM batch_items WHERE state = 'failed' GROUP BY 1")
                      .fetchall())
    return {
        "cases": cases, "loader": loader, "queries": len(queries.queries), **evaluation.figures,
        "not_embedded": evaluation.not_embedded, "ranks": [list(score.ranks) for score in evaluation.scores],
        "chunks": chunks, "tokens": int(tokens), "vectors": vectors, "failed_items": failed.get("embeddings", 0),
        "chunk_types": types, "load_seconds": round(loaded - started, 1),
        "embed_seconds": round(embedded - loaded, 1), "query_seconds": round(time.perf_counter() - embedded, 1),
    }


# -- orchestration ------------------------------------------------------------------------------------

def _database_url(admin_url: str, name: str) -> str:
    base, _, query = admin_url.partition("?")
    return f"{base.rsplit('/', 1)[0]}/{name}" + (f"?{query}" if query else "")


def run(args: argparse.Namespace) -> dict:
    import psycopg

    from legal_batch.db import embedded, upgrade

    BENCH_HOME.mkdir(parents=True, exist_ok=True)
    lock = (BENCH_HOME / "bench.lock").open("w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        log(f"another benchmark run holds {BENCH_HOME / 'bench.lock'}; waiting for it to finish")
        fcntl.flock(lock, fcntl.LOCK_EX)
    started_server = not embedded.is_running(BENCH_HOME)
    admin_url = embedded.start(BENCH_HOME)
    prefix = f"lb_retrieval_{uuid.uuid4().hex[:10]}"
    report: dict = {"measured_at": datetime.now(UTC).isoformat(timespec="seconds"), "loader": args.loader,
                    "code": str(ROOT), "commit": _commit(), "chunk_tokens": args.chunk_tokens,
                    "overlap_tokens": args.overlap_tokens, "corpora": {}}
    try:
        for name in args.corpora.split(","):
            home = Path(tempfile.mkdtemp(prefix="lb_retrieval_home_"))
            database = f"{prefix}_{name}"
            with psycopg.connect(admin_url, autocommit=True) as admin:
                admin.execute(f'CREATE DATABASE "{database}"')
            try:
                url = _database_url(admin_url, database)
                upgrade(url)
                env = {k: v for k, v in os.environ.items() if not k.startswith(("LEGAL_BATCH_", "DAGSTER_"))}
                env.update(LEGAL_BATCH_HOME=str(home), LEGAL_BATCH_DATABASE_URL=url,
                           LEGAL_BATCH_EMBEDDINGS_PROVIDER="local",
                           LEGAL_BATCH_CHUNK_MAX_TOKENS=str(args.chunk_tokens),
                           LEGAL_BATCH_CHUNK_OVERLAP_TOKENS=str(args.overlap_tokens), BENCH_RETRIEVAL_LOADER=args.loader,
                           PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep))
                params = {"corpus": str(args.corpus_dir / f"{name}.jsonl"),
                          "queries": str(args.corpus_dir / f"{name}_queries.jsonl")}
                out = home / "figures.json"
                log(f"corpus {name}")
                subprocess.run([sys.executable, "-m", "benchmarks.bench_retrieval", "--stage", json.dumps(params),
                                "--out", str(out)], check=True, env=env, cwd=ROOT, stdout=sys.stderr)
                report["corpora"][name] = json.loads(out.read_text())
            finally:
                with psycopg.connect(admin_url, autocommit=True) as admin:
                    admin.execute(f'DROP DATABASE IF EXISTS "{database}" WITH (FORCE)')
                shutil.rmtree(home, ignore_errors=True)
    finally:
        if started_server and embedded.stop(BENCH_HOME):
            log(f"stopped the embedded server under {BENCH_HOME}")
        lock.close()
    return report


def _commit() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True)
    except OSError:
        return "unknown"
    return head.stdout.strip() + (" (with uncommitted changes)" if dirty.stdout.strip() else "")


def table(report: dict) -> str:
    lines = [f"code {report['code']} at {report['commit']}; chunks of {report['chunk_tokens']} tokens, "
             f"{report['overlap_tokens']} overlap; local model",
             "| corpus | cases | queries | recall@1 | recall@5 | recall@10 | MRR | nDCG@10 | chunks | tokens |"
             " failed items | chunk types |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for name, f in report["corpora"].items():
        types = ", ".join(f"{kind} {count}" for kind, count in f["chunk_types"].items())
        lines.append(f"| {name} | {f['cases']} | {f['queries']} | {f['recall_at_1']:.2f} | {f['recall_at_5']:.2f} |"
                     f" {f['recall_at_10']:.2f} | {f['mrr']:.3f} | {f['ndcg_at_10']:.3f} | {f['chunks']:,} |"
                     f" {f['tokens']:,} | {f['failed_items']} | {types} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus-dir", type=Path, default=DEFAULT_CORPUS_DIR)
    parser.add_argument("--corpora", default="us_opinions,zh_judgments",
                        help="comma-separated corpus names (<name>.jsonl and <name>_queries.jsonl in --corpus-dir)")
    parser.add_argument("--chunk-tokens", type=int, default=512)
    parser.add_argument("--overlap-tokens", type=int, default=64)
    parser.add_argument("--loader", choices=("auto", "insert"), default="auto",
                        help="auto: core.corpus_import (what `legal-batch cases import` runs); insert: plain "
                             "INSERTs of the raw records under the same ids (the text exactly as in the file)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON instead of a table")
    parser.add_argument("--stage", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.stage:
        Path(args.out).write_text(json.dumps(stage(json.loads(args.stage))))
        return
    report = run(args)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2, ensure_ascii=False))
    print(json.dumps(report, indent=2, ensure_ascii=False) if args.json else table(report))


if __name__ == "__main__":
    main()
