"""Drive the Bedrock batch emulator with the real boto3 clients over HTTP (moto's server holds S3)."""

from __future__ import annotations

import json
import math
import uuid
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from legal_batch_tests.emulators.bedrock_batch import (
    BedrockBatchEmulator,
    deterministic_unit_vector,
    running_bedrock_emulator,
)

TITAN = "amazon.titan-embed-text-v2:0"
CLAUDE = "anthropic.claude-3-haiku-20240307-v1:0"
ROLE = "arn:aws:iam::123456789012:role/BedrockBatchRole"
TERMINAL = {"Completed", "PartiallyCompleted", "Failed", "Stopped", "Expired"}


@pytest.fixture
def emulator() -> Iterator[BedrockBatchEmulator]:
    with running_bedrock_emulator() as emu:
        yield emu


@pytest.fixture
def bucket(emulator: BedrockBatchEmulator) -> str:
    name = f"legal-batch-{uuid.uuid4().hex[:10]}"
    s3_client(emulator).create_bucket(Bucket=name)
    return name


def s3_client(emu: BedrockBatchEmulator) -> Any:
    return boto3.client(
        "s3",
        endpoint_url=emu.s3_endpoint_url,
        region_name=emu.region,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )


def bedrock_client(emu: BedrockBatchEmulator, **config: Any) -> Any:
    return boto3.client(
        "bedrock",
        endpoint_url=emu.bedrock_endpoint_url,
        region_name=emu.region,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        config=Config(**config) if config else None,
    )


def titan_records(n: int, *, dimensions: int = 256) -> list[dict[str, Any]]:
    return [
        {
            "recordId": f"doc{i:05d}",
            "modelInput": {
                "inputText": f"Judgment {i}: the appeal is dismissed.",
                "dimensions": dimensions,
                "normalize": True,
            },
        }
        for i in range(n)
    ]


def claude_records(n: int, start: int = 0) -> list[dict[str, Any]]:
    return [
        {
            "recordId": f"hn{i:05d}",
            "modelInput": {
                "anthropic_version": "bedrock-2023-05-31",
                "max_tokens": 256,
                "system": "Write a one-paragraph headnote.",
                "messages": [
                    {"role": "user", "content": f"Case {i}. The court held that the contract was void."}
                ],
            },
        }
        for i in range(start, start + n)
    ]


def put_jsonl(emu: BedrockBatchEmulator, bucket: str, key: str, records: list[dict[str, Any]]) -> None:
    body = "".join(json.dumps(r) + "\n" for r in records).encode()
    s3_client(emu).put_object(Bucket=bucket, Key=key, Body=body)


def read_jsonl(emu: BedrockBatchEmulator, bucket: str, key: str) -> list[dict[str, Any]]:
    body = s3_client(emu).get_object(Bucket=bucket, Key=key)["Body"].read().decode()
    return [json.loads(line) for line in body.splitlines() if line.strip()]


def create_job(client: Any, bucket: str, input_key: str, *, model_id: str = TITAN, **overrides: Any) -> str:
    request: dict[str, Any] = {
        "jobName": f"job-{uuid.uuid4().hex[:8]}",
        "roleArn": ROLE,
        "modelId": model_id,
        "inputDataConfig": {
            "s3InputDataConfig": {"s3Uri": f"s3://{bucket}/{input_key}", "s3InputFormat": "JSONL"}
        },
        "outputDataConfig": {"s3OutputDataConfig": {"s3Uri": f"s3://{bucket}/output/"}},
        **overrides,
    }
    return str(client.create_model_invocation_job(**request)["jobArn"])


def job_id(job_arn: str) -> str:
    return job_arn.rsplit("/", 1)[-1]


def error_code(exc: pytest.ExceptionInfo[ClientError]) -> str:
    return str(exc.value.response["Error"]["Code"])


def test_titan_lifecycle_150_records_round_trip(emulator: BedrockBatchEmulator, bucket: str) -> None:
    records = titan_records(150)
    records[0]["modelInput"].pop("dimensions")  # Titan V2 default: 1024
    put_jsonl(emulator, bucket, "input/embeddings.jsonl", records)
    emulator.fail_record_ids["doc00007"] = ("ModelErrorException", "the model could not embed this text")
    client = bedrock_client(emulator)

    arn = create_job(client, bucket, "input/embeddings.jsonl", timeoutDurationInHours=72)
    assert arn.startswith("arn:aws:bedrock:us-east-1:123456789012:model-invocation-job/")
    assert len(job_id(arn)) == 12
    job = client.get_model_invocation_job(jobIdentifier=arn)
    assert job["status"] == "Submitted"
    assert isinstance(job["submitTime"], datetime)
    assert (job["jobExpirationTime"] - job["submitTime"]).total_seconds() == 72 * 3600
    assert "endTime" not in job

    seen = [emulator.advance(arn) for _ in range(4)]
    assert seen == ["Validating", "Scheduled", "InProgress", "Completed"]
    job = client.get_model_invocation_job(jobIdentifier=arn)
    assert job["status"] == "Completed"
    assert isinstance(job["endTime"], datetime)
    assert (job["totalRecordCount"], job["successRecordCount"], job["errorRecordCount"]) == (150, 149, 1)

    keys = {
        o["Key"] for o in s3_client(emulator).list_objects_v2(Bucket=bucket, Prefix="output/")["Contents"]
    }
    prefix = f"output/{job_id(arn)}"
    assert keys == {f"{prefix}/embeddings.jsonl.out", f"{prefix}/manifest.json.out"}
    lines = read_jsonl(emulator, bucket, f"{prefix}/embeddings.jsonl.out")
    assert [line["recordId"] for line in lines] != [
        r["recordId"] for r in records
    ]  # consumers must join on id
    by_id = {line["recordId"]: line for line in lines}
    assert set(by_id) == {r["recordId"] for r in records}

    assert by_id["doc00007"]["error"] == {
        "errorCode": "ModelErrorException",
        "errorMessage": "the model could not embed this text",
    }
    assert "modelOutput" not in by_id["doc00007"]
    output = by_id["doc00001"]["modelOutput"]
    text = records[1]["modelInput"]["inputText"]
    assert by_id["doc00001"]["modelInput"] == records[1]["modelInput"]
    assert output["embedding"] == output["embeddingsByType"]["float"] == deterministic_unit_vector(text, 256)
    assert math.isclose(math.fsum(v * v for v in output["embedding"]), 1.0)
    assert output["inputTextTokenCount"] > 0
    assert len(by_id["doc00000"]["modelOutput"]["embedding"]) == 1024

    manifest = json.loads(
        s3_client(emulator).get_object(Bucket=bucket, Key=f"{prefix}/manifest.json.out")["Body"].read()
    )
    assert manifest["totalRecordCount"] == manifest["processedRecordCount"] == 150
    assert (manifest["successRecordCount"], manifest["errorRecordCount"]) == (149, 1)
    assert manifest["inputTokenCount"] == sum(
        line["modelOutput"]["inputTextTokenCount"] for line in lines if "modelOutput" in line
    )
    assert manifest["outputTokenCount"] == 0


def test_claude_prefix_input_finishes_by_polling_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    with running_bedrock_emulator(auto_advance=True) as emu:
        for name, value in emu.env().items():
            monkeypatch.setenv(name, value)
        s3, client = boto3.client("s3"), boto3.client("bedrock")  # endpoints come from env() alone
        bucket = f"legal-batch-{uuid.uuid4().hex[:10]}"
        s3.create_bucket(Bucket=bucket)
        put_jsonl(emu, bucket, "batch/part-1.jsonl", claude_records(60))
        put_jsonl(emu, bucket, "batch/part-2.jsonl", claude_records(60, start=60))
        s3.put_object(Bucket=bucket, Key="batch/README.txt", Body=b"not input")
        emu.fail_record_ids["hn00061"] = ("400", "bad request")

        arn = create_job(client, bucket, "batch/", model_id=CLAUDE)
        statuses: list[str] = []
        while not statuses or statuses[-1] not in TERMINAL:
            statuses.append(client.get_model_invocation_job(jobIdentifier=arn)["status"])
        assert statuses == ["Validating", "Scheduled", "InProgress", "Completed"]

        part1 = read_jsonl(emu, bucket, f"output/{job_id(arn)}/part-1.jsonl.out")
        part2 = read_jsonl(emu, bucket, f"output/{job_id(arn)}/part-2.jsonl.out")
        assert {line["recordId"] for line in part1} == {f"hn{i:05d}" for i in range(60)}
        assert {line["recordId"] for line in part2} == {f"hn{i:05d}" for i in range(60, 120)}
        message = next(line for line in part1 if line["recordId"] == "hn00003")["modelOutput"]
        assert message["type"] == "message" and message["role"] == "assistant"
        assert message["stop_reason"] == "end_turn"
        assert message["model"] == "claude-3-haiku-20240307"
        assert (
            message["content"][0]["type"] == "text" and "contract was void" in message["content"][0]["text"]
        )
        assert message["usage"]["input_tokens"] > 0 and message["usage"]["output_tokens"] > 0
        failed = next(line for line in part2 if line["recordId"] == "hn00061")
        assert failed["error"] == {"errorCode": "400", "errorMessage": "bad request"}

        manifest = json.loads(
            s3.get_object(Bucket=bucket, Key=f"output/{job_id(arn)}/manifest.json.out")["Body"].read()
        )
        assert (manifest["totalRecordCount"], manifest["errorRecordCount"]) == (120, 1)
        ok_lines = [line["modelOutput"]["usage"] for line in part1 + part2 if "modelOutput" in line]
        assert manifest["outputTokenCount"] == sum(u["output_tokens"] for u in ok_lines)


def test_custom_responder_and_record_ids_generated(emulator: BedrockBatchEmulator, bucket: str) -> None:
    emulator.responder = lambda model_id, model_input: {"echo": model_input["q"], "model": model_id}
    put_jsonl(emulator, bucket, "in.jsonl", [{"modelInput": {"q": i}} for i in range(100)])
    arn = create_job(bedrock_client(emulator), bucket, "in.jsonl", model_id="meta.llama3-8b-instruct-v1:0")
    emulator.complete(arn)
    lines = read_jsonl(emulator, bucket, f"output/{job_id(arn)}/in.jsonl.out")
    assert len({line["recordId"] for line in lines}) == 100
    assert sorted(line["modelOutput"]["echo"] for line in lines) == list(range(100))


def test_create_is_idempotent_on_client_request_token(emulator: BedrockBatchEmulator, bucket: str) -> None:
    client = bedrock_client(emulator)
    first = create_job(client, bucket, "in.jsonl", jobName="nightly-embeddings", clientRequestToken="token-1")
    again = create_job(client, bucket, "in.jsonl", jobName="nightly-embeddings", clientRequestToken="token-1")
    assert again == first
    assert list(emulator.jobs) == [first]
    assert emulator.jobs[first]["clientRequestToken"] == "token-1"

    with pytest.raises(ClientError) as exc:
        create_job(client, bucket, "in.jsonl", jobName="nightly-embeddings", clientRequestToken="token-2")
    assert error_code(exc) == "ConflictException"
    assert list(emulator.jobs) == [first]


@pytest.mark.parametrize(
    ("overrides", "member"),
    [
        ({"jobName": "bad_name!"}, "jobName"),
        ({"jobName": "-leading-dash"}, "jobName"),
        ({"timeoutDurationInHours": 200}, "timeoutDurationInHours"),
        ({"roleArn": "not-a-role"}, "roleArn"),
        ({"outputDataConfig": {"s3OutputDataConfig": {"s3Uri": "https://example.com/out"}}}, "s3Uri"),
    ],
)
def test_invalid_create_is_a_validation_exception(
    emulator: BedrockBatchEmulator, bucket: str, overrides: dict[str, Any], member: str
) -> None:
    with pytest.raises(ClientError) as exc:
        create_job(bedrock_client(emulator), bucket, "in.jsonl", **overrides)
    assert error_code(exc) == "ValidationException"
    assert exc.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400
    assert member in exc.value.response["Error"]["Message"]
    assert emulator.jobs == {}


def test_bad_input_fails_the_job(emulator: BedrockBatchEmulator, bucket: str) -> None:
    client = bedrock_client(emulator)
    put_jsonl(emulator, bucket, "small.jsonl", titan_records(99))
    small = create_job(client, bucket, "small.jsonl")
    emulator.complete(small)
    job = client.get_model_invocation_job(jobIdentifier=small)
    assert job["status"] == "Failed"
    assert "99" in job["message"] and "100" in job["message"]
    assert isinstance(job["endTime"], datetime)

    body = "".join(json.dumps(r) + "\n" for r in titan_records(120)) + "{not json\n"
    s3_client(emulator).put_object(Bucket=bucket, Key="broken.jsonl", Body=body.encode())
    broken = create_job(client, bucket, "broken.jsonl")
    assert [emulator.advance(broken) for _ in range(2)] == ["Validating", "Failed"]
    assert "line 121" in client.get_model_invocation_job(jobIdentifier=broken)["message"]

    put_jsonl(emulator, bucket, "ok.jsonl", titan_records(100))
    no_output_bucket = create_job(
        client,
        bucket,
        "ok.jsonl",
        outputDataConfig={"s3OutputDataConfig": {"s3Uri": "s3://no-such-bucket-here/out/"}},
    )
    emulator.complete(no_output_bucket)
    assert emulator.jobs[no_output_bucket]["status"] == "Failed"
    assert "NoSuchBucket" in emulator.jobs[no_output_bucket]["message"]

    missing = create_job(client, bucket, "nothing-here/")
    emulator.complete(missing)
    assert emulator.jobs[missing]["status"] == "Failed"
    assert "Contents" not in s3_client(emulator).list_objects_v2(Bucket=bucket, Prefix="output/")


def test_partial_expired_and_stopped_jobs_write_partial_output(
    emulator: BedrockBatchEmulator, bucket: str
) -> None:
    client = bedrock_client(emulator)
    put_jsonl(emulator, bucket, "in.jsonl", titan_records(150))

    def outputs(arn: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        lines = read_jsonl(emulator, bucket, f"output/{job_id(arn)}/in.jsonl.out")
        manifest = read_jsonl(emulator, bucket, f"output/{job_id(arn)}/manifest.json.out")[0]
        return lines, manifest

    partial = create_job(client, bucket, "in.jsonl")
    emulator.partial(partial)
    lines, manifest = outputs(partial)
    assert client.get_model_invocation_job(jobIdentifier=partial)["status"] == "PartiallyCompleted"
    assert {line["recordId"] for line in lines} == {f"doc{i:05d}" for i in range(75)}
    assert (manifest["totalRecordCount"], manifest["processedRecordCount"]) == (150, 75)

    expired = create_job(client, bucket, "in.jsonl")
    emulator.expire(expired, completed_fraction=0.2)
    job = client.get_model_invocation_job(jobIdentifier=expired)
    assert job["status"] == "Expired" and "timed out" in job["message"]
    assert len(outputs(expired)[0]) == 30

    stopped = create_job(client, bucket, "in.jsonl")
    emulator.stop_job(stopped, completed_fraction=0.4)
    assert client.get_model_invocation_job(jobIdentifier=stopped)["status"] == "Stopped"
    assert outputs(stopped)[1]["processedRecordCount"] == 60

    via_api = create_job(client, bucket, "in.jsonl")
    for _ in range(3):
        emulator.advance(via_api)  # InProgress
    client.stop_model_invocation_job(jobIdentifier=via_api)
    assert client.get_model_invocation_job(jobIdentifier=via_api)["status"] == "Stopping"
    assert emulator.advance(via_api) == "Stopped"
    lines, manifest = outputs(via_api)
    assert lines == [] and manifest["processedRecordCount"] == 0
    with pytest.raises(ClientError) as exc:
        client.stop_model_invocation_job(jobIdentifier=via_api)
    assert error_code(exc) == "ValidationException"


def test_list_filters_and_paginates(emulator: BedrockBatchEmulator, bucket: str) -> None:
    client = bedrock_client(emulator)
    arns = [create_job(client, bucket, "in.jsonl", jobName=f"headnotes-{i}") for i in range(5)]
    create_job(client, bucket, "in.jsonl", jobName="embeddings-0")
    for arn in arns[:2]:
        emulator.set_status(arn, "Completed")

    completed = client.list_model_invocation_jobs(statusEquals="Completed")["invocationJobSummaries"]
    assert {s["jobArn"] for s in completed} == set(arns[:2])
    assert all(isinstance(s["submitTime"], datetime) for s in completed)

    page = client.list_model_invocation_jobs(nameContains="headnotes", maxResults=2, sortOrder="Ascending")
    assert [s["jobArn"] for s in page["invocationJobSummaries"]] == arns[:2]
    assert "nextToken" in page
    last = emulator.requests[-1]
    assert last.operation == "ListModelInvocationJobs"
    assert last.query["maxResults"] == ["2"] and last.query["nameContains"] == ["headnotes"]

    pages = client.get_paginator("list_model_invocation_jobs").paginate(
        nameContains="headnotes", PaginationConfig={"PageSize": 2}
    )
    summaries = [s for p in pages for s in p["invocationJobSummaries"]]
    assert [s["jobArn"] for s in summaries] == arns[::-1]  # default: newest first

    submitted = client.list_model_invocation_jobs(statusEquals="Submitted")["invocationJobSummaries"]
    assert len(submitted) == 4
    with pytest.raises(ClientError) as exc:
        client.list_model_invocation_jobs(nextToken="garbage")
    assert error_code(exc) == "ValidationException"


def test_job_identifier_arn_is_percent_encoded_in_the_path(
    emulator: BedrockBatchEmulator, bucket: str
) -> None:
    client = bedrock_client(emulator)
    arn = create_job(client, bucket, "in.jsonl")
    assert client.get_model_invocation_job(jobIdentifier=arn)["jobArn"] == arn
    get = emulator.requests[-1]
    assert get.method == "GET" and get.operation == "GetModelInvocationJob"
    assert get.raw_path == "/model-invocation-job/" + arn.replace(":", "%3A").replace("/", "%2F")
    assert get.path == f"/model-invocation-job/{arn}"

    assert client.get_model_invocation_job(jobIdentifier=job_id(arn))["jobArn"] == arn  # bare id works too
    client.stop_model_invocation_job(jobIdentifier=arn)
    stop = emulator.requests[-1]
    assert stop.method == "POST" and stop.path == f"/model-invocation-job/{arn}/stop"
    assert emulator.jobs[arn]["status"] == "Stopping"

    create = next(r for r in emulator.requests if r.operation == "CreateModelInvocationJob")
    assert create.json()["modelId"] == TITAN and create.headers["Content-Type"].startswith("application/")

    with pytest.raises(ClientError) as exc:
        client.get_model_invocation_job(jobIdentifier="abcdefabcdef")
    assert error_code(exc) == "ResourceNotFoundException"
    assert exc.value.response["ResponseMetadata"]["HTTPStatusCode"] == 404
    with pytest.raises(ClientError) as exc:
        client.get_model_invocation_job(jobIdentifier="NOT-AN-ID")
    assert error_code(exc) == "ValidationException"


def test_injected_throttling_is_retried_by_standard_mode(emulator: BedrockBatchEmulator, bucket: str) -> None:
    emulator.add_fault(operation="CreateModelInvocationJob", status=429, error_type="ThrottlingException")
    client = bedrock_client(emulator, retries={"mode": "standard", "total_max_attempts": 3})
    response = client.create_model_invocation_job(
        jobName="retried",
        roleArn=ROLE,
        modelId=TITAN,
        inputDataConfig={"s3InputDataConfig": {"s3Uri": f"s3://{bucket}/in.jsonl"}},
        outputDataConfig={"s3OutputDataConfig": {"s3Uri": f"s3://{bucket}/output/"}},
    )
    assert response["ResponseMetadata"]["RetryAttempts"] == 1
    creates = emulator.requests_for("CreateModelInvocationJob")
    assert len(creates) == 2
    assert creates[0].json()["clientRequestToken"] == creates[1].json()["clientRequestToken"]
    assert list(emulator.jobs) == [response["jobArn"]]

    emulator.add_fault(
        operation="GetModelInvocationJob", status=429, error_type="ThrottlingException", times=5
    )
    with pytest.raises(ClientError) as exc:
        client.get_model_invocation_job(jobIdentifier=response["jobArn"])
    assert error_code(exc) == "ThrottlingException"
    assert len(emulator.requests_for("GetModelInvocationJob")) == 3


def test_quota_and_non_retryable_faults(bucket: str, emulator: BedrockBatchEmulator) -> None:
    emulator.max_active_jobs = 1
    client = bedrock_client(emulator, retries={"mode": "standard", "total_max_attempts": 3})
    create_job(client, bucket, "in.jsonl")
    with pytest.raises(ClientError) as exc:
        create_job(client, bucket, "in.jsonl")
    assert error_code(exc) == "ServiceQuotaExceededException"

    emulator.add_fault(
        operation="ListModelInvocationJobs", status=403, error_type="AccessDeniedException", message="no"
    )
    with pytest.raises(ClientError) as exc:
        client.list_model_invocation_jobs()
    assert (error_code(exc), exc.value.response["Error"]["Message"]) == ("AccessDeniedException", "no")
    assert len(emulator.requests_for("ListModelInvocationJobs")) == 1
    assert client.list_model_invocation_jobs()["invocationJobSummaries"]  # the fault was used up

    with pytest.raises(ValueError):
        emulator.add_fault(operation="InvokeModel", status=500, error_type="InternalServerException")
