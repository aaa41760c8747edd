"""The OpenAI batch file formats, shared by the `openai`, `azure_openai` and `local` providers.

Input line: `{"custom_id","method":"POST","url","body"}`. Output line:
`{"id","custom_id","response":{"status_code","request_id","body"},"error"}`; failures sit in a
separate error file in the same shape. Results are joined on `custom_id`, never on line order.

Embedding requests ask for `encoding_format: "base64"`: the embeddings API then returns each vector
as the base64 of its little-endian float32 bytes (the documented alternative to `float`, and what the
`openai` SDK itself asks for), ~4x smaller than JSON floats and decoded with one `np.frombuffer`.
Output lines that carry a list of floats (`encoding_format: "float"`, the local provider, requests
written before) are read as well.
"""

from __future__ import annotations

import binascii
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import orjson
import pybase64

from legal_batch.core import parallel_parse
from legal_batch.core.jsonl import dumps_line, iter_objects
from legal_batch.providers.base import ChatRequest, EmbeddingRequest, Endpoint, Request, Result

_RETRYABLE_CODES = frozenset({"batch_expired", "server_error", "rate_limit_exceeded", "timeout", "batch_cancelled"})

EncodingFormat = Literal["float", "base64"]


def chat_body(request: ChatRequest, *, model: str) -> dict:
    messages = [{"role": "system", "content": request.system}, {"role": "user", "content": request.user}]
    body: dict = {
        "model": model,
        "messages": messages,
        "max_tokens": request.max_tokens,
        "temperature": request.temperature,
    }
    if request.json_schema is not None:
        body["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "result", "schema": request.json_schema},
        }
    return body


def request_line(request: Request, *, endpoint: Endpoint, model: str, url_prefix: str = "/v1",
                 dimensions: int | None = 1024, encoding_format: EncodingFormat = "float") -> bytes:
    """One OpenAI-envelope request line. `encoding_format` is how an embedding comes back: `base64`
    (little-endian float32 bytes, what the OpenAI provider asks for) or `float` (a JSON list)."""
    if isinstance(request, EmbeddingRequest):
        if endpoint != "embeddings":
            raise ValueError(f"embedding request {request.custom_id} sent to the {endpoint} endpoint")
        body: dict = {"model": model, "input": request.text, "encoding_format": encoding_format}
        if dimensions is not None:
            body["dimensions"] = dimensions
        url = f"{url_prefix}/embeddings"
    else:
        body = chat_body(request, model=model)
        url = f"{url_prefix}/chat/completions"
    return dumps_line({"custom_id": request.custom_id, "method": "POST", "url": url, "body": body})


def parse_response_body(body: dict, *, endpoint: Endpoint, custom_id: str | None, source: str,
                        line_no: int) -> Result:
    """A successful response body (from a batch output line or a real-time call) as a `Result`."""
    usage = body.get("usage") or {}
    if endpoint == "embeddings":
        data = body.get("data") or []
        if not data or "embedding" not in data[0]:
            return Result(custom_id, source, line_no, error="response has no embedding", retryable=True)
        embedding = data[0]["embedding"]
        if type(embedding) is str:  # encoding_format "base64"
            decoded = decode_base64_vector(embedding)
            if isinstance(decoded, str):
                return Result(custom_id, source, line_no, error=decoded)
            return Result(custom_id, source, line_no, vector=decoded,
                          input_tokens=int(usage.get("prompt_tokens") or 0))
        if type(embedding) is list and (culprit := first_non_number(embedding)) is not None:
            return Result(custom_id, source, line_no, error=f"embedding is not a list of numbers: {culprit}")
        vector = _float32_list(embedding) if type(embedding) is list else None
        if vector is None:
            try:
                vector = np.asarray(embedding, dtype=np.float32)
            except (TypeError, ValueError) as exc:
                return Result(custom_id, source, line_no, error=f"embedding is not a list of numbers: {exc}")
        return Result(custom_id, source, line_no, vector=vector, input_tokens=int(usage.get("prompt_tokens") or 0))
    choices = body.get("choices") or []
    if not choices:
        return Result(custom_id, source, line_no, error="response has no choices", retryable=True)
    message = choices[0].get("message") or {}
    return Result(
        custom_id,
        source,
        line_no,
        text=message.get("content"),
        finish_reason=choices[0].get("finish_reason"),
        input_tokens=int(usage.get("prompt_tokens") or 0),
        output_tokens=int(usage.get("completion_tokens") or 0),
        extra={"refusal": message.get("refusal")} if message.get("refusal") else {},
    )


def decode_base64_vector(text: str) -> np.ndarray | str:
    """A base64 embedding (little-endian float32 bytes) as a float32 array, or why it is not one.

    Strict: characters outside the base64 alphabet, bad padding and a byte count that is not a
    whole number of float32 values are refused (the component count is the sink's to check).
    `pybase64` (SIMD) decodes 1,024 dims in ~5 µs, the standard library's `base64` in ~25 µs."""
    try:
        raw = pybase64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        return f"embedding is not valid base64 ({exc})"
    if not raw or len(raw) % 4:
        return (f"base64 embedding decodes to {len(raw)} bytes, not a whole number of float32 values "
                "(4 bytes each)")
    return np.frombuffer(raw, dtype="<f4")


def first_non_number(values: list) -> str | None:
    """The first element of a flat list that is not a JSON number, described, or None when all are.

    numpy reads "0.5", "NaN" and null as floats without complaint, so output that puts strings in a
    vector must be refused before conversion. `sum` is the cheap check (~4 µs for 1,024 floats, it
    raises on a string, null or nested list); the culprit is looked for only when it fails."""
    try:
        sum(values)
        return None
    except TypeError:
        for index, value in enumerate(values):
            if isinstance(value, bool) or not isinstance(value, int | float):
                return f"element {index} is {type(value).__name__} {orjson.dumps(value).decode()[:40]}"
        return "an element is not a number"


def _float32_list(values: list) -> np.ndarray | None:
    """A flat list of numbers as float32, ~20% faster than `np.asarray` (no shape discovery); None
    when it is anything else (nested, strings that are not numbers, ...), for `np.asarray` to judge.
    Where both succeed they give the same array."""
    try:
        return np.fromiter(values, dtype=np.float32, count=len(values))
    except Exception:
        return None


def iter_results(files: Sequence[Path], *, endpoint: Endpoint, workers: int = 1) -> Iterator[Result]:
    """Results from OpenAI-format output and error files, streamed line by line. With `workers` > 1,
    a file worth it (`_worth_workers`) is parsed by that many processes, its results still in file
    order (`core.parallel_parse`)."""
    for path in files:
        if workers > 1 and _worth_workers(path):
            yield from parallel_parse.iter_parsed(path, parse_range, endpoint, workers=workers)
        else:
            yield from _iter_range(path, endpoint, 0, None)


PARALLEL_MIN_LINE_BYTES = 12_000
"""Lines at least this long on average (1,024 JSON floats: ~22 KB) cost ~140 µs each to parse, far
more than sending the parsed vector between processes; base64 lines (~5.8 KB, ~25 µs) and chat
answers do not gain from workers."""


def _worth_workers(path: Path) -> bool:
    """A large file of long lines (JSON-float vectors), where worker processes can start."""
    size = path.stat().st_size
    if size < parallel_parse.MIN_FILE_BYTES or not parallel_parse.usable():
        return False
    with path.open("rb") as handle:
        head = handle.read(1 << 20)
    return len(head) / max(1, head.count(b"\n")) >= PARALLEL_MIN_LINE_BYTES


def parse_range(path: Path, start: int, end: int, endpoint: Endpoint) -> list[Result]:
    """The results of the lines starting in the byte range [start, end), numbered from 1 at `start`
    (for `parallel_parse`)."""
    return list(_iter_range(path, endpoint, start, end))


def _iter_range(path: Path, endpoint: Endpoint, start: int, end: int | None) -> Iterator[Result]:
    source = path.name
    for line_no, obj, problem in iter_objects(path, start=start, end=end):
        if obj is None:
            yield Result(None, source, line_no, error=problem, retryable=True)
        else:
            yield _result_of(obj, endpoint=endpoint, source=source, line_no=line_no)


def _result_of(obj: dict, *, endpoint: Endpoint, source: str, line_no: int) -> Result:
    custom_id = obj.get("custom_id") if isinstance(obj.get("custom_id"), str) else None
    error = obj.get("error")
    if error:
        code = str(error.get("code") or "error") if isinstance(error, dict) else "error"
        message = error.get("message") if isinstance(error, dict) else str(error)
        return Result(custom_id, source, line_no, error=f"{code}: {message}", retryable=code in _RETRYABLE_CODES)
    response = obj.get("response")
    if not isinstance(response, dict):
        return Result(custom_id, source, line_no, error="line has neither response nor error", retryable=True)
    status = response.get("status_code")
    body = response.get("body")
    if status != 200:
        detail = body.get("error") if isinstance(body, dict) else None
        code = str(detail.get("code") or detail.get("type") or status) if isinstance(detail, dict) else str(status)
        message = detail.get("message") if isinstance(detail, dict) else str(body)[:200]
        retryable = not isinstance(status, int) or status >= 500 or status == 429 or code in _RETRYABLE_CODES
        return Result(custom_id, source, line_no, error=f"HTTP {status} {code}: {message}", retryable=retryable)
    if not isinstance(body, dict):
        return Result(custom_id, source, line_no, error="response body is not a JSON object", retryable=True)
    return parse_response_body(body, endpoint=endpoint, custom_id=custom_id, source=source, line_no=line_no)
