"""The whole embeddings lifecycle at scale, each stage against its physical limit measured in the same run.

    python -m benchmarks.bench_scale --cases 3000 [--storage vector|halfvec] [--compare-storage]

From an empty throwaway database (`benchmarks.throwaway`) to searchable, with the local provider
(deterministic vectors, no network), through the functions the Dagster assets call:

  seed      N demo cases (`core.seed.seed_demo_cases`)        limit: n/a
  chunk     `flows.embeddings.flow.sync_chunks`                limit: tokenizing the same texts alone,
                                                                      on all cores (tiktoken batch)
  plan      `core.batch.plan` (shards in the ledger)           limit: n/a
  write     every shard's request file (`write_request_file`)  limit: a bare write + fsync of the same bytes
  provider  submit, poll (the local provider embeds), download limit: n/a (a real provider's batch window)
  parse     our parser (`iter_results`) over every output file limit: a bare `orjson.loads` + base64
                                                                      decode of the same lines
  copy      raw binary COPY of the parsed vectors (keys, model, text hashes, vectors) into the vector
            table, rolled back                                 limit: the same vectors into a bare
                                                                      temporary table (no key, no hashes, no WAL)
  ingest    `core.batch.ingest_shard` of every shard (parse and COPY overlap, hashes looked up, ledger
            closed, chunks of the same texts served)           limit: the raw COPY (`copy`'s rate); also
                                                                      reported against the parse rate
  index     `ensure_vector_index` (its memory and workers sized for the table), progress from
            `pg_stat_progress_create_index`                    limit: n/a
  search    HNSW top 10 (`hnsw.ef_search` 100, as the product searches)
                                                               limit: the exact scan (index off)

`parse` and `copy` are the two halves of `ingest`, measured alone; they are not part of the wall.
Each stage runs in a fresh process: `peak_rss_mb` is that stage's own. One line per stage on stdout,

    stage=<name> rate=<x>/s limit=<y>/s ratio=<x/y> share=<fraction of the wall> peak_rss_mb=<m> unit=<u>

then recall@10 of the index against exact search, and `corpus_minutes_120k`: the stages' measured
rates applied to 120,000 cases at this run's chunks per case (the index build scaled by n·log n).
With `--compare-storage` the vectors are also copied into a table of the other storage type, indexed
the same way, and its recall@10 is measured against its own exact search and against float32 exact
search in the first table. Figures also go to `benchmarks/results/scale.json`.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script (each stage's child process)
    sys.path.insert(0, str(ROOT))

from benchmarks import throwaway  # noqa: E402
from benchmarks.throwaway import MB, Figures, log, peak_rss_mb  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "scale.json"
CORPUS_CASES = 120_000
COMPARE_TABLE = "public.bench_other_storage"


class Bench(throwaway.Bench):
    SCRIPT = Path(__file__).resolve()


def _conn():
    from legal_batch.db import connect

    return connect(os.environ["LEGAL_BATCH_DATABASE_URL"])


def _table(params: dict):
    from legal_batch.core.user_tables import VectorTable

    return VectorTable(None, params["dimensions"], params["storage"])


def _provider():
    from legal_batch.providers.local import LocalProvider
    from legal_batch.settings import get_settings

    return LocalProvider(get_settings().home_dir / "local_provider", dimensions=1024)


def _flow(params: dict):
    from legal_batch.flows.embeddings.flow import EmbeddingsFlow

    provider = _provider()
    return EmbeddingsFlow(model=provider.default_model("embeddings"), dimensions=params["dimensions"],
                          provider=provider.name, table=_table(params))


def _files_root() -> Path:
    from legal_batch.settings import get_settings

    return get_settings().home_dir / "files"


def _shards(conn) -> list[str]:
    return [key for (key,) in conn.execute("SELECT shard_key FROM batch_jobs WHERE flow = 'embeddings' ORDER BY id")]


def _outputs(conn) -> list[tuple[str, list[Path]]]:
    from legal_batch.core.batch import output_dir

    return [(key, sorted(output_dir(_files_root(), "embeddings", key).glob("*.jsonl"))) for key in _shards(conn)]


# -- stages (each in its own process; environment: LEGAL_BATCH_HOME, LEGAL_BATCH_DATABASE_URL) ----------

def stage_setup(params: dict) -> Figures:
    """Our vector table in the storage type asked for (converted while empty, as at start)."""
    from legal_batch.core.user_tables import check_vector_table, install_sink_view

    with _conn() as conn, conn.transaction():
        check_vector_table(conn, _table(params))
        install_sink_view(conn, _table(params))
    return {}


def stage_seed(params: dict) -> Figures:
    from legal_batch.core.seed import seed_demo_cases

    with _conn() as conn:
        started = time.perf_counter()
        seed_demo_cases(conn, cases=params["cases"])
        seconds = time.perf_counter() - started
    return {"seconds": seconds, "units": params["cases"], "peak_rss_mb": peak_rss_mb()}


def stage_chunk(params: dict) -> Figures:
    from legal_batch.flows.embeddings.flow import sync_chunks
    from legal_batch.settings import get_settings

    settings = get_settings()
    with _conn() as conn:
        started = time.perf_counter()
        synced = sync_chunks(conn, max_tokens=settings.chunk_max_tokens, overlap_tokens=settings.chunk_overlap_tokens,
                             workers=settings.chunk_workers)
        seconds = time.perf_counter() - started
    return {"seconds": seconds, "units": synced.cases, "chunks": synced.chunks, "peak_rss_mb": peak_rss_mb()}


def stage_chunk_limit(params: dict) -> Figures:
    """The tokenizer alone over the same texts, on all cores (tiktoken's threaded batch encode)."""
    from legal_batch.core.tokens import encoding

    encoder = encoding("cl100k_base")
    cores = os.cpu_count() or 1
    seconds, cases, tokens = 0.0, 0, 0
    with _conn() as conn, conn.transaction(), conn.cursor(name="texts") as cur:
        cur.itersize = 500
        cur.execute("SELECT full_text FROM court_cases ORDER BY id")
        while batch := cur.fetchmany(500):
            texts = [text or "" for (text,) in batch]
            started = time.perf_counter()
            tokens += sum(map(len, encoder.encode_ordinary_batch(texts, num_threads=cores)))
            seconds += time.perf_counter() - started
            cases += len(texts)
    return {"seconds": seconds, "units": cases, "tokens": tokens, "peak_rss_mb": peak_rss_mb()}


def stage_plan(params: dict) -> Figures:
    from legal_batch.core import batch

    provider = _provider()
    flow = _flow(params)
    with _conn() as conn:
        started = time.perf_counter()
        planned = batch.plan(conn, flow, provider, model=flow.model, max_shards=None)
        seconds = time.perf_counter() - started
        items = conn.execute("SELECT count(*) FROM batch_items WHERE flow = 'embeddings'").fetchone()[0]
    return {"seconds": seconds, "units": items, "shards": len(planned.shard_keys), "peak_rss_mb": peak_rss_mb()}


def stage_write(params: dict) -> Figures:
    from legal_batch.core import batch

    provider = _provider()
    flow = _flow(params)
    size = 0
    with _conn() as conn:
        started = time.perf_counter()
        for shard_key in _shards(conn):
            size += batch.write_request_file(conn, flow, provider, shard_key, files_root=_files_root()).bytes
        seconds = time.perf_counter() - started
    return {"seconds": seconds, "units": size / MB, "peak_rss_mb": peak_rss_mb()}


def stage_write_limit(params: dict) -> Figures:
    """The same bytes written to a new file and fsynced (as `atomic_writer` does), file by file."""
    from legal_batch.core.batch import request_file_path

    seconds, size = 0.0, 0
    scratch = _files_root() / "write-limit.tmp"
    with _conn() as conn:
        for shard_key in _shards(conn):
            data = request_file_path(_files_root(), "embeddings", shard_key).read_bytes()
            started = time.perf_counter()
            with scratch.open("wb") as out:
                for offset in range(0, len(data), MB):
                    out.write(data[offset:offset + MB])
                out.flush()
                os.fsync(out.fileno())
            seconds += time.perf_counter() - started
            size += len(data)
            scratch.unlink()
    return {"seconds": seconds, "units": size / MB, "peak_rss_mb": peak_rss_mb()}


def stage_provider(params: dict) -> Figures:
    """Submit every shard to the local provider, poll until all are finished, download the outputs."""
    from legal_batch.core import batch

    provider = _provider()
    flow = _flow(params)
    with _conn() as conn:
        started = time.perf_counter()
        for shard_key in _shards(conn):
            batch.submit_shard(conn, flow, provider, shard_key, files_root=_files_root())
        while conn.execute("SELECT count(*) FROM batch_jobs WHERE flow = 'embeddings' AND state NOT IN"
                           " ('completed', 'expired', 'failed', 'cancelled', 'ingested')").fetchone()[0]:
            batch.poll_open_jobs(conn, lambda _name: provider, flow="embeddings", time_budget_s=3600)
        for shard_key in _shards(conn):
            batch.download_outputs(conn, provider, shard_key, files_root=_files_root())
        seconds = time.perf_counter() - started
        vectors = conn.execute("SELECT count(*) FROM batch_items WHERE flow = 'embeddings'").fetchone()[0]
    return {"seconds": seconds, "units": vectors, "peak_rss_mb": peak_rss_mb()}


def stage_parse(params: dict) -> Figures:
    """Our parser over every output file, then a bare loop over the same lines: orjson, and the
    vector decoded (base64, as the local provider answers our requests, or a float list)."""
    import numpy as np
    import orjson
    import pybase64

    provider = _provider()
    with _conn() as conn:
        files = [path for _, paths in _outputs(conn) for path in paths]
    started = time.perf_counter()
    vectors = sum(result.vector is not None for result in provider.iter_results(files, endpoint="embeddings"))
    seconds = time.perf_counter() - started
    rss = peak_rss_mb()
    started = time.perf_counter()
    bare = 0
    for path in (path for path in files if path.name == "output.jsonl"):
        with path.open("rb", buffering=MB) as handle:
            for raw in handle:
                embedding = orjson.loads(raw)["response"]["body"]["data"][0]["embedding"]
                vector = (np.frombuffer(pybase64.b64decode(embedding), dtype="<f4") if type(embedding) is str
                          else np.asarray(embedding, dtype=np.float32))
                bare += vector.shape[0] > 0
    limit_seconds = time.perf_counter() - started
    return {"seconds": seconds, "units": vectors, "peak_rss_mb": rss, "limit_seconds": limit_seconds,
            "limit_units": bare}


def _parsed_blocks(conn, block: int = 2_000):
    """(case ids, chunk indexes, float32 vectors) of every output line, `block` at a time."""
    import numpy as np

    provider = _provider()
    case_ids: list[str] = []
    indexes: list[int] = []
    vectors = np.empty((block, 1024), dtype=np.float32)
    for shard_key, paths in _outputs(conn):
        subjects = dict(conn.execute(  # one shard's at a time: memory stays that of a shard
            "SELECT i.custom_id, i.subject_key FROM batch_items i JOIN batch_jobs j ON j.id = i.job_id"
            " WHERE j.shard_key = %s", (shard_key,)).fetchall())
        for result in provider.iter_results(paths, endpoint="embeddings"):
            if result.vector is None:
                continue
            case_id, _, index = subjects[result.custom_id].partition(":")
            vectors[len(case_ids)] = result.vector
            case_ids.append(case_id)
            indexes.append(int(index))
            if len(case_ids) == block:
                yield case_ids, indexes, vectors
                case_ids, indexes = [], []
    if case_ids:
        yield case_ids, indexes, vectors[: len(case_ids)]


def stage_copy(params: dict) -> Figures:
    """Raw binary COPY of the parsed vectors — keys, model, text hashes, vectors, nothing else — into
    the vector table (rolled back): the destination's own limit, which `ingest` is measured against.
    Then the bare limit: the same vectors into a temporary table without key or hashes (no WAL).
    Parsing and the hash lookups are not timed."""
    from legal_batch.core.vector_copy import binary_copy_data
    from legal_batch.flows.embeddings.flow import EmbeddingSink

    table, half = _table(params), params["storage"] == "halfvec"
    model = _provider().default_model("embeddings")
    seconds = limit_seconds = 0.0
    vectors = 0
    with _conn() as conn:
        conn.execute(f"CREATE TEMP TABLE bare_copy (case_id uuid, chunk_index int, embedding {table.column_type})")
        with conn.transaction(force_rollback=True), conn.cursor() as cur:
            for case_ids, indexes, block in _parsed_blocks(conn):
                hashes, _ = EmbeddingSink._block_facts(cur, case_ids, indexes, table=table.relation, model=model)
                started = time.perf_counter()
                EmbeddingSink._copy(cur, table.relation, block, case_ids, indexes, model=model, hashes=hashes,
                                    half=half)
                seconds += time.perf_counter() - started
                started = time.perf_counter()
                with cur.copy("COPY bare_copy (case_id, chunk_index, embedding) FROM STDIN WITH (FORMAT BINARY)") as copy:
                    copy.write(binary_copy_data(case_ids, indexes, block, half=half))
                limit_seconds += time.perf_counter() - started
                vectors += len(case_ids)
    return {"seconds": seconds, "units": vectors, "peak_rss_mb": peak_rss_mb(), "limit_seconds": limit_seconds,
            "limit_units": vectors}


def stage_ingest(params: dict) -> Figures:
    from legal_batch.core import batch

    provider = _provider()
    flow = _flow(params)
    with _conn() as conn:
        outputs = _outputs(conn)
        started = time.perf_counter()
        for shard_key, files in outputs:
            batch.ingest_shard(conn, flow, provider, shard_key, files=files)
        seconds = time.perf_counter() - started
        vectors = conn.execute(f"SELECT count(*) FROM {_table(params).relation}").fetchone()[0]
        conn.execute("VACUUM ANALYZE")
    return {"seconds": seconds, "units": vectors, "peak_rss_mb": peak_rss_mb()}


def stage_index(params: dict) -> Figures:
    from legal_batch.core.progress import watch_index_build
    from legal_batch.db import connect
    from legal_batch.flows.embeddings.flow import ensure_vector_index, plan_index_build

    table = _table(params)
    with _conn() as conn:
        plan = plan_index_build(conn, table)
        with watch_index_build(lambda: connect(os.environ["LEGAL_BATCH_DATABASE_URL"]), log, table=table.relation):
            seconds = ensure_vector_index(conn, table=table, log=log)
        if seconds is None:
            raise RuntimeError(f"the index on {table.name} was not built (it exists, or shards are still open)")
        sizes = conn.execute("SELECT pg_table_size(%s), pg_relation_size(%s)",
                             (table.relation, table.index_name)).fetchone()
    return {"seconds": seconds, "units": plan.rows, "peak_rss_mb": peak_rss_mb(),
            "maintenance_work_mem_mb": plan.maintenance_work_mem_mb, "graph_mb": plan.graph_mb,
            "parallel_workers": plan.parallel_workers, "table_mb": round(sizes[0] / MB), "index_mb": round(sizes[1] / MB)}


def stage_search(params: dict) -> Figures:
    from legal_batch.flows.embeddings.index_recall import index_recall

    table = _table(params)
    with _conn() as conn:
        product = index_recall(conn, table, queries=params["queries"], k=10, ef_search=100)
    return {"seconds": product.index_seconds, "units": product.queries, "peak_rss_mb": peak_rss_mb(),
            "limit_seconds": product.exact_seconds, "limit_units": product.queries,
            "recall_at_10": round(product.recall, 4)}


def stage_compare(params: dict) -> Figures:
    """The same vectors in a table of the other storage type: its index build, sizes and recall@10,
    against its own exact search and against exact search in the first table."""
    from legal_batch.core.user_tables import VectorTable
    from legal_batch.flows.embeddings.flow import hnsw_index_sql, plan_index_build
    from legal_batch.flows.embeddings.index_recall import index_recall

    first = _table(params)
    other = VectorTable(COMPARE_TABLE, first.dimensions, "vector" if first.storage == "halfvec" else "halfvec")
    with _conn() as conn:
        conn.execute(f"CREATE TABLE {other.relation} AS SELECT case_id, chunk_index, model,"
                     f" embedding::{other.column_type} AS embedding FROM {first.relation}")
        conn.execute(f"ANALYZE {other.relation}")
        plan = plan_index_build(conn, other)
        log(f"compare: {other.name} ({other.column_type}): {plan.describe()}")
        started = time.perf_counter()
        with conn.transaction():
            conn.execute(f"SET LOCAL maintenance_work_mem = '{plan.maintenance_work_mem_mb}MB'")
            conn.execute(f"SET LOCAL max_parallel_maintenance_workers = {plan.parallel_workers}")
            conn.execute(hnsw_index_sql(other))
        seconds = time.perf_counter() - started
        sizes = conn.execute("SELECT pg_table_size(%s), pg_relation_size(%s)",
                             (other.relation, f"public.{other.index_name}")).fetchone()
        own = index_recall(conn, other, queries=params["queries"], k=10, ef_search=100)
        halfvec, vector = (other, first) if other.storage == "halfvec" else (first, other)
        against = index_recall(conn, halfvec, queries=params["queries"], k=10, ef_search=100, exact=vector)
    figures: Figures = {"storage": other.storage, "index_seconds": round(seconds, 1), "rows": plan.rows,
                        "index_rows_per_s": round(plan.rows / seconds, 1), "table_mb": round(sizes[0] / MB),
                        "index_mb": round(sizes[1] / MB), "graph_mb": plan.graph_mb,
                        "recall_at_10": round(own.recall, 4), "search_queries_per_s": round(own.index_queries_per_s, 1)}
    figures["halfvec_recall_at_10_vs_float32_exact"] = round(against.recall, 4)
    return figures


STAGES = {name.removeprefix("stage_"): function for name, function in globals().items()
          if name.startswith("stage_")}


# -- orchestration ------------------------------------------------------------------------------------

LIFECYCLE = ("seed", "chunk", "plan", "write", "provider", "ingest", "index")
"""The stages from an empty database to searchable: their seconds add up to the wall."""
UNITS = {"seed": "cases", "chunk": "cases", "plan": "chunks", "write": "MB", "provider": "vectors",
         "parse": "vectors", "copy": "vectors", "ingest": "vectors", "index": "rows", "search": "queries"}


def run(args: argparse.Namespace) -> tuple[list[str], Figures]:
    params = {"cases": args.cases, "dimensions": 1024, "storage": args.storage, "queries": args.queries}
    figures: Figures = {"measured_at": datetime.now(UTC).isoformat(timespec="seconds"), "cpus": os.cpu_count() or 0,
                        "load_average_1m_at_start": round(os.getloadavg()[0], 2), "cases": args.cases,
                        "storage": args.storage}
    stages: dict[str, dict] = {}
    limits: dict[str, dict] = {}
    bench = Bench(keep=args.keep)
    try:
        url = bench.database("scale", migrate=True)
        bench.stage("setup", url, params)
        for name in ("seed", "chunk", "plan", "write"):
            stages[name] = bench.stage(name, url, params)
        limits["chunk"] = bench.stage("chunk_limit", url, params)
        limits["write"] = bench.stage("write_limit", url, params)
        stages["provider"] = bench.stage("provider", url, params)
        stages["parse"] = bench.stage("parse", url, params)
        stages["copy"] = bench.stage("copy", url, params)
        stages["ingest"] = bench.stage("ingest", url, params)
        stages["index"] = bench.stage("index", url, params)
        stages["search"] = bench.stage("search", url, params)
        if args.compare_storage:
            figures |= {f"compare_{k}": v for k, v in bench.stage("compare", url, params).items()}
    finally:
        bench.close()
    figures["load_average_1m_at_end"] = round(os.getloadavg()[0], 2)
    return _report_lines(stages, limits, figures, args)


def _rate(units: float, seconds: float) -> float:
    return units / seconds if seconds > 0 else 0.0


def _report_lines(stages: dict[str, dict], limits: dict[str, dict], figures: Figures,
                  args: argparse.Namespace) -> tuple[list[str], Figures]:
    for name, measured in stages.items():  # limits measured inside the stage's own process
        if "limit_seconds" in measured:
            limits[name] = {"seconds": measured["limit_seconds"], "units": measured["limit_units"]}
    parse_limit = _rate(limits["parse"]["units"], limits["parse"]["seconds"])
    copy_limit = _rate(limits["copy"]["units"], limits["copy"]["seconds"])
    wall = sum(stages[name]["seconds"] for name in LIFECYCLE)
    lines = []
    for name, measured in stages.items():
        rate = _rate(measured["units"], measured["seconds"])
        if name == "ingest":
            limit = _rate(stages["copy"]["units"], stages["copy"]["seconds"])
            figures["ingest_vs_parse"] = round(rate / parse_limit, 3) if parse_limit else 0.0
            figures["ingest_vs_bare_copy"] = round(rate / copy_limit, 3) if copy_limit else 0.0
        elif name in limits:
            limit = _rate(limits[name]["units"], limits[name]["seconds"])
        else:
            limit = None
        shown = f"{limit:.1f}/s" if limit else "n/a"
        ratio = f"{rate / limit:.3f}" if limit else "n/a"
        lines.append(f"stage={name} rate={rate:.1f}/s limit={shown} ratio={ratio} share={measured['seconds'] / wall:.3f}"
                     f" peak_rss_mb={measured['peak_rss_mb']} unit={UNITS[name]}")
        figures[f"{name}_seconds"] = round(measured["seconds"], 2)
        figures[f"{name}_rate_per_s"] = round(rate, 1)
        if limit:
            figures[f"{name}_limit_per_s"] = round(limit, 1)
    cases, chunks = stages["chunk"]["units"], stages["chunk"]["chunks"]
    per_case = chunks / cases
    rows = stages["index"]["units"]
    corpus_chunks = CORPUS_CASES * per_case
    projected = {}
    for name in LIFECYCLE:
        measured = stages[name]
        scale = CORPUS_CASES / cases if UNITS[name] in ("cases", "MB") else corpus_chunks / measured["units"]
        if name == "index":  # HNSW insertion costs ~log n per row
            scale = corpus_chunks * math.log(corpus_chunks) / (rows * math.log(rows))
        projected[name] = measured["seconds"] * scale / 60
    index = stages["index"]
    search = stages["search"]
    figures |= {"wall_seconds": round(wall, 1), "chunks": chunks, "chunks_per_case": round(per_case, 2),
                "index_maintenance_work_mem_mb": index["maintenance_work_mem_mb"],
                "index_graph_mb": index["graph_mb"], "index_parallel_workers": index["parallel_workers"],
                "table_mb": index["table_mb"], "index_mb": index["index_mb"],
                "recall_at_10": search["recall_at_10"],
                "corpus_chunks_120k": round(corpus_chunks),
                "corpus_minutes_120k_by_stage": {name: round(minutes, 1) for name, minutes in projected.items()},
                "corpus_minutes_120k_without_provider": round(sum(projected.values()) - projected["provider"], 1),
                "corpus_minutes_120k": round(sum(projected.values()), 1)}
    lines.append(f"recall_at_10={search['recall_at_10']} storage={args.storage} (index vs exact search, "
                 f"hnsw.ef_search=100, {search['units']} queries)")
    if "compare_recall_at_10" in figures:
        lines.append(f"compare_storage={figures['compare_storage']} recall_at_10={figures['compare_recall_at_10']}"
                     f" halfvec_recall_at_10_vs_float32_exact={figures['compare_halfvec_recall_at_10_vs_float32_exact']}"
                     f" table_mb={figures['compare_table_mb']} index_mb={figures['compare_index_mb']}"
                     f" index_rows_per_s={figures['compare_index_rows_per_s']}")
    lines.append(f"wall_seconds={wall:.1f} cases={cases} chunks={chunks} chunks_per_case={per_case:.2f} "
                 f"table_mb={index['table_mb']} index_mb={index['index_mb']} maintenance_work_mem_mb="
                 f"{index['maintenance_work_mem_mb']} parallel_workers={index['parallel_workers']}")
    lines.append(f"ingest_vs_raw_copy={figures['ingest_rate_per_s'] / figures['copy_rate_per_s']:.3f} "
                 f"ingest_vs_parse={figures['ingest_vs_parse']} ingest_vs_bare_copy={figures['ingest_vs_bare_copy']}")
    lines.append(f"corpus_minutes_120k={figures['corpus_minutes_120k']} (without the local provider: "
                 f"{figures['corpus_minutes_120k_without_provider']}; {round(corpus_chunks):,} chunks)")
    return lines, figures


def main(argv: list[str] | None = None) -> None:
    parser = throwaway.parser(__doc__ or "", STAGES)
    parser.add_argument("--cases", type=int, default=3_000, help="demo cases to run through the lifecycle")
    parser.add_argument("--storage", choices=("vector", "halfvec"), default="vector",
                        help="the vector table's storage type (LEGAL_BATCH_EMBEDDINGS_STORAGE)")
    parser.add_argument("--compare-storage", action="store_true",
                        help="also copy the vectors into a table of the other storage type and measure its index")
    parser.add_argument("--queries", type=int, default=50, help="query vectors for recall@10 and the search rates")
    args = parser.parse_args(argv)
    if throwaway.ran_stage(args, STAGES):
        return
    lines, figures = run(args)
    for line in lines:
        print(line, flush=True)
    throwaway.write_results(RESULTS, figures)


if __name__ == "__main__":
    main()
