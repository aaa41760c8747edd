"""A set below the provider's minimum records per batch job goes real-time, not to a failing job, and
is then ingested — and materialized in Dagster — like any other shard."""

import dataclasses
from collections.abc import Iterable, Iterator
from pathlib import Path

import dagster as dg
import pytest

from legal_batch.core import batch, ledger
from legal_batch.core.seed import seed_demo_cases
from legal_batch.definitions import FLOWS_BY_NAME, defs
from legal_batch.driver import FlowDriver
from legal_batch.flows.embeddings.flow import EmbeddingsFlow, sync_chunks
from legal_batch.providers.base import Endpoint, ProviderError, Request, Result
from legal_batch.providers.local import LocalProvider

MODEL = "local-lexical-v1"


def count(conn, sql: str) -> int:
    return conn.execute(sql).fetchone()[0]


def small_shard(conn, provider: LocalProvider, files_root: Path) -> tuple[EmbeddingsFlow, ledger.Shard, int]:
    """Two cases chunked and planned as one shard below `provider`'s minimum, its request file written."""
    seed_demo_cases(conn, cases=2)
    sync_chunks(conn, max_tokens=512, overlap_tokens=64)
    chunks = count(conn, "SELECT count(*) FROM case_chunks")
    provider.limits = dataclasses.replace(provider.limits, min_records_per_job=chunks + 1)
    flow = EmbeddingsFlow(model=MODEL)
    planned = batch.plan(conn, flow, provider, model=MODEL)
    (job,) = ledger.list_jobs(conn, flow="embeddings")
    assert planned.planned_items == chunks and job.mode == "realtime"
    batch.write_request_file(conn, flow, provider, job.shard_key, files_root=files_root)
    return flow, job, chunks


def test_a_shard_under_the_minimum_is_served_in_real_time_and_ingested_like_a_batch_shard(lb_env, conn):
    files_root = Path(lb_env.home_dir) / "files"
    provider = LocalProvider(Path(lb_env.home_dir) / "lp")
    flow, job, chunks = small_shard(conn, provider, files_root)

    outcome = batch.submit_shard(conn, flow, provider, job.shard_key, files_root=files_root)

    assert "below the provider's minimum per batch job" in outcome.message and outcome.state == "completed"
    job = ledger.get_job(conn, job.shard_key)
    assert (job.state, job.provider_status, job.completed_count, job.failed_count) == (
        "completed", "realtime", chunks, 0)
    assert not (Path(lb_env.home_dir) / "lp").exists(), "no batch job was created"
    assert count(conn, "SELECT count(*) FROM case_embeddings") == 0, "the shard's ingest writes the results"
    assert ledger.summary(conn, "embeddings").items_by_state == {"submitted": chunks}

    files = batch.download_outputs(conn, provider, job.shard_key, files_root=files_root)
    assert [str(f) for f in files] == [job.output_location]
    report = batch.ingest_shard(conn, flow, provider, job.shard_key, files=files)

    job = ledger.get_job(conn, job.shard_key)
    assert (job.state, job.items_done, report.rows_written) == ("ingested", chunks, chunks)
    assert count(conn, "SELECT count(*) FROM case_embeddings") == chunks
    assert batch.submit_shard(conn, flow, provider, job.shard_key, files_root=files_root).message.startswith(
        "already ingested")
    assert batch.ingest_shard(conn, flow, provider, job.shard_key, files=files).already_ingested


def test_real_time_errors_become_retryable_items_naming_the_line_and_the_shard(lb_env, conn):
    files_root = Path(lb_env.home_dir) / "files"
    provider = LocalProvider(Path(lb_env.home_dir) / "lp", fail_rate=0.5)
    flow, job, chunks = small_shard(conn, provider, files_root)
    batch.submit_shard(conn, flow, provider, job.shard_key, files_root=files_root)
    files = batch.download_outputs(conn, provider, job.shard_key, files_root=files_root)
    batch.ingest_shard(conn, flow, provider, job.shard_key, files=files)

    job = ledger.get_job(conn, job.shard_key)
    assert job.items_retryable == job.failed_count > 0 and job.items_done == job.completed_count > 0
    for (reason,) in conn.execute("SELECT last_error FROM batch_items WHERE state = 'retryable'"):
        assert "realtime.jsonl:" in reason and f"{job.shard_key} (real time)" in reason
        assert "injected failure" in reason


class _DropsMidway(LocalProvider):
    """Answers the first request, then the connection drops."""

    def realtime(self, requests: Iterable[Request], *, endpoint: Endpoint, model: str) -> Iterator[Result]:
        for number, result in enumerate(super().realtime(requests, endpoint=endpoint, model=model)):
            if number == 1:
                raise ProviderError("connection reset by peer", retryable=True)
            yield result


def test_a_real_time_shard_interrupted_midway_records_nothing_and_is_served_again(lb_env, conn):
    files_root = Path(lb_env.home_dir) / "files"
    provider = _DropsMidway(Path(lb_env.home_dir) / "lp")
    flow, job, chunks = small_shard(conn, provider, files_root)

    with pytest.raises(ProviderError):
        batch.submit_shard(conn, flow, provider, job.shard_key, files_root=files_root)

    again = ledger.get_job(conn, job.shard_key)
    assert (again.state, again.submit_attempts, again.output_location) == ("exported", 0, None)
    assert ledger.summary(conn, "embeddings").items_by_state == {"exported": chunks}
    assert count(conn, "SELECT max(attempts) FROM batch_items") == 0
    assert not (batch.output_dir(files_root, "embeddings", job.shard_key) / batch.REALTIME_OUTPUT).exists()

    healthy = LocalProvider(Path(lb_env.home_dir) / "lp")
    healthy.limits = provider.limits
    assert batch.submit_shard(conn, flow, healthy, job.shard_key, files_root=files_root).state == "completed"


def test_the_real_time_shard_gets_its_results_materialization_and_the_index(
        lb_env, conn, dagster_instance, monkeypatch):
    seed_demo_cases(conn, cases=2)
    import legal_batch.resources as resources

    real = resources.make_provider

    def below_every_minimum(name: str, settings):  # every shard of this test is under the minimum
        provider = real(name, settings)
        provider.limits = dataclasses.replace(provider.limits, min_records_per_job=10_000)
        return provider

    monkeypatch.setattr(resources, "make_provider", below_every_minimum)
    emb = FLOWS_BY_NAME["embeddings"]
    run = FlowDriver(emb, defs, flow="embeddings", echo=lambda _: None, dagster_instance=dagster_instance).run(
        wait=True, poll_interval=0)

    (job,) = ledger.list_jobs(conn, flow="embeddings")
    chunks = count(conn, "SELECT count(*) FROM case_chunks")
    assert (job.mode, job.provider_status, job.state, job.items_done) == ("realtime", "realtime", "ingested", chunks)
    assert run.submitted == [job.shard_key] and run.ingested == [job.shard_key] and run.failed_runs == []
    for asset in ("embedding_batch_outputs", "case_embeddings"):
        event = dagster_instance.get_latest_materialization_event(dg.AssetKey(asset))
        assert event is not None and event.asset_materialization.partition == job.shard_key, asset
    results = dagster_instance.get_latest_materialization_event(dg.AssetKey("case_embeddings")).asset_materialization
    assert results.metadata["dagster/row_count"].value == chunks
    assert "hnsw_index_built_seconds" in results.metadata, "the index hook ran after the last load"
    assert count(conn, "SELECT count(*) FROM pg_indexes WHERE indexname = 'case_embeddings_hnsw'") == 1
