"""HTTP emulator of the OpenAI Batch API and the Azure OpenAI Global Batch API.

Tests drive it with the real ``openai`` SDK over HTTP::

    with running_openai_emulator(auto_advance=True) as emu:
        client = openai.OpenAI(base_url=emu.base_url, api_key=emu.api_key)
        azure = openai.AzureOpenAI(azure_endpoint=emu.azure_endpoint, api_key=emu.api_key,
                                   api_version="2024-10-21")

Served paths (``{p}`` is ``/v1`` for OpenAI, ``/openai`` for Azure — ``?api-version=`` required —
or ``/openai/v1`` for Azure's v1 API — ``api-version`` optional)::

    POST {p}/files   GET {p}/files   GET|DELETE {p}/files/{id}   GET {p}/files/{id}/content
    POST {p}/batches   GET {p}/batches?limit=&after=   GET {p}/batches/{id}   POST {p}/batches/{id}/cancel
    POST {p}/chat/completions | /embeddings | /responses                  (real-time path)
    POST /openai/deployments/{deployment}/chat/completions | /embeddings  (Azure real-time path)

Auth: OpenAI paths take ``Authorization: Bearer <key>``; Azure paths take an ``api-key`` header
(``Authorization: Bearer <key>`` is accepted too, standing in for an Entra ID token).

The lifecycle is validating -> in_progress -> finalizing -> completed, moved by ``advance`` (or,
when ``auto_advance`` is set, one step each time a client looks at the batch: ``GET /batches/{id}``,
or a ``GET /batches`` page that lists it; batches in ``held`` stay where they are). Input lines are validated when the batch
leaves ``validating``, as the real services do: the batch is created, then fails with ``errors``.
Results are produced when the batch enters ``completed``; output lines are shuffled (joined on
``custom_id`` by consumers), failures go to a separate error file, and the providers' traps are
reproduced: every line failed -> ``completed`` with ``output_file_id`` null; nothing failed ->
OpenAI's ``error_file_id`` is null while Azure's points at an empty (0 byte) file. ``expire`` puts
the unanswered lines in the error file as ``batch_expired``; a finished cancellation answers the
first ``cancel_completed_fraction`` of the lines (default none) and leaves the rest out of both
files, so consumers must requeue whatever has no result. Batch lists are per flavour (an Azure
client does not see OpenAI batches); files and batch ids are shared.

Embeddings are deterministic unit vectors (``embedding_vector``), returned as the request's
``encoding_format`` asks, as the API documents: ``float`` (the default, a JSON list) or ``base64``
(the little-endian float32 bytes, base64-encoded); any other value is a 400 ``invalid_value`` on
that line. ``latency_s`` adds a delay to every HTTP answer (a network round trip, for benchmarks).

Enqueued-token quota (``enqueued_token_limit``, per model or for every model): as the services
document it, ``POST /batches`` does not refuse a batch over the quota — the batch is created and
fails with ``errors.data[].code == "token_limit_exceeded"`` when it leaves ``validating`` (or at
once, with ``quota_check="create"``), with OpenAI's message "Enqueued token limit reached for
<model> in organization <org>. Limit: <n> enqueued tokens. ..." (``quota_states_limit=False``
drops the limit from the message). The input tokens of a model's batches in ``in_progress`` and
``finalizing`` count against it, with exact cl100k token counts.
"""

from __future__ import annotations

import base64
import codecs
import hashlib
import json
import math
import random
import re
import struct
import sys
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal
from urllib.parse import parse_qsl, urlsplit

Flavour = Literal["openai", "azure"]
JSON = dict[str, Any]

OPENAI_BATCH_ENDPOINTS = frozenset({"/v1/chat/completions", "/v1/embeddings", "/v1/responses"})
"""Batch endpoints the emulator accepts on OpenAI paths (the ones it knows how to answer)."""
AZURE_BATCH_ENDPOINTS = frozenset(
    {"/chat/completions", "/v1/chat/completions", "/responses", "/v1/responses"}
)
"""Batch endpoints accepted on Azure paths: Global Batch does not take embeddings (DESIGN.md section 4)."""

MAX_FILE_BYTES = 200 * 1024 * 1024
MAX_REQUESTS: dict[Flavour, int] = {"openai": 50_000, "azure": 100_000}
MAX_EMBEDDING_INPUTS = 50_000
MAX_METADATA_KEYS = 16
COMPLETION_WINDOW_SECONDS = 24 * 3600

TERMINAL_STATUSES = frozenset({"completed", "failed", "expired", "cancelled"})
_FORCEABLE_STATUSES = frozenset(
    {"validating", "in_progress", "finalizing", "cancelling", "cancelled", "failed"}
)
_TIMESTAMP_FIELD = {
    "in_progress": "in_progress_at",
    "finalizing": "finalizing_at",
    "completed": "completed_at",
    "failed": "failed_at",
    "expired": "expired_at",
    "cancelling": "cancelling_at",
    "cancelled": "cancelled_at",
}
_EXPIRED_ERROR = {
    "code": "batch_expired",
    "message": "This request could not be executed before the completion window expired.",
}


@dataclass(frozen=True)
class RecordedRequest:
    """One HTTP request as the emulator received it (recorded before faults, auth and routing)."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: bytes


@dataclass
class _Rule:
    """A pending fault or delay: applies to the next ``remaining`` matching requests."""

    method: str
    pattern: re.Pattern[str]
    remaining: int
    status: int = 0
    retry_after: float | None = None
    body: JSON | None = None
    seconds: float = 0.0

    def matches(self, request: RecordedRequest) -> bool:
        """True when the method (or ``*``) and the path regex match and uses are left."""
        method_ok = self.method == "*" or self.method.upper() == request.method
        return self.remaining > 0 and method_ok and self.pattern.search(request.path) is not None


@dataclass
class _Response:
    """What the handler writes back."""

    status: int
    body: bytes
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)


class ApiError(Exception):
    """An error answered with the OpenAI error JSON ``{"error": {message, type, param, code}}``."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.payload: JSON = {"error": {"message": message, "type": type, "param": param, "code": code}}


class _LineError(Exception):
    """A single batch line failed: it goes to the error file with this status and error."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


@dataclass(frozen=True)
class _Context:
    """A routed request: which API flavour it came through, its path parameters and the raw request."""

    flavour: Flavour
    request: RecordedRequest
    params: tuple[str, ...]

    def json(self) -> JSON:
        """The request body as a JSON object, or a 400."""
        try:
            data = json.loads(self.request.body or b"{}")
        except ValueError as exc:
            raise ApiError(400, f"We could not parse the JSON body of your request: {exc}") from None
        if not isinstance(data, dict):
            raise ApiError(400, "The request body must be a JSON object.")
        return data


def _new_id(prefix: str) -> str:
    return prefix + uuid.uuid4().hex


def _now() -> int:
    return int(time.time())


def _dumps(obj: object) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def _tokens(text: str) -> int:
    """Rough token count: a quarter of the characters."""
    return len(text) // 4


def _text_of(content: object) -> str:
    """The text inside a message ``content``: a string or a list of parts with ``text``."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(str(part.get("text", "")) for part in content if isinstance(part, dict))
    return ""


def _summary(text: str, limit: int = 80) -> str:
    return " ".join(text.split())[:limit]


def embedding_vector(text: str, dimensions: int) -> list[float]:
    """Deterministic unit-norm vector for ``text``, seeded by the sha256 of the text."""
    rng = random.Random(int.from_bytes(hashlib.sha256(text.encode()).digest(), "big"))
    vector = [rng.gauss(0.0, 1.0) for _ in range(dimensions)]
    norm = math.sqrt(sum(x * x for x in vector)) or 1.0
    return [x / norm for x in vector]


def default_chat_response(body: JSON) -> JSON:
    """Deterministic ``chat.completion``: ``"Summary: <start of the last user message>"``.

    Honours ``max_tokens``/``max_completion_tokens`` by truncating with ``finish_reason="length"``.
    """
    messages = [m for m in body.get("messages") or [] if isinstance(m, dict)]
    prompt = "".join(_text_of(m.get("content")) for m in messages)
    user = [_text_of(m.get("content")) for m in messages if m.get("role") == "user"]
    content = "Summary: " + _summary(user[-1] if user else prompt)
    finish_reason = "stop"
    limit = body.get("max_completion_tokens") or body.get("max_tokens")
    if isinstance(limit, int) and _tokens(content) > limit:
        content, finish_reason = content[: limit * 4], "length"
    digest = hashlib.sha256(_dumps(body)).hexdigest()
    prompt_tokens, completion_tokens = _tokens(prompt), _tokens(content)
    return {
        "id": "chatcmpl-" + digest[:24],
        "object": "chat.completion",
        "created": _now(),
        "model": body.get("model"),
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content, "refusal": None, "annotations": []},
                "logprobs": None,
                "finish_reason": finish_reason,
            }
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
        "system_fingerprint": None,
        "service_tier": "default",
    }


def default_responses_response(body: JSON) -> JSON:
    """Deterministic Responses-API ``response`` echoing the start of ``input``."""
    raw_input = body.get("input")
    if isinstance(raw_input, list):
        prompt = " ".join(_text_of(item.get("content")) for item in raw_input if isinstance(item, dict))
    else:
        prompt = _text_of(raw_input)
    text = "Summary: " + _summary(prompt)
    digest = hashlib.sha256(_dumps(body)).hexdigest()
    input_tokens, output_tokens = _tokens(prompt), _tokens(text)
    return {
        "id": "resp_" + digest[:24],
        "object": "response",
        "created_at": _now(),
        "status": "completed",
        "model": body.get("model"),
        "output": [
            {
                "type": "message",
                "id": "msg_" + digest[24:48],
                "status": "completed",
                "role": "assistant",
                "content": [{"type": "output_text", "text": text, "annotations": []}],
            }
        ],
        "usage": {
            "input_tokens": input_tokens,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": output_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": input_tokens + output_tokens,
        },
    }


def _embedding_inputs(body: JSON) -> list[str]:
    """``body.input`` as a list of strings, or a line error."""
    value = body.get("input")
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value and all(isinstance(item, str) for item in value):
        return list(value)
    raise _LineError(400, "invalid_value", "'input' must be a non-empty string or a list of strings.")


def _multipart_fields(body: bytes, content_type: str) -> dict[str, tuple[str | None, bytes]]:
    """Parse ``multipart/form-data``: field name -> (filename or None, content)."""
    match = re.search(r'boundary="?([^";]+)"?', content_type)
    if "multipart/form-data" not in content_type or match is None:
        raise ApiError(400, "Expected a multipart/form-data body.")
    fields: dict[str, tuple[str | None, bytes]] = {}
    for part in body.split(b"--" + match.group(1).encode())[1:]:
        if part.startswith(b"--"):
            break
        head, _, content = part.removeprefix(b"\r\n").partition(b"\r\n\r\n")
        disposition = head.decode("latin-1")
        name = re.search(r'\bname="([^"]*)"', disposition)
        filename = re.search(r'\bfilename="([^"]*)"', disposition)
        if name:
            fields[name.group(1)] = (filename.group(1) if filename else None, content.removesuffix(b"\r\n"))
    return fields


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, emulator: OpenAIBatchEmulator) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.emulator = emulator

    def handle_error(self, request: object, client_address: object) -> None:
        """Ignore clients that hang up (e.g. a timed-out SDK call); report anything else."""
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)  # type: ignore[arg-type]


class _Handler(BaseHTTPRequestHandler):
    """Reads a request, hands it to the emulator, writes its answer."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out in two writes; avoid a 40 ms stall per call
    server: _Server

    def do_GET(self) -> None:
        self._handle()

    do_POST = do_DELETE = do_PUT = do_PATCH = do_GET

    def log_message(self, format: str, *args: object) -> None:
        """Keep test output quiet."""
        return

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _handle(self) -> None:
        url = urlsplit(self.path)
        request = RecordedRequest(
            method=self.command,
            path=url.path,
            query=dict(parse_qsl(url.query, keep_blank_values=True)),
            headers={key.lower(): value for key, value in self.headers.items()},
            body=self._read_body(),
        )
        response = self.server.emulator._dispatch(request)
        self.send_response(response.status)
        self.send_header("Content-Type", response.content_type)
        self.send_header("Content-Length", str(len(response.body)))
        self.send_header("x-request-id", _new_id("req_"))
        for name, value in response.headers.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(response.body)


_Route = tuple[str, re.Pattern[str], Callable[["OpenAIBatchEmulator", _Context], "_Response | JSON"]]


class OpenAIBatchEmulator:
    """In-process HTTP server speaking the OpenAI and Azure OpenAI Files + Batches APIs.

    State (``requests``, ``files``, ``batches``) is plain data that tests may read; the control
    methods (``advance``, ``complete``, ``expire``, ...) move batches the way the service would.
    Limits (``max_requests``, ``max_file_bytes``, ``max_embedding_inputs``) and the accepted
    endpoints are instance attributes so a test can lower or widen them.
    """

    def __init__(
        self, *, api_key: str = "test-key", auto_advance: bool = False, dimensions_default: int = 1536
    ) -> None:
        self.api_key = api_key
        self.auto_advance = auto_advance
        self.dimensions_default = dimensions_default
        self.requests: list[RecordedRequest] = []
        self.files: dict[str, JSON] = {}
        self.batches: dict[str, JSON] = {}
        self.responder: Callable[[JSON], JSON] | None = None
        """Answers non-embedding lines (and real-time chat); default: ``default_chat_response``."""
        self.fail_custom_ids: dict[str, tuple[int, str, str]] = {}
        """custom_id -> (status_code, error code, message): that line goes to the error file."""
        self.cancel_completed_fraction = 0.0
        """Share of lines (input order) counted as done when a cancellation finishes."""
        self.max_requests: dict[Flavour, int] = dict(MAX_REQUESTS)
        self.max_file_bytes = MAX_FILE_BYTES
        self.max_embedding_inputs = MAX_EMBEDDING_INPUTS
        self.batch_endpoints: dict[Flavour, frozenset[str]] = {
            "openai": OPENAI_BATCH_ENDPOINTS,
            "azure": AZURE_BATCH_ENDPOINTS,
        }
        self.enqueued_token_limit: int | dict[str, int] | None = None
        """Enqueued-token quota: one limit for every model, or per model; None = no quota."""
        self.quota_check: Literal["validation", "create"] = "validation"
        self.quota_states_limit = True
        self.quota_refusals = 0
        self.latency_s = 0.0
        """Seconds added before every answer (outside the lock: concurrent requests wait in parallel)."""
        self.held: set[str] = set()
        """Batches ``auto_advance`` leaves where they are (say, someone else's long batch); ``advance`` moves them."""
        self._lock = threading.RLock()
        self._faults: list[_Rule] = []
        self._delays: list[_Rule] = []
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # ----------------------------------------------------------------- lifecycle

    def start(self) -> OpenAIBatchEmulator:
        """Bind 127.0.0.1 on a free port and serve from a daemon thread."""
        if self._server is None:
            self._server = _Server(self)
            self._thread = threading.Thread(
                target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and release the port."""
        server, thread = self._server, self._thread
        self._server = self._thread = None
        if server is not None:
            server.shutdown()
            server.server_close()
        if thread is not None:
            thread.join(timeout=5)

    def __enter__(self) -> OpenAIBatchEmulator:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        """The bound port (the emulator must be started)."""
        if self._server is None:
            raise RuntimeError("OpenAIBatchEmulator is not started; call start() first")
        return int(self._server.server_address[1])

    @property
    def base_url(self) -> str:
        """For ``openai.OpenAI(base_url=...)``."""
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def azure_endpoint(self) -> str:
        """For ``openai.AzureOpenAI(azure_endpoint=...)``."""
        return f"http://127.0.0.1:{self.port}"

    # ------------------------------------------------------------ test controls

    def file_content(self, file_id: str) -> bytes:
        """The stored bytes of a file (input, output or error file)."""
        with self._lock:
            return bytes(self.files[file_id]["content"])

    def add_fault(
        self,
        *,
        method: str,
        path_regex: str,
        status: int,
        times: int = 1,
        retry_after: float | None = None,
        body: JSON | None = None,
    ) -> None:
        """Answer the next ``times`` requests matching ``method`` (or ``*``) and ``path_regex``
        (searched in the path, without the query) with ``status`` and the OpenAI error JSON —
        or ``body`` when given — plus ``Retry-After`` when ``retry_after`` is given."""
        rule = _Rule(method, re.compile(path_regex), times, status=status, retry_after=retry_after, body=body)
        with self._lock:
            self._faults.append(rule)

    def add_delay(self, *, method: str, path_regex: str, seconds: float, times: int = 1) -> None:
        """Sleep ``seconds`` before answering the next ``times`` matching requests."""
        with self._lock:
            self._delays.append(_Rule(method, re.compile(path_regex), times, seconds=seconds))

    def set_status(self, batch_id: str, status: str) -> None:
        """Force a status (validating|in_progress|finalizing|cancelling|cancelled|failed) and stamp
        its ``*_at`` field; forcing ``cancelled`` also writes the partial results."""
        if status not in _FORCEABLE_STATUSES:
            raise ValueError(f"cannot force status {status!r}; use complete() or expire() for those")
        with self._lock:
            batch = self._batch(batch_id)
            if status == "cancelled":
                self._finish(batch, "cancelled", self._fraction(batch, self.cancel_completed_fraction))
            else:
                self._stamp(batch, status)

    def advance(self, batch_id: str) -> str:
        """One step: validating -> in_progress (or failed) -> finalizing -> completed, and
        cancelling -> cancelled. Terminal batches do not move. Returns the new status."""
        with self._lock:
            batch = self._batch(batch_id)
            status = batch["status"]
            if status == "validating":
                errors = self._validate(batch) or self._over_quota(batch)
                if errors:
                    self._fail(batch, errors)
                else:
                    self._stamp(batch, "in_progress")
            elif status == "in_progress":
                self._stamp(batch, "finalizing")
            elif status == "finalizing":
                self._finish(batch, "completed", len(self._requests_of(batch)))
            elif status == "cancelling":
                self._finish(batch, "cancelled", self._fraction(batch, self.cancel_completed_fraction))
            return str(batch["status"])

    def complete(self, batch_id: str) -> None:
        """Advance until the batch is terminal (completed, unless validation fails or it is cancelling)."""
        with self._lock:
            while self._batch(batch_id)["status"] not in TERMINAL_STATUSES:
                self.advance(batch_id)

    def expire(self, batch_id: str, *, completed_fraction: float = 0.5) -> None:
        """Status ``expired``: the first ``int(n * completed_fraction)`` lines (input order) are
        answered as usual, the rest go to the error file with code ``batch_expired``."""
        with self._lock:
            batch = self._batch(batch_id)
            if batch["status"] in TERMINAL_STATUSES:
                raise ValueError(f"batch {batch_id} is already {batch['status']}")
            self._finish(batch, "expired", self._fraction(batch, completed_fraction), expire_rest=True)

    def fail_validation(
        self, batch_id: str, message: str, *, code: str = "invalid_request", line: int | None = None
    ) -> None:
        """Status ``failed`` with ``errors.data == [{code, message, line, param}]``."""
        with self._lock:
            self._fail(
                self._batch(batch_id), [{"code": code, "message": message, "line": line, "param": None}]
            )

    def copy_batch(self, batch_id: str, *, metadata: dict[str, str] | None = None) -> str:
        """A new batch, listed as the newest, with the input file, endpoint and status of ``batch_id``
        and its own ``metadata``: a quick way to hold many batches (1,000 for a status sweep).
        The source must not have finished (its results are not copied). Returns the new id."""
        with self._lock:
            source = self._batch(batch_id)
            if source["status"] in TERMINAL_STATUSES:
                raise ValueError(f"batch {batch_id} is already {source['status']}; copy it before it finishes")
            batch = {**source, "id": _new_id("batch_"), "metadata": metadata,
                     "request_counts": dict(source["request_counts"]), "_processed": False,
                     "output_file_id": None, "error_file_id": None}
            self.batches[batch["id"]] = batch
            return str(batch["id"])

    # ------------------------------------------------------------- dispatching

    def _dispatch(self, request: RecordedRequest) -> _Response:
        """Record, apply delays and faults, authenticate, then route."""
        with self._lock:
            self.requests.append(request)
            delay = self._take(self._delays, request)
            fault = self._take(self._faults, request)
        if self.latency_s > 0:
            time.sleep(self.latency_s)
        if delay is not None:
            time.sleep(delay.seconds)
        if fault is not None:
            return self._fault_response(fault)
        try:
            flavour, rest = self._authorise(request)
            for method, pattern, handler in self._ROUTES:
                match = pattern.fullmatch(rest)
                if match and method == request.method:
                    result = handler(self, _Context(flavour, request, match.groups()))
                    return result if isinstance(result, _Response) else _Response(200, _dumps(result))
            raise ApiError(404, f"Unknown request URL: {request.method} {request.path}.", code="unknown_url")
        except ApiError as exc:
            return _Response(exc.status, _dumps(exc.payload))
        except Exception:
            message = "Emulator error:\n" + traceback.format_exc()
            return _Response(
                500,
                _dumps({"error": {"message": message, "type": "server_error", "param": None, "code": None}}),
            )

    @staticmethod
    def _take(rules: list[_Rule], request: RecordedRequest) -> _Rule | None:
        for rule in rules:
            if rule.matches(request):
                rule.remaining -= 1
                return rule
        return None

    @staticmethod
    def _fault_response(fault: _Rule) -> _Response:
        if fault.body is not None:
            payload = fault.body
        elif fault.status == 429:
            payload = ApiError(
                429,
                "Rate limit reached. Please try again later.",
                type="requests",
                code="rate_limit_exceeded",
            ).payload
        elif fault.status >= 500:
            payload = ApiError(
                fault.status, "The server had an error while processing your request.", type="server_error"
            ).payload
        else:
            payload = ApiError(fault.status, f"Injected fault: HTTP {fault.status}.").payload
        headers = {}
        if fault.retry_after is not None:
            headers["Retry-After"] = f"{fault.retry_after:g}"
        return _Response(fault.status, _dumps(payload), headers=headers)

    def _authorise(self, request: RecordedRequest) -> tuple[Flavour, str]:
        """Split the path into (flavour, path under the API prefix); check the key and api-version."""
        path, headers = request.path, request.headers
        bearer = headers.get("authorization", "")
        bearer_ok = bearer == f"Bearer {self.api_key}"
        if path.startswith("/v1/"):
            if not bearer_ok:
                raise self._auth_error(
                    "Incorrect API key provided." if bearer else "You didn't provide an API key."
                )
            return "openai", path[len("/v1") :]
        if path.startswith("/openai/"):
            if not (bearer_ok or headers.get("api-key") == self.api_key):
                raise self._auth_error(
                    "Access denied due to invalid subscription key or wrong API endpoint. Make sure to provide "
                    "a valid key for an active subscription and use a correct regional API endpoint for your resource."
                )
            if path.startswith("/openai/v1/"):
                return "azure", path[len("/openai/v1") :]
            if not request.query.get("api-version"):
                raise ApiError(
                    400,
                    "Missing required query parameter 'api-version'.",
                    param="api-version",
                    code="missing_api_version",
                )
            return "azure", path[len("/openai") :]
        raise ApiError(404, f"Unknown request URL: {request.method} {path}.", code="unknown_url")

    @staticmethod
    def _auth_error(message: str) -> ApiError:
        return ApiError(401, message, code="invalid_api_key")

    # ------------------------------------------------------------------- files

    def _file_object(self, file: JSON) -> JSON:
        return {
            "id": file["id"],
            "object": "file",
            "bytes": file["bytes"],
            "created_at": file["created_at"],
            "filename": file["filename"],
            "purpose": file["purpose"],
            "status": "processed",
            "expires_at": None,
            "status_details": None,
        }

    def _store_file(self, content: bytes, *, filename: str, purpose: str) -> JSON:
        file = {
            "id": _new_id("file-"),
            "filename": filename,
            "purpose": purpose,
            "bytes": len(content),
            "content": content,
            "created_at": _now(),
        }
        with self._lock:
            self.files[file["id"]] = file
        return file

    def _file(self, file_id: str) -> JSON:
        file = self.files.get(file_id)
        if file is None:
            raise ApiError(404, f"No such File object: {file_id}", param="id")
        return file

    def _api_upload_file(self, ctx: _Context) -> JSON:
        fields = _multipart_fields(ctx.request.body, ctx.request.headers.get("content-type", ""))
        if "file" not in fields:
            raise ApiError(
                400, "Missing required parameter: 'file'.", param="file", code="missing_required_parameter"
            )
        purpose = fields.get("purpose", (None, b""))[1].decode()
        if purpose != "batch":
            raise ApiError(
                400, f"Invalid purpose {purpose!r}: the emulator accepts 'batch' only.", param="purpose"
            )
        filename, content = fields["file"]
        return self._file_object(
            self._store_file(content, filename=filename or "upload.jsonl", purpose=purpose)
        )

    def _api_list_files(self, ctx: _Context) -> JSON:
        with self._lock:
            files = [
                f
                for f in reversed(self.files.values())
                if ctx.request.query.get("purpose") in (None, f["purpose"])
            ]
            return self._page([self._file_object(f) for f in files], ctx.request.query, default_limit=10_000)

    def _api_get_file(self, ctx: _Context) -> JSON:
        with self._lock:
            return self._file_object(self._file(ctx.params[0]))

    def _api_file_content(self, ctx: _Context) -> _Response:
        with self._lock:
            content = self._file(ctx.params[0])["content"]
        return _Response(200, bytes(content), content_type="application/octet-stream")

    def _api_delete_file(self, ctx: _Context) -> JSON:
        with self._lock:
            file = self._file(ctx.params[0])
            del self.files[file["id"]]
        return {"id": file["id"], "object": "file", "deleted": True}

    # ----------------------------------------------------------------- batches

    @staticmethod
    def _public(batch: JSON) -> JSON:
        """The batch as the API returns it: internal ``_`` fields dropped."""
        return json.loads(_dumps({k: v for k, v in batch.items() if not k.startswith("_")}))

    def _batch(self, batch_id: str) -> JSON:
        batch = self.batches.get(batch_id)
        if batch is None:
            raise ApiError(404, f"No batch found with id '{batch_id}'.", param="batch_id")
        return batch

    def _api_create_batch(self, ctx: _Context) -> JSON:
        body = ctx.json()
        input_file_id, endpoint = body.get("input_file_id"), body.get("endpoint")
        if not isinstance(input_file_id, str) or not input_file_id:
            raise ApiError(
                400,
                "Missing required parameter: 'input_file_id'.",
                param="input_file_id",
                code="missing_required_parameter",
            )
        allowed = self.batch_endpoints[ctx.flavour]
        if endpoint not in allowed:
            raise ApiError(
                400,
                f"Invalid value {endpoint!r} for 'endpoint'; supported: {sorted(allowed)}.",
                param="endpoint",
                code="invalid_value",
            )
        if body.get("completion_window") != "24h":
            raise ApiError(
                400,
                "Invalid 'completion_window': only '24h' is supported.",
                param="completion_window",
                code="invalid_value",
            )
        metadata = body.get("metadata")
        if metadata is not None and not (
            isinstance(metadata, dict)
            and len(metadata) <= MAX_METADATA_KEYS
            and all(
                isinstance(k, str) and len(k) <= 64 and isinstance(v, str) and len(v) <= 512
                for k, v in metadata.items()
            )
        ):
            raise ApiError(
                400,
                "Invalid 'metadata': at most 16 string keys (<= 64 chars) with string values (<= 512 chars).",
                param="metadata",
                code="invalid_value",
            )
        with self._lock:
            file = self._file(input_file_id)
            if file["purpose"] != "batch":
                raise ApiError(400, f"File {input_file_id} must have purpose 'batch'.", param="input_file_id")
            now = _now()
            batch: JSON = {
                "id": _new_id("batch_"),
                "object": "batch",
                "endpoint": endpoint,
                "model": None,
                "errors": None,
                "input_file_id": input_file_id,
                "completion_window": "24h",
                "status": "validating",
                "output_file_id": None,
                "error_file_id": None,
                "created_at": now,
                "in_progress_at": None,
                "expires_at": now + COMPLETION_WINDOW_SECONDS,
                "finalizing_at": None,
                "completed_at": None,
                "failed_at": None,
                "expired_at": None,
                "cancelling_at": None,
                "cancelled_at": None,
                "request_counts": {"total": 0, "completed": 0, "failed": 0},
                "usage": self._usage(0, 0),
                "metadata": metadata,
                "_flavour": ctx.flavour,
                "_requests": None,
                "_processed": False,
            }
            self.batches[batch["id"]] = batch
            if self.quota_check == "create" and self.enqueued_token_limit is not None:
                errors = self._over_quota(batch)
                if errors:
                    self._fail(batch, errors)
            return self._public(batch)

    def _api_get_batch(self, ctx: _Context) -> JSON:
        with self._lock:
            batch = self._batch(ctx.params[0])
            if self.auto_advance and batch["id"] not in self.held:
                self.advance(batch["id"])
            return self._public(batch)

    def _api_cancel_batch(self, ctx: _Context) -> JSON:
        with self._lock:
            batch = self._batch(ctx.params[0])
            if batch["status"] in TERMINAL_STATUSES:
                raise ApiError(
                    400, f"Cannot cancel a batch with status '{batch['status']}'.", code="invalid_state"
                )
            if batch["status"] != "cancelling":
                self._stamp(batch, "cancelling")
            return self._public(batch)

    def _api_list_batches(self, ctx: _Context) -> JSON:
        with self._lock:
            newest_first = [b for b in reversed(self.batches.values()) if b["_flavour"] == ctx.flavour]
            page = self._page(newest_first, ctx.request.query, default_limit=20)
            if self.auto_advance:
                for batch in page["data"]:
                    if batch["id"] not in self.held:
                        self.advance(batch["id"])
            page["data"] = [self._public(b) for b in page["data"]]  # only the page's batches
        return page

    @staticmethod
    def _page(items: list[JSON], query: dict[str, str], *, default_limit: int) -> JSON:
        """Cursor pagination: ``limit`` items after the id ``after``."""
        try:
            limit = int(query.get("limit", default_limit))
        except ValueError:
            raise ApiError(400, "Invalid 'limit': must be an integer.", param="limit") from None
        if not 1 <= limit <= max(default_limit, 100):
            raise ApiError(
                400, f"Invalid 'limit': must be between 1 and {max(default_limit, 100)}.", param="limit"
            )
        start = 0
        if after := query.get("after"):
            ids = [item["id"] for item in items]
            if after not in ids:
                raise ApiError(400, f"Invalid 'after': no object with id '{after}'.", param="after")
            start = ids.index(after) + 1
        page = items[start : start + limit]
        return {
            "object": "list",
            "data": page,
            "first_id": page[0]["id"] if page else None,
            "last_id": page[-1]["id"] if page else None,
            "has_more": start + limit < len(items),
        }

    # ---------------------------------------------------- validation, results

    def _stamp(self, batch: JSON, status: str) -> None:
        batch["status"] = status
        if status in _TIMESTAMP_FIELD:
            batch[_TIMESTAMP_FIELD[status]] = _now()

    def _fail(self, batch: JSON, errors: list[JSON]) -> None:
        batch["errors"] = {"object": "list", "data": errors}
        self._stamp(batch, "failed")

    def _validate(self, batch: JSON) -> list[JSON]:
        """Check the input file the way the service does when a batch leaves ``validating``.

        Stores the valid request lines in ``batch["_requests"]`` and the model in ``batch["model"]``;
        returns the errors (``{code, message, line, param}``), empty when the file is valid.
        """
        errors: list[JSON] = []

        def error(code: str, message: str, line: int | None = None, param: str | None = None) -> None:
            errors.append({"code": code, "message": message, "line": line, "param": param})

        flavour: Flavour = batch["_flavour"]
        endpoint = batch["endpoint"]
        file = self.files.get(batch["input_file_id"])
        content = b"" if file is None else bytes(file["content"])
        requests: list[JSON] = []
        batch["_requests"] = requests
        if file is None:
            error(
                "invalid_request",
                f"The input file {batch['input_file_id']} no longer exists.",
                param="input_file_id",
            )
            return errors
        if len(content) > self.max_file_bytes:
            error(
                "file_too_large",
                f"The input file is {len(content)} bytes; the limit is {self.max_file_bytes}.",
            )
            return errors
        if content.startswith(codecs.BOM_UTF8):
            if flavour == "azure":
                error(
                    "invalid_json_line",
                    "The input file starts with a UTF-8 byte order mark (BOM); remove it.",
                    line=1,
                )
                return errors
            content = content[len(codecs.BOM_UTF8) :]
        model: str | None = None
        seen: set[str] = set()
        lines = inputs = 0
        for number, raw in enumerate(content.split(b"\n"), start=1):
            if not raw.strip():
                continue
            lines += 1
            try:
                item = json.loads(raw.decode("utf-8"))
            except ValueError:
                item = None
            if not isinstance(item, dict):
                error("invalid_json_line", "This line is not parseable as valid JSON.", number)
                continue
            before = len(errors)
            custom_id, body = item.get("custom_id"), item.get("body")
            if not isinstance(custom_id, str) or not custom_id:
                error(
                    "missing_required_parameter",
                    "Missing required parameter: 'custom_id'.",
                    number,
                    "custom_id",
                )
            elif custom_id in seen:
                error(
                    "duplicate_custom_id",
                    f"The custom_id {custom_id!r} is a duplicate of another request; custom_id must be unique within a batch.",
                    number,
                    "custom_id",
                )
            else:
                seen.add(custom_id)
            if item.get("method") != "POST":
                error(
                    "invalid_request",
                    f"Invalid method {item.get('method')!r}; only 'POST' is supported.",
                    number,
                    "method",
                )
            if item.get("url") != endpoint:
                error(
                    "url_mismatch",
                    f"The URL {item.get('url')!r} of this request does not match the batch endpoint {endpoint!r}.",
                    number,
                    "url",
                )
            if not isinstance(body, dict):
                error("missing_required_parameter", "Missing required parameter: 'body'.", number, "body")
            elif not isinstance(body.get("model"), str):
                error(
                    "missing_required_parameter",
                    "Missing required parameter: 'body.model'.",
                    number,
                    "body.model",
                )
            elif model is None:
                model = body["model"]
            elif body["model"] != model:
                error(
                    "model_mismatch",
                    f"The model {body['model']!r} of this request does not match {model!r} used by the previous lines; "
                    "a batch uses one model.",
                    number,
                    "body.model",
                )
            if isinstance(body, dict) and endpoint.endswith("/embeddings"):
                value = body.get("input")
                inputs += len(value) if isinstance(value, list) else 1
            if len(errors) == before:
                requests.append(item)
        if lines == 0:
            error("empty_file", "The input file contains no requests.")
        if lines > self.max_requests[flavour]:
            error(
                "too_many_tasks",
                f"The input file has {lines} requests; the limit is {self.max_requests[flavour]}.",
            )
        if inputs > self.max_embedding_inputs:
            error(
                "too_many_tasks",
                f"The batch has {inputs} embedding inputs; the limit is {self.max_embedding_inputs}.",
            )
        batch["model"] = model
        batch["request_counts"] = {"total": lines, "completed": 0, "failed": 0}
        return errors

    def enqueued_tokens(self, model: str, *, excluding: str | None = None) -> int:
        """Input tokens of the model's batches the quota counts (in progress or finalizing)."""
        with self._lock:
            return sum(self._input_tokens(b) for b in self.batches.values()
                       if b["id"] != excluding and b["status"] in ("in_progress", "finalizing")
                       and self._model_of(b) == model)

    def _model_of(self, batch: JSON) -> str | None:
        if batch.get("_requests") is None:
            self._validate(batch)
        return batch.get("model")

    def _input_tokens(self, batch: JSON) -> int:
        if "_input_tokens" not in batch:
            from legal_batch.core.tokens import count_tokens

            total = 0
            for request in self._requests_of(batch):
                body = request.get("body") or {}
                value = body.get("input")
                texts = value if isinstance(value, list) else [value] if isinstance(value, str) else []
                texts += [_text_of(m.get("content")) for m in body.get("messages") or [] if isinstance(m, dict)]
                total += sum(count_tokens(t) for t in texts if isinstance(t, str))
            batch["_input_tokens"] = total
        return int(batch["_input_tokens"])

    def _over_quota(self, batch: JSON) -> list[JSON]:
        """``token_limit_exceeded`` when this batch would pass the model's enqueued-token quota."""
        model = self._model_of(batch)
        limit = self.enqueued_token_limit
        if isinstance(limit, dict):
            limit = limit.get(model or "")
        if limit is None or model is None:
            return []
        if self.enqueued_tokens(model, excluding=batch["id"]) + self._input_tokens(batch) <= limit:
            return []
        self.quota_refusals += 1
        stated = f" Limit: {limit:,} enqueued tokens." if self.quota_states_limit else ""
        return [{"code": "token_limit_exceeded", "line": None, "param": None,
                 "message": f"Enqueued token limit reached for {model} in organization org-emulator.{stated} "
                            "Please try again once some in_progress batches have been completed."}]

    def _requests_of(self, batch: JSON) -> list[JSON]:
        """The valid request lines, validating first if the batch skipped ``validating``."""
        if batch.get("_requests") is None:
            self._validate(batch)
        return list(batch["_requests"])

    def _fraction(self, batch: JSON, fraction: float) -> int:
        return int(len(self._requests_of(batch)) * fraction)

    def _finish(self, batch: JSON, status: str, done: int, *, expire_rest: bool = False) -> None:
        """Enter a terminal ``status``: answer the first ``done`` lines (input order), write the
        output and error files (shuffled), update counts and usage. Already-processed batches keep
        their files."""
        if not batch["_processed"]:
            batch["_processed"] = True
            requests = self._requests_of(batch)
            outputs: list[JSON] = []
            failures: list[JSON] = []
            input_tokens = output_tokens = 0
            for request in requests[:done]:
                line, usage = self._answer_line(batch["endpoint"], request)
                succeeded = line["error"] is None and line["response"]["status_code"] == 200
                (outputs if succeeded else failures).append(line)
                input_tokens += usage[0]
                output_tokens += usage[1]
            if expire_rest:
                failures += [self._batch_error_line(r["custom_id"], _EXPIRED_ERROR) for r in requests[done:]]
            self._write_results(batch, outputs, failures)
            batch["request_counts"] = {
                "total": len(requests),
                "completed": len(outputs),
                "failed": len(failures),
            }
            batch["usage"] = self._usage(input_tokens, output_tokens)
        self._stamp(batch, status)

    def _write_results(self, batch: JSON, outputs: list[JSON], failures: list[JSON]) -> None:
        def jsonl(lines: list[JSON]) -> bytes:
            ordered = sorted(lines, key=lambda line: hashlib.sha256(line["custom_id"].encode()).digest())
            return b"".join(_dumps(line) + b"\n" for line in ordered)

        if outputs:
            name = f"{batch['id']}_output.jsonl"
            output = self._store_file(jsonl(outputs), filename=name, purpose="batch_output")
            batch["output_file_id"] = output["id"]
        if failures or batch["_flavour"] == "azure":
            name = f"{batch['id']}_error.jsonl"
            error_file = self._store_file(jsonl(failures), filename=name, purpose="batch_output")
            batch["error_file_id"] = error_file["id"]

    @staticmethod
    def _usage(input_tokens: int, output_tokens: int) -> JSON:
        return {
            "input_tokens": input_tokens,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": output_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": input_tokens + output_tokens,
        }

    @staticmethod
    def _batch_error_line(custom_id: str, error: JSON) -> JSON:
        """A line that failed at the batch level (e.g. expired): no response, an ``error``."""
        return {"id": _new_id("batch_req_"), "custom_id": custom_id, "response": None, "error": dict(error)}

    def _answer_line(self, endpoint: str, request: JSON) -> tuple[JSON, tuple[int, int]]:
        """One output or error-file line for a request, and its (input, output) token usage."""
        custom_id = request["custom_id"]
        try:
            if custom_id in self.fail_custom_ids:
                raise _LineError(*self.fail_custom_ids[custom_id])
            status, body = 200, self._respond(endpoint, request["body"])
        except _LineError as exc:
            error_type = "invalid_request_error" if exc.status < 500 else "server_error"
            status = exc.status
            body = {"error": {"message": exc.message, "type": error_type, "param": None, "code": exc.code}}
        except Exception as exc:  # a broken responder: report it on the line, like a 500 from the model
            status = 500
            body = {
                "error": {
                    "message": f"{type(exc).__name__}: {exc}",
                    "type": "server_error",
                    "param": None,
                    "code": None,
                }
            }
        usage = body.get("usage") or {}
        tokens = (
            int(usage.get("prompt_tokens", usage.get("input_tokens", 0))),
            int(usage.get("completion_tokens", usage.get("output_tokens", 0))),
        )
        line = {
            "id": _new_id("batch_req_"),
            "custom_id": custom_id,
            "response": {"status_code": status, "request_id": _new_id("req_"), "body": body},
            "error": None,
        }
        return line, tokens

    def _respond(self, endpoint: str, body: JSON) -> JSON:
        """The response body for one request to ``endpoint``."""
        if endpoint.endswith("/embeddings"):
            return self._embeddings_response(body)
        if self.responder is not None:
            return self.responder(body)
        if endpoint.endswith("/responses"):
            return default_responses_response(body)
        return default_chat_response(body)

    def _embeddings_response(self, body: JSON) -> JSON:
        """``{"object": "list", "data": [embedding...], "model", "usage"}`` with deterministic vectors."""
        texts = _embedding_inputs(body)
        dimensions = body.get("dimensions", self.dimensions_default)
        if not isinstance(dimensions, int) or dimensions < 1:
            raise _LineError(400, "invalid_value", "'dimensions' must be a positive integer.")
        encoding = body.get("encoding_format", "float")
        if encoding not in ("float", "base64"):
            raise _LineError(
                400, "invalid_value",
                f"Invalid value {encoding!r} for 'encoding_format'; supported: 'float', 'base64'.",
            )
        data = []
        for index, text in enumerate(texts):
            vector = embedding_vector(text, dimensions)
            encoded: list[float] | str = vector
            if encoding == "base64":  # the float32 bytes, little-endian, as the API documents
                encoded = base64.b64encode(struct.pack(f"<{dimensions}f", *vector)).decode()
            data.append({"object": "embedding", "index": index, "embedding": encoded})
        tokens = sum(_tokens(text) for text in texts)
        return {
            "object": "list",
            "data": data,
            "model": body.get("model"),
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }

    # ------------------------------------------------------ real-time endpoints

    def _realtime(self, ctx: _Context, endpoint: str) -> JSON:
        body = ctx.json()
        if len(ctx.params) == 2:  # Azure deployment route: the deployment is the model
            body.setdefault("model", ctx.params[0])
        if not isinstance(body.get("model"), str):
            raise ApiError(
                400, "Missing required parameter: 'model'.", param="model", code="missing_required_parameter"
            )
        try:
            return self._respond(endpoint, body)
        except _LineError as exc:
            raise ApiError(exc.status, exc.message, code=exc.code) from None

    def _api_realtime(self, ctx: _Context) -> JSON:
        if len(ctx.params) == 2 and ctx.flavour != "azure":
            raise ApiError(404, f"Unknown request URL: POST {ctx.request.path}.", code="unknown_url")
        return self._realtime(ctx, ctx.params[-1])

    _ROUTES: list[_Route] = [
        ("POST", re.compile(r"/files"), _api_upload_file),
        ("GET", re.compile(r"/files"), _api_list_files),
        ("GET", re.compile(r"/files/([^/]+)"), _api_get_file),
        ("DELETE", re.compile(r"/files/([^/]+)"), _api_delete_file),
        ("GET", re.compile(r"/files/([^/]+)/content"), _api_file_content),
        ("POST", re.compile(r"/batches"), _api_create_batch),
        ("GET", re.compile(r"/batches"), _api_list_batches),
        ("GET", re.compile(r"/batches/([^/]+)"), _api_get_batch),
        ("POST", re.compile(r"/batches/([^/]+)/cancel"), _api_cancel_batch),
        ("POST", re.compile(r"(/chat/completions|/embeddings|/responses)"), _api_realtime),
        (
            "POST",
            re.compile(r"/deployments/([^/]+)(/chat/completions|/embeddings|/responses)"),
            _api_realtime,
        ),
    ]


@contextmanager
def running_openai_emulator(**kw: Any) -> Iterator[OpenAIBatchEmulator]:
    """Start an ``OpenAIBatchEmulator(**kw)`` for the ``with`` block, then stop it."""
    emulator = OpenAIBatchEmulator(**kw).start()
    try:
        yield emulator
    finally:
        emulator.stop()
