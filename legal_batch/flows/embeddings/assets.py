"""Embeddings of judgment chunks into pgvector, through provider batch jobs.

`embedding_candidates` → `embedding_request_files` → `embedding_batch_jobs` → `embedding_batch_outputs`
→ `case_embeddings`, one dynamic partition per shard (see `flows.batch_assets`).
"""

from __future__ import annotations

import dagster as dg
import psycopg

from legal_batch.core import ledger, vector_cache
from legal_batch.core.progress import Heartbeat, watch_index_build
from legal_batch.core.user_tables import CaseSource, VectorTable
from legal_batch.flows.batch_assets import CandidatesConfig, FlowNames, build_flow_definitions
from legal_batch.flows.catalog import COURT_CASES
from legal_batch.flows.embeddings.checks import sinks_spec, vector_checks, vector_spec
from legal_batch.flows.embeddings.flow import (
    DONE_WITHOUT_RESULT_SQL,
    EmbeddingsFlow,
    ensure_vector_index,
    prepare_chunks,
)
from legal_batch.flows.embeddings.flow import has_unchunked_cases as unchunked_cases_exist
from legal_batch.flows.embeddings.record_sources import check_source_name, has_more
from legal_batch.flows.embeddings.replicas import PRIMARY
from legal_batch.providers.base import BatchProvider
from legal_batch.resources import DatabaseResource, get_settings
from legal_batch.resources.providers import make_provider
from legal_batch.sinks.registry import parse_sink_names

NAMES = FlowNames(flow="embeddings", prefix="embedding", results="case_embeddings")

CASE_EMBEDDINGS_SCHEMA = dg.TableSchema(
    columns=[
        dg.TableColumn("case_id", "uuid", description="court_cases.id (with chunk_index: case_chunks).",
                       constraints=dg.TableColumnConstraints(nullable=False)),
        dg.TableColumn("chunk_index", "integer", constraints=dg.TableColumnConstraints(nullable=False)),
        dg.TableColumn("model", "text", description="The embedding model, e.g. text-embedding-3-small.",
                       constraints=dg.TableColumnConstraints(nullable=False)),
        dg.TableColumn("embedding", "vector(1024)", description="Unit-norm vector; HNSW cosine index "
                       "case_embeddings_hnsw.", constraints=dg.TableColumnConstraints(nullable=False)),
        dg.TableColumn("created_at", "timestamptz", constraints=dg.TableColumnConstraints(nullable=False)),
    ],
    constraints=dg.TableConstraints(other=["PRIMARY KEY (case_id, chunk_index, model)",
                                           "FOREIGN KEY (case_id, chunk_index) REFERENCES case_chunks"]),
)


def make_flow(provider: BatchProvider, config: CandidatesConfig | None, *,
              job: ledger.Shard | None = None) -> EmbeddingsFlow:
    """For planning: the settings (source, vector table, dimensions) and the run's `config`; for a
    shard: what it was planned with (its job row)."""
    settings = get_settings()
    source = CaseSource.from_settings(settings)
    if job is not None and job.params is not None:
        return EmbeddingsFlow.for_job(model=job.model, params=job.params, provider=job.provider, source=source,
                                      settings=settings)
    sinks = config.sinks if config and config.sinks else settings.embeddings_sinks
    record_source = config.source if config and config.source else settings.embeddings_source
    return EmbeddingsFlow(
        model=settings.embedding_model or provider.default_model("embeddings"),
        dimensions=settings.embedding_dimensions,
        limit_cases=config.limit if config else None,
        provider=provider.name,
        source=source,
        table=VectorTable.from_settings(settings),
        sinks=parse_sink_names(sinks, setting="--sink" if config and config.sinks else "LEGAL_BATCH_EMBEDDINGS_SINKS"),
        record_source=check_source_name(record_source, setting="--source" if config and config.source
                                        else "LEGAL_BATCH_EMBEDDINGS_SOURCE"),
        settings=settings,
    )


def chunk_new_cases(context: dg.AssetExecutionContext, conn: psycopg.Connection, config: CandidatesConfig) -> dict:
    settings = get_settings()
    heartbeat = Heartbeat(context.log.info, f"chunking cases ({settings.chunk_workers} workers)")
    flow = make_flow(make_provider(config.provider or settings.embeddings_provider, settings), config)
    with heartbeat.ticking():
        prepared = prepare_chunks(conn, flow, max_tokens=settings.chunk_max_tokens,
                                  overlap_tokens=settings.chunk_overlap_tokens, workers=settings.chunk_workers,
                                  on_progress=heartbeat.beat, on_total=heartbeat.expect)
    context.log.info(prepared["chunking"])
    return prepared


def has_unchunked_cases(conn: psycopg.Connection) -> bool | str:
    """New or removed cases, or (with a record source) more of it to read: then a marker of the last
    pass, so that each pass makes a new planning run."""
    settings = get_settings()
    name = check_source_name(settings.embeddings_source)
    if name is not None and (more := has_more(conn, name, settings,
                                              rescan_after_s=max(600.0, settings.poll_interval))):
        return more
    return unchunked_cases_exist(conn, CaseSource.from_settings(settings))


def build_index_when_loaded(context: dg.AssetExecutionContext, conn: psycopg.Connection,
                            database: DatabaseResource) -> dict:
    """After the last in-flight shard is ingested, build the HNSW index (once; see ensure_vector_index),
    logging its progress every 10 s while it builds (minutes for a large table). Also what the vector
    cache has saved so far (this ingest gave chunks of its texts waiting for them their vector)."""
    saved = vector_cache.savings(conn, flow=NAMES.flow)
    totals = {"cache_requests_saved_total": saved.requests, "cache_tokens_saved_total": saved.tokens,
              "cache_usd_saved_total": float(saved.usd)}
    settings = get_settings()
    table = VectorTable.from_settings(settings)
    if PRIMARY in parse_sink_names(settings.embeddings_sinks):  # else the vector table is not searched
        with watch_index_build(database.connect, context.log.info, table=table.relation):
            seconds = ensure_vector_index(conn, table=table, log=context.log.info)
        if seconds is not None:
            context.log.info(f"built the HNSW index on {table.name} in {seconds:.1f} s")
            totals["hnsw_index_built_seconds"] = round(seconds, 1)
    return {**totals, **write_back_statuses(context, conn)}


def write_back_statuses(context: dg.AssetExecutionContext, conn: psycopg.Connection) -> dict:
    """After an ingest, with a record source (the shard's, or the settings'): write back the statuses of
    the records that are finished. A failure is logged, never the ingest's: the next pass tries again."""
    settings = get_settings()
    row = conn.execute("SELECT model, params FROM batch_jobs WHERE flow = %s AND state = %s AND params IS NOT NULL"
                       " ORDER BY ingested_at DESC LIMIT 1", (NAMES.flow, ledger.JobState.INGESTED)).fetchone()
    if row is None:
        return {}
    flow = EmbeddingsFlow.for_job(model=row[0], params=row[1], settings=settings)
    if flow.record_source is None:
        flow.record_source = check_source_name(settings.embeddings_source)
    if flow.record_source is None:
        return {}
    try:
        written = flow.write_back(conn)
    except Exception as exc:
        context.log.warning(f"statuses not written back to the {flow.record_source} source "
                            f"({str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}); "
                            "the next pass tries again")
        return {}
    context.log.info(written.line())
    return {"source_statuses_written": written.succeeded + written.failed,
            "source_statuses_not_written": len(written.not_written)}


def table_rows(conn: psycopg.Connection) -> int:
    """Every vector in the vector table (case_embeddings or LEGAL_BATCH_EMBEDDINGS_TABLE; all shards, all models)."""
    relation = VectorTable.from_settings(get_settings()).relation
    return conn.execute(f"SELECT count(*) FROM {relation}").fetchone()[0]


DEFS = build_flow_definitions(
    NAMES,
    make_flow=make_flow,
    prepare=chunk_new_cases,
    has_unprepared=has_unchunked_cases,
    result_check_specs=[vector_spec, sinks_spec],
    result_checks=vector_checks,
    after_ingest=build_index_when_loaded,
    done_without_result_sql=DONE_WITHOUT_RESULT_SQL,
    sources=[COURT_CASES],
    configured_provider=get_settings().embeddings_provider,
    results_kinds=("postgres", "pgvector"),
    results_table=VectorTable.from_settings(get_settings()).name,
    results_schema=CASE_EMBEDDINGS_SCHEMA,
    table_rows=table_rows,
    descriptions={
        "candidates": "Chunks of court judgments that need an embedding. Grain: one chunk (case_id, chunk_index). "
                      "Chunks new cases, and again cases whose text or headnote changed, into case_chunks "
                      "(paragraph-aware, token budget, overlap; unchanged chunks keep their vectors), serves "
                      "chunks whose text is in the vector cache with no request, then cuts one chunk per "
                      "distinct text with no embedding and no open ledger item into shards "
                      "(batch_jobs/batch_items). Metadata: requests, tokens and USD the cache saved. "
                      "Idempotent: in-flight and done chunks are never planned again.",
        "request_files": "One shard's JSONL request file in the provider's batch format. Grain: one request line "
                         "per chunk; key: custom_id chunk-<case_id>-<chunk_index>. Rewritten identically until "
                         "submitted.",
        "batch_jobs": "The provider batch job of one shard. Submitted once: the ledger row and client token are "
                      "written before the provider call, and a crash in between is reconciled, not resubmitted.",
        "batch_outputs": "The downloaded output and error files of one finished provider job.",
        "results": "Embeddings of judgment chunks in pgvector (case_embeddings, or LEGAL_BATCH_EMBEDDINGS_TABLE; "
                   "vector(LEGAL_BATCH_EMBEDDING_DIMENSIONS), HNSW cosine). Grain: (case_id, chunk_index, model). "
                   "One transaction per shard: vectors upserted (each with the hash of its chunk's text, and "
                   "into the vector cache) and ledger items closed together; chunks of the same text waiting "
                   "for it take the vector from the cache; re-ingest changes nothing.",
    },
)
