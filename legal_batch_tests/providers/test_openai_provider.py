"""The `openai` provider over HTTP, through the real `openai` SDK, against `OpenAIBatchEmulator`.

Configuration is only the SDK's standard variables pointing at the emulator; the assertions are on
the bytes the emulator received, the statuses and files the provider reports, and (end to end)
rows in pgvector and ledger states.
"""

from __future__ import annotations

import base64
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import openai
import psycopg
import pytest

from legal_batch.core import batch, ledger
from legal_batch.db import connect
from legal_batch.providers import openai_format
from legal_batch.providers.base import (
    ChatRequest,
    EmbeddingRequest,
    ProviderError,
    ProviderQuotaError,
    Request,
)
from legal_batch.providers.openai import OpenAIProvider
from legal_batch.resources.providers import make_provider
from legal_batch.settings import Settings, get_settings
from legal_batch_tests.emulators.openai_batch import (
    OpenAIBatchEmulator,
    RecordedRequest,
    embedding_vector,
    running_openai_emulator,
)

MODEL = "text-embedding-3-small"
FAST = {"backoff_initial": 0.05, "backoff_max": 0.2}


@pytest.fixture
def emulator() -> Iterator[OpenAIBatchEmulator]:
    with running_openai_emulator(api_key="sk-test-emulator-key-0123456789") as emu:
        yield emu


@pytest.fixture
def sdk_env(emulator: OpenAIBatchEmulator, monkeypatch: pytest.MonkeyPatch) -> OpenAIBatchEmulator:
    monkeypatch.setenv("OPENAI_API_KEY", emulator.api_key)
    monkeypatch.setenv("OPENAI_BASE_URL", emulator.base_url)
    return emulator


@pytest.fixture
def provider(sdk_env: OpenAIBatchEmulator) -> OpenAIProvider:
    return make_provider("openai", Settings(), **FAST)


def texts(n: int) -> dict[str, str]:
    return {f"chunk-{i}": f"Paragraph {i} of a judgment about negligence and duty of care." for i in range(n)}


def write_requests(provider: OpenAIProvider, path: Path, requests: list[Request], *, endpoint: str = "embeddings",
                   model: str = MODEL) -> bytes:
    content = b"".join(provider.format_line(r, endpoint=endpoint, model=model) for r in requests)  # type: ignore[arg-type]
    path.write_bytes(content)
    return content


def submit_texts(provider: OpenAIProvider, tmp_path: Path, corpus: dict[str, str], *, token: str = "lb-token-1",
                 shard: str = "embeddings-00001-abcd"):
    path = tmp_path / f"{shard}.jsonl"
    write_requests(provider, path, [EmbeddingRequest(cid, text) for cid, text in corpus.items()])
    return provider.submit(request_file=path, endpoint="embeddings", model=MODEL, client_token=token, shard_key=shard)


def calls(emulator: OpenAIBatchEmulator, method: str, path: str) -> list[RecordedRequest]:
    return [r for r in emulator.requests if r.method == method and r.path == path]


def batches_with_token(emulator: OpenAIBatchEmulator, token: str) -> list[dict]:
    return [b for b in emulator.batches.values() if (b.get("metadata") or {}).get("client_token") == token]


# -- bytes on the wire -------------------------------------------------------------------------------

def test_request_file_is_uploaded_byte_for_byte_and_the_batch_carries_our_token(
        provider: OpenAIProvider, emulator: OpenAIBatchEmulator, tmp_path: Path) -> None:
    corpus = texts(3)
    path = tmp_path / "shard.jsonl"
    sent = write_requests(provider, path, [EmbeddingRequest(cid, text) for cid, text in corpus.items()])

    job = provider.submit(request_file=path, endpoint="embeddings", model=MODEL, client_token="lb-abc",
                          shard_key="embeddings-00001-abcd")

    uploaded = emulator.file_content(job.input_location)
    assert uploaded == sent
    assert not uploaded.startswith(b"\xef\xbb\xbf")
    lines = [json.loads(line) for line in uploaded.splitlines()]
    assert [line["custom_id"] for line in lines] == list(corpus)
    assert {line["url"] for line in lines} == {"/v1/embeddings"}
    assert lines[0]["method"] == "POST"
    assert lines[0]["body"] == {"model": MODEL, "input": corpus["chunk-0"], "encoding_format": "base64",
                                "dimensions": 1024}
    (create,) = calls(emulator, "POST", "/v1/batches")
    assert json.loads(create.body) == {
        "input_file_id": job.input_location, "endpoint": "/v1/embeddings", "completion_window": "24h",
        "metadata": {"client_token": "lb-abc", "shard_key": "embeddings-00001-abcd"},
    }
    assert create.headers["authorization"] == f"Bearer {emulator.api_key}"
    assert job.status.state == "pending" and job.status.raw_status == "validating"


def test_chat_lines_target_chat_completions(provider: OpenAIProvider) -> None:
    line = json.loads(provider.format_line(ChatRequest("case-1", "You write headnotes.", "The facts..."),
                                           endpoint="chat", model=provider.default_model("chat")))
    assert line["url"] == "/v1/chat/completions"
    assert line["body"]["model"] == "gpt-4o-mini"
    assert line["body"]["messages"][1] == {"role": "user", "content": "The facts..."}
    assert provider.default_model("embeddings") == MODEL
    assert provider.limits.max_records_per_job == 50_000
    assert provider.limits.max_embedding_inputs_per_job == 50_000
    assert provider.limits.max_bytes_per_file <= 200 * 1024 * 1024


# -- lifecycle, results ------------------------------------------------------------------------------

def test_lifecycle_to_vectors_joined_on_custom_id_with_error_file_lines_as_errors(
        provider: OpenAIProvider, emulator: OpenAIBatchEmulator, tmp_path: Path) -> None:
    corpus = texts(6)
    emulator.fail_custom_ids["chunk-2"] = (400, "invalid_value", "input is too long")
    emulator.fail_custom_ids["chunk-4"] = (500, "server_error", "model overloaded")
    job = submit_texts(provider, tmp_path, corpus)

    seen = []
    for _ in range(3):
        emulator.advance(job.provider_job_id)
        status = provider.poll(job.provider_job_id)
        seen.append((status.raw_status, status.state))
    assert seen == [("in_progress", "running"), ("finalizing", "running"), ("completed", "completed")]
    assert (status.total, status.completed, status.failed) == (6, 4, 2)
    assert status.output_location and status.error_location
    assert "2 of 6 requests failed" in (status.message or "")

    files = provider.download(job.provider_job_id, status, tmp_path / "out")
    assert [f.name for f in files] == ["output.jsonl", "errors.jsonl"]
    assert files[0].read_bytes() == emulator.file_content(status.output_location)
    results = {r.custom_id: r for r in provider.iter_results(files, endpoint="embeddings")}
    assert set(results) == set(corpus)
    for cid in ("chunk-0", "chunk-1", "chunk-3", "chunk-5"):
        assert results[cid].error is None
        np.testing.assert_allclose(results[cid].vector, embedding_vector(corpus[cid], 1024), rtol=1e-6)
        assert results[cid].input_tokens > 0
    assert results["chunk-2"].vector is None and "input is too long" in (results["chunk-2"].error or "")
    assert results["chunk-2"].retryable is False
    assert results["chunk-4"].retryable is True and results["chunk-4"].source == "errors.jsonl"


def test_expired_batch_keeps_its_partial_output(provider: OpenAIProvider, emulator: OpenAIBatchEmulator,
                                                tmp_path: Path) -> None:
    job = submit_texts(provider, tmp_path, texts(4))
    emulator.advance(job.provider_job_id)
    emulator.expire(job.provider_job_id, completed_fraction=0.5)

    status = provider.poll(job.provider_job_id)
    assert (status.state, status.completed, status.failed) == ("expired", 2, 2)
    assert "expired" in (status.message or "")
    results = list(provider.iter_results(provider.download(job.provider_job_id, status, tmp_path / "out"),
                                         endpoint="embeddings"))
    done = sorted(r.custom_id for r in results if r.vector is not None)
    expired = sorted(r.custom_id for r in results if r.error)
    assert done == ["chunk-0", "chunk-1"] and expired == ["chunk-2", "chunk-3"]
    assert all(r.retryable and "batch_expired" in (r.error or "") for r in results if r.error)


def test_every_request_failed_is_completed_with_no_output_file(provider: OpenAIProvider,
                                                               emulator: OpenAIBatchEmulator, tmp_path: Path) -> None:
    corpus = texts(3)
    emulator.fail_custom_ids.update({cid: (500, "server_error", "boom") for cid in corpus})
    job = submit_texts(provider, tmp_path, corpus)
    emulator.complete(job.provider_job_id)

    status = provider.poll(job.provider_job_id)
    assert (status.state, status.output_location, status.failed) == ("completed", None, 3)
    files = provider.download(job.provider_job_id, status, tmp_path / "out")
    assert [f.name for f in files] == ["errors.jsonl"]
    assert sorted(r.custom_id for r in provider.iter_results(files, endpoint="embeddings") if r.error) == sorted(corpus)


def test_validation_failure_is_failed_with_the_services_message(provider: OpenAIProvider,
                                                                emulator: OpenAIBatchEmulator, tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    good = provider.format_line(EmbeddingRequest("a", "one"), endpoint="embeddings", model=MODEL)
    other_model = provider.format_line(EmbeddingRequest("b", "two"), endpoint="embeddings",
                                       model="text-embedding-3-large")
    path.write_bytes(good + other_model)
    job = provider.submit(request_file=path, endpoint="embeddings", model=MODEL, client_token="t", shard_key="s")
    emulator.advance(job.provider_job_id)

    status = provider.poll(job.provider_job_id)
    assert status.state == "failed" and not status.quota_exceeded
    assert "model_mismatch (line 2)" in (status.message or "") and job.provider_job_id in (status.message or "")
    assert provider.download(job.provider_job_id, status, tmp_path / "out") == []


def test_unknown_status_is_refused_by_name(provider: OpenAIProvider, emulator: OpenAIBatchEmulator,
                                           tmp_path: Path) -> None:
    job = submit_texts(provider, tmp_path, texts(1))
    emulator.batches[job.provider_job_id]["status"] = "paused"
    with pytest.raises(ProviderError, match="'paused'"):
        provider.poll(job.provider_job_id)


def test_cancel_goes_through_cancelling_to_cancelled(provider: OpenAIProvider, emulator: OpenAIBatchEmulator,
                                                     tmp_path: Path) -> None:
    job = submit_texts(provider, tmp_path, texts(2))
    emulator.advance(job.provider_job_id)
    provider.cancel(job.provider_job_id)
    assert provider.poll(job.provider_job_id).state == "running"
    emulator.advance(job.provider_job_id)
    assert provider.poll(job.provider_job_id).state == "cancelled"
    provider.cancel(job.provider_job_id)  # already finished: nothing to do, no error


# -- quota -------------------------------------------------------------------------------------------

def test_enqueued_token_quota_on_a_batch_is_reported_as_quota(provider: OpenAIProvider,
                                                              emulator: OpenAIBatchEmulator, tmp_path: Path) -> None:
    job = submit_texts(provider, tmp_path, texts(2))
    emulator.fail_validation(job.provider_job_id, "Enqueued token limit reached for text-embedding-3-small in "
                             "organization org-x. Limit: 3,000,000 enqueued tokens.", code="token_limit_exceeded")
    status = provider.poll(job.provider_job_id)
    assert status.state == "failed" and status.quota_exceeded
    assert "token_limit_exceeded" in (status.message or "")


def test_quota_refusal_on_create_raises_quota_error_without_retrying(provider: OpenAIProvider,
                                                                     emulator: OpenAIBatchEmulator,
                                                                     tmp_path: Path) -> None:
    emulator.add_fault(method="POST", path_regex=r"/batches$", status=429, retry_after=30, body={"error": {
        "message": "Enqueued token limit reached for text-embedding-3-small.", "type": "tokens",
        "param": None, "code": "token_limit_exceeded"}})
    with pytest.raises(ProviderQuotaError, match="enqueued-token quota") as raised:
        submit_texts(provider, tmp_path, texts(2))
    assert raised.value.retry_after == 30 and raised.value.retryable
    assert len(calls(emulator, "POST", "/v1/batches")) == 1
    assert emulator.batches == {}


# -- idempotency, faults -----------------------------------------------------------------------------

def test_submit_after_a_crash_finds_the_batch_instead_of_creating_another(
        provider: OpenAIProvider, emulator: OpenAIBatchEmulator, tmp_path: Path) -> None:
    """A crash after the provider created the batch but before the ledger recorded it: the next submit
    with the same token returns that batch (found on the second page of the list)."""
    sdk = openai.OpenAI(base_url=emulator.base_url, api_key=emulator.api_key)
    uploaded = sdk.files.create(file=("r.jsonl", b'{"custom_id":"x","method":"POST","url":"/v1/embeddings",'
                                                 b'"body":{"model":"m","input":"x"}}\n'), purpose="batch")
    crashed = sdk.batches.create(input_file_id=uploaded.id, endpoint="/v1/embeddings", completion_window="24h",
                                 metadata={"client_token": "lb-crashed", "shard_key": "embeddings-00007-aaaa"})
    for n in range(105):  # newer batches of other shards push it to the second page
        sdk.batches.create(input_file_id=uploaded.id, endpoint="/v1/embeddings", completion_window="24h",
                           metadata={"client_token": f"other-{n}"})
    files_before, creates_before = len(emulator.files), len(calls(emulator, "POST", "/v1/batches"))

    found = provider.find_job(client_token="lb-crashed")
    job = submit_texts(provider, tmp_path, texts(2), token="lb-crashed", shard="embeddings-00007-aaaa")

    assert found is not None and found.provider_job_id == crashed.id
    assert job.provider_job_id == crashed.id
    assert len(emulator.files) == files_before and len(calls(emulator, "POST", "/v1/batches")) == creates_before
    assert any(r.query.get("after") for r in calls(emulator, "GET", "/v1/batches"))
    assert provider.find_job(client_token="never-used") is None


def test_a_create_whose_answer_was_lost_is_reconciled_not_duplicated(sdk_env: OpenAIBatchEmulator,
                                                                     tmp_path: Path) -> None:
    """The first POST /batches is processed after the client gave up waiting: the retry finds it."""
    emulator = sdk_env
    provider = make_provider("openai", Settings(), create_timeout=0.15, backoff_initial=1.0)
    emulator.add_delay(method="POST", path_regex=r"/batches$", seconds=0.4)

    job = submit_texts(provider, tmp_path, texts(2), token="lb-slow")

    assert len(calls(emulator, "POST", "/v1/batches")) == 1
    (batch,) = batches_with_token(emulator, "lb-slow")
    assert job.provider_job_id == batch["id"]


def test_500_on_create_is_retried_after_looking_for_the_token(provider: OpenAIProvider,
                                                              emulator: OpenAIBatchEmulator, tmp_path: Path) -> None:
    emulator.add_fault(method="POST", path_regex=r"/batches$", status=500)
    job = submit_texts(provider, tmp_path, texts(2), token="lb-500")
    order = [(r.method, r.path) for r in emulator.requests if r.path.startswith("/v1/batches")]
    assert order == [("GET", "/v1/batches"),   # find_job before the upload: nothing yet
                     ("POST", "/v1/batches"),  # answered 500
                     ("GET", "/v1/batches"),   # not created: look for the token before trying again
                     ("POST", "/v1/batches")]
    assert [b["id"] for b in batches_with_token(emulator, "lb-500")] == [job.provider_job_id]


def test_429_with_retry_after_on_create_is_retried_after_the_delay(provider: OpenAIProvider,
                                                                   emulator: OpenAIBatchEmulator,
                                                                   tmp_path: Path) -> None:
    emulator.add_fault(method="POST", path_regex=r"/batches$", status=429, retry_after=0.3)
    started = time.monotonic()
    job = submit_texts(provider, tmp_path, texts(2), token="lb-429")
    assert time.monotonic() - started >= 0.3
    assert len(calls(emulator, "POST", "/v1/batches")) == 2
    assert [b["id"] for b in batches_with_token(emulator, "lb-429")] == [job.provider_job_id]


def test_rate_limit_that_never_clears_on_create_requeues_as_quota(sdk_env: OpenAIBatchEmulator,
                                                                  tmp_path: Path) -> None:
    provider = make_provider("openai", Settings(), create_attempts=2, **FAST)
    sdk_env.add_fault(method="POST", path_regex=r"/batches$", status=429, times=5, retry_after=0.05)
    with pytest.raises(ProviderQuotaError, match="rate limits"):
        submit_texts(provider, tmp_path, texts(1))
    assert sdk_env.batches == {}


def test_429_and_500_on_poll_and_download_are_retried(provider: OpenAIProvider, emulator: OpenAIBatchEmulator,
                                                      tmp_path: Path) -> None:
    job = submit_texts(provider, tmp_path, texts(3))
    emulator.complete(job.provider_job_id)
    emulator.add_fault(method="GET", path_regex=r"/batches/batch_", status=429, retry_after=0.1)
    emulator.add_fault(method="GET", path_regex=r"/batches/batch_", status=500)
    status = provider.poll(job.provider_job_id)
    assert status.state == "completed"
    assert len(calls(emulator, "GET", f"/v1/batches/{job.provider_job_id}")) == 3

    emulator.add_fault(method="GET", path_regex=r"/content$", status=500)
    emulator.add_fault(method="GET", path_regex=r"/content$", status=429, retry_after=0.1)
    files = provider.download(job.provider_job_id, status, tmp_path / "out")
    assert len([r for r in provider.iter_results(files, endpoint="embeddings") if r.vector is not None]) == 3


def test_deleted_output_file_says_it_expired_and_a_missing_error_file_is_fine(
        provider: OpenAIProvider, emulator: OpenAIBatchEmulator, tmp_path: Path) -> None:
    emulator.fail_custom_ids["chunk-0"] = (500, "server_error", "boom")
    job = submit_texts(provider, tmp_path, texts(3))
    emulator.complete(job.provider_job_id)
    status = provider.poll(job.provider_job_id)
    sdk = openai.OpenAI(base_url=emulator.base_url, api_key=emulator.api_key)

    sdk.files.delete(status.error_location or "")
    files = provider.download(job.provider_job_id, status, tmp_path / "out")
    assert [f.name for f in files] == ["output.jsonl"]

    sdk.files.delete(status.output_location or "")
    with pytest.raises(ProviderError, match="no longer exists") as raised:
        provider.download(job.provider_job_id, status, tmp_path / "again")
    assert "30 days" in str(raised.value) and job.provider_job_id in str(raised.value)
    assert not raised.value.retryable


# -- real time ---------------------------------------------------------------------------------------

def test_realtime_embeddings_ride_out_429s_and_keep_input_order(sdk_env: OpenAIBatchEmulator) -> None:
    provider = make_provider("openai", Settings(), embedding_inputs_per_call=2, **FAST)
    sdk_env.add_fault(method="POST", path_regex=r"/v1/embeddings$", status=429, times=2, retry_after=0.1)
    corpus = texts(5)
    started = time.monotonic()

    results = list(provider.realtime([EmbeddingRequest(c, t) for c, t in corpus.items()], endpoint="embeddings",
                                     model=MODEL))

    assert time.monotonic() - started >= 0.1
    assert [r.custom_id for r in results] == list(corpus) and [r.line_no for r in results] == [1, 2, 3, 4, 5]
    for result in results:
        assert result.error is None
        np.testing.assert_allclose(result.vector, embedding_vector(corpus[result.custom_id or ""], 1024), rtol=1e-6)
    assert len(calls(sdk_env, "POST", "/v1/embeddings")) == 3 + 2  # 3 grouped calls, 2 answered 429 first
    assert sum(r.input_tokens for r in results) == sum(len(t) // 4 for t in corpus.values())


def test_realtime_failures_are_results_not_exceptions(sdk_env: OpenAIBatchEmulator) -> None:
    provider = make_provider("openai", Settings(), realtime_attempts=2, concurrency=1, **FAST)
    sdk_env.add_fault(method="POST", path_regex=r"/chat/completions$", status=500, times=2)
    sdk_env.add_fault(method="POST", path_regex=r"/chat/completions$", status=400)
    requests = [ChatRequest(f"case-{i}", "You write headnotes.", f"Judgment {i}.") for i in range(3)]

    results = list(provider.realtime(requests, endpoint="chat", model="gpt-4o-mini"))

    assert [r.custom_id for r in results] == ["case-0", "case-1", "case-2"]
    assert "HTTP 500" in (results[0].error or "") and results[0].retryable
    assert "HTTP 400" in (results[1].error or "") and not results[1].retryable
    assert results[2].error is None and results[2].text == "Summary: Judgment 2."


# -- configuration and secrets -----------------------------------------------------------------------

def test_missing_key_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(ProviderError, match="OPENAI_API_KEY"):
        make_provider("openai", Settings())


def test_the_api_key_never_reaches_messages_metadata_or_logs(emulator: OpenAIBatchEmulator, tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    monkeypatch.setenv("OPENAI_BASE_URL", emulator.base_url)
    monkeypatch.setenv("OPENAI_API_KEY", emulator.api_key)
    provider = make_provider("openai", Settings(), **FAST)
    emulator.add_fault(method="POST", path_regex=r"/batches$", status=500)
    job = submit_texts(provider, tmp_path, texts(1))
    wrong = "sk-wrong-key-that-must-stay-secret-42"
    monkeypatch.setenv("OPENAI_API_KEY", wrong)
    refused = make_provider("openai", Settings(), **FAST)
    emulator.add_fault(method="GET", path_regex=r"/batches/", status=401, body={"error": {
        "message": f"Incorrect API key provided: {wrong}.", "type": "invalid_request_error", "param": None,
        "code": "invalid_api_key"}})

    with pytest.raises(ProviderError) as raised:
        refused.poll(job.provider_job_id)

    assert "OPENAI_API_KEY" in str(raised.value) and wrong not in str(raised.value)
    assert emulator.api_key not in json.dumps(emulator.batches[job.provider_job_id]["metadata"])
    assert emulator.api_key not in caplog.text and wrong not in caplog.text


# -- end to end --------------------------------------------------------------------------------------

def test_embeddings_flow_runs_end_to_end_on_openai(lb_env: Settings, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    from legal_batch.core.seed import seed_demo_cases
    from legal_batch.db import connect
    from legal_batch.definitions import FLOWS_BY_NAME, defs
    from legal_batch.driver import FlowDriver

    with running_openai_emulator(auto_advance=True) as emulator:
        monkeypatch.setenv("OPENAI_API_KEY", emulator.api_key)
        monkeypatch.setenv("OPENAI_BASE_URL", emulator.base_url)
        monkeypatch.setenv("LEGAL_BATCH_EMBEDDINGS_PROVIDER", "openai")
        monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster"))
        (tmp_path / "dagster").mkdir()
        settings = get_settings(fresh=True)
        assert settings.embeddings_provider == "openai"
        conn = connect(settings.database_url or "")
        try:
            seed_demo_cases(conn, cases=3)
            runner = FlowDriver(FLOWS_BY_NAME["embeddings"], defs, flow="embeddings", echo=lambda s: None)
            run = runner.run(wait=True, poll_interval=0.05)
            _assert_flow_result(conn, emulator, run.failed_runs)
        finally:
            conn.close()


def _assert_flow_result(conn: psycopg.Connection, emulator: OpenAIBatchEmulator, failed_runs: list[str]) -> None:
    assert failed_runs == []
    chunks = conn.execute("SELECT count(*) FROM case_chunks").fetchone()[0]
    embedded = conn.execute(
        "SELECT count(*), min(vector_dims(embedding)), max(vector_dims(embedding)), min(model), max(model)"
        " FROM case_embeddings").fetchone()
    assert chunks > 0 and embedded == (chunks, 1024, 1024, MODEL, MODEL)
    items = dict(conn.execute("SELECT state, count(*) FROM batch_items WHERE flow = 'embeddings'"
                              " GROUP BY state").fetchall())
    assert items == {"done": chunks}
    jobs = conn.execute("SELECT shard_key, provider, state, provider_job_id, provider_status FROM batch_jobs"
                        " WHERE flow = 'embeddings'").fetchall()
    assert jobs and all(j[1:3] == ("openai", "ingested") and j[4] == "completed" for j in jobs)
    per_shard = {j[0]: [b["id"] for b in emulator.batches.values() if (b["metadata"] or {}).get("shard_key") == j[0]]
                 for j in jobs}
    assert per_shard == {j[0]: [j[3]] for j in jobs}
    assert len(emulator.batches) == len(jobs)


# -- base64 embeddings -------------------------------------------------------------------------------

def _output_of(provider: OpenAIProvider, emulator: OpenAIBatchEmulator, tmp_path: Path, lines: bytes,
               name: str) -> list[Path]:
    """Submit request `lines` as one batch, run it to completion and download its files."""
    path = tmp_path / f"{name}.jsonl"
    path.write_bytes(lines)
    job = provider.submit(request_file=path, endpoint="embeddings", model=MODEL, client_token=f"lb-{name}",
                          shard_key=name)
    emulator.complete(job.provider_job_id)
    return provider.download(job.provider_job_id, provider.poll(job.provider_job_id), tmp_path / name)


def test_base64_output_is_little_endian_float32_a_quarter_of_the_bytes_and_parses_like_floats(
        provider: OpenAIProvider, emulator: OpenAIBatchEmulator, tmp_path: Path) -> None:
    corpus = texts(4)
    requests = [EmbeddingRequest(cid, text) for cid, text in corpus.items()]
    as_base64 = b"".join(provider.format_line(r, endpoint="embeddings", model=MODEL) for r in requests)
    as_floats = b"".join(openai_format.request_line(r, endpoint="embeddings", model=MODEL, encoding_format="float")
                         for r in requests)

    base64_files = _output_of(provider, emulator, tmp_path, as_base64, "b64")
    float_files = _output_of(provider, emulator, tmp_path, as_floats, "floats")

    line = json.loads(base64_files[0].read_bytes().splitlines()[0])
    embedding = line["response"]["body"]["data"][0]["embedding"]
    assert isinstance(embedding, str)
    expected = np.asarray(embedding_vector(corpus[line["custom_id"]], 1024), dtype="<f4")
    assert base64.b64decode(embedding) == expected.tobytes()
    assert base64_files[0].stat().st_size < 0.4 * float_files[0].stat().st_size
    from_base64 = {r.custom_id: r for r in provider.iter_results(base64_files, endpoint="embeddings")}
    from_floats = {r.custom_id: r for r in provider.iter_results(float_files, endpoint="embeddings")}
    assert set(from_base64) == set(from_floats) == set(corpus)
    for cid in corpus:
        a, b = from_base64[cid], from_floats[cid]
        assert a.error is None and a.vector is not None and a.vector.dtype == np.float32
        assert np.array_equal(a.vector, b.vector) and a.input_tokens == b.input_tokens > 0


def test_a_malformed_base64_vector_is_an_error_of_its_line(provider: OpenAIProvider, tmp_path: Path) -> None:
    def line(custom_id: str, embedding: str) -> bytes:
        body = {"object": "list", "data": [{"object": "embedding", "index": 0, "embedding": embedding}],
                "usage": {"prompt_tokens": 3, "total_tokens": 3}}
        return json.dumps({"id": "r", "custom_id": custom_id, "error": None,
                           "response": {"status_code": 200, "request_id": "q", "body": body}}).encode() + b"\n"

    good = np.linspace(-1, 1, 1024, dtype=np.float32)
    encode = lambda raw: base64.b64encode(raw).decode()  # noqa: E731
    output = tmp_path / "output.jsonl"
    output.write_bytes(line("good", encode(good.tobytes())) + line("short", encode(good.tobytes()[:4094]))
                       + line("not-base64", "this is not base64!") + line("empty", "")
                       + line("half", encode(good[:512].tobytes())))

    results = {r.custom_id: r for r in provider.iter_results([output], endpoint="embeddings")}

    assert np.array_equal(results["good"].vector, good) and results["good"].error is None
    for cid, where, message in (("short", "output.jsonl:2", "decodes to 4094 bytes, not a whole number of float32"),
                                ("not-base64", "output.jsonl:3", "embedding is not valid base64"),
                                ("empty", "output.jsonl:4", "decodes to 0 bytes")):
        assert results[cid].vector is None and results[cid].where == where
        assert message in (results[cid].error or ""), results[cid].error
    assert results["half"].vector.shape == (512,)  # a whole vector of the wrong size: the sink refuses it


def test_the_emulator_refuses_an_unknown_encoding_format_on_its_line(
        provider: OpenAIProvider, emulator: OpenAIBatchEmulator, tmp_path: Path) -> None:
    line = provider.format_line(EmbeddingRequest("odd", "text"), endpoint="embeddings", model=MODEL)
    files = _output_of(provider, emulator, tmp_path, line.replace(b'"base64"', b'"int8"'), "odd")
    (result,) = provider.iter_results(files, endpoint="embeddings")
    assert result.vector is None and "HTTP 400 invalid_value" in (result.error or "")
    assert "'encoding_format'" in (result.error or "") and result.retryable is False


# -- the status of many batches ----------------------------------------------------------------------

def _open_jobs(conn: psycopg.Connection, provider: OpenAIProvider, emulator: OpenAIBatchEmulator, tmp_path: Path,
               count: int) -> list[ledger.Shard]:
    """`count` one-item shards in the ledger, each `pending` with its own batch (validating) in the emulator."""
    plan = ledger.plan_shards(
        conn, flow="embeddings", provider="openai", model=MODEL, params={"n": count},
        candidate_sql="SELECT 'case:' || g, 'chunk-' || g, 10, 100 FROM generate_series(1, %(n)s) g ORDER BY g",
        limits=ledger.ShardLimits(max_records=1, max_bytes=10**9))
    template = submit_texts(provider, tmp_path, texts(1), token="lb-template", shard="template").provider_job_id
    jobs = [ledger.get_job(conn, key) for key in plan.shard_keys]
    batch_ids = [emulator.copy_batch(template, metadata={"client_token": job.client_token,
                                                         "shard_key": job.shard_key}) for job in jobs]
    with conn.transaction(), conn.cursor() as cur:
        cur.executemany("UPDATE batch_jobs SET provider_job_id = %s, state = 'pending', provider_status = 'validating',"
                        " submitted_at = now() WHERE id = %s", [(b, job.id) for b, job in zip(batch_ids, jobs,
                                                                                              strict=True)])
        cur.execute("UPDATE batch_items SET state = 'submitted', attempts = 1")
    return [ledger.get_job(conn, key) for key in plan.shard_keys]


def test_a_thousand_open_batches_are_polled_from_the_batch_list_and_only_ever_move_forward(
        conn: psycopg.Connection, provider: OpenAIProvider, emulator: OpenAIBatchEmulator, tmp_path: Path,
        database_url: str) -> None:
    jobs = _open_jobs(conn, provider, emulator, tmp_path, 1_000)
    expected: dict[str, str] = {}
    for number, job in enumerate(jobs):
        batch_id = job.provider_job_id or ""
        if number % 4 == 1:
            emulator.set_status(batch_id, "in_progress")
        elif number % 4 == 2:
            emulator.set_status(batch_id, "finalizing")
        elif number % 4 == 3:
            emulator.complete(batch_id)
        expected[job.shard_key] = ["pending", "running", "running", "completed"][number % 4]
    refused = jobs[4]  # created, then failed for the enqueued-token quota: requeued, not failed
    emulator.fail_validation(refused.provider_job_id or "", "Enqueued token limit reached for "
                             "text-embedding-3-small in organization org-x.", code="token_limit_exceeded")
    expected[refused.shard_key] = "exported"
    ahead = jobs[8]  # still validating when listed; another poller records it running before we do
    expected[ahead.shard_key] = "running"

    class OtherPollerMeanwhile:
        """The real provider, and another poller recording a newer status right after the listing."""

        def __getattr__(self, name: str) -> object:
            return getattr(provider, name)

        def poll_many(self, ids, *, created_after=None):
            statuses = provider.poll_many(ids, created_after=created_after)
            emulator.set_status(ahead.provider_job_id or "", "in_progress")
            with connect(database_url) as other:
                other.execute("UPDATE batch_jobs SET state = 'running', provider_status = 'in_progress',"
                              " completed_count = 0, failed_count = 0, updated_at = clock_timestamp()"
                              " WHERE id = %s", (ahead.id,))
            return statuses

    before = len(emulator.requests)
    polled = batch.poll_open_jobs(conn, lambda _: OtherPollerMeanwhile(), flow="embeddings")  # type: ignore[arg-type,return-value]

    sent = emulator.requests[before:]
    assert [(r.method, r.path) for r in sent] == [("GET", "/v1/batches")] * 10  # 1,000 batches, 100 a page
    assert len(polled) == 999  # every job but the one the other poller had already moved on
    states = dict(conn.execute("SELECT shard_key, state FROM batch_jobs WHERE flow = 'embeddings'").fetchall())
    assert states == expected
    done = ledger.get_job(conn, jobs[3].shard_key)
    assert (done.provider_status, done.completed_count, done.output_location) == (
        "completed", 1, emulator.batches[jobs[3].provider_job_id]["output_file_id"])
    requeued = ledger.get_job(conn, refused.shard_key)
    assert requeued.provider_job_id is None and requeued.quota_refusals == 1
    assert conn.execute("SELECT state, attempts FROM batch_items WHERE job_id = %s",
                        (refused.id,)).fetchone() == ("exported", 0)

    # the next tick: nothing changed at the provider, so nothing is written
    stamps = conn.execute("SELECT id, updated_at FROM batch_jobs ORDER BY id").fetchall()
    again = batch.poll_open_jobs(conn, lambda _: provider, flow="embeddings")
    assert len(again) == 1_000 - 250 - 1 and {p.job.state for p in again} == {"pending", "running"}
    assert conn.execute("SELECT id, updated_at FROM batch_jobs ORDER BY id").fetchall() == stamps


def test_a_batch_the_list_does_not_reach_is_polled_by_itself(
        conn: psycopg.Connection, provider: OpenAIProvider, emulator: OpenAIBatchEmulator, tmp_path: Path) -> None:
    older, newer = _open_jobs(conn, provider, emulator, tmp_path, 2)
    emulator.complete(older.provider_job_id or "")
    emulator.set_status(newer.provider_job_id or "", "in_progress")
    stale = emulator.copy_batch(newer.provider_job_id or "", metadata={"client_token": "someone-else"})
    emulator.batches[stale]["created_at"] -= 3 * 86_400  # created days before ours: the list stops there
    moved = emulator.batches.pop(newer.provider_job_id or "")
    emulator.batches[moved["id"]] = moved  # listed first: newer, stale (stop), then older, never reached
    before = len(emulator.requests)

    polled = batch.poll_open_jobs(conn, lambda _: provider, flow="embeddings")

    assert {p.job.shard_key: p.job.state for p in polled} == {older.shard_key: "completed",
                                                              newer.shard_key: "running"}
    assert [(r.method, r.path) for r in emulator.requests[before:]] == [
        ("GET", "/v1/batches"), ("GET", f"/v1/batches/{older.provider_job_id}")]
