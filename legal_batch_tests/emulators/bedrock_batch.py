"""HTTP emulator of AWS Bedrock batch inference (model invocation jobs) in front of moto's S3 server.

moto has no Bedrock batch-job API, so this module serves the four REST operations of the
``bedrock`` control plane that batch inference uses (shapes from botocore's ``bedrock``
service model, API version 2023-04-20) on a local ``ThreadingHTTPServer``:

* ``POST /model-invocation-job``                        CreateModelInvocationJob
* ``GET  /model-invocation-job/{jobIdentifier}``        GetModelInvocationJob
* ``GET  /model-invocation-jobs``                       ListModelInvocationJobs
* ``POST /model-invocation-job/{jobIdentifier}/stop``   StopModelInvocationJob

and, for the real-time path, the one ``bedrock-runtime`` operation it needs:

* ``POST /model/{modelId}/invoke``                      InvokeModel (the same responder as batch
  records; a ``RecordError`` becomes the matching HTTP error, e.g. 400 ``ValidationException``)

Input and output live in a real (moto) S3 server, reached with boto3 over HTTP, so code
under test talks to both services exactly as it would in AWS. Jobs only move when the test
says so (``advance``/``complete``/...), or one step per GetModelInvocationJob call with
``auto_advance=True``.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import random
import re
import threading
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError
from moto.server import ThreadedMotoServer

ACCOUNT_ID = "123456789012"
DEFAULT_TIMEOUT_HOURS = 168

OPERATIONS = frozenset(
    {
        "CreateModelInvocationJob",
        "GetModelInvocationJob",
        "ListModelInvocationJobs",
        "StopModelInvocationJob",
    }
)
RUNTIME_OPERATIONS = frozenset({"InvokeModel"})
"""bedrock-runtime operations served on the same port (``env()`` points AWS_ENDPOINT_URL_BEDROCK_RUNTIME here)."""
_RUNTIME_ERROR_TYPES = {
    400: "ValidationException",
    403: "AccessDeniedException",
    404: "ResourceNotFoundException",
    408: "ModelTimeoutException",
    424: "ModelErrorException",
    429: "ThrottlingException",
    500: "InternalServerException",
    503: "ServiceUnavailableException",
}
STATUSES = frozenset(
    {
        "Submitted",
        "Validating",
        "Scheduled",
        "InProgress",
        "Completed",
        "PartiallyCompleted",
        "Failed",
        "Stopping",
        "Stopped",
        "Expired",
    }
)
TERMINAL_STATUSES = frozenset({"Completed", "PartiallyCompleted", "Failed", "Stopped", "Expired"})
STOPPABLE_STATUSES = frozenset({"Submitted", "Validating", "Scheduled", "InProgress"})
_NEXT_STATUS = {
    "Submitted": "Validating",
    "Validating": "Scheduled",
    "Scheduled": "InProgress",
    "InProgress": "Completed",
    "Stopping": "Stopped",
}

# Patterns and limits copied from the service model.
JOB_NAME_RE = re.compile(r"[a-zA-Z0-9]{1,63}(-*[a-zA-Z0-9\+\-\.]){0,63}")
ROLE_ARN_RE = re.compile(r"arn:aws(-[^:]+)?:iam::([0-9]{12})?:role/.+")
TOKEN_RE = re.compile(r"[a-zA-Z0-9]{1,256}(-*[a-zA-Z0-9]){0,256}")
S3_URI_RE = re.compile(
    r"s3://[a-z0-9][-.a-z0-9]{1,61}[a-z0-9](?:/[-!_*'().a-z0-9A-Z]+(?:/[-!_*'().a-z0-9A-Z]+)*)?/?"
)
JOB_IDENTIFIER_RE = re.compile(
    r"((arn:aws(-[^:]+)?:bedrock:[a-z0-9-]{1,20}:[0-9]{12}:model-invocation-job/)?[a-z0-9]{12})"
)

# Members of GetModelInvocationJobResponse / ModelInvocationJobSummary (identical sets).
_JOB_RESPONSE_FIELDS = (
    "jobArn",
    "jobName",
    "modelId",
    "clientRequestToken",
    "roleArn",
    "status",
    "message",
    "submitTime",
    "lastModifiedTime",
    "endTime",
    "inputDataConfig",
    "outputDataConfig",
    "vpcConfig",
    "timeoutDurationInHours",
    "jobExpirationTime",
    "modelInvocationType",
    "totalRecordCount",
    "processedRecordCount",
    "successRecordCount",
    "errorRecordCount",
)

Responder = Callable[[str, dict[str, Any]], dict[str, Any]]


@dataclass(frozen=True)
class RecordedRequest:
    """One HTTP call the bedrock server received (faulted calls included)."""

    method: str
    path: str  # percent-decoded path, without the query string
    raw_path: str  # exactly as sent on the request line, query string included
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes
    operation: str | None  # None when the route is unknown

    def json(self) -> Any:
        """The body parsed as JSON (None when empty)."""
        return json.loads(self.body) if self.body else None


class ApiError(Exception):
    """An error answered as ``{"message"}`` with ``x-amzn-ErrorType``."""

    def __init__(self, status: int, error_type: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.error_type = error_type
        self.message = message


class RecordError(Exception):
    """Raised by a responder: the record gets an ``error`` line instead of ``modelOutput``."""

    def __init__(self, error_code: str | int, error_message: str) -> None:
        super().__init__(error_message)
        self.error_code = error_code
        self.error_message = error_message


class _InputError(Exception):
    """The job input cannot be used; the job fails with this message."""


@dataclass
class _Fault:
    operation: str
    status: int
    error_type: str
    message: str
    remaining: int


@dataclass
class _InputFile:
    name: str  # basename, e.g. "part-0001.jsonl"
    records: list[dict[str, Any]] = field(default_factory=list)


def _validation(message: str) -> ApiError:
    return ApiError(400, "ValidationException", message)


def _now() -> datetime:
    return datetime.now(UTC)


def _iso(value: datetime) -> str:
    """ISO-8601 with milliseconds and ``Z``, the form the service sends and botocore parses."""
    return value.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _split_s3_uri(uri: str) -> tuple[str, str]:
    bucket, _, key = uri[len("s3://") :].partition("/")
    return bucket, key


def count_tokens(text: str) -> int:
    """A deterministic stand-in for a tokenizer: words and punctuation marks."""
    return len(re.findall(r"\w+|[^\w\s]", text))


# --------------------------------------------------------------------------- default responder


def deterministic_unit_vector(text: str, dimensions: int) -> list[float]:
    """A unit-norm vector seeded by sha256(text); the same text always gives the same vector."""
    rng = random.Random(int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest(), "big"))
    values = [rng.gauss(0.0, 1.0) for _ in range(dimensions)]
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return [v / norm for v in values]


def _titan_embedding(model_id: str, model_input: dict[str, Any]) -> dict[str, Any]:
    text = model_input.get("inputText")
    if not isinstance(text, str) or not text:
        raise RecordError(400, "Malformed input request: #: required key [inputText] not found")
    if "v2" not in model_id:  # Titan Embeddings G1 - Text: fixed size, no options
        vector = deterministic_unit_vector(text, 1536)
        return {"embedding": vector, "inputTextTokenCount": count_tokens(text)}
    dimensions = model_input.get("dimensions", 1024)
    if dimensions not in (256, 512, 1024):
        raise RecordError(
            400, f"Malformed input request: #/dimensions: {dimensions} is not a valid enum value"
        )
    if not isinstance(model_input.get("normalize", True), bool):
        raise RecordError(400, "Malformed input request: #/normalize: expected type: Boolean")
    vector = deterministic_unit_vector(text, dimensions)
    return {
        "embedding": vector,
        "embeddingsByType": {"float": vector},
        "inputTextTokenCount": count_tokens(text),
    }


def _content_text(content: Any) -> str:
    """Text of an Anthropic ``content``/``system`` value (a string or a list of blocks)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(
            block.get("text", "")
            for block in content
            if isinstance(block, dict) and block.get("type") == "text"
        )
    raise RecordError(400, "Malformed input request: content must be a string or a list of content blocks")


def _claude_message(model_id: str, model_input: dict[str, Any]) -> dict[str, Any]:
    for key in ("anthropic_version", "max_tokens", "messages"):
        if key not in model_input:
            raise RecordError(400, f"Malformed input request: #: required key [{key}] not found")
    max_tokens = model_input["max_tokens"]
    if not isinstance(max_tokens, int) or max_tokens < 1:
        raise RecordError(400, "Malformed input request: #/max_tokens: must be a positive integer")
    messages = model_input["messages"]
    if not isinstance(messages, list) or not messages:
        raise RecordError(400, "Malformed input request: #/messages: expected at least 1 message")
    texts = [_content_text(model_input.get("system", ""))]
    for message in messages:
        if not isinstance(message, dict) or message.get("role") not in ("user", "assistant"):
            raise RecordError(
                400, "Malformed input request: #/messages: each message needs role user|assistant"
            )
        texts.append(_content_text(message.get("content", "")))
    user_texts = [_content_text(m.get("content", "")) for m in messages if m["role"] == "user"]
    if not user_texts:
        raise RecordError(400, "Malformed input request: #/messages: expected at least one user message")
    last_user = user_texts[-1]
    words = ["Summary:", *last_user.split()[:40]]
    stop_reason = "end_turn"
    if len(words) > max_tokens:
        words, stop_reason = words[:max_tokens], "max_tokens"
    reply = " ".join(words)
    digest = hashlib.sha256(f"{model_id}\n{json.dumps(model_input, sort_keys=True)}".encode()).hexdigest()
    return {
        "id": f"msg_bdrk_{digest[:24]}",
        "type": "message",
        "role": "assistant",
        "model": re.sub(r"-v\d+(:\d+)?$", "", model_id.rsplit("anthropic.", 1)[-1]),
        "content": [{"type": "text", "text": reply}],
        "stop_reason": stop_reason,
        "stop_sequence": None,
        "usage": {"input_tokens": sum(count_tokens(t) for t in texts), "output_tokens": count_tokens(reply)},
    }


def default_responder(model_id: str, model_input: dict[str, Any]) -> dict[str, Any]:
    """Model output for Titan text embeddings and Anthropic Claude messages; RecordError otherwise."""
    if "titan-embed-text" in model_id:
        return _titan_embedding(model_id, model_input)
    if "anthropic.claude" in model_id:
        return _claude_message(model_id, model_input)
    raise RecordError(400, f"The emulator has no default responder for model {model_id}")


def _token_counts(model_output: dict[str, Any]) -> tuple[int, int]:
    """(input tokens, output tokens) reported in a model output body."""
    usage = model_output.get("usage")
    if isinstance(usage, dict):
        return int(usage.get("input_tokens", 0)), int(usage.get("output_tokens", 0))
    return int(model_output.get("inputTextTokenCount", 0)), 0


# --------------------------------------------------------------------------- HTTP plumbing


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, emulator: BedrockBatchEmulator) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.emulator = emulator


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def do_GET(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    def do_PUT(self) -> None:
        self._handle()

    def do_DELETE(self) -> None:
        self._handle()

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        status, payload, extra_headers = self.server.emulator._dispatch(
            self.command, self.path, dict(self.headers.items()), body
        )
        data = json.dumps(payload).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("x-amzn-RequestId", str(uuid.uuid4()))
        for name, value in extra_headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        """Keep test output quiet."""


# --------------------------------------------------------------------------- the emulator


class BedrockBatchEmulator:
    """Bedrock batch inference over HTTP, with S3 served by moto; see the module docstring."""

    def __init__(
        self,
        *,
        region: str = "us-east-1",
        auto_advance: bool = False,
        min_records: int = 100,
        max_records: int = 50_000,
        max_active_jobs: int = 20,
    ) -> None:
        self.region = region
        self.auto_advance = auto_advance
        self.min_records = min_records
        self.max_records = max_records
        self.max_active_jobs = max_active_jobs
        self.responder: Responder | None = None
        self.fail_record_ids: dict[str, tuple[str | int, str]] = {}
        self.requests: list[RecordedRequest] = []
        self.jobs: dict[str, dict[str, Any]] = {}
        self.s3_endpoint_url = ""
        self.bedrock_endpoint_url = ""
        self._inputs: dict[str, list[_InputFile]] = {}
        self._faults: list[_Fault] = []
        self._lock = threading.RLock()
        self._moto: ThreadedMotoServer | None = None
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._s3: Any = None

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> BedrockBatchEmulator:
        """Start moto's S3 server and the bedrock server, each on a free 127.0.0.1 port."""
        self._moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._moto.start()
        moto_host, moto_port = self._moto.get_host_and_port()
        self.s3_endpoint_url = f"http://{moto_host}:{moto_port}"
        self._s3 = boto3.session.Session().client(
            "s3",
            endpoint_url=self.s3_endpoint_url,
            region_name=self.region,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            config=Config(retries={"mode": "standard", "max_attempts": 3}),
        )
        self._server = _Server(self)
        self.bedrock_endpoint_url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="bedrock-emulator",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Shut both servers down (idempotent)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self._moto is not None:
            self._moto.stop()
            self._moto = None

    def __enter__(self) -> BedrockBatchEmulator:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def env(self) -> dict[str, str]:
        """Environment variables that point boto3 clients at the emulator."""
        return {
            "AWS_ENDPOINT_URL_S3": self.s3_endpoint_url,
            "AWS_ENDPOINT_URL_BEDROCK": self.bedrock_endpoint_url,
            "AWS_ENDPOINT_URL_BEDROCK_RUNTIME": self.bedrock_endpoint_url,
            "AWS_REGION": self.region,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
        }

    # ------------------------------------------------------------------ test controls

    def add_fault(
        self, *, operation: str, status: int, error_type: str, times: int = 1, message: str = "injected"
    ) -> None:
        """Answer the next ``times`` calls of ``operation`` with this error (before any other handling)."""
        if operation not in OPERATIONS:
            raise ValueError(f"unknown operation {operation!r}; expected one of {sorted(OPERATIONS)}")
        with self._lock:
            self._faults.append(_Fault(operation, status, error_type, message, times))

    def add_runtime_fault(
        self, *, status: int, error_type: str, times: int = 1, message: str = "injected"
    ) -> None:
        """Answer the next ``times`` InvokeModel calls (bedrock-runtime) with this error."""
        with self._lock:
            self._faults.append(_Fault("InvokeModel", status, error_type, message, times))

    def set_status(self, job_arn: str, status: str, message: str | None = None) -> None:
        """Force a status (no side effects: nothing is read or written in S3)."""
        if status not in STATUSES:
            raise ValueError(f"unknown status {status!r}")
        with self._lock:
            self._set_status(self._job(job_arn), status, message)

    def advance(self, job_arn: str) -> str:
        """Move one step along Submitted→Validating→Scheduled→InProgress→Completed (Stopping→Stopped).

        Leaving Validating reads and checks the input (the job may become Failed instead);
        entering Completed or Stopped writes the output. Terminal jobs stay as they are.
        """
        with self._lock:
            job = self._job(job_arn)
            status = job["status"]
            if status == "Validating":
                error = self._ensure_input(job)
                if error:
                    self._set_status(job, "Failed", error)
                else:
                    self._set_status(job, "Scheduled")
            elif status == "InProgress":
                self._finish(job, "Completed", 1.0)
            elif status == "Stopping":
                self._finish(job, "Stopped", 0.0, require_input=False)
            elif status in _NEXT_STATUS:
                self._set_status(job, _NEXT_STATUS[status])
            return str(job["status"])

    def complete(self, job_arn: str) -> None:
        """Advance until the job is terminal (normally Completed, Failed if the input is bad)."""
        with self._lock:
            while self._job(job_arn)["status"] not in TERMINAL_STATUSES:
                self.advance(job_arn)

    def expire(self, job_arn: str, *, completed_fraction: float = 0.5) -> None:
        """Expired, with output for the first ``completed_fraction`` of the records only."""
        with self._lock:
            job = self._job(job_arn)
            message = f"Job timed out after {job['timeoutDurationInHours']} hours"
            self._finish(job, "Expired", completed_fraction, message=message)

    def partial(self, job_arn: str, *, completed_fraction: float = 0.5) -> None:
        """PartiallyCompleted, with output for the first ``completed_fraction`` of the records."""
        with self._lock:
            self._finish(self._job(job_arn), "PartiallyCompleted", completed_fraction)

    def stop_job(self, job_arn: str, *, completed_fraction: float = 0.0) -> None:
        """Stopped, with output for the first ``completed_fraction`` of the records."""
        with self._lock:
            self._finish(self._job(job_arn), "Stopped", completed_fraction, require_input=False)

    def requests_for(self, operation: str) -> list[RecordedRequest]:
        """Recorded calls of one operation."""
        with self._lock:
            return [r for r in self.requests if r.operation == operation]

    # ------------------------------------------------------------------ job internals

    def _job(self, job_arn: str) -> dict[str, Any]:
        try:
            return self.jobs[job_arn]
        except KeyError:
            raise KeyError(f"no such job {job_arn!r}") from None

    def _set_status(self, job: dict[str, Any], status: str, message: str | None = None) -> None:
        now = _now()
        job["status"] = status
        job["lastModifiedTime"] = now
        if message is not None:
            job["message"] = message
        if status in TERMINAL_STATUSES:
            job["endTime"] = now

    def _ensure_input(self, job: dict[str, Any]) -> str | None:
        """Read and check the job input once; returns why it is unusable, or None."""
        if job["jobArn"] in self._inputs:
            return None
        try:
            files = self._read_input_files(job["inputDataConfig"]["s3InputDataConfig"]["s3Uri"])
        except _InputError as exc:
            return str(exc)
        total = sum(len(f.records) for f in files)
        if total < self.min_records:
            return f"The number of records ({total}) is below the minimum of {self.min_records} records per batch inference job."
        if total > self.max_records:
            return f"The number of records ({total}) exceeds the maximum of {self.max_records} records per batch inference job."
        self._inputs[job["jobArn"]] = files
        job["totalRecordCount"] = total
        return None

    def _read_input_files(self, uri: str) -> list[_InputFile]:
        bucket, key = _split_s3_uri(uri)
        try:
            if key.endswith(".jsonl"):
                keys = [key]
            else:
                prefix = key if not key or key.endswith("/") else f"{key}/"
                keys = []
                for page in self._s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
                    keys.extend(o["Key"] for o in page.get("Contents", []) if o["Key"].endswith(".jsonl"))
                keys.sort()
            if not keys:
                raise _InputError(f"No .jsonl input files found at {uri}.")
            files = []
            for object_key in keys:
                text = self._s3.get_object(Bucket=bucket, Key=object_key)["Body"].read().decode("utf-8-sig")
                files.append(self._parse_input_file(object_key.rsplit("/", 1)[-1], text))
        except ClientError as exc:
            code = exc.response.get("Error", {}).get("Code", "Error")
            raise _InputError(f"Unable to read input data from {uri}: {code}.") from exc
        return files

    def _parse_input_file(self, name: str, text: str) -> _InputFile:
        parsed = _InputFile(name)
        for line_number, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                raise _InputError(f"Invalid JSON in input file {name} at line {line_number}.") from None
            if not isinstance(record, dict) or not isinstance(record.get("modelInput"), dict):
                raise _InputError(
                    f"Invalid record in input file {name} at line {line_number}: modelInput is required."
                )
            record_id = record.get("recordId")
            if record_id is None:  # the service generates one for records without an id
                record_id = f"{len(parsed.records) + 1:011d}"
            parsed.records.append({"recordId": str(record_id), "modelInput": record["modelInput"]})
        return parsed

    def _finish(
        self,
        job: dict[str, Any],
        status: str,
        fraction: float,
        *,
        message: str | None = None,
        require_input: bool = True,
    ) -> None:
        """Write output for the first ``fraction`` of the records, then set the terminal ``status``.

        An unusable input fails the job when ``require_input``; otherwise (stopping) the job
        ends in ``status`` without output, as it does when stopped before validation.
        """
        if job["status"] in TERMINAL_STATUSES:
            raise ValueError(f"job {job['jobArn']} is already {job['status']}")
        loaded = job["jobArn"] in self._inputs
        if not loaded and (require_input or fraction > 0):
            error = self._ensure_input(job)
            if error and require_input:
                self._set_status(job, "Failed", error)
                return
            loaded = error is None
        if loaded:
            try:
                self._write_output(job, fraction)
            except ClientError as exc:
                code = exc.response.get("Error", {}).get("Code", "Error")
                uri = job["outputDataConfig"]["s3OutputDataConfig"]["s3Uri"]
                self._set_status(job, "Failed", f"Unable to write output data to {uri}: {code}.")
                return
        self._set_status(job, status, message)

    def _write_output(self, job: dict[str, Any], fraction: float) -> None:
        files = self._inputs[job["jobArn"]]
        total = sum(len(f.records) for f in files)
        budget = max(0, min(total, math.floor(total * fraction + 1e-9)))
        out_bucket, out_key = _split_s3_uri(job["outputDataConfig"]["s3OutputDataConfig"]["s3Uri"])
        base = "/".join(p for p in (out_key.strip("/"), job["jobId"]) if p)
        stats = {"success": 0, "error": 0, "input_tokens": 0, "output_tokens": 0}
        for input_file in files:
            taken = input_file.records[:budget]
            budget -= len(taken)
            lines = [self._process_record(job["modelId"], record, stats) for record in taken]
            body = "".join(
                json.dumps(line) + "\n" for line in _shuffled(lines, f"{job['jobId']}/{input_file.name}")
            )
            self._s3.put_object(
                Bucket=out_bucket, Key=f"{base}/{input_file.name}.out", Body=body.encode("utf-8")
            )
        manifest = {
            "totalRecordCount": total,
            "processedRecordCount": stats["success"] + stats["error"],
            "successRecordCount": stats["success"],
            "errorRecordCount": stats["error"],
            "inputTokenCount": stats["input_tokens"],
            "outputTokenCount": stats["output_tokens"],
        }
        self._s3.put_object(
            Bucket=out_bucket, Key=f"{base}/manifest.json.out", Body=json.dumps(manifest).encode()
        )
        for name in ("totalRecordCount", "processedRecordCount", "successRecordCount", "errorRecordCount"):
            job[name] = manifest[name]

    def _process_record(self, model_id: str, record: dict[str, Any], stats: dict[str, int]) -> dict[str, Any]:
        """The output line for one input record; updates ``stats``."""
        line: dict[str, Any] = {"recordId": record["recordId"], "modelInput": record["modelInput"]}
        failure = self.fail_record_ids.get(record["recordId"])
        if failure is None:
            try:
                output = (self.responder or default_responder)(model_id, record["modelInput"])
            except RecordError as exc:
                failure = (exc.error_code, exc.error_message)
            except ValueError as exc:
                failure = (400, str(exc))
        if failure is not None:
            stats["error"] += 1
            line["error"] = {"errorCode": failure[0], "errorMessage": failure[1]}
            return line
        stats["success"] += 1
        input_tokens, output_tokens = _token_counts(output)
        stats["input_tokens"] += input_tokens
        stats["output_tokens"] += output_tokens
        line["modelOutput"] = output
        return line

    # ------------------------------------------------------------------ HTTP dispatch

    def _dispatch(
        self, method: str, raw_path: str, headers: dict[str, str], body: bytes
    ) -> tuple[int, dict[str, Any], dict[str, str]]:
        """Route one request; returns (status, JSON payload, extra headers)."""
        split = urlsplit(raw_path)
        segments = [unquote(s) for s in split.path.strip("/").split("/")]
        operation, identifier = _route(method, segments)
        query = parse_qs(split.query, keep_blank_values=True)
        with self._lock:
            self.requests.append(
                RecordedRequest(method, unquote(split.path), raw_path, query, headers, body, operation)
            )
        try:
            if operation is None:
                raise ApiError(404, "UnknownOperationException", f"No operation for {method} {split.path}")
            self._raise_fault(operation)
            if operation == "InvokeModel":
                return self._invoke(identifier or "", body)
            with self._lock:
                if operation == "CreateModelInvocationJob":
                    return 200, self._create(_json_body(body)), {}
                if operation == "GetModelInvocationJob":
                    return 200, self._get(identifier), {}
                if operation == "ListModelInvocationJobs":
                    return 200, self._list(query), {}
                return 200, self._stop(identifier), {}
        except ApiError as exc:
            return exc.status, {"message": exc.message}, {"x-amzn-ErrorType": exc.error_type}
        except Exception as exc:  # an emulator bug must surface as a 500, not a hung connection
            return (
                500,
                {"message": f"{type(exc).__name__}: {exc}"},
                {"x-amzn-ErrorType": "InternalServerException"},
            )

    def _invoke(self, model_id: str, body: bytes) -> tuple[int, dict[str, Any], dict[str, str]]:
        """InvokeModel: the responder's output for one model input, with bedrock-runtime's headers."""
        try:
            model_input = json.loads(body or b"{}")
        except ValueError:
            raise ApiError(400, "ValidationException", "Malformed input request: body is not valid JSON") from None
        if not isinstance(model_input, dict):
            raise ApiError(400, "ValidationException", "Malformed input request: body must be a JSON object")
        try:
            output = (self.responder or default_responder)(model_id, model_input)
        except RecordError as exc:
            raise _runtime_error(exc) from None
        except ValueError as exc:
            raise ApiError(400, "ValidationException", str(exc)) from None
        input_tokens, output_tokens = _token_counts(output)
        headers = {
            "X-Amzn-Bedrock-Input-Token-Count": str(input_tokens),
            "X-Amzn-Bedrock-Output-Token-Count": str(output_tokens),
            "X-Amzn-Bedrock-Invocation-Latency": "1",
        }
        return 200, output, headers

    def _raise_fault(self, operation: str) -> None:
        with self._lock:
            for fault in self._faults:
                if fault.operation == operation and fault.remaining > 0:
                    fault.remaining -= 1
                    raise ApiError(fault.status, fault.error_type, fault.message)

    def _resolve(self, identifier: str) -> dict[str, Any]:
        if not JOB_IDENTIFIER_RE.fullmatch(identifier):
            raise _validation(
                f"1 validation error detected: Value '{identifier}' at 'jobIdentifier' failed to satisfy "
                f"constraint: Member must satisfy regular expression pattern: {JOB_IDENTIFIER_RE.pattern}"
            )
        job_id = identifier.rsplit("/", 1)[-1]
        for job in self.jobs.values():
            if job["jobId"] == job_id and (identifier == job_id or identifier == job["jobArn"]):
                return job
        raise ApiError(
            404, "ResourceNotFoundException", f"The specified job {identifier} could not be found."
        )

    def _create(self, request: dict[str, Any]) -> dict[str, Any]:
        _validate_create(request)
        token = request.get("clientRequestToken")
        if token:
            for existing in self.jobs.values():
                if existing.get("clientRequestToken") == token:
                    return {"jobArn": existing["jobArn"]}
        if any(job["jobName"] == request["jobName"] for job in self.jobs.values()):
            raise ApiError(
                400, "ConflictException", f"A job with the name {request['jobName']} already exists."
            )
        active = sum(1 for job in self.jobs.values() if job["status"] not in TERMINAL_STATUSES)
        if active >= self.max_active_jobs:
            raise ApiError(
                400,
                "ServiceQuotaExceededException",
                f"The number of active batch inference jobs ({active}) has reached the quota of {self.max_active_jobs}.",
            )
        job_id = uuid.uuid4().hex[:12]
        arn = f"arn:aws:bedrock:{self.region}:{ACCOUNT_ID}:model-invocation-job/{job_id}"
        now = _now()
        timeout = request.get("timeoutDurationInHours") or DEFAULT_TIMEOUT_HOURS
        job: dict[str, Any] = {
            "jobArn": arn,
            "jobId": job_id,
            "jobName": request["jobName"],
            "modelId": request["modelId"],
            "roleArn": request["roleArn"],
            "clientRequestToken": token,
            "status": "Submitted",
            "submitTime": now,
            "lastModifiedTime": now,
            "inputDataConfig": request["inputDataConfig"],
            "outputDataConfig": request["outputDataConfig"],
            "timeoutDurationInHours": timeout,
            "jobExpirationTime": now + timedelta(hours=timeout),
        }
        for optional in ("vpcConfig", "modelInvocationType", "tags"):
            if optional in request:
                job[optional] = request[optional]
        self.jobs[arn] = job
        return {"jobArn": arn}

    def _get(self, identifier: str | None) -> dict[str, Any]:
        job = self._resolve(identifier or "")
        if self.auto_advance:
            self.advance(job["jobArn"])
        return _job_view(job)

    def _stop(self, identifier: str | None) -> dict[str, Any]:
        job = self._resolve(identifier or "")
        if job["status"] in STOPPABLE_STATUSES:
            self._set_status(job, "Stopping")
        elif job["status"] != "Stopping":
            raise _validation(f"The job {job['jobArn']} is {job['status']} and can't be stopped.")
        return {}

    def _list(self, query: dict[str, list[str]]) -> dict[str, Any]:
        def param(name: str) -> str | None:
            values = query.get(name)
            return values[-1] if values else None

        status = param("statusEquals")
        if status is not None and status not in STATUSES:
            raise _validation(
                f"1 validation error detected: Value '{status}' at 'statusEquals' failed to satisfy constraint"
            )
        name_contains = param("nameContains")
        after, before = _query_time(param("submitTimeAfter")), _query_time(param("submitTimeBefore"))
        max_results = _query_int(param("maxResults"), "maxResults", 1, 1000, default=1000)
        descending = (param("sortOrder") or "Descending") == "Descending"
        offset = _decode_token(param("nextToken"))

        jobs = list(self.jobs.values())  # insertion order == creation order
        if descending:
            jobs.reverse()
        selected = [
            job
            for job in jobs
            if (status is None or job["status"] == status)
            and (not name_contains or name_contains in job["jobName"])
            and (after is None or job["submitTime"] > after)
            and (before is None or job["submitTime"] < before)
        ]
        page = selected[offset : offset + max_results]
        response: dict[str, Any] = {"invocationJobSummaries": [_job_view(job) for job in page]}
        if offset + max_results < len(selected):
            response["nextToken"] = _encode_token(offset + max_results)
        return response


# --------------------------------------------------------------------------- helpers


def _route(method: str, segments: list[str]) -> tuple[str | None, str | None]:
    """(operation, jobIdentifier or modelId) for a request; the identifier is already percent-decoded."""
    if segments == ["model-invocation-job"] and method == "POST":
        return "CreateModelInvocationJob", None
    if segments == ["model-invocation-jobs"] and method == "GET":
        return "ListModelInvocationJobs", None
    if len(segments) == 2 and segments[0] == "model-invocation-job" and method == "GET":
        return "GetModelInvocationJob", segments[1]
    if (
        len(segments) == 3
        and segments[0] == "model-invocation-job"
        and segments[2] == "stop"
        and method == "POST"
    ):
        return "StopModelInvocationJob", segments[1]
    if len(segments) == 3 and segments[0] == "model" and segments[2] == "invoke" and method == "POST":
        return "InvokeModel", segments[1]
    return None, None


def _runtime_error(exc: RecordError) -> ApiError:
    """The bedrock-runtime error for a responder's RecordError (numeric codes are HTTP statuses)."""
    code = str(exc.error_code)
    if code.isdigit():
        status = int(code)
        fallback = "ValidationException" if status < 500 else "InternalServerException"
        return ApiError(status, _RUNTIME_ERROR_TYPES.get(status, fallback), exc.error_message)
    statuses = {name: status for status, name in _RUNTIME_ERROR_TYPES.items()}
    return ApiError(statuses.get(code, 400), code, exc.error_message)


def _json_body(body: bytes) -> dict[str, Any]:
    try:
        parsed = json.loads(body or b"{}")
    except ValueError:
        raise ApiError(400, "SerializationException", "The request body is not valid JSON.") from None
    if not isinstance(parsed, dict):
        raise ApiError(400, "SerializationException", "The request body must be a JSON object.")
    return parsed


def _constraint(value: Any, member: str, constraint: str) -> str:
    return f"Value '{value}' at '{member}' failed to satisfy constraint: {constraint}"


def _validate_create(request: dict[str, Any]) -> None:
    """Raise ValidationException listing every constraint the request breaks, like the service."""
    errors: list[str] = []
    name = request.get("jobName")
    if not isinstance(name, str) or not name:
        errors.append(_constraint(name, "jobName", "Member must not be null"))
    elif len(name) > 63:
        errors.append(_constraint(name, "jobName", "Member must have length less than or equal to 63"))
    elif not JOB_NAME_RE.fullmatch(name):
        errors.append(
            _constraint(
                name, "jobName", f"Member must satisfy regular expression pattern: {JOB_NAME_RE.pattern}"
            )
        )
    role = request.get("roleArn")
    if not isinstance(role, str) or not role:
        errors.append(_constraint(role, "roleArn", "Member must not be null"))
    elif not ROLE_ARN_RE.fullmatch(role):
        errors.append(
            _constraint(
                role, "roleArn", f"Member must satisfy regular expression pattern: {ROLE_ARN_RE.pattern}"
            )
        )
    model_id = request.get("modelId")
    if not isinstance(model_id, str) or not model_id:
        errors.append(_constraint(model_id, "modelId", "Member must not be null"))
    token = request.get("clientRequestToken")
    if token is not None and (not isinstance(token, str) or not TOKEN_RE.fullmatch(token)):
        errors.append(
            _constraint(
                token,
                "clientRequestToken",
                f"Member must satisfy regular expression pattern: {TOKEN_RE.pattern}",
            )
        )
    timeout = request.get("timeoutDurationInHours")
    if timeout is not None and (not isinstance(timeout, int) or not 24 <= timeout <= 168):
        errors.append(
            _constraint(
                timeout,
                "timeoutDurationInHours",
                "Member must have value greater than or equal to 24 and less than or equal to 168",
            )
        )
    for member, config_key in (
        ("inputDataConfig", "s3InputDataConfig"),
        ("outputDataConfig", "s3OutputDataConfig"),
    ):
        config = request.get(member)
        s3_config = config.get(config_key) if isinstance(config, dict) else None
        uri = s3_config.get("s3Uri") if isinstance(s3_config, dict) else None
        path = f"{member}.{config_key}.s3Uri"
        if not isinstance(uri, str) or not uri:
            errors.append(_constraint(uri, path, "Member must not be null"))
        elif not S3_URI_RE.fullmatch(uri):
            errors.append(
                _constraint(uri, path, f"Member must satisfy regular expression pattern: {S3_URI_RE.pattern}")
            )
    if errors:
        noun = "error" if len(errors) == 1 else "errors"
        raise _validation(f"{len(errors)} validation {noun} detected: " + "; ".join(errors))


def _job_view(job: dict[str, Any]) -> dict[str, Any]:
    """The job as GetModelInvocationJob / a ModelInvocationJobSummary returns it."""
    view: dict[str, Any] = {}
    for name in _JOB_RESPONSE_FIELDS:
        value = job.get(name)
        if value is not None:
            view[name] = _iso(value) if isinstance(value, datetime) else value
    return view


def _shuffled(lines: list[dict[str, Any]], seed: str) -> list[dict[str, Any]]:
    """A deterministic permutation that always differs from the input order (for 2+ lines)."""
    order = list(range(len(lines)))
    random.Random(seed).shuffle(order)
    if len(order) > 1 and order == sorted(order):
        order = order[1:] + order[:1]
    return [lines[i] for i in order]


def _query_int(raw: str | None, name: str, low: int, high: int, *, default: int) -> int:
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise _validation(
            f"1 validation error detected: Value '{raw}' at '{name}' must be an integer"
        ) from None
    if not low <= value <= high:
        raise _validation(
            f"1 validation error detected: {_constraint(value, name, f'Member must have value between {low} and {high}')}"
        )
    return value


def _query_time(raw: str | None) -> datetime | None:
    if raw is None:
        return None
    try:
        parsed = datetime.fromisoformat(raw)
    except ValueError:
        raise _validation(f"Invalid timestamp '{raw}'.") from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def _encode_token(offset: int) -> str:
    return base64.urlsafe_b64encode(f"offset:{offset}".encode()).decode()


def _decode_token(token: str | None) -> int:
    if token is None:
        return 0
    try:
        kind, _, value = base64.urlsafe_b64decode(token.encode()).decode().partition(":")
        if kind != "offset":
            raise ValueError(token)
        return max(0, int(value))
    except ValueError:
        raise _validation("The pagination token is invalid.") from None


@contextmanager
def running_bedrock_emulator(**kw: Any) -> Iterator[BedrockBatchEmulator]:
    """Start a BedrockBatchEmulator for the duration of a ``with`` block."""
    emulator = BedrockBatchEmulator(**kw).start()
    try:
        yield emulator
    finally:
        emulator.stop()


TEST_ROLE_ARN = "arn:aws:iam::123456789012:role/BedrockBatchRole"


def point_at_emulator(monkeypatch: Any, emulator: BedrockBatchEmulator, *, role_arn: str = TEST_ROLE_ARN) -> str:
    """Point boto3 and legal_batch at the emulator for one test (the AWS variables, a fresh bucket in
    moto, the role); returns the bucket name."""
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    for name, value in emulator.env().items():
        monkeypatch.setenv(name, value)
    bucket = f"legal-batch-{uuid.uuid4().hex[:10]}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    monkeypatch.setenv("LEGAL_BATCH_S3_BUCKET", bucket)
    monkeypatch.setenv("LEGAL_BATCH_BEDROCK_ROLE_ARN", role_arn)
    return bucket
