"""The OpenAI / Azure OpenAI batch emulator, driven over HTTP by the real ``openai`` SDK clients."""

from __future__ import annotations

import base64
import json
import math
import struct
from collections.abc import Iterator
from typing import Any

import openai
import pytest

from legal_batch_tests.emulators.openai_batch import OpenAIBatchEmulator, running_openai_emulator

AZURE_API_VERSION = "2024-10-21"


@pytest.fixture
def emulator() -> Iterator[OpenAIBatchEmulator]:
    with running_openai_emulator(auto_advance=True, dimensions_default=8) as emu:
        yield emu


@pytest.fixture
def client(emulator: OpenAIBatchEmulator) -> openai.OpenAI:
    return openai.OpenAI(base_url=emulator.base_url, api_key=emulator.api_key, max_retries=2)


@pytest.fixture
def azure(emulator: OpenAIBatchEmulator) -> openai.AzureOpenAI:
    return openai.AzureOpenAI(
        azure_endpoint=emulator.azure_endpoint, api_key=emulator.api_key, api_version=AZURE_API_VERSION
    )


def embedding_line(
    custom_id: str, text: str | list[str], *, model: str = "text-embedding-3-small"
) -> dict[str, Any]:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/embeddings",
        "body": {"model": model, "input": text},
    }


def chat_line(
    custom_id: str, text: str, *, url: str = "/chat/completions", model: str = "gpt-4o-batch"
) -> dict[str, Any]:
    body = {"model": model, "messages": [{"role": "user", "content": text}]}
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": body}


def jsonl(lines: list[dict[str, Any]]) -> bytes:
    return b"".join(json.dumps(line).encode() + b"\n" for line in lines)


def parse_jsonl(content: bytes) -> list[dict[str, Any]]:
    return [json.loads(line) for line in content.splitlines() if line.strip()]


def submit(
    sdk: openai.OpenAI, lines: list[dict[str, Any]] | bytes, *, endpoint: str = "/v1/embeddings"
) -> openai.types.Batch:
    content = lines if isinstance(lines, bytes) else jsonl(lines)
    uploaded = sdk.files.create(file=("requests.jsonl", content), purpose="batch")
    return sdk.batches.create(input_file_id=uploaded.id, endpoint=endpoint, completion_window="24h")  # type: ignore[arg-type]


def poll(sdk: openai.OpenAI, batch_id: str, *, max_polls: int = 10) -> openai.types.Batch:
    for _ in range(max_polls):
        batch = sdk.batches.retrieve(batch_id)
        if batch.status in ("completed", "failed", "expired", "cancelled"):
            return batch
    raise AssertionError(f"batch {batch_id} still {batch.status} after {max_polls} polls")


def download(sdk: openai.OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    assert file_id is not None
    return parse_jsonl(sdk.files.content(file_id).read())


def test_openai_embeddings_batch_end_to_end(emulator: OpenAIBatchEmulator, client: openai.OpenAI) -> None:
    lines = [embedding_line(f"case-{i}", f"judgment paragraph {i}") for i in range(6)]
    lines.append(embedding_line("case-list", ["first text", "second text"]))
    lines[0]["body"]["dimensions"] = 16
    emulator.fail_custom_ids["case-3"] = (400, "context_length_exceeded", "Input is too long.")

    created = submit(client, lines)
    assert created.status == "validating" and created.output_file_id is None
    batch = poll(client, created.id)

    assert batch.status == "completed"
    assert batch.model == "text-embedding-3-small"
    assert batch.request_counts is not None
    assert batch.request_counts.model_dump() == {"total": 7, "completed": 6, "failed": 1}
    assert batch.in_progress_at and batch.finalizing_at and batch.completed_at
    assert [r.method for r in emulator.requests if "/batches/" in r.path] == ["GET"] * 3

    outputs = download(client, batch.output_file_id)
    by_id = {line["custom_id"]: line for line in outputs}
    assert set(by_id) == {f"case-{i}" for i in (0, 1, 2, 4, 5)} | {"case-list"}
    input_order = [line["custom_id"] for line in lines if line["custom_id"] in by_id]
    assert [line["custom_id"] for line in outputs] != input_order, "output must not come back in input order"
    for line in outputs:
        assert line["id"].startswith("batch_req_") and line["error"] is None
        assert line["response"]["status_code"] == 200 and line["response"]["request_id"]
        body = line["response"]["body"]
        assert body["object"] == "list" and body["model"] == "text-embedding-3-small"
        for item in body["data"]:
            assert math.isclose(math.fsum(x * x for x in item["embedding"]), 1.0, rel_tol=1e-9)
    assert len(by_id["case-0"]["response"]["body"]["data"][0]["embedding"]) == 16
    assert len(by_id["case-1"]["response"]["body"]["data"][0]["embedding"]) == 8
    assert [item["index"] for item in by_id["case-list"]["response"]["body"]["data"]] == [0, 1]

    (error,) = download(client, batch.error_file_id)
    assert error["custom_id"] == "case-3" and error["error"] is None
    assert error["response"]["status_code"] == 400
    assert error["response"]["body"]["error"]["code"] == "context_length_exceeded"


def test_embeddings_are_deterministic_and_match_the_real_time_path(
    emulator: OpenAIBatchEmulator, client: openai.OpenAI
) -> None:
    batch = poll(client, submit(client, [embedding_line("a", "same text")]).id)
    from_batch = download(client, batch.output_file_id)[0]["response"]["body"]["data"][0]["embedding"]

    # The SDK asks for base64 by default on the real-time path and decodes float32 itself.
    real_time = client.embeddings.create(model="text-embedding-3-small", input=["same text", "other"])
    assert real_time.data[0].embedding == pytest.approx(from_batch, abs=1e-6)
    assert real_time.data[1].embedding != pytest.approx(from_batch, abs=1e-6)
    assert emulator.requests[-1].path == "/v1/embeddings"


def test_base64_embeddings_are_the_little_endian_float32_bytes_of_the_float_ones(client: openai.OpenAI) -> None:
    lines = [embedding_line("floats", "the same judgment"), embedding_line("bytes", "the same judgment"),
             embedding_line("list", ["one text", "two texts"]), embedding_line("odd", "x")]
    lines[1]["body"]["encoding_format"] = "base64"
    lines[2]["body"]["encoding_format"] = "base64"
    lines[3]["body"]["encoding_format"] = "int8"
    batch = poll(client, submit(client, lines).id)

    by_id = {line["custom_id"]: line for line in download(client, batch.output_file_id)}
    floats = by_id["floats"]["response"]["body"]["data"][0]["embedding"]
    encoded = by_id["bytes"]["response"]["body"]["data"][0]["embedding"]
    assert isinstance(encoded, str) and len(encoded) == 4 * math.ceil(8 * 4 / 3)  # 8 dims × 4 bytes
    assert base64.b64decode(encoded) == struct.pack("<8f", *floats)
    assert [isinstance(item["embedding"], str) for item in by_id["list"]["response"]["body"]["data"]] == [True] * 2
    (odd,) = download(client, batch.error_file_id)
    assert odd["custom_id"] == "odd" and odd["response"]["status_code"] == 400
    assert odd["response"]["body"]["error"]["code"] == "invalid_value"
    assert "'encoding_format'" in odd["response"]["body"]["error"]["message"]


def test_openai_error_file_is_null_when_nothing_fails(client: openai.OpenAI) -> None:
    batch = poll(client, submit(client, [embedding_line("only", "text")]).id)
    assert batch.status == "completed" and batch.output_file_id is not None
    assert batch.error_file_id is None


def test_azure_chat_batch_end_to_end(emulator: OpenAIBatchEmulator, azure: openai.AzureOpenAI) -> None:
    lines = [chat_line(f"doc-{i}", f"Summarise judgment number {i} please") for i in range(4)]
    batch = poll(azure, submit(azure, lines, endpoint="/chat/completions").id)

    assert batch.status == "completed"
    assert batch.request_counts is not None and batch.request_counts.completed == 4
    outputs = download(azure, batch.output_file_id)
    assert {line["custom_id"] for line in outputs} == {f"doc-{i}" for i in range(4)}
    doc2 = next(line for line in outputs if line["custom_id"] == "doc-2")["response"]["body"]
    assert doc2["object"] == "chat.completion" and doc2["model"] == "gpt-4o-batch"
    assert doc2["choices"][0]["message"]["content"] == "Summary: Summarise judgment number 2 please"
    assert doc2["choices"][0]["finish_reason"] == "stop"
    usage = doc2["usage"]
    assert usage["prompt_tokens"] == len("Summarise judgment number 2 please") // 4
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]

    # Azure's trap: an error file exists even when nothing failed, and it is empty.
    assert batch.error_file_id is not None
    assert azure.files.retrieve(batch.error_file_id).bytes == 0
    assert azure.files.content(batch.error_file_id).read() == b""

    azure_requests = [r for r in emulator.requests if r.path.startswith("/openai/")]
    assert {r.path.split("/")[2] for r in azure_requests} == {"files", "batches"}
    assert all(r.query["api-version"] == AZURE_API_VERSION for r in azure_requests)
    assert all(r.headers["api-key"] == emulator.api_key for r in azure_requests)


def test_azure_real_time_chat_uses_the_deployment_path(
    emulator: OpenAIBatchEmulator, azure: openai.AzureOpenAI
) -> None:
    emulator.responder = lambda body: {
        "id": "chatcmpl-x",
        "object": "chat.completion",
        "created": 0,
        "model": body["model"],
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "{}"}, "finish_reason": "stop"}],
    }
    reply = azure.chat.completions.create(model="gpt-4o-dep", messages=[{"role": "user", "content": "hi"}])
    assert reply.choices[0].message.content == "{}" and reply.model == "gpt-4o-dep"
    assert emulator.requests[-1].path == "/openai/deployments/gpt-4o-dep/chat/completions"


def test_responder_shapes_batch_answers(emulator: OpenAIBatchEmulator, client: openai.OpenAI) -> None:
    def responder(body: dict[str, Any]) -> dict[str, Any]:
        if "boom" in body["messages"][0]["content"]:
            raise ValueError("model exploded")
        return {"object": "chat.completion", "echo": body["messages"][0]["content"]}

    emulator.responder = responder
    lines = [
        chat_line("ok", "fine", url="/v1/chat/completions"),
        chat_line("bad", "boom", url="/v1/chat/completions"),
    ]
    batch = poll(client, submit(client, lines, endpoint="/v1/chat/completions").id)

    assert download(client, batch.output_file_id)[0]["response"]["body"]["echo"] == "fine"
    (error,) = download(client, batch.error_file_id)
    assert error["custom_id"] == "bad" and error["response"]["status_code"] == 500


@pytest.mark.parametrize(
    ("lines", "code", "line_number"),
    [
        pytest.param(
            [embedding_line("a", "x"), embedding_line("a", "y")], "duplicate_custom_id", 2, id="duplicate"
        ),
        pytest.param(
            [embedding_line("a", "x"), embedding_line("b", "y", model="text-embedding-3-large")],
            "model_mismatch",
            2,
            id="mixed-models",
        ),
        pytest.param([embedding_line("a", "x"), chat_line("b", "y")], "url_mismatch", 2, id="wrong-url"),
        pytest.param(b'{"custom_id": "a", "method": "POST"\n', "invalid_json_line", 1, id="broken-json"),
    ],
)
def test_invalid_input_fails_in_validating(
    client: openai.OpenAI, lines: list[dict[str, Any]] | bytes, code: str, line_number: int
) -> None:
    created = submit(client, lines)
    assert created.status == "validating", "the batch is created first, then fails"

    batch = poll(client, created.id)
    assert batch.status == "failed" and batch.failed_at is not None
    assert batch.errors is not None and batch.errors.data
    assert (batch.errors.data[0].code, batch.errors.data[0].line) == (code, line_number)
    assert batch.output_file_id is None and batch.error_file_id is None


def test_azure_rejects_a_bom_and_limits_are_per_provider(
    emulator: OpenAIBatchEmulator, azure: openai.AzureOpenAI, client: openai.OpenAI
) -> None:
    bom = b"\xef\xbb\xbf" + jsonl([chat_line("a", "x")])
    batch = poll(azure, submit(azure, bom, endpoint="/chat/completions").id)
    assert batch.status == "failed" and batch.errors and batch.errors.data
    assert batch.errors.data[0].line == 1 and "BOM" in (batch.errors.data[0].message or "")

    emulator.max_requests["openai"] = 2
    batch = poll(client, submit(client, [embedding_line(str(i), "x") for i in range(3)]).id)
    assert batch.status == "failed" and batch.errors and batch.errors.data
    assert batch.errors.data[0].code == "too_many_tasks"


def test_create_rejects_bad_parameters(client: openai.OpenAI, azure: openai.AzureOpenAI) -> None:
    uploaded = client.files.create(file=("r.jsonl", jsonl([embedding_line("a", "x")])), purpose="batch")
    with pytest.raises(openai.BadRequestError, match="completion_window"):
        client.batches.create(input_file_id=uploaded.id, endpoint="/v1/embeddings", completion_window="48h")  # type: ignore[arg-type]
    with pytest.raises(openai.BadRequestError, match="metadata"):
        client.batches.create(
            input_file_id=uploaded.id,
            endpoint="/v1/embeddings",
            completion_window="24h",
            metadata={f"k{i}": "v" for i in range(17)},
        )
    with pytest.raises(openai.BadRequestError, match="endpoint"):  # Azure Global Batch takes no embeddings
        azure.batches.create(input_file_id=uploaded.id, endpoint="/v1/embeddings", completion_window="24h")
    with pytest.raises(openai.BadRequestError, match="purpose"):
        client.files.create(file=("r.jsonl", b"{}"), purpose="fine-tune")


def test_expiry_keeps_completed_lines_and_expires_the_rest(
    emulator: OpenAIBatchEmulator, client: openai.OpenAI
) -> None:
    emulator.auto_advance = False
    lines = [embedding_line(f"c{i}", f"text {i}") for i in range(4)]
    batch_id = submit(client, lines).id
    assert emulator.advance(batch_id) == "in_progress"

    emulator.expire(batch_id, completed_fraction=0.5)
    batch = client.batches.retrieve(batch_id)
    assert batch.status == "expired" and batch.expired_at is not None
    assert batch.request_counts is not None
    assert batch.request_counts.model_dump() == {"total": 4, "completed": 2, "failed": 2}
    assert {line["custom_id"] for line in download(client, batch.output_file_id)} == {"c0", "c1"}
    expired = download(client, batch.error_file_id)
    assert {line["custom_id"] for line in expired} == {"c2", "c3"}
    assert all(line["response"] is None and line["error"]["code"] == "batch_expired" for line in expired)


def test_every_line_failing_completes_without_an_output_file(
    emulator: OpenAIBatchEmulator, client: openai.OpenAI
) -> None:
    for custom_id in ("a", "b"):
        emulator.fail_custom_ids[custom_id] = (429, "rate_limit_exceeded", "Too many tokens.")
    batch = poll(client, submit(client, [embedding_line("a", "x"), embedding_line("b", "y")]).id)

    assert batch.status == "completed"
    assert batch.output_file_id is None
    assert batch.request_counts is not None and batch.request_counts.failed == 2
    assert {line["response"]["status_code"] for line in download(client, batch.error_file_id)} == {429}


def test_cancel_moves_through_cancelling_to_cancelled(
    emulator: OpenAIBatchEmulator, client: openai.OpenAI
) -> None:
    emulator.auto_advance = False
    batch_id = submit(client, [embedding_line(f"c{i}", "x") for i in range(4)]).id
    emulator.advance(batch_id)

    assert client.batches.cancel(batch_id).status == "cancelling"
    emulator.auto_advance = True
    batch = client.batches.retrieve(batch_id)
    assert batch.status == "cancelled" and batch.cancelling_at and batch.cancelled_at
    assert batch.output_file_id is None and batch.error_file_id is None
    with pytest.raises(openai.BadRequestError, match="cancelled"):
        client.batches.cancel(batch_id)


def test_cancel_can_return_partial_output(emulator: OpenAIBatchEmulator, client: openai.OpenAI) -> None:
    emulator.auto_advance = False
    emulator.cancel_completed_fraction = 0.5
    batch_id = submit(client, [embedding_line(f"c{i}", "x") for i in range(4)]).id
    client.batches.cancel(batch_id)
    assert emulator.advance(batch_id) == "cancelled"
    batch = client.batches.retrieve(batch_id)
    assert {line["custom_id"] for line in download(client, batch.output_file_id)} == {"c0", "c1"}


def test_control_methods(emulator: OpenAIBatchEmulator, client: openai.OpenAI) -> None:
    emulator.auto_advance = False
    batch_id = submit(client, [embedding_line("a", "x")]).id
    emulator.set_status(batch_id, "finalizing")
    assert client.batches.retrieve(batch_id).status == "finalizing"
    emulator.complete(batch_id)
    assert client.batches.retrieve(batch_id).status == "completed"
    assert emulator.file_content(emulator.batches[batch_id]["output_file_id"]).count(b"\n") == 1

    other = submit(client, [embedding_line("a", "x")]).id
    emulator.fail_validation(other, "quota exhausted", code="token_limit_exceeded")
    batch = client.batches.retrieve(other)
    assert batch.status == "failed" and batch.errors and batch.errors.data
    assert (batch.errors.data[0].code, batch.errors.data[0].message) == (
        "token_limit_exceeded",
        "quota exhausted",
    )


def test_list_paginates_newest_first(emulator: OpenAIBatchEmulator, client: openai.OpenAI) -> None:
    created = [submit(client, [embedding_line("a", "x")]).id for _ in range(5)]

    first = client.batches.list(limit=2)
    assert [b.id for b in first.data] == created[::-1][:2]
    assert first.has_more is True
    assert [b.id for b in client.batches.list(limit=2)] == created[::-1], "auto-pagination follows `after`"
    pages = [r.query for r in emulator.requests if r.path == "/v1/batches" and r.method == "GET"]
    assert pages[-1] == {"limit": "2", "after": created[1]}


def test_rate_limit_with_retry_after_is_retried_by_the_sdk(
    emulator: OpenAIBatchEmulator, client: openai.OpenAI
) -> None:
    emulator.add_fault(method="POST", path_regex=r"/batches$", status=429, retry_after=0.01)
    emulator.add_fault(method="GET", path_regex=r"/batches/", status=503, times=2, retry_after=0.01)

    batch = poll(client, submit(client, [embedding_line("a", "x")]).id)
    assert batch.status == "completed"

    creates = [r for r in emulator.requests if r.method == "POST" and r.path == "/v1/batches"]
    assert [r.headers["x-stainless-retry-count"] for r in creates] == ["0", "1"]
    assert creates[0].body == creates[1].body


def test_rate_limit_surfaces_when_retries_run_out(emulator: OpenAIBatchEmulator) -> None:
    client = openai.OpenAI(base_url=emulator.base_url, api_key=emulator.api_key, max_retries=0)
    body = {
        "error": {
            "message": "Enqueued token limit reached.",
            "type": "invalid_request_error",
            "param": None,
            "code": "token_limit_exceeded",
        }
    }
    emulator.add_fault(method="*", path_regex=r"/files$", status=429, retry_after=30, body=body)
    with pytest.raises(openai.RateLimitError) as caught:
        client.files.create(file=("r.jsonl", b"{}"), purpose="batch")
    assert caught.value.code == "token_limit_exceeded"
    assert caught.value.response.headers["retry-after"] == "30"


def test_delay_makes_the_sdk_time_out(emulator: OpenAIBatchEmulator) -> None:
    client = openai.OpenAI(base_url=emulator.base_url, api_key=emulator.api_key, max_retries=0, timeout=0.2)
    emulator.add_delay(method="GET", path_regex=r"/batches$", seconds=0.6)
    with pytest.raises(openai.APITimeoutError):
        client.batches.list()
    assert client.batches.list().data == []


def test_wrong_key_is_an_authentication_error(emulator: OpenAIBatchEmulator) -> None:
    wrong = openai.OpenAI(base_url=emulator.base_url, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as caught:
        wrong.batches.list()
    assert caught.value.status_code == 401
    assert set(caught.value.body or {}) >= {"message", "type", "param", "code"}  # type: ignore[arg-type]

    wrong_azure = openai.AzureOpenAI(
        azure_endpoint=emulator.azure_endpoint, api_key="wrong", api_version=AZURE_API_VERSION, max_retries=0
    )
    with pytest.raises(openai.AuthenticationError):
        wrong_azure.files.list()


def test_azure_paths_require_api_version(emulator: OpenAIBatchEmulator) -> None:
    # A plain OpenAI client pointed at the Azure prefix sends no api-version.
    no_version = openai.OpenAI(
        base_url=emulator.azure_endpoint + "/openai",
        api_key="unused",
        default_headers={"api-key": emulator.api_key},
        max_retries=0,
    )
    with pytest.raises(openai.BadRequestError, match="api-version"):
        no_version.batches.list()
    assert "api-version" not in emulator.requests[-1].query
