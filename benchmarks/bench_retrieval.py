"""Retrieval quality of the local embeddings on real judgments: recall@1/5/10, MRR and nDCG@10.

    python -m benchmarks.bench_retrieval [--corpus-dir /work/shared/corpora] [--corpora us_opinions,zh_judgments]
                                         [--chunk-tokens 512] [--overlap-tokens 64] [--json]

A corpus is `<name>.jsonl` (one judgment a line: `id`, `case_name`, `citation`, `court`,
`decision_date`, `full_text`) with `<name>_queries.jsonl` (`query`, `expected_id`) beside it. Each
corpus goes into its own throwaway database `lb_retrieval_<random>_<name>` on the embedded Postgres
under `.legal_batch/bench` (dropped at the end), with a temporary `LEGAL_BATCH_HOME`, in a fresh
Python process:

1. load     the judgments into `court_cases` (`core.corpus_import` when present, else — or with
            `--loader insert` — plain INSERTs of the raw records; the case id is a uuid5 of the record's `id`);
2. embed    the whole local flow through the Dagster definitions (`flows.runner.FlowDriver`: chunk,
            plan, request files, submit, poll, ingest) with the `local` provider;
3. query    each query embedded by the provider's real-time path; cases ranked by their best chunk
            (exact cosine distance over every chunk, no index), so a case appears once in a ranking.

A query the model cannot embed (no features) counts as a miss at every cut-off. Figures per corpus:
`recall_at_1/5/10` (share of queries whose expected case is in the top k), `mrr` (mean of 1/rank),
`ndcg_at_10` (one relevant case: 1/log2(rank + 1) within the top 10), the chunk-type distribution,
chunks and tokens embedded, failed items. Output: a table on stdout (progress on stderr) and the
figures as JSON in `benchmarks/results/retrieval.json` (git-ignored); `--json` prints the JSON instead
of the table. The code measured is the checkout this file sits in (its root is put first on the
child's `PYTHONPATH`), so a copy of this file in a `git worktree` of an older commit measures that
commit.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import math
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
CASE_NAMESPACE = uuid.UUID("6f1c2e4a-55b1-4d8e-9a57-0c6b1f3e8d21")


def log(message: str) -> None:
    print(f"[retrieval {datetime.now():%H:%M:%S}] {message}", file=sys.stderr, flush=True)


def _importer():  # noqa: ANN202 - the checkout's core.corpus_import module, when it has one
    if os.environ.get("BENCH_RETRIEVAL_LOADER") == "insert":
        return None
    try:
        from legal_batch.core import corpus_import
    except ImportError:
        return None
    needed = ("find_sources", "import_cases", "ID_NAMESPACE")
    return corpus_import if all(hasattr(corpus_import, name) for name in needed) else None


def case_id(record_id: str) -> str:
    """The `court_cases.id` the loader gives a record: the importer's uuid5 when it is used, else ours."""
    importer = _importer()
    return str(uuid.uuid5(importer.ID_NAMESPACE if importer else CASE_NAMESPACE, record_id))


# -- the stage (runs in its own process; environment: LEGAL_BATCH_HOME, LEGAL_BATCH_DATABASE_URL) ---------

def _load(conn, corpus: Path) -> tuple[int, str]:
    """The corpus's judgments into `court_cases` (cases loaded, loader): with `core.corpus_import` when
    this checkout has it (what `legal-batch cases import` runs), else with plain INSERTs."""
    importer = _importer()
    if importer is not None:
        conn.autocommit = True
        report = importer.import_cases(conn, importer.find_sources(corpus))
        conn.autocommit = False
        loaded = conn.execute("SELECT count(*) FROM court_cases").fetchone()[0]
        if getattr(report, "exit_code", 0):
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
                (case_id(record["id"]), record.get("citation"), record.get("case_name"), record.get("court"),
                 record.get("decision_date"), record["full_text"]),
            )
            rows += 1
    return rows, "INSERT"


def _ranks(conn, queries: list[dict], *, provider, model: str) -> list[int | None]:
    """The rank (1-based) of each query's expected case among all cases, by best chunk; None if unranked."""
    from legal_batch.providers.base import EmbeddingRequest

    requests = [EmbeddingRequest(f"q{n}", q["query"]) for n, q in enumerate(queries)]
    ranks: list[int | None] = []
    for query, result in zip(queries, provider.realtime(requests, endpoint="embeddings", model=model), strict=True):
        if result.vector is None:
            log(f"query not embedded ({result.error}): {query['query'][:60]}")
            ranks.append(None)
            continue
        ranking = [row[0] for row in conn.execute(
            "SELECT case_id::text FROM case_embeddings WHERE model = %s"
            " GROUP BY case_id ORDER BY min(embedding <=> %s), case_id",
            (model, result.vector),
        ).fetchall()]
        expected = case_id(query["expected_id"])
        ranks.append(ranking.index(expected) + 1 if expected in ranking else None)
    return ranks


def figures_of(ranks: list[int | None]) -> dict[str, float]:
    """recall@1/5/10, MRR and nDCG@10 of the ranks of one relevant case per query (None = not found)."""
    n = len(ranks) or 1
    found = [r for r in ranks if r is not None]
    return {
        "recall_at_1": round(sum(r <= 1 for r in found) / n, 3),
        "recall_at_5": round(sum(r <= 5 for r in found) / n, 3),
        "recall_at_10": round(sum(r <= 10 for r in found) / n, 3),
        "mrr": round(sum(1 / r for r in found) / n, 3),
        "ndcg_at_10": round(sum(1 / math.log2(r + 1) for r in found if r <= 10) / n, 3),
    }


def stage(params: dict) -> dict:
    import legal_batch
    from legal_batch.db import connect
    from legal_batch.definitions import FLOWS_BY_NAME, defs
    from legal_batch.driver import FlowDriver
    from legal_batch.providers.local import LocalProvider
    from legal_batch.settings import get_settings

    log(f"code under test: {Path(legal_batch.__file__).parent}")
    corpus = Path(params["corpus"])
    queries = [json.loads(line) for line in Path(params["queries"]).read_text(encoding="utf-8").splitlines()
               if line.strip()]
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
        ranks = _ranks(conn, queries, provider=provider, model=model)
        types = dict(conn.execute("SELECT chunk_type, count(*) FROM case_chunks GROUP BY 1 ORDER BY 2 DESC").fetchall())
        chunks, tokens = conn.execute("SELECT count(*), coalesce(sum(token_count), 0) FROM case_chunks").fetchone()
        vectors = conn.execute("SELECT count(*) FROM case_embeddings WHERE model = %s", (model,)).fetchone()[0]
        failed = dict(conn.execute("SELECT flow, count(*) FROM batch_items WHERE state = 'failed' GROUP BY 1")
                      .fetchall())
    return {
        "cases": cases, "loader": loader, "queries": len(queries), **figures_of(ranks), "ranks": ranks,
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
                        help="auto: core.corpus_import when the checkout has it; insert: plain INSERTs of the raw "
                             "records (the same text whatever the checkout, for before/after comparisons)")
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
