"""The `bedrock` provider through the real boto3 clients, over HTTP, against the Bedrock batch
emulator (moto's S3 server holds the bucket). Configuration comes only from the environment."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import numpy as np
import orjson
import pytest

from legal_batch.core.seed import seed_demo_cases
from legal_batch.db import connect
from legal_batch.providers.base import (
    ChatRequest,
    EmbeddingRequest,
    ProviderError,
    ProviderQuotaError,
    Result,
    UnsupportedRequest,
)
from legal_batch.providers.bedrock import (
    DEFAULT_CHAT_MODEL,
    DEFAULT_EMBEDDING_MODEL,
    JOB_NAME_RE,
    BedrockProvider,
    job_name_for,
    read_manifest,
)
from legal_batch.resources.providers import make_provider as build_provider
from legal_batch.settings import Settings, get_settings
from legal_batch_tests.emulators.bedrock_batch import (
    TEST_ROLE_ARN,
    BedrockBatchEmulator,
    RecordError,
    default_responder,
    deterministic_unit_vector,
    point_at_emulator,
    running_bedrock_emulator,
)

ROLE = TEST_ROLE_ARN
TITAN = DEFAULT_EMBEDDING_MODEL
CLAUDE = DEFAULT_CHAT_MODEL
TOKEN = "lb-0123456789abcdef01234567"
SHARD = "embeddings-00001-1a2b3c4d"


@pytest.fixture
def emulator(monkeypatch: pytest.MonkeyPatch) -> Iterator[BedrockBatchEmulator]:
    with running_bedrock_emulator() as emu:
        monkeypatch.delenv("AWS_PROFILE", raising=False)
        for name, value in emu.env().items():
            monkeypatch.setenv(name, value)
        yield emu


@pytest.fixture
def bucket(emulator: BedrockBatchEmulator) -> str:
    name = f"legal-batch-{uuid.uuid4().hex[:10]}"
    boto3.client("s3").create_bucket(Bucket=name)
    return name


def make_provider(bucket: str, **options: Any) -> BedrockProvider:
    settings = Settings(_env_file=None, s3_bucket=bucket, bedrock_role_arn=ROLE)  # type: ignore[call-arg]
    options = {"max_retries": 1, "realtime_backoff_s": (0.01, 0.05), **options}
    return build_provider("bedrock", settings, **options)  # type: ignore[return-value]


@pytest.fixture
def provider(bucket: str) -> BedrockProvider:
    return make_provider(bucket)


@pytest.fixture
def offline() -> BedrockProvider:
    """For formats and parsing only: no clients, nothing on the wire."""
    return BedrockProvider(s3=None, bedrock=None, runtime=None, bucket="my-bucket", role_arn=ROLE)


def text_of(i: int) -> str:
    return f"Chunk {i}: the appeal is dismissed and the costs follow the event."


def embedding_requests(n: int) -> list[EmbeddingRequest]:
    return [EmbeddingRequest(f"chunk-{i:05d}", text_of(i)) for i in range(n)]


def write_requests(provider: BedrockProvider, path: Path, requests: list, *, endpoint: str = "embeddings",
                   model: str = TITAN) -> Path:
    with path.open("wb") as out:
        for request in requests:
            out.write(provider.format_line(request, endpoint=endpoint, model=model))  # type: ignore[arg-type]
    return path


def submit(provider: BedrockProvider, tmp_path: Path, requests: list, *, shard: str = SHARD, token: str = TOKEN,
           endpoint: str = "embeddings", model: str = TITAN) -> str:
    path = write_requests(provider, tmp_path / f"{shard}.jsonl", requests, endpoint=endpoint, model=model)
    job = provider.submit(request_file=path, endpoint=endpoint, model=model,  # type: ignore[arg-type]
                          client_token=token, shard_key=shard)
    return job.provider_job_id


def results_of(provider: BedrockProvider, arn: str, dest: Path, *, endpoint: str = "embeddings") -> list[Result]:
    files = provider.download(arn, provider.poll(arn), dest)
    return list(provider.iter_results(files, endpoint=endpoint))  # type: ignore[arg-type]


def s3_body(bucket: str, key: str) -> bytes:
    return boto3.client("s3").get_object(Bucket=bucket, Key=key)["Body"].read()


# -- configuration and formats ----------------------------------------------------------------------

def test_the_factory_names_the_missing_variable() -> None:
    with pytest.raises(ProviderError, match="LEGAL_BATCH_S3_BUCKET"):
        build_provider("bedrock", Settings(_env_file=None, bedrock_role_arn=ROLE))  # type: ignore[call-arg]
    with pytest.raises(ProviderError, match="LEGAL_BATCH_BEDROCK_ROLE_ARN"):
        build_provider("bedrock", Settings(_env_file=None, s3_bucket="my-bucket"))  # type: ignore[call-arg]


def test_the_factory_validates_bucket_role_and_prefix(
    emulator: BedrockBatchEmulator, monkeypatch: pytest.MonkeyPatch
) -> None:
    for overrides, variable in (({"s3_bucket": "Bad_Bucket"}, "LEGAL_BATCH_S3_BUCKET"),
                                ({"bedrock_role_arn": "role/x"}, "LEGAL_BATCH_BEDROCK_ROLE_ARN"),
                                ({"s3_prefix": "a/../b"}, "LEGAL_BATCH_S3_PREFIX"),
                                ({"embedding_dimensions": 768}, "LEGAL_BATCH_EMBEDDING_DIMENSIONS")):
        values = {"s3_bucket": "my-bucket", "bedrock_role_arn": ROLE, **overrides}
        with pytest.raises(ProviderError, match=variable):
            build_provider("bedrock", Settings(_env_file=None, **values))  # type: ignore[arg-type]
    monkeypatch.delenv("AWS_DEFAULT_REGION")  # AWS_REGION alone is enough
    provider: BedrockProvider = build_provider(  # type: ignore[assignment]
        "bedrock", Settings(_env_file=None, s3_bucket="my-bucket", bedrock_role_arn=ROLE))  # type: ignore[call-arg]
    assert provider.bedrock.meta.region_name == provider.runtime.meta.region_name == "us-east-1"
    assert provider.bedrock.meta.endpoint_url == emulator.bedrock_endpoint_url
    assert provider.runtime.meta.endpoint_url == emulator.bedrock_endpoint_url
    assert provider.s3.meta.endpoint_url == emulator.s3_endpoint_url
    limits = provider.limits
    assert (limits.max_records_per_job, limits.min_records_per_job, limits.max_bytes_per_file,
            limits.quota_kind, limits.max_input_tokens) == (45_000, 100, 1024**3, "jobs", 8192)
    assert provider.request_key("embeddings-00007-ab") == "legal-batch/requests/embeddings-00007-ab.jsonl"
    with pytest.raises(ProviderError, match="shard key"):
        provider.request_key("../../etc")
    monkeypatch.delenv("AWS_REGION")
    monkeypatch.setenv("AWS_CONFIG_FILE", str(Path(__file__).with_name("no-such-aws-config")))
    with pytest.raises(ProviderError, match="AWS_REGION"):
        build_provider(
            "bedrock", Settings(_env_file=None, s3_bucket="my-bucket", bedrock_role_arn=ROLE))  # type: ignore[call-arg]


def test_format_line_titan_and_claude_bytes(offline: BedrockProvider) -> None:
    provider = offline
    line = provider.format_line(EmbeddingRequest("chunk-1", "The court held."), endpoint="embeddings", model=TITAN)
    assert line == (b'{"recordId":"chunk-1","modelInput":{"inputText":"The court held.","dimensions":1024,'
                    b'"normalize":true}}\n')
    chat = ChatRequest("hn-1", "You write headnotes.", "Case text.", max_tokens=300, temperature=0.2, prefill="{ ")
    assert orjson.loads(provider.format_line(chat, endpoint="chat", model=CLAUDE)) == {
        "recordId": "hn-1",
        "modelInput": {
            "anthropic_version": "bedrock-2023-05-31",
            "max_tokens": 300,
            "temperature": 0.2,
            "system": "You write headnotes.",
            "messages": [{"role": "user", "content": "Case text."}, {"role": "assistant", "content": "{"}],
        },
    }
    no_prefill = orjson.loads(provider.format_line(ChatRequest("hn-2", "s", "u"), endpoint="chat", model=CLAUDE))
    assert no_prefill["modelInput"]["messages"] == [{"role": "user", "content": "u"}]
    with pytest.raises(UnsupportedRequest, match="cohere"):
        provider.format_line(EmbeddingRequest("x", "t"), endpoint="embeddings", model="cohere.embed-english-v3")
    with pytest.raises(UnsupportedRequest, match="meta.llama"):
        provider.format_line(ChatRequest("x", "s", "u"), endpoint="chat", model="meta.llama3-8b-instruct-v1:0")


def test_job_names_fit_the_service_pattern() -> None:
    assert job_name_for(client_token=TOKEN, shard_key=SHARD) == f"{SHARD}-{TOKEN}"
    long_name = job_name_for(client_token=TOKEN, shard_key="headnotes_" + "x" * 80)
    assert len(long_name) <= 63 and long_name.endswith(TOKEN) and JOB_NAME_RE.fullmatch(long_name)
    odd = job_name_for(client_token="token with spaces/and+slashes", shard_key="__")
    assert JOB_NAME_RE.fullmatch(odd) and len(odd) <= 63


# -- submit ---------------------------------------------------------------------------------------

def test_submit_uploads_exact_bytes_and_creates_one_valid_job(
    provider: BedrockProvider, emulator: BedrockBatchEmulator, bucket: str, tmp_path: Path
) -> None:
    path = write_requests(provider, tmp_path / "req.jsonl", embedding_requests(120))
    job = provider.submit(request_file=path, endpoint="embeddings", model=TITAN, client_token=TOKEN,
                          shard_key=SHARD)

    uploaded = s3_body(bucket, f"legal-batch/requests/{SHARD}.jsonl")
    assert uploaded == path.read_bytes()
    lines = [orjson.loads(line) for line in uploaded.splitlines()]
    assert len(lines) == 120
    assert lines[7] == {"recordId": "chunk-00007",
                        "modelInput": {"inputText": text_of(7), "dimensions": 1024, "normalize": True}}

    creates = emulator.requests_for("CreateModelInvocationJob")
    assert len(creates) == 1
    body = creates[0].json()
    assert JOB_NAME_RE.fullmatch(body["jobName"]) and len(body["jobName"]) <= 63
    assert SHARD in body["jobName"]
    assert body["clientRequestToken"] == TOKEN
    assert body["roleArn"] == ROLE and body["modelId"] == TITAN and body["timeoutDurationInHours"] == 72
    assert body["inputDataConfig"] == {"s3InputDataConfig": {
        "s3Uri": f"s3://{bucket}/legal-batch/requests/{SHARD}.jsonl", "s3InputFormat": "JSONL"}}
    assert body["outputDataConfig"] == {"s3OutputDataConfig": {"s3Uri": f"s3://{bucket}/legal-batch/outputs/{SHARD}/"}}
    assert job.provider_job_id in emulator.jobs
    assert job.input_location == f"s3://{bucket}/legal-batch/requests/{SHARD}.jsonl"
    assert (job.status.state, job.status.raw_status) == ("pending", "Submitted")


def test_large_request_file_goes_up_in_parts(bucket: str, emulator: BedrockBatchEmulator, tmp_path: Path) -> None:
    provider = make_provider(bucket, multipart_threshold=5 * 1024 * 1024)
    path = tmp_path / "big.jsonl"
    line = provider.format_line(EmbeddingRequest("c", "x" * 1000), endpoint="embeddings", model=TITAN)
    with path.open("wb") as out:
        for _ in range(6 * 1024 * 1024 // len(line) + 1):
            out.write(line)
    provider.submit(request_file=path, endpoint="embeddings", model=TITAN, client_token=TOKEN, shard_key=SHARD)
    key = f"legal-batch/requests/{SHARD}.jsonl"
    head = boto3.client("s3").head_object(Bucket=bucket, Key=key)
    assert head["ETag"].strip('"').endswith("-2")  # a multipart upload of two parts
    assert s3_body(bucket, key) == path.read_bytes()


# -- lifecycle, download, results ---------------------------------------------------------------------

def test_lifecycle_to_completed_and_results_joined_on_record_id(
    provider: BedrockProvider, emulator: BedrockBatchEmulator, bucket: str, tmp_path: Path
) -> None:
    requests = embedding_requests(150)
    emulator.fail_record_ids.update({
        "chunk-00003": (400, "Malformed input request: #/inputText: expected type: String"),
        "chunk-00004": ("ThrottlingException", "Too many requests, please wait before trying again."),
        "chunk-00005": ("503", "Service unavailable"),
    })
    arn = submit(provider, tmp_path, requests)
    job_id = arn.rsplit("/", 1)[-1]

    states = [provider.poll(arn).state]
    for _ in range(4):
        emulator.advance(arn)
        states.append(provider.poll(arn).state)
    assert states == ["pending", "pending", "pending", "running", "completed"]
    status = provider.poll(arn)
    assert (status.raw_status, status.total, status.completed, status.failed) == ("Completed", 150, 147, 3)
    assert status.output_location == f"s3://{bucket}/legal-batch/outputs/{SHARD}/{job_id}/"

    files = provider.download(arn, status, tmp_path / "out")
    assert sorted(f.name for f in files) == [f"{SHARD}.jsonl.out", "manifest.json.out"]
    manifest = read_manifest(tmp_path / "out" / "manifest.json.out")
    assert (manifest.total_records, manifest.success_records, manifest.error_records) == (150, 147, 3)

    results = list(provider.iter_results(files, endpoint="embeddings"))
    assert len(results) == 150
    assert [r.custom_id for r in results] != [r.custom_id for r in requests]  # output order differs
    by_id = {r.custom_id: r for r in results}
    assert set(by_id) == {r.custom_id for r in requests}
    for request in requests[6:]:
        result = by_id[request.custom_id]
        assert result.error is None and result.vector is not None
        assert result.vector.dtype == np.float32 and result.vector.shape == (1024,)
        assert np.allclose(result.vector, deterministic_unit_vector(request.text, 1024), atol=1e-6)
        assert result.input_tokens > 0
    assert manifest.input_tokens == sum(r.input_tokens for r in results)
    bad, throttled, unavailable = by_id["chunk-00003"], by_id["chunk-00004"], by_id["chunk-00005"]
    assert bad.error is not None and bad.error.startswith("400: Malformed input") and not bad.retryable
    assert throttled.error is not None and throttled.error.startswith("ThrottlingException") and throttled.retryable
    assert unavailable.error == "503: Service unavailable" and unavailable.retryable
    assert bad.where == f"{SHARD}.jsonl.out:{[r.custom_id for r in results].index('chunk-00003') + 1}"


def test_claude_results_text_finish_reason_and_usage(
    provider: BedrockProvider, emulator: BedrockBatchEmulator, bucket: str, tmp_path: Path
) -> None:
    requests = [ChatRequest(f"hn-{i:04d}", "Write a headnote.", f"Case {i}. The contract was void for mistake.",
                            max_tokens=3 if i == 0 else 200, prefill="Summary")
                for i in range(100)]
    arn = submit(provider, tmp_path, requests, endpoint="chat", model=CLAUDE, shard="headnotes-00001-aa")
    line = orjson.loads(s3_body(bucket, "legal-batch/requests/headnotes-00001-aa.jsonl").splitlines()[1])
    assert line["modelInput"]["messages"][-1] == {"role": "assistant", "content": "Summary"}
    emulator.complete(arn)
    results = {r.custom_id: r for r in results_of(provider, arn, tmp_path / "out", endpoint="chat")}
    assert len(results) == 100
    one = results["hn-0001"]
    assert one.text == "Summary: Case 1. The contract was void for mistake."  # no prefill prepended
    assert one.finish_reason == "stop" and one.input_tokens > 0 and one.output_tokens > 0
    assert results["hn-0000"].finish_reason == "length"


def test_malformed_and_odd_output_lines(offline: BedrockProvider, tmp_path: Path) -> None:
    provider = offline
    out = tmp_path / "part.jsonl.out"
    lines = [
        b'{"recordId":"a","modelInput":{},"modelOutput":{"embedding":[0.5,0.5],"inputTextTokenCount":4}}',
        b'{"recordId":"b","modelInput":{},"modelOutp',
        b'{"recordId":"c","modelInput":{},"error":{"errorCode":500,"errorMessage":"Internal error"}}',
        b'{"recordId":"d","modelInput":{},"error":{"errorCode":429,"errorMessage":"Too many requests"}}',
        b'{"recordId":"e","modelInput":{},"error":{"errorCode":"ValidationException","errorMessage":"bad"}}',
        b'{"recordId":"f","modelInput":{},"modelOutput":{"inputTextTokenCount":4}}',
        b'{"modelInput":{},"modelOutput":{"embedding":[1.0]}}',
        b'[1, 2]',
        b'',
        b'{"recordId":"g","modelInput":{},"error":{"errorCode":"ModelTimeoutException","errorMessage":"slow"}}',
    ]
    out.write_bytes(b"\n".join(lines) + b"\n")
    (tmp_path / "manifest.json.out").write_bytes(b'{"totalRecordCount": 7}')
    results = list(provider.iter_results([tmp_path / "manifest.json.out", out], endpoint="embeddings"))
    summary = [(r.custom_id, r.line_no, r.error is None, r.retryable) for r in results]
    assert summary == [("a", 1, True, True), (None, 2, False, True), ("c", 3, False, True), ("d", 4, False, True),
                       ("e", 5, False, False), ("f", 6, False, True), (None, 7, False, True),
                       (None, 8, False, True), ("g", 10, False, True)]
    assert results[0].vector is not None and results[0].input_tokens == 4
    assert "not valid JSON" in (results[1].error or "") and results[1].where == "part.jsonl.out:2"
    assert results[2].error == "500: Internal error"
    assert "no recordId" in (results[6].error or "")


@pytest.mark.parametrize(
    ("finish", "raw", "state"),
    [("partial", "PartiallyCompleted", "partial"), ("expire", "Expired", "expired"),
     ("stop_job", "Stopped", "cancelled")],
)
def test_partial_expired_and_stopped_jobs_give_their_partial_output(
    provider: BedrockProvider, emulator: BedrockBatchEmulator, tmp_path: Path, finish: str, raw: str, state: str
) -> None:
    arn = submit(provider, tmp_path, embedding_requests(150))
    getattr(emulator, finish)(arn, completed_fraction=0.4)
    status = provider.poll(arn)
    assert (status.state, status.raw_status, status.terminal) == (state, raw, True)
    if finish == "expire":
        assert status.message is not None and "timed out" in status.message
    results = results_of(provider, arn, tmp_path / "out")
    assert sorted(r.custom_id for r in results) == [f"chunk-{i:05d}" for i in range(60)]
    assert all(r.vector is not None for r in results)


def test_cancel_stops_the_job_and_is_quiet_once_finished(
    provider: BedrockProvider, emulator: BedrockBatchEmulator, tmp_path: Path
) -> None:
    arn = submit(provider, tmp_path, embedding_requests(100))
    provider.cancel(arn)
    assert (provider.poll(arn).state, provider.poll(arn).raw_status) == ("running", "Stopping")
    emulator.advance(arn)
    assert provider.poll(arn).state == "cancelled"
    provider.cancel(arn)  # already stopped: nothing to do
    assert results_of(provider, arn, tmp_path / "out") == []


def test_job_below_minimum_records_fails_and_has_no_output(
    provider: BedrockProvider, emulator: BedrockBatchEmulator, tmp_path: Path
) -> None:
    arn = submit(provider, tmp_path, embedding_requests(99))
    emulator.complete(arn)
    status = provider.poll(arn)
    assert status.state == "failed" and status.message is not None and "99" in status.message
    assert provider.download(arn, status, tmp_path / "out") == []


# -- quota, validation, reconciliation --------------------------------------------------------------

def test_quota_and_throttling_on_create_raise_provider_quota_error(
    provider: BedrockProvider, emulator: BedrockBatchEmulator, tmp_path: Path
) -> None:
    emulator.max_active_jobs = 1
    submit(provider, tmp_path, embedding_requests(100))
    with pytest.raises(ProviderQuotaError, match="ServiceQuotaExceededException"):
        submit(provider, tmp_path, embedding_requests(100), shard="embeddings-00002-bb", token="lb-second")

    emulator.max_active_jobs = 20
    emulator.add_fault(operation="CreateModelInvocationJob", status=429, error_type="ThrottlingException", times=2)
    with pytest.raises(ProviderQuotaError, match="ThrottlingException") as exc:
        submit(provider, tmp_path, embedding_requests(100), shard="embeddings-00003-cc", token="lb-third")
    assert exc.value.retryable
    assert len(emulator.jobs) == 1  # botocore tried twice (one retry), nothing was created


def test_validation_exception_is_not_retryable(
    provider: BedrockProvider, emulator: BedrockBatchEmulator, tmp_path: Path
) -> None:
    emulator.add_fault(operation="CreateModelInvocationJob", status=400, error_type="ValidationException",
                       message="The provided model identifier is invalid.")
    with pytest.raises(ProviderError, match="model identifier is invalid") as exc:
        submit(provider, tmp_path, embedding_requests(100))
    assert not exc.value.retryable and not isinstance(exc.value, ProviderQuotaError)
    assert len(emulator.requests_for("CreateModelInvocationJob")) == 1


def test_find_job_after_a_crash_between_create_and_record(
    provider: BedrockProvider, emulator: BedrockBatchEmulator, bucket: str, tmp_path: Path
) -> None:
    for n in range(3):  # other jobs in the account
        submit(provider, tmp_path, embedding_requests(100), shard=f"other-{n}", token=f"lb-other{n}")
    arn = submit(provider, tmp_path, embedding_requests(100))  # ... and then the process died

    restarted = make_provider(bucket)
    found = restarted.find_job(client_token=TOKEN)
    assert found is not None and found.provider_job_id == arn
    assert found.input_location == f"s3://{bucket}/legal-batch/requests/{SHARD}.jsonl"
    assert found.status.state == "pending"
    assert restarted.find_job(client_token="lb-never-submitted") is None
    listed = emulator.requests_for("ListModelInvocationJobs")[-2]
    assert listed.query["nameContains"] == [TOKEN]

    again = submit(restarted, tmp_path, embedding_requests(100))  # a blind resubmit is still one job
    assert again == arn and len(emulator.jobs) == 4


# -- real time ----------------------------------------------------------------------------------------

def test_realtime_retries_injected_throttling_and_keeps_order(bucket: str, emulator: BedrockBatchEmulator) -> None:
    provider = make_provider(bucket, max_retries=0, realtime_attempts=5)  # tenacity does all the retrying
    emulator.add_runtime_fault(status=429, error_type="ThrottlingException", times=3)
    requests = embedding_requests(10)
    results = list(provider.realtime(requests, endpoint="embeddings", model=TITAN))
    assert [r.custom_id for r in results] == [r.custom_id for r in requests]
    for request, result in zip(requests, results, strict=True):
        assert result.error is None and result.vector is not None and result.input_tokens > 0
        assert np.allclose(result.vector, deterministic_unit_vector(request.text, 1024), atol=1e-6)
    calls = emulator.requests_for("InvokeModel")
    assert len(calls) == 13
    assert calls[0].path == f"/model/{TITAN}/invoke"
    assert orjson.loads(calls[-1].body)["dimensions"] == 1024


def test_realtime_retries_in_one_layer(bucket: str, emulator: BedrockBatchEmulator) -> None:
    provider = make_provider(bucket, max_retries=5, realtime_attempts=2)  # botocore retries S3 and Bedrock only
    emulator.add_runtime_fault(status=503, error_type="ServiceUnavailableException", times=10)
    [result] = provider.realtime([EmbeddingRequest("busy", "text")], endpoint="embeddings", model=TITAN)
    assert result.error is not None and result.error.startswith("ServiceUnavailableException")
    assert len(emulator.requests_for("InvokeModel")) == 2


def test_realtime_errors_become_results(bucket: str, emulator: BedrockBatchEmulator) -> None:
    provider = make_provider(bucket, max_retries=0, realtime_attempts=2)

    def responder(model_id: str, model_input: dict[str, Any]) -> dict[str, Any]:
        if "refuse" in str(model_input.get("inputText")):
            raise RecordError(400, "Malformed input request: refused")
        return default_responder(model_id, model_input)

    emulator.responder = responder
    results = list(provider.realtime([EmbeddingRequest("ok", "fine text"), EmbeddingRequest("no", "refuse me")],
                                     endpoint="embeddings", model=TITAN))
    assert results[0].vector is not None
    assert results[1].error == "ValidationException: Malformed input request: refused"
    assert not results[1].retryable
    emulator.add_runtime_fault(status=503, error_type="ServiceUnavailableException", times=2)
    [exhausted] = provider.realtime([EmbeddingRequest("busy", "text")], endpoint="embeddings", model=TITAN)
    assert exhausted.error is not None and exhausted.error.startswith("ServiceUnavailableException")
    assert exhausted.retryable

    chat = ChatRequest("hn", "Write a headnote.", "The appeal is allowed.", prefill="Summary")
    [answer] = provider.realtime([chat], endpoint="chat", model=CLAUDE)
    assert answer.text == "Summary: The appeal is allowed." and answer.finish_reason == "stop"


# -- end to end ---------------------------------------------------------------------------------------

def test_embeddings_flow_end_to_end_on_bedrock(
    lb_env: Settings, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from legal_batch.definitions import FLOWS_BY_NAME, defs
    from legal_batch.driver import FlowDriver

    with running_bedrock_emulator(auto_advance=True) as emulator:
        bucket = point_at_emulator(monkeypatch, emulator)
        monkeypatch.setenv("LEGAL_BATCH_EMBEDDINGS_PROVIDER", "bedrock")
        monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster"))
        (tmp_path / "dagster").mkdir()
        settings = get_settings(fresh=True)
        with connect(settings.database_url or "") as conn:  # our schema on its search path
            seed_demo_cases(conn, cases=10)  # 10 demo cases chunk into well over 100 records

        run = FlowDriver(FLOWS_BY_NAME["embeddings"], defs, flow="embeddings", echo=lambda s: None).run(
            wait=True, poll_interval=0.05)
        assert run.failed_runs == []

        with connect(settings.database_url or "") as conn:
            chunks = conn.execute("SELECT count(*) FROM case_chunks").fetchone()[0]
            assert chunks >= 100  # one shard above Bedrock's minimum of 100 records
            assert conn.execute("SELECT count(*) FROM case_embeddings WHERE model = %s",
                                (TITAN,)).fetchone()[0] == chunks
            jobs = conn.execute("SELECT shard_key, state, provider, provider_job_id, request_count, input_tokens"
                                " FROM batch_jobs WHERE flow = 'embeddings'").fetchall()
            items = dict(conn.execute("SELECT state, count(*) FROM batch_items WHERE flow = 'embeddings'"
                                      " GROUP BY state").fetchall())
            text, stored = conn.execute(
                "SELECT c.chunk_text, e.embedding::text FROM case_chunks c JOIN case_embeddings e"
                " USING (case_id, chunk_index) ORDER BY c.case_id, c.chunk_index LIMIT 1").fetchone()

    assert items == {"done": chunks}
    assert len(jobs) == 1
    shard_key, state, provider_name, arn, request_count, input_tokens = jobs[0]
    assert (state, provider_name, request_count) == ("ingested", "bedrock", chunks)
    assert arn in emulator.jobs and emulator.jobs[arn]["status"] == "Completed" and input_tokens > 0
    creates = emulator.requests_for("CreateModelInvocationJob")
    assert len(creates) == 1  # exactly one create per shard
    assert creates[0].json()["inputDataConfig"]["s3InputDataConfig"]["s3Uri"] == (
        f"s3://{bucket}/legal-batch/requests/{shard_key}.jsonl")
    vector = np.array([float(v) for v in stored.strip("[]").split(",")], dtype=np.float32)
    assert np.allclose(vector, deterministic_unit_vector(text, 1024), atol=1e-6)
