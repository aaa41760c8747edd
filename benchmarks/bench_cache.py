"""Content-hash dedup and change detection of the embeddings flow, counted on the local provider.

    python -m benchmarks.bench_cache [--dedup-cases 300] [--repeat-fraction 0.3] [--change-cases 1000]

1. dedup: `--dedup-cases` generated judgments of 10 paragraphs each, each paragraph long enough
   (~300 tokens) to be a chunk of its own; a known share of the paragraphs (`--repeat-fraction`) is
   drawn from a pool of 20 boilerplate paragraphs repeated across judgments. Embedded once with
   `LEGAL_BATCH_CHUNK_OVERLAP_TOKENS=0`: `dedup_requests_saved_per_repeated_chunk` is (chunks −
   requests sent) / (chunks − distinct chunk texts) — 1.0 when every repeated chunk was served from
   the vector cache and every distinct text was requested once. The same corpus with the default
   overlap (64 tokens) shows how many repeated *paragraphs* still make identical chunks when each
   chunk starts with the previous one's tail (`overlap_*`). Then the whole corpus imported again
   under new ids: `reimport_requests` and `reimport_usd` (at text-embedding-3-small's batch price).
2. change: `--change-cases` demo judgments (default settings: 512-token chunks, 64 overlap) embedded;
   then `--edit-fraction` (1%) of them edited, a sentence added to one paragraph in the middle third
   of each. `change_requests` is what the next run sent and `change_chunks_with_new_text` the chunks
   whose text was not there before, counted from the tables (they must be equal);
   `change_pass_s` and `change_pass_mb_per_s` are a chunking pass over the unchanged corpus (hashing
   every judgment in Postgres): what finding the edits costs each run.
3. ingest: one shard of `--ingest-cases` (600) demo judgments ingested with the cache (the flow
   knows its provider, as in the pipeline) and without, `--repeat` (2) times each, fastest counts:
   `ingest_with_vs_without_cache` is what the cache costs at ingest (a vector is written once, in the
   vector table; the cost is serving the chunks of the same texts).

Runs in this process on a throwaway database of the embedded server under `.legal_batch/bench`
(dropped at the end), through the same functions the assets call (`sync_chunks`, the vector cache,
`batch.plan` … `ingest_shard`). Prints `name=value` per line and writes
`benchmarks/results/cache.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
import uuid
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.bench_embeddings import Bench, log  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "cache.json"
PRICED_MODEL = "text-embedding-3-small"
Figures = dict[str, float | int | str]

_VOCABULARY = ("court appeal tenant landlord lease covenant breach damages contract statute limitation possession "
               "evidence witness judgment order costs injunction trust beneficiary estate negligence duty care "
               "causation remoteness loss claim defence counterclaim hearing tribunal applicant respondent "
               "section ordinance regulation discretion review jurisdiction error law fact finding inference "
               "credibility document notice service period extension sentence plea conviction offence charge "
               "arrest warrant search seizure property title registration mortgage priority insolvency creditor")
_WORDS = tuple(_VOCABULARY.split())


def _paragraph(rng: random.Random, sentences: int = 12) -> str:
    return " ".join(" ".join(rng.choice(_WORDS) for _ in range(rng.randint(18, 26))).capitalize() + "."
                    for _ in range(sentences))


def dedup_corpus(cases: int, fraction: float, *, seed: int = 7) -> list[str]:
    rng = random.Random(seed)
    boilerplate = [_paragraph(rng) for _ in range(20)]
    texts = []
    for _ in range(cases):
        paragraphs = [rng.choice(boilerplate) if rng.random() < fraction else _paragraph(rng) for _ in range(10)]
        texts.append("\n\n".join(paragraphs))
    return texts


def _conn():
    from legal_batch.db import connect

    return connect(os.environ["LEGAL_BATCH_DATABASE_URL"])


def _tables():
    from legal_batch.core.user_tables import check_tables
    from legal_batch.settings import get_settings

    with _conn() as conn:
        check_tables(conn, get_settings(fresh=True))


def embed_all(conn, *, overlap: int) -> dict[str, int]:
    """One `legal-batch embeddings run --wait` through the core functions: chunk, serve from the
    cache, plan, write, submit, poll, download, ingest until nothing is open. Returns requests sent."""
    from legal_batch.core import batch, ledger
    from legal_batch.core.user_tables import CaseSource, VectorTable
    from legal_batch.flows.embeddings.flow import EmbeddingsFlow, prepare_chunks
    from legal_batch.providers.local import LocalProvider
    from legal_batch.settings import get_settings

    settings = get_settings(fresh=True)
    provider = LocalProvider(settings.home_dir / "local_provider", dimensions=settings.embedding_dimensions)
    flow = EmbeddingsFlow(model=provider.default_model("embeddings"), dimensions=settings.embedding_dimensions,
                          provider=provider.name, source=CaseSource(), table=VectorTable())
    files = settings.home_dir / "files"
    started = time.perf_counter()
    prepared = prepare_chunks(conn, flow, max_tokens=settings.chunk_max_tokens, overlap_tokens=overlap)
    prepare_s = time.perf_counter() - started
    requests = 0
    while True:
        planned = batch.plan(conn, flow, provider, model=flow.model)
        if not planned.shard_keys:
            break
        for key in planned.shard_keys:
            batch.write_request_file(conn, flow, provider, key, files_root=files)
            batch.submit_shard(conn, flow, provider, key, files_root=files)
            while ledger.get_job(conn, key).state not in ("completed", "partial", "failed", "cancelled", "expired"):
                batch.poll_open_jobs(conn, lambda _: provider, flow="embeddings")
            outputs = batch.download_outputs(conn, provider, key, files_root=files)
            batch.ingest_shard(conn, flow, provider, key, files=outputs)
            requests += ledger.get_job(conn, key).request_count
    return {"requests": requests, "prepare_s": prepare_s, "served_at_prepare": prepared["cache_requests_saved"]}


def _insert_cases(conn, texts: list[str]) -> None:
    with conn.cursor().copy("COPY court_cases (id, case_name, full_text) FROM STDIN") as copy:
        for n, text in enumerate(texts):
            copy.write_row((uuid.uuid4(), f"Case {n}", text))


def _scalar(conn, sql: str, *params):
    return conn.execute(sql, params).fetchone()[0]


def run_dedup(bench: Bench, args: argparse.Namespace) -> Figures:
    from legal_batch.core.cost import price

    figures: Figures = {}
    texts = dedup_corpus(args.dedup_cases, args.repeat_fraction)
    for label, overlap in (("dedup", 0), ("overlap", 64)):
        os.environ["LEGAL_BATCH_DATABASE_URL"] = bench.database(label, migrate=True)
        os.environ["LEGAL_BATCH_CHUNK_OVERLAP_TOKENS"] = str(overlap)
        _tables()
        with _conn() as conn:
            _insert_cases(conn, texts)
            sent = embed_all(conn, overlap=overlap)
            chunks = _scalar(conn, "SELECT count(*) FROM case_chunks")
            distinct = _scalar(conn, "SELECT count(DISTINCT text_sha256) FROM case_chunks")
            saved = chunks - sent["requests"]
            figures[f"{label}_cases"] = len(texts)
            figures[f"{label}_chunks"] = chunks
            figures[f"{label}_distinct_chunk_texts"] = distinct
            figures[f"{label}_repeated_chunks"] = chunks - distinct
            figures[f"{label}_requests"] = sent["requests"]
            figures[f"{label}_requests_saved"] = saved
            figures[f"{label}_cache_savings_recorded"] = _scalar(
                conn, "SELECT coalesce(sum(requests), 0) FROM cache_savings")
            figures[f"{label}_requests_saved_per_repeated_chunk"] = round(saved / (chunks - distinct), 4) \
                if chunks > distinct else "n/a"
            if label == "dedup":
                tokens = _scalar(conn, "SELECT coalesce(sum(token_count), 0) FROM case_chunks c WHERE EXISTS"
                                       " (SELECT 1 FROM batch_items i WHERE i.subject_key = c.case_id || ':'"
                                       "  || c.chunk_index AND i.job_id IS NULL AND i.state = 'done')")
                figures["dedup_tokens_saved"] = int(tokens)
                figures["dedup_usd_saved_at_text_embedding_3_small"] = float(
                    price(PRICED_MODEL, input_tokens=int(tokens)).batch_usd)
                # the whole corpus again, under new ids
                jobs = _scalar(conn, "SELECT count(*) FROM batch_jobs")
                _insert_cases(conn, texts)
                again = embed_all(conn, overlap=overlap)
                reimported_tokens = _scalar(conn, "SELECT coalesce(sum(input_tokens), 0) FROM batch_jobs")
                figures["reimport_cases"] = len(texts)
                figures["reimport_requests"] = again["requests"]
                figures["reimport_new_jobs"] = _scalar(conn, "SELECT count(*) FROM batch_jobs") - jobs
                figures["reimport_served_from_cache"] = again["served_at_prepare"]
                figures["reimport_usd"] = float(price(PRICED_MODEL, input_tokens=0).batch_usd) if not \
                    again["requests"] else float(price(PRICED_MODEL, input_tokens=int(reimported_tokens)).batch_usd)
            else:
                repeated_paragraphs = sum(text.count("\n\n") + 1 for text in texts) - len(
                    {p for text in texts for p in text.split("\n\n")})
                figures["overlap_repeated_paragraphs"] = repeated_paragraphs
    return figures


def run_change(bench: Bench, args: argparse.Namespace) -> Figures:
    from legal_batch.core.seed import seed_demo_cases
    from legal_batch.flows.embeddings.flow import sync_chunks
    from legal_batch.settings import get_settings

    os.environ["LEGAL_BATCH_DATABASE_URL"] = bench.database("change", migrate=True)
    os.environ.pop("LEGAL_BATCH_CHUNK_OVERLAP_TOKENS", None)
    _tables()
    figures: Figures = {}
    with _conn() as conn:
        seed_demo_cases(conn, cases=args.change_cases)
        first = embed_all(conn, overlap=get_settings(fresh=True).chunk_overlap_tokens)
        figures["change_cases"] = args.change_cases
        figures["change_first_requests"] = first["requests"]
        figures["change_chunks"] = _scalar(conn, "SELECT count(*) FROM case_chunks")
        text_mb = _scalar(conn, "SELECT sum(octet_length(full_text)) FROM court_cases") / 1_000_000
        settings = get_settings(fresh=True)
        started = time.perf_counter()
        idle = sync_chunks(conn, max_tokens=settings.chunk_max_tokens, overlap_tokens=settings.chunk_overlap_tokens)
        seconds = time.perf_counter() - started
        figures["change_pass_cases_rechunked"] = idle.cases
        figures["change_pass_s"] = round(seconds, 2)
        figures["change_pass_mb"] = round(text_mb, 1)
        figures["change_pass_mb_per_s"] = round(text_mb / seconds, 1)
        before = {sha for (sha,) in conn.execute("SELECT DISTINCT text_sha256 FROM case_chunks")}
        edits = max(1, round(args.change_cases * args.edit_fraction))
        rng = random.Random(11)
        for case_id, text in conn.execute("SELECT id, full_text FROM court_cases ORDER BY random() LIMIT %s",
                                          (edits,)).fetchall():
            paragraphs = text.split("\n\n")
            target = rng.randrange(len(paragraphs) // 3, max(len(paragraphs) // 3 + 1, 2 * len(paragraphs) // 3))
            paragraphs[target] += " The court added this sentence on correcting the judgment."
            conn.execute("UPDATE court_cases SET full_text = %s WHERE id = %s", ("\n\n".join(paragraphs), case_id))
        second = embed_all(conn, overlap=settings.chunk_overlap_tokens)
        after = conn.execute("SELECT text_sha256 FROM case_chunks").fetchall()
        new_text = sum(1 for (sha,) in after if sha not in before)
        figures["change_cases_edited"] = edits
        figures["change_chunks_with_new_text"] = new_text
        figures["change_requests"] = second["requests"]
        figures["change_requests_per_changed_chunk"] = round(second["requests"] / new_text, 4) if new_text else "n/a"
        figures["change_vectors_match_chunks"] = _scalar(
            conn, "SELECT count(*) FROM case_embeddings e JOIN case_chunks c USING (case_id, chunk_index)"
                  " WHERE e.text_sha256 = c.text_sha256") == len(after)
    return figures


def run_ingest(bench: Bench, args: argparse.Namespace) -> Figures:
    """What the cache costs at ingest: one shard of `--ingest-cases` demo judgments ingested
    with the cache (the flow knows its provider) and without, alternately, `--repeat` times each; the
    fastest of each counts."""
    from dataclasses import replace

    from legal_batch.core import batch, ledger
    from legal_batch.core.seed import seed_demo_cases
    from legal_batch.flows.embeddings.flow import EmbeddingsFlow, sync_chunks
    from legal_batch.providers.local import LocalProvider
    from legal_batch.settings import get_settings

    best: dict[str, float] = {}
    vectors = 0
    for attempt in range(args.repeat):
        for label, provider_name in (("without", None), ("with", "local")):
            os.environ["LEGAL_BATCH_DATABASE_URL"] = bench.database(f"ingest_{label}_{attempt}", migrate=True)
            _tables()
            settings = get_settings(fresh=True)
            with _conn() as conn:
                seed_demo_cases(conn, cases=args.ingest_cases)
                sync_chunks(conn, max_tokens=settings.chunk_max_tokens, overlap_tokens=settings.chunk_overlap_tokens)
                provider = LocalProvider(settings.home_dir / f"local_provider_{label}_{attempt}")
                provider.limits = replace(provider.limits, max_records_per_job=10**6, max_embedding_inputs_per_job=None,
                                          max_bytes_per_file=1 << 40)
                flow = EmbeddingsFlow(model=provider.default_model("embeddings"), provider=provider_name)
                (key,) = batch.plan(conn, flow, provider, model=flow.model).shard_keys
                files = settings.home_dir / f"files_{label}_{attempt}"
                batch.write_request_file(conn, flow, provider, key, files_root=files)
                batch.submit_shard(conn, flow, provider, key, files_root=files)
                while ledger.get_job(conn, key).state != "completed":
                    batch.poll_open_jobs(conn, lambda _, p=provider: p, flow="embeddings")
                outputs = batch.download_outputs(conn, provider, key, files_root=files)
                started = time.perf_counter()
                vectors = batch.ingest_shard(conn, flow, provider, key, files=outputs).done
                seconds = time.perf_counter() - started
                best[label] = min(best.get(label, float("inf")), seconds)
    return {"ingest_vectors": vectors,
            "ingest_without_cache_vectors_per_s": round(vectors / best["without"]),
            "ingest_with_cache_vectors_per_s": round(vectors / best["with"]),
            "ingest_with_vs_without_cache": round(best["without"] / best["with"], 3)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dedup-cases", type=int, default=300)
    parser.add_argument("--repeat-fraction", type=float, default=0.3)
    parser.add_argument("--change-cases", type=int, default=1000)
    parser.add_argument("--edit-fraction", type=float, default=0.01)
    parser.add_argument("--ingest-cases", type=int, default=600)
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--stages", default="dedup,change,ingest")
    parser.add_argument("--keep", action="store_true")
    args = parser.parse_args(argv)
    bench = Bench(keep=args.keep)
    os.environ["LEGAL_BATCH_HOME"] = str(bench.home)
    for key in [k for k in os.environ if k.startswith("LEGAL_BATCH_") and k not in ("LEGAL_BATCH_HOME",)]:
        del os.environ[key]
    os.environ["LEGAL_BATCH_HOME"] = str(bench.home)
    figures: Figures = {"measured_at": datetime.now(UTC).isoformat(timespec="seconds"), "cpus": os.cpu_count() or 0,
                        "load_average_1m_at_start": round(os.getloadavg()[0], 2)}
    try:
        stages = args.stages.split(",")
        if "dedup" in stages:
            log(f"dedup: {args.dedup_cases} cases, {args.repeat_fraction:.0%} of paragraphs repeated")
            figures.update(run_dedup(bench, args))
        if "change" in stages:
            log(f"change: {args.change_cases} demo cases, {args.edit_fraction:.0%} edited")
            figures.update(run_change(bench, args))
        if "ingest" in stages:
            log(f"ingest: {args.ingest_cases} demo cases in one shard, with and without the cache")
            figures.update(run_ingest(bench, args))
    finally:
        bench.close()
    figures["load_average_1m_at_end"] = round(os.getloadavg()[0], 2)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(figures, indent=2, default=lambda v: float(v) if isinstance(v, Decimal) else v))
    for name, value in figures.items():
        print(f"{name}={value}")


if __name__ == "__main__":
    main()
