"""The queue-quota gate: a quota refusal is never an item failure, shards fit the quota, the queue is
kept full without passing it, the quota is configured or learned (and remembered in the database),
and a spend cap stops submission — against the OpenAI emulator's documented quota behaviour (the
batch is created, then fails with `token_limit_exceeded`) and Bedrock's jobs-in-progress quota."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from legal_batch.core import batch, ledger, quota
from legal_batch.core.seed import seed_demo_cases
from legal_batch.db import connect
from legal_batch.definitions import FLOWS_BY_NAME, defs
from legal_batch.driver import FlowDriver, FlowRun, RunFailed
from legal_batch.flows.embeddings.flow import EmbeddingsFlow, sync_chunks
from legal_batch.providers.local import LocalProvider
from legal_batch.settings import get_settings
from legal_batch_tests.emulators.bedrock_batch import point_at_emulator, running_bedrock_emulator
from legal_batch_tests.emulators.openai_batch import OpenAIBatchEmulator, running_openai_emulator

MODEL = "text-embedding-3-small"


@pytest.fixture
def openai_env(lb_env, monkeypatch: pytest.MonkeyPatch) -> Iterator[OpenAIBatchEmulator]:
    with running_openai_emulator(auto_advance=True) as emulator:
        monkeypatch.setenv("OPENAI_API_KEY", emulator.api_key)
        monkeypatch.setenv("OPENAI_BASE_URL", emulator.base_url)
        monkeypatch.setenv("LEGAL_BATCH_EMBEDDINGS_PROVIDER", "openai")
        get_settings(fresh=True)
        yield emulator


def _runner(dagster_instance, lines: list[str] | None = None) -> FlowDriver:
    echo = (lambda text: lines.append(text)) if lines is not None else (lambda _: None)
    return FlowDriver(FLOWS_BY_NAME["embeddings"], defs, flow="embeddings", echo=echo,
                      dagster_instance=dagster_instance)


def _items(conn: psycopg.Connection) -> dict[str, int]:
    return dict(conn.execute("SELECT state, count(*) FROM batch_items GROUP BY state").fetchall())


def _corpus_tokens(conn: psycopg.Connection) -> int:
    return conn.execute("SELECT sum(token_count) FROM case_chunks").fetchone()[0]


class _PeakQueue:
    """Samples, from the emulator's side, the most enqueued tokens a model ever had."""

    def __init__(self, emulator: OpenAIBatchEmulator) -> None:
        self.emulator = emulator
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.emulator.enqueued_tokens(MODEL))
            self._stop.wait(0.005)

    def __enter__(self) -> _PeakQueue:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def test_a_refused_shard_is_requeued_split_to_the_stated_quota_and_finishes_with_nothing_failed(
        openai_env, conn, dagster_instance):
    emulator = openai_env
    seed_demo_cases(conn, cases=6)
    lines: list[str] = []
    runner = _runner(dagster_instance, lines)
    runner.plan(FlowRun("embeddings"), limit=None)
    total = conn.execute("SELECT sum(est_input_tokens) FROM batch_jobs").fetchone()[0]
    limit = int(total) // 3  # the first shard holds everything: the provider refuses it
    emulator.enqueued_token_limit = {MODEL: limit}

    with _PeakQueue(emulator) as peak:
        run = runner.run(wait=True, poll_interval=0.01)

    assert emulator.quota_refusals == 1, "one refusal states the limit; none after it is known"
    assert peak.peak <= limit
    assert run.failed_runs == []
    assert _items(conn) == {"done": conn.execute("SELECT count(*) FROM case_chunks").fetchone()[0]}
    assert conn.execute("SELECT max(attempts) FROM batch_items").fetchone()[0] == 1, "the refusal was not counted"
    learned = conn.execute("SELECT limit_value, source, refusals FROM provider_quotas"
                           " WHERE provider = 'openai' AND model = %s", (MODEL,)).fetchone()
    assert learned == (limit, "stated", 1)
    first = conn.execute("SELECT state, split_into, quota_refusals FROM batch_jobs ORDER BY id LIMIT 1").fetchone()
    assert first[0] == "split" and len(first[1]) >= 4 and first[2] == 1
    usable = int(limit * 0.95)
    sizes = [t for (t,) in conn.execute("SELECT est_input_tokens FROM batch_jobs WHERE state = 'ingested'")]
    assert max(sizes) <= usable // 4 + max(
        conn.execute("SELECT max(token_count) FROM case_chunks").fetchone()[0], 0)


def test_a_batch_created_already_failed_for_quota_is_requeued_not_failed(openai_env, conn, dagster_instance):
    emulator = openai_env
    emulator.quota_check = "create"
    emulator.enqueued_token_limit = 100
    seed_demo_cases(conn, cases=1)
    runner = _runner(dagster_instance)
    runner.plan(FlowRun("embeddings"), limit=None)
    job = ledger.list_jobs(conn, flow="embeddings")[0]
    first_token = job.client_token
    batch.write_request_file(conn, EmbeddingsFlow(model=MODEL), defs.resources["providers"].named("openai"),
                             job.shard_key, files_root=get_settings().home_dir / "files")
    outcome = batch.submit_shard(conn, EmbeddingsFlow(model=MODEL), defs.resources["providers"].named("openai"),
                                 job.shard_key, policy=get_settings().quota_policy())

    job = ledger.get_job(conn, job.shard_key)
    assert outcome.state == "exported" and "requeued, not failed" in outcome.message
    assert (job.state, job.provider_job_id, job.quota_refusals) == ("exported", None, 1)
    assert job.client_token != first_token, "a new submission gets a new client token"
    assert "Limit: 100 enqueued tokens" in job.last_error
    assert set(_items(conn)) == {"exported"}
    assert conn.execute("SELECT max(attempts) FROM batch_items").fetchone()[0] == 0


def test_a_quota_smaller_than_one_request_stops_the_run_with_the_request_and_setting_named(
        openai_env, conn, dagster_instance, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("LEGAL_BATCH_OPENAI_ENQUEUED_TOKEN_LIMIT", "50")
    get_settings(fresh=True)
    seed_demo_cases(conn, cases=1)
    with pytest.raises(RunFailed) as raised:
        _runner(dagster_instance).run(wait=True, poll_interval=0.01)
    message = str(raised.value)
    assert "LEGAL_BATCH_OPENAI_ENQUEUED_TOKEN_LIMIT" in message and "request chunk-" in message
    assert "\n" not in message
    assert conn.execute("SELECT count(*) FROM batch_items").fetchone()[0] == 0, "nothing planned, nothing failed"
    assert openai_env.batches == {}


def test_an_unknown_quota_that_states_no_limit_is_learned_by_halving(openai_env, conn, dagster_instance):
    emulator = openai_env
    emulator.quota_states_limit = False
    seed_demo_cases(conn, cases=6)
    sync_chunks(conn, max_tokens=512, overlap_tokens=64)
    limit = _corpus_tokens(conn) // 5
    emulator.enqueued_token_limit = limit

    run = _runner(dagster_instance).run(wait=True, poll_interval=0.01)

    assert run.failed_runs == []
    assert set(_items(conn)) == {"done"}
    assert conn.execute("SELECT max(attempts) FROM batch_items").fetchone()[0] == 1
    learned, source, refusals = conn.execute("SELECT limit_value, source, refusals FROM provider_quotas").fetchone()
    assert source == "learned" and learned <= limit * 2 and refusals == emulator.quota_refusals
    assert 1 <= emulator.quota_refusals <= 6, emulator.quota_refusals


def test_a_configured_quota_cuts_shards_and_several_submitters_never_overfill_it(
        lb_env, conn, monkeypatch: pytest.MonkeyPatch):
    seed_demo_cases(conn, cases=8)
    sync_chunks(conn, max_tokens=512, overlap_tokens=64)
    limit = _corpus_tokens(conn) // 3
    monkeypatch.setenv("LEGAL_BATCH_LOCAL_ENQUEUED_TOKEN_LIMIT", str(limit))
    policy = get_settings(fresh=True).quota_policy()
    provider = LocalProvider(Path(lb_env.home_dir) / "lp")
    flow = EmbeddingsFlow(model="local-lexical-v1")
    batch.plan(conn, flow, provider, model="local-lexical-v1", policy=policy)
    jobs = ledger.list_jobs(conn, flow="embeddings")
    usable = int(limit * 0.95)
    assert len(jobs) >= 12
    assert all(j.est_input_tokens <= usable // 4 + 600 for j in jobs), "shards are a share of the quota"
    for job in jobs:
        batch.write_request_file(conn, flow, provider, job.shard_key, files_root=Path(lb_env.home_dir) / "files")

    def submit_all(keys: list[str]) -> None:
        with connect(lb_env.database_url or "") as own:
            for key in keys:
                batch.submit_shard(own, flow, provider, key, policy=policy)

    keys = [j.shard_key for j in jobs]
    threads = [threading.Thread(target=submit_all, args=(keys[i::2],)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    queued = quota.queued(conn, provider="local", model="local-lexical-v1")
    assert 0 < queued.tokens <= usable, (queued, usable)
    waiting = ledger.list_jobs(conn, flow="embeddings", states=("exported",))
    assert waiting and all(j.waiting_reason.startswith("waiting for quota") and j.waiting_since for j in waiting)
    assert all(j.submit_attempts == 0 for j in waiting), "waiting for room is not a submission attempt"
    assert set(_items(conn)) == {"exported", "submitted"}

    views = quota.queue_views(conn, kinds={"local": "enqueued_tokens"}, policy=policy)
    assert len(views) == 1 and views[0].limit == limit and views[0].enqueued_tokens == queued.tokens
    assert views[0].waiting_shards == len(waiting)
    assert f"of {limit:,} tokens queued" in views[0].line()


def test_the_budget_cap_refuses_a_run_before_any_request_and_holds_shards_at_the_gate(
        openai_env, conn, dagster_instance, monkeypatch: pytest.MonkeyPatch):
    emulator = openai_env
    seed_demo_cases(conn, cases=4)
    monkeypatch.setenv("LEGAL_BATCH_BUDGET_USD", "0.0000001")
    get_settings(fresh=True)
    with pytest.raises(quota.BudgetExceeded) as raised:
        _runner(dagster_instance).run(wait=True, poll_interval=0.01)
    assert "LEGAL_BATCH_BUDGET_USD=0.0000001" in str(raised.value) and "Nothing was submitted" in str(raised.value)
    assert emulator.batches == {} and [r for r in emulator.requests if r.method == "POST"] == []

    # a cap that covers about half of the shards: those go, the rest wait for budget, visibly
    monkeypatch.setenv("LEGAL_BATCH_OPENAI_ENQUEUED_TOKEN_LIMIT", str(10**9))
    monkeypatch.setenv("LEGAL_BATCH_SHARD_MAX_RECORDS", "10")
    conn.execute("DELETE FROM batch_items; DELETE FROM batch_jobs")
    get_settings(fresh=True)
    runner = _runner(dagster_instance)
    runner.plan(FlowRun("embeddings"), limit=None)
    shards, estimate = quota.unsubmitted_estimate(conn, flow="embeddings")
    monkeypatch.setenv("LEGAL_BATCH_BUDGET_USD", f'{{"embeddings": {estimate / 2:.8f}}}')
    get_settings(fresh=True)
    state = FlowRun("embeddings")
    runner.submit_pending(state)
    waiting = ledger.list_jobs(conn, flow="embeddings", states=("exported", "planned"))
    assert 0 < len(state.submitted) < shards and waiting
    assert all("waiting for budget" in (j.waiting_reason or "") for j in waiting if j.state == "exported")
    assert quota.committed_usd(conn, flow="embeddings") <= estimate / 2


def test_bedrock_jobs_in_progress_quota_refusal_is_learned_and_requeued(lb_env, conn, dagster_instance,
                                                                       monkeypatch: pytest.MonkeyPatch):
    with running_bedrock_emulator(max_active_jobs=2) as emulator:
        point_at_emulator(monkeypatch, emulator)
        monkeypatch.setenv("LEGAL_BATCH_EMBEDDINGS_PROVIDER", "bedrock")
        monkeypatch.setenv("LEGAL_BATCH_SHARD_MAX_RECORDS", "100")
        get_settings(fresh=True)
        seed_demo_cases(conn, cases=20)
        runner = _runner(dagster_instance)
        state = FlowRun("embeddings")
        runner.plan(state, limit=None)
        assert len(ledger.list_jobs(conn, flow="embeddings")) >= 4
        runner.submit_pending(state)

        model = ledger.list_jobs(conn, flow="embeddings")[0].model
        assert quota.queued(conn, provider="bedrock", model=model).jobs == 2
        learned = conn.execute("SELECT limit_value, source FROM provider_quotas WHERE provider = 'bedrock'").fetchone()
        assert learned == (2, "stated")
        assert set(_items(conn)) <= {"exported", "submitted", "done"}, "the last, small shard is served in real time"
        assert conn.execute("SELECT max(attempts) FROM batch_items WHERE state = 'exported'").fetchone()[0] == 0
        refused = conn.execute("SELECT count(*) FROM batch_jobs WHERE quota_refusals > 0").fetchone()[0]
        assert refused == 1, "after the refusal the gate holds the rest without asking the provider"


def test_a_provider_that_keeps_refusing_leaves_the_run_waiting_with_the_reason_and_the_ledger_consistent(
        openai_env, conn, dagster_instance):
    """Someone else's batches fill the organisation's quota: every submission is refused, with a
    limit we already know. The run waits (saying why and since when), counts no attempt, fails
    nothing, and the ledger verifies at any point it is stopped."""
    import io

    import openai

    from legal_batch.core.verify import verify

    emulator = openai_env
    seed_demo_cases(conn, cases=1)
    sync_chunks(conn, max_tokens=512, overlap_tokens=64)
    emulator.enqueued_token_limit = _corpus_tokens(conn) * 2
    client = openai.OpenAI(base_url=emulator.base_url, api_key=emulator.api_key)
    body = {"model": MODEL, "input": "word " * (_corpus_tokens(conn) * 2 - 10)}
    line = json.dumps({"custom_id": "x", "method": "POST", "url": "/v1/embeddings", "body": body}) + "\n"
    upload = client.files.create(file=("other.jsonl", io.BytesIO(line.encode())), purpose="batch")
    other = client.batches.create(input_file_id=upload.id, endpoint="/v1/embeddings", completion_window="24h")
    emulator.advance(other.id)  # in progress: someone else's tokens fill the quota
    emulator.held.add(other.id)  # and it stays so, however often the batch list shows it
    conn.execute("INSERT INTO provider_quotas (provider, model, kind, limit_value, source) VALUES"
                 " ('openai', %s, 'enqueued_tokens', %s, 'stated')", (MODEL, emulator.enqueued_token_limit))
    lines: list[str] = []

    run = _runner(dagster_instance, lines).run(wait=True, poll_interval=0.2, timeout=4)

    assert emulator.quota_refusals >= 1
    assert set(_items(conn)) == {"exported"}
    assert conn.execute("SELECT max(attempts) FROM batch_items").fetchone()[0] == 0
    job = ledger.list_jobs(conn, flow="embeddings")[0]
    assert job.state == "exported" and job.quota_refusals >= 1 and job.next_submit_at is not None
    waiting = [text for text in lines if "waiting" in text and "refused for quota" in text and " since " in text]
    assert waiting, lines
    assert run.failed_runs == []
    assert verify(conn, {"embeddings": None}).ok
