"""A set below the provider's minimum records per batch job goes real-time, not to a failing job."""

import dataclasses
from pathlib import Path

from legal_batch.core import batch, ledger
from legal_batch.core.embeddings import EmbeddingsFlow, sync_chunks
from legal_batch.core.seed import seed_demo_cases
from legal_batch.providers.local import LocalProvider


def test_a_shard_under_the_minimum_is_served_in_real_time_at_the_real_time_price(lb_env, conn):
    seed_demo_cases(conn, cases=2)
    sync_chunks(conn, max_tokens=512, overlap_tokens=64)
    chunks = conn.execute("SELECT count(*) FROM case_chunks").fetchone()[0]
    provider = LocalProvider(Path(lb_env.home_dir) / "lp")
    provider.limits = dataclasses.replace(provider.limits, min_records_per_job=chunks + 1)
    flow = EmbeddingsFlow(model="local-lexical-v1")

    planned = batch.plan(conn, flow, provider, model="local-lexical-v1")
    (job,) = ledger.list_jobs(conn, flow="embeddings")
    assert planned.planned_items == chunks and job.mode == "realtime"
    batch.write_request_file(conn, flow, provider, job.shard_key, files_root=Path(lb_env.home_dir) / "files")
    outcome = batch.submit_shard(conn, flow, provider, job.shard_key)

    assert "below the provider's minimum per batch job" in outcome.message
    job = ledger.get_job(conn, job.shard_key)
    assert (job.state, job.provider_status, job.items_done) == ("ingested", "realtime", chunks)
    assert not (Path(lb_env.home_dir) / "lp").exists(), "no batch job was created"
    assert conn.execute("SELECT count(*) FROM case_embeddings").fetchone()[0] == chunks
    assert batch.submit_shard(conn, flow, provider, job.shard_key).message.startswith("already ingested")
