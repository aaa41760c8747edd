"""A batch the provider fails for quota (enqueued-token limit) is requeued with back-off, not lost or
counted as an attempt, and is submitted again under a new client token."""

from datetime import UTC, datetime

import pytest

from legal_batch.core import batch, ledger
from legal_batch.core.embeddings import EmbeddingsFlow
from legal_batch.core.seed import seed_demo_cases
from legal_batch.definitions import FLOWS_BY_NAME, defs
from legal_batch.flows.runner import FlowRun, FlowRunner
from legal_batch.resources.settings import get_settings
from legal_batch_tests.emulators.openai_batch import running_openai_emulator


def test_token_limit_exceeded_requeues_the_shard_with_backoff_and_a_new_token(
        lb_env, conn, dagster_instance, monkeypatch: pytest.MonkeyPatch):
    with running_openai_emulator() as emulator:
        monkeypatch.setenv("OPENAI_API_KEY", emulator.api_key)
        monkeypatch.setenv("OPENAI_BASE_URL", emulator.base_url)
        monkeypatch.setenv("LEGAL_BATCH_EMBEDDINGS_PROVIDER", "openai")
        get_settings(fresh=True)
        seed_demo_cases(conn, cases=2)
        runner = FlowRunner(FLOWS_BY_NAME["embeddings"], defs, flow="embeddings", echo=lambda _: None,
                            dagster_instance=dagster_instance)
        state = FlowRun("embeddings")
        runner.plan(state, limit=None)
        runner.submit_pending(state)
        job = ledger.list_jobs(conn, flow="embeddings")[0]
        first_token, first_batch = job.client_token, job.provider_job_id
        emulator.fail_validation(first_batch, "Enqueued token limit reached for text-embedding-3-small",
                                 code="token_limit_exceeded")

        polled = batch.poll_open_jobs(conn, defs.resources["providers"].named, flow="embeddings")
        assert polled[0].status.quota_exceeded
        job = ledger.get_job(conn, job.shard_key)
        assert job.state == "exported" and job.provider_job_id is None
        assert job.client_token != first_token
        assert job.next_submit_at > datetime.now(UTC)
        assert first_batch in job.last_error and "quota" in job.last_error
        items = dict(conn.execute("SELECT state, max(attempts) FROM batch_items GROUP BY state").fetchall())
        assert items == {"exported": 0}, "the refused attempt is not counted"

        held = batch.submit_shard(conn, EmbeddingsFlow(model="text-embedding-3-small"),
                                  defs.resources["providers"].named("openai"), job.shard_key)
        assert "held back" in held.message and len(emulator.batches) == 1

        conn.execute("UPDATE batch_jobs SET next_submit_at = now() - interval '1 second'")
        runner.submit_pending(state)
        job = ledger.get_job(conn, job.shard_key)
        assert job.state == "pending" and job.provider_job_id not in (None, first_batch)
        assert len(emulator.batches) == 2
        assert [b["metadata"]["client_token"] for b in emulator.batches.values()] == [first_token, job.client_token]
