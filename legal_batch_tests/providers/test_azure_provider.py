"""The `azure_openai` provider over HTTP, through the real `openai.AzureOpenAI` client, against the
Azure flavour of `OpenAIBatchEmulator` (`/openai/...?api-version=`, `api-key` header)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from legal_batch.providers.azure_openai import AzureOpenAIProvider
from legal_batch.providers.base import (
    ChatRequest,
    EmbeddingRequest,
    ProviderError,
    UnsupportedRequest,
)
from legal_batch.resources.providers import make_provider
from legal_batch.settings import Settings
from legal_batch_tests.emulators.openai_batch import OpenAIBatchEmulator, running_openai_emulator

API_VERSION = "2024-10-21"
DEPLOYMENT = "gpt-4o-mini-batch"
NO_EMBEDDINGS = "Azure OpenAI Global Batch does not support embeddings"


@pytest.fixture
def emulator() -> Iterator[OpenAIBatchEmulator]:
    with running_openai_emulator(api_key="azure-test-key-0123456789") as emu:
        yield emu


@pytest.fixture
def azure_env(emulator: OpenAIBatchEmulator, monkeypatch: pytest.MonkeyPatch) -> OpenAIBatchEmulator:
    monkeypatch.setenv("AZURE_OPENAI_ENDPOINT", emulator.azure_endpoint)
    monkeypatch.setenv("AZURE_OPENAI_API_KEY", emulator.api_key)
    monkeypatch.setenv("OPENAI_API_VERSION", API_VERSION)
    monkeypatch.setenv("AZURE_OPENAI_BATCH_DEPLOYMENT", DEPLOYMENT)
    monkeypatch.delenv("AZURE_OPENAI_AD_TOKEN", raising=False)
    return emulator


@pytest.fixture
def provider(azure_env: OpenAIBatchEmulator) -> AzureOpenAIProvider:
    made = make_provider("azure_openai", Settings())
    assert isinstance(made, AzureOpenAIProvider)
    made.backoff_initial, made.backoff_max = 0.05, 0.2
    return made


def headnote_requests(n: int) -> list[ChatRequest]:
    return [ChatRequest(f"case-{i}", "You are a law reporter. Write a headnote.", f"Judgment {i}: the appeal is "
                        "allowed because the duty of care was breached.") for i in range(n)]


def submit(provider: AzureOpenAIProvider, tmp_path: Path, requests: list[ChatRequest], *, token: str = "lb-az-1"):
    path = tmp_path / "headnotes-00001.jsonl"
    path.write_bytes(b"".join(provider.format_line(r, endpoint="chat", model="gpt-4o-mini") for r in requests))
    return provider.submit(request_file=path, endpoint="chat", model="gpt-4o-mini", client_token=token,
                           shard_key="headnotes-00001-beef")


def test_request_file_names_the_deployment_on_every_line_and_goes_to_the_azure_paths(
        provider: AzureOpenAIProvider, emulator: OpenAIBatchEmulator, tmp_path: Path) -> None:
    job = submit(provider, tmp_path, headnote_requests(3))

    uploaded = emulator.file_content(job.input_location)
    assert uploaded == (tmp_path / "headnotes-00001.jsonl").read_bytes()
    assert not uploaded.startswith(b"\xef\xbb\xbf") and uploaded.endswith(b"\n")
    lines = [json.loads(line) for line in uploaded.splitlines()]
    assert [line["custom_id"] for line in lines] == ["case-0", "case-1", "case-2"]
    assert {line["url"] for line in lines} == {"/chat/completions"}
    assert {line["body"]["model"] for line in lines} == {DEPLOYMENT}
    (create,) = [r for r in emulator.requests if r.method == "POST" and r.path == "/openai/batches"]
    assert create.query == {"api-version": API_VERSION}
    assert create.headers["api-key"] == emulator.api_key
    assert json.loads(create.body) == {
        "input_file_id": job.input_location, "endpoint": "/chat/completions", "completion_window": "24h",
        "metadata": {"client_token": "lb-az-1", "shard_key": "headnotes-00001-beef"},
    }
    assert all(r.path.startswith("/openai/") for r in emulator.requests)
    assert provider.default_model("chat") == DEPLOYMENT
    assert provider.limits.max_records_per_job == 100_000
    assert provider.limits.max_bytes_per_file <= 200 * 1024 * 1024


def test_lifecycle_to_texts_joined_on_custom_id_with_an_empty_error_file(
        provider: AzureOpenAIProvider, emulator: OpenAIBatchEmulator, tmp_path: Path) -> None:
    requests = headnote_requests(4)
    job = submit(provider, tmp_path, requests)
    states = []
    for _ in range(3):
        emulator.advance(job.provider_job_id)
        states.append(provider.poll(job.provider_job_id).state)
    status = provider.poll(job.provider_job_id)

    assert states == ["running", "running", "completed"]
    assert (status.total, status.completed, status.failed) == (4, 4, 0)
    files = provider.download(job.provider_job_id, status, tmp_path / "out")
    assert [f.name for f in files] == ["output.jsonl", "errors.jsonl"]
    assert files[1].stat().st_size == 0  # Azure writes an empty error file even on success
    texts = {r.custom_id: r.text for r in provider.iter_results(files, endpoint="chat")}
    assert texts == {r.custom_id: "Summary: " + r.user[:80] for r in requests}


def test_failed_lines_and_quota(provider: AzureOpenAIProvider, emulator: OpenAIBatchEmulator, tmp_path: Path) -> None:
    emulator.fail_custom_ids["case-1"] = (400, "content_filter", "The response was filtered.")
    job = submit(provider, tmp_path, headnote_requests(2))
    emulator.complete(job.provider_job_id)
    status = provider.poll(job.provider_job_id)
    results = {r.custom_id: r for r in provider.iter_results(provider.download(job.provider_job_id, status,
                                                                                tmp_path / "out"), endpoint="chat")}
    assert results["case-0"].text and results["case-1"].error and not results["case-1"].retryable

    quota = submit(provider, tmp_path, headnote_requests(2), token="lb-az-quota")
    emulator.fail_validation(quota.provider_job_id, "The number of enqueued tokens has surpassed the configured "
                             f"limit of 30K for the deployment '{DEPLOYMENT}'.", code="token_limit_exceeded")
    status = provider.poll(quota.provider_job_id)
    assert status.state == "failed" and status.quota_exceeded


def test_submit_after_a_crash_finds_the_azure_batch(provider: AzureOpenAIProvider, emulator: OpenAIBatchEmulator,
                                                    tmp_path: Path) -> None:
    sdk = openai.AzureOpenAI(azure_endpoint=emulator.azure_endpoint, api_key=emulator.api_key,
                             api_version=API_VERSION)
    line = b'{"custom_id":"a","method":"POST","url":"/chat/completions","body":{"model":"d","messages":[]}}\n'
    uploaded = sdk.files.create(file=("r.jsonl", line), purpose="batch")
    crashed = sdk.batches.create(input_file_id=uploaded.id, endpoint="/chat/completions",  # type: ignore[arg-type]
                                 completion_window="24h", metadata={"client_token": "lb-az-crash"})
    creates = len([r for r in emulator.requests if r.method == "POST" and r.path == "/openai/batches"])

    job = submit(provider, tmp_path, headnote_requests(1), token="lb-az-crash")

    assert job.provider_job_id == crashed.id
    assert len([r for r in emulator.requests if r.method == "POST" and r.path == "/openai/batches"]) == creates


def test_azure_refuses_embeddings_with_a_clear_message(provider: AzureOpenAIProvider,
                                                       emulator: OpenAIBatchEmulator, tmp_path: Path) -> None:
    request = EmbeddingRequest("chunk-1", "text")
    with pytest.raises(UnsupportedRequest, match=NO_EMBEDDINGS) as raised:
        provider.format_line(request, endpoint="embeddings", model="text-embedding-3-small")
    assert "LEGAL_BATCH_EMBEDDINGS_PROVIDER=openai or bedrock" in str(raised.value)
    with pytest.raises(UnsupportedRequest, match=NO_EMBEDDINGS):
        provider.default_model("embeddings")
    (tmp_path / "e.jsonl").write_bytes(b"{}\n")
    with pytest.raises(UnsupportedRequest, match=NO_EMBEDDINGS):
        provider.submit(request_file=tmp_path / "e.jsonl", endpoint="embeddings", model="m", client_token="t",
                        shard_key="s")
    with pytest.raises(UnsupportedRequest, match=NO_EMBEDDINGS):
        list(provider.realtime([request], endpoint="embeddings", model="m"))
    assert emulator.requests == []


def test_realtime_chat_goes_to_the_deployment_and_rides_out_429s(provider: AzureOpenAIProvider,
                                                                 emulator: OpenAIBatchEmulator) -> None:
    emulator.add_fault(method="POST", path_regex=r"/chat/completions$", status=429, times=2, retry_after=0.1)
    started = time.monotonic()
    results = list(provider.realtime(headnote_requests(3), endpoint="chat", model="ignored"))
    assert time.monotonic() - started >= 0.1
    assert [r.custom_id for r in results] == ["case-0", "case-1", "case-2"]
    assert all(r.error is None and (r.text or "").startswith("Summary: Judgment") for r in results)
    paths = {r.path for r in emulator.requests}
    assert paths == {f"/openai/deployments/{DEPLOYMENT}/chat/completions"}
    assert len(emulator.requests) == 5


@pytest.mark.parametrize("missing", ["AZURE_OPENAI_BATCH_DEPLOYMENT", "AZURE_OPENAI_ENDPOINT",
                                     "AZURE_OPENAI_API_KEY", "OPENAI_API_VERSION"])
def test_missing_configuration_names_the_variable(azure_env: OpenAIBatchEmulator, monkeypatch: pytest.MonkeyPatch,
                                                  missing: str) -> None:
    monkeypatch.delenv(missing)
    with pytest.raises(ProviderError, match=missing) as raised:
        make_provider("azure_openai", Settings())
    assert azure_env.api_key not in str(raised.value)
