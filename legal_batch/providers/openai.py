"""The `openai` provider: the OpenAI Batch API through the real `openai` SDK.

Configured only by the SDK's standard variables (`OPENAI_API_KEY`, `OPENAI_BASE_URL`), so the same
code runs against api.openai.com and against an emulator. `OpenAIStyleProvider` holds everything the
OpenAI and Azure OpenAI batch APIs share (Files + Batches, statuses, output and error files, the
real-time path); `AzureOpenAIProvider` (`providers/azure_openai.py`) subclasses it.

Limits (per job): ≤ 50,000 requests, input file ≤ 200 MB, embeddings ≤ 50,000 inputs across the
batch; `completion_window` is `24h` only; output and error files are deleted after 30 days.

Idempotency: `POST /batches` has no idempotency key, so the SDK's own retry could create a second
batch. Creation therefore runs with SDK retries off; before a batch is created (again) the provider
lists batches for one whose `metadata.client_token` is ours (`find_job`), so a lost answer or a crash
never leaves two batches for one token.

Retries, one layer per call: lifecycle calls (upload, list, poll, download, cancel) use the SDK's
(`max_retries` on the client); batch creation and the real-time path go through the same client with
SDK retries off (`_once`) and retry with `tenacity` — creation looking for its token before each
retry, the real-time path with exponential back-off that respects `Retry-After`.
"""

from __future__ import annotations

import logging
import os
import random
import re
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, ClassVar

import httpx2
import openai
from openai.types import Batch
from tenacity import RetryCallState, Retrying, retry_if_exception, stop_after_attempt

from legal_batch.core.jsonl import atomic_writer
from legal_batch.providers import openai_format
from legal_batch.providers.base import (
    QUOTA_KINDS,
    ChatRequest,
    EmbeddingRequest,
    Endpoint,
    JobState,
    JobStatus,
    ProviderError,
    ProviderLimits,
    ProviderName,
    ProviderQuotaError,
    Request,
    Result,
    SubmittedJob,
)

log = logging.getLogger("legal_batch")

STATES: dict[str, JobState] = {
    "validating": "pending",
    "in_progress": "running",
    "finalizing": "running",
    "cancelling": "running",
    "completed": "completed",
    "expired": "expired",
    "cancelled": "cancelled",
    "failed": "failed",
}
"""Every batch status the OpenAI and Azure batch APIs document, normalised. The SDK does not
validate `status`: anything else is refused by `poll` with a `ProviderError` naming it."""

QUOTA_ERROR_CODES = frozenset({"token_limit_exceeded"})
"""Batch error codes meaning "your enqueued-token quota is full": requeue later, not a failure."""

OUTPUT_RETENTION_DAYS = 30
_CHUNK_BYTES = 1024 * 1024
_MAX_WAIT_SECONDS = 120.0
_SECRET_PATTERN = re.compile(r"\b(sk-[A-Za-z0-9_\-*]{6,})")


class OpenAIStyleProvider:
    """Files + Batches providers speaking the OpenAI batch formats (OpenAI and Azure OpenAI).

    Lifecycle calls (upload, poll, list, download, cancel) rely on the SDK's retries (429 with
    `Retry-After`, 5xx, connection errors; `max_retries` on the client). Batch creation does not:
    see the module docstring. The real-time path retries with `tenacity` (exponential back-off,
    `Retry-After` respected) and runs `concurrency` calls at a time.
    """

    name: ClassVar[ProviderName]
    service: ClassVar[str]
    """How messages name the service, e.g. "OpenAI"."""
    key_variable: ClassVar[str]
    """The variable holding the API key, named in credential errors (never its value)."""
    retention_days: ClassVar[str] = "30"

    def __init__(
        self,
        client: openai.OpenAI,
        *,
        limits: ProviderLimits,
        dimensions: int = 1024,
        concurrency: int = 4,
        realtime_attempts: int = 6,
        create_attempts: int = 4,
        create_timeout: float = 120.0,
        backoff_initial: float = 1.0,
        backoff_max: float = 60.0,
        embedding_inputs_per_call: int = 64,
        embedding_tokens_per_call: int = 250_000,
        find_lookback_days: int = OUTPUT_RETENTION_DAYS,
        find_max_batches: int = 10_000,
        parse_workers: int | None = None,
    ) -> None:
        """`client`: an SDK client (its `max_retries` governs lifecycle calls).
        `concurrency`: real-time calls in flight. `realtime_attempts` / `create_attempts`: tries per
        real-time call / per batch creation. `create_timeout`: seconds before a create is treated as
        "outcome unknown" (then reconciled by token). `embedding_inputs_per_call` (≤ 2048) and
        `embedding_tokens_per_call` (≤ 300,000; a text counts as its UTF-8 bytes, an upper bound of its
        tokens): how many real-time embedding inputs share one call.
        `find_lookback_days` / `find_max_batches`: how far back `find_job` lists batches (older ones
        have lost their output files anyway). `parse_workers`: processes that parse a large JSON-float
        output file (default: the CPUs beyond two — one for this process, one for Postgres' COPY —;
        1 parses in this process: on 2 cores, workers measured no faster)."""
        if not 1 <= embedding_inputs_per_call <= 2048:
            raise ValueError("embedding_inputs_per_call must be between 1 and 2048 (the embeddings API limit)")
        self.client = client
        self.limits = limits
        self.dimensions = dimensions
        self.concurrency = max(1, concurrency)
        self.realtime_attempts = max(1, realtime_attempts)
        self.create_attempts = max(1, create_attempts)
        self.create_timeout = create_timeout
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.embedding_inputs_per_call = embedding_inputs_per_call
        self.embedding_tokens_per_call = min(embedding_tokens_per_call, 300_000)
        self.find_lookback = timedelta(days=find_lookback_days)
        self.find_max_batches = find_max_batches
        self.parse_workers = parse_workers or max(1, (os.cpu_count() or 1) - 2)
        self._once = client.with_options(max_retries=0)
        """The same client without SDK retries: batch creation and the real-time path retry themselves."""

    # -- what subclasses vary ------------------------------------------------------------------------
    def default_model(self, endpoint: Endpoint) -> str:
        raise NotImplementedError

    def format_line(self, request: Request, *, endpoint: Endpoint, model: str) -> bytes:
        """One `{"custom_id","method":"POST","url","body"}` line (with its newline)."""
        raise NotImplementedError

    def _batch_endpoint(self, endpoint: Endpoint) -> str:
        """The `endpoint` of `POST /batches`, equal to every line's `url`."""
        raise NotImplementedError

    def _realtime_model(self, model: str) -> str:
        return model

    def _check_endpoint(self, endpoint: Endpoint) -> None:
        """Raise `UnsupportedRequest` for endpoints the service cannot serve."""

    def _await_file_ready(self, file: Any) -> None:
        """Wait for an uploaded file to be usable by a batch (Azure processes uploads asynchronously)."""

    # -- submit ---------------------------------------------------------------------------------------
    def submit(
        self, *, request_file: Path, endpoint: Endpoint, model: str, client_token: str, shard_key: str
    ) -> SubmittedJob:
        """Upload `request_file` unchanged (`purpose="batch"`) and create a `24h` batch whose
        `metadata` carries `client_token` and `shard_key`. If a batch with this token already exists
        (a crash after creating, a lost answer) it is returned instead and nothing is uploaded.

        Raises `ProviderQuotaError` when the service refuses for quota (enqueued tokens, rate limit),
        `ProviderError(retryable=True)` when the outcome is unknown after every attempt (the next
        submit reconciles by token first), `ProviderError` otherwise."""
        self._check_endpoint(endpoint)
        existing = self.find_job(client_token=client_token)
        if existing is not None:
            log.warning("%s batch %s already carries token %s (shard %s): returning it, not submitting again",
                        self.service, existing.provider_job_id, client_token, shard_key)
            return existing
        file_id = self._upload(request_file, shard_key=shard_key)
        batch = self._create_batch(input_file_id=file_id, endpoint=endpoint, client_token=client_token,
                                   shard_key=shard_key)
        return self._submitted(batch)

    def _upload(self, request_file: Path, *, shard_key: str) -> str:
        if not request_file.is_file():
            raise ProviderError(f"shard {shard_key}: request file {request_file} does not exist; write it again "
                                "(materialize the shard's request file) before submitting")
        with self._api(f"uploading {request_file} for shard {shard_key}"), request_file.open("rb") as handle:
            file = self.client.files.create(file=(request_file.name, handle), purpose="batch")
            self._await_file_ready(file)
        return file.id

    def _create_batch(self, *, input_file_id: str, endpoint: Endpoint, client_token: str, shard_key: str) -> Batch:
        """`POST /batches` without SDK retries; before each retry, look for the batch by token."""
        doing = f"creating the batch for shard {shard_key} (file {input_file_id}, token {client_token})"
        retrying = Retrying(retry=retry_if_exception(_create_may_retry), stop=stop_after_attempt(self.create_attempts),
                            wait=self._wait, reraise=True, before_sleep=_log_retry(doing))
        try:
            for attempt in retrying:
                with attempt:
                    if attempt.retry_state.attempt_number > 1:
                        found = self._find_batch(client_token)
                        if found is not None:
                            log.warning("%s batch %s with token %s was created by an earlier attempt whose "
                                        "answer was lost; not creating another", self.service, found.id, client_token)
                            return found
                    return self._once.batches.create(
                        input_file_id=input_file_id,
                        endpoint=self._batch_endpoint(endpoint),  # type: ignore[arg-type]
                        completion_window="24h",
                        metadata={"client_token": client_token, "shard_key": shard_key},
                        timeout=self.create_timeout,
                    )
        except openai.APIStatusError as exc:
            if exc.status_code == 429 and exc.code != "insufficient_quota":  # refused: no batch was created
                what = "the enqueued-token quota" if _is_quota(exc) else f"rate limits ({self.create_attempts} tries)"
                raise ProviderQuotaError(
                    f"{self.service} refused {doing} for {what}: {self._describe(exc)}; the shard is requeued "
                    "and submitted again after a back-off", retry_after=_retry_after(exc)) from exc
            if not _transient(exc):
                raise self._status_error(exc, doing) from exc
            unknown: Exception = exc
        except openai.APIConnectionError as exc:
            unknown = exc
        with self._api(f"looking for token {client_token} after {doing} failed"):
            found = self._find_batch(client_token)  # the last attempt may have created it after all
        if found is not None:
            return found
        raise ProviderError(
            f"{self.service}: {doing} failed {self.create_attempts} times ({self._redact(str(unknown))}); no batch "
            f"with token {client_token} exists. The shard stays `submitting`: the next submit looks for the token "
            "first, then creates the batch", retryable=True) from unknown

    # -- find / poll / cancel -------------------------------------------------------------------------
    def find_job(self, *, client_token: str) -> SubmittedJob | None:
        """The batch whose `metadata.client_token` is `client_token`, newest first, looking back
        `find_lookback_days` (at most `find_max_batches` batches); None when there is none."""
        with self._api(f"listing batches to find token {client_token}"):
            batch = self._find_batch(client_token)
        return None if batch is None else self._submitted(batch)

    def _find_batch(self, client_token: str) -> Batch | None:
        oldest = int((datetime.now(UTC) - self.find_lookback).timestamp())
        for seen, batch in enumerate(self.client.batches.list(limit=100), start=1):
            if (batch.metadata or {}).get("client_token") == client_token:
                return batch
            if batch.created_at < oldest:
                return None
            if seen >= self.find_max_batches:
                log.warning("%s: gave up looking for token %s after %d batches", self.service, client_token, seen)
                return None
        return None

    def poll(self, provider_job_id: str) -> JobStatus:
        """The batch's status, normalised (see `STATES`), with request counts and file ids."""
        with self._api(f"polling batch {provider_job_id}"):
            batch = self.client.batches.retrieve(provider_job_id)
        return self._status(batch)

    def poll_many(self, provider_job_ids: Sequence[str], *,
                  created_after: datetime | None = None) -> dict[str, JobStatus]:
        """The statuses of many batches from the batch list (`GET /batches`, 100 a page, newest first)
        instead of one `GET /batches/{id}` each: 1,000 open batches take ~10 calls, not 1,000.

        The listing stops once every wanted batch was seen, at the first batch created before
        `created_after` (default: `find_lookback_days` ago), or after `find_max_batches` batches.
        Batches not seen, and those with a status `STATES` does not know, are left out: the caller
        polls them one by one (which names an unknown status)."""
        wanted = set(provider_job_ids)
        found: dict[str, JobStatus] = {}
        if not wanted:
            return found
        oldest = int((created_after or datetime.now(UTC) - self.find_lookback).timestamp())
        with self._api(f"listing batches for the status of {len(wanted)} batches"):
            for seen, batch in enumerate(self.client.batches.list(limit=100), start=1):
                if batch.id in wanted:
                    wanted.discard(batch.id)
                    if batch.status in STATES:
                        found[batch.id] = self._status(batch)
                    if not wanted:
                        break
                if batch.created_at < oldest or seen >= self.find_max_batches:
                    break
        return found

    def cancel(self, provider_job_id: str) -> None:
        """Ask the service to cancel; a batch that already finished is left as it is."""
        try:
            with self._api(f"cancelling batch {provider_job_id}"):
                self.client.batches.cancel(provider_job_id)
        except ProviderError:
            if self.poll(provider_job_id).terminal:
                log.info("%s batch %s already finished; nothing to cancel", self.service, provider_job_id)
                return
            raise

    def _submitted(self, batch: Batch) -> SubmittedJob:
        return SubmittedJob(batch.id, batch.input_file_id, self._status(batch))

    def _status(self, batch: Batch) -> JobStatus:
        raw = str(batch.status)
        state = STATES.get(raw)
        if state is None:
            raise ProviderError(
                f"{self.service} batch {batch.id} has status {raw!r}, which legal_batch does not know "
                f"(known: {', '.join(sorted(STATES))}); the job is left as it is — check it in the {self.service} "
                "console and report the new status so it can be mapped")
        counts = batch.request_counts
        total, completed, failed = (counts.total, counts.completed, counts.failed) if counts else (None, None, None)
        errors = list(batch.errors.data or []) if batch.errors else []
        quota = state == "failed" and any(
            (e.code or "") in QUOTA_ERROR_CODES or "enqueued token" in (e.message or "").lower() for e in errors)
        return JobStatus(
            state=state,
            raw_status=raw,
            total=total,
            completed=completed,
            failed=failed,
            output_location=batch.output_file_id or None,
            error_location=batch.error_file_id or None,
            message=self._status_message(batch, state, errors, quota=quota),
            quota_exceeded=quota,
        )

    def _status_message(self, batch: Batch, state: JobState, errors: list[Any], *, quota: bool) -> str | None:
        counts = batch.request_counts
        if state == "failed":
            listed = "; ".join(
                f"{e.code or 'error'}{f' (line {e.line})' if e.line is not None else ''}: {e.message}"
                for e in errors[:5])
            more = f" (+{len(errors) - 5} more)" if len(errors) > 5 else ""
            what = ("was refused for the enqueued-token quota, not for its requests; submit the shard again once "
                    "running batches have finished" if quota else f"failed (input file {batch.input_file_id})")
            return self._redact(f"{self.service} batch {batch.id} {what}: {listed or 'no reason given'}{more}")
        if state == "expired" and counts:
            return (f"{self.service} batch {batch.id} expired after 24 h with {counts.completed} of {counts.total} "
                    "requests answered; the rest are retryable")
        if state in ("completed", "cancelled") and counts and counts.failed:
            where = f"error file {batch.error_file_id}" if batch.error_file_id else "no error file"
            return f"{self.service} batch {batch.id}: {counts.failed} of {counts.total} requests failed ({where})"
        return None

    # -- download / results ---------------------------------------------------------------------------
    def download(self, provider_job_id: str, status: JobStatus, dest: Path) -> list[Path]:
        """Stream the output file to `dest/output.jsonl` and the error file to `dest/errors.jsonl`,
        chunk by chunk, never whole in memory. No output file (every request failed) and a missing
        or empty error file are normal. An output file the service has deleted (retention) raises."""
        output_id, error_id = status.output_location, status.error_location
        if output_id is None and error_id is None:
            with self._api(f"reading batch {provider_job_id}"):
                batch = self.client.batches.retrieve(provider_job_id)
            output_id, error_id = batch.output_file_id, batch.error_file_id
        dest.mkdir(parents=True, exist_ok=True)
        files: list[Path | None] = []
        if output_id:
            files.append(self._fetch(output_id, dest / "output.jsonl", job=provider_job_id, kind="output"))
        if error_id:
            files.append(self._fetch(error_id, dest / "errors.jsonl", job=provider_job_id, kind="error"))
        return [path for path in files if path is not None]

    def _fetch(self, file_id: str, path: Path, *, job: str, kind: str) -> Path | None:
        doing = f"downloading the {kind} file {file_id} of batch {job}"
        try:
            with self._api(doing), self.client.files.with_streaming_response.content(file_id) as response, \
                    atomic_writer(path) as out:
                for chunk in response.iter_bytes(_CHUNK_BYTES):
                    out.write(chunk)
        except ProviderError as exc:
            if not isinstance(exc.__cause__, openai.NotFoundError):
                raise
            if kind == "error":
                log.warning("%s: the error file %s of batch %s no longer exists; its requests count as "
                            "unanswered (retryable)", self.service, file_id, job)
                return None
            raise ProviderError(
                f"the {kind} file {file_id} of {self.service} batch {job} no longer exists: {self.service} deletes "
                f"batch output files {self.retention_days} days after the batch finishes, so these results cannot be "
                "downloaded any more. Nothing was ingested; the shard's items must be submitted again (ingest the "
                "shard without files so they become retryable, or mark its items retryable in batch_items). "
                "Download finished batches well within the retention period.") from exc
        return path

    def iter_results(self, files: Sequence[Path], *, endpoint: Endpoint) -> Iterator[Result]:
        """Results from output and error files, line by line; join on `custom_id`, never on order."""
        return openai_format.iter_results(files, endpoint=endpoint, workers=self.parse_workers)

    # -- real time ------------------------------------------------------------------------------------
    def realtime(self, requests: Iterable[Request], *, endpoint: Endpoint, model: str) -> Iterator[Result]:
        """Call the embeddings / chat completions API directly, `concurrency` calls in flight, in input
        order. Embedding inputs are grouped, up to `embedding_inputs_per_call` and
        `embedding_tokens_per_call` per call. 429, 5xx and connection errors are retried with
        exponential back-off (`Retry-After` respected) up to `realtime_attempts` times; what still
        fails is yielded as a `Result` with `error` (retryable or not), never raised."""
        self._check_endpoint(endpoint)
        model = self._realtime_model(model)
        pool = ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix=f"{self.name}-realtime")
        pending: deque[Future[list[Result]]] = deque()
        try:
            for group in self._groups(requests, endpoint=endpoint):
                pending.append(pool.submit(self._call_group, group, endpoint=endpoint, model=model))
                if len(pending) >= 2 * self.concurrency:
                    yield from pending.popleft().result()
            while pending:
                yield from pending.popleft().result()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _groups(self, requests: Iterable[Request], *, endpoint: Endpoint) -> Iterator[list[tuple[int, Request]]]:
        group: list[tuple[int, Request]] = []
        tokens = 0
        for number, request in enumerate(requests, start=1):
            if endpoint != "embeddings" or not isinstance(request, EmbeddingRequest):
                yield [(number, request)]
                continue
            size = len(request.text.encode("utf-8"))  # ≥ its token count: a token is at least one byte
            if group and (len(group) >= self.embedding_inputs_per_call or tokens + size > self.embedding_tokens_per_call):
                yield group
                group, tokens = [], 0
            group.append((number, request))
            tokens += size
        if group:
            yield group

    def _call_group(self, group: list[tuple[int, Request]], *, endpoint: Endpoint, model: str) -> list[Result]:
        retrying = Retrying(retry=retry_if_exception(_transient), stop=stop_after_attempt(self.realtime_attempts),
                            wait=self._wait, reraise=True)
        try:
            body = retrying(self._call_once, group, endpoint=endpoint, model=model)
        except openai.APIStatusError as exc:
            return self._failed(group, f"HTTP {exc.status_code} {exc.code or ''}: {self._describe(exc)}".strip(),
                                retryable=_transient(exc))
        except openai.APIConnectionError as exc:
            return self._failed(group, f"connection error after {self.realtime_attempts} attempts: {exc}",
                                retryable=True)
        if endpoint == "embeddings" and len(group) > 1:
            return self._split_embeddings(body, group)
        (number, request), = group
        return [openai_format.parse_response_body(body, endpoint=endpoint, custom_id=request.custom_id,
                                                  source="realtime", line_no=number)]

    def _call_once(self, group: list[tuple[int, Request]], *, endpoint: Endpoint, model: str) -> dict:
        requests = [request for _, request in group]
        if endpoint == "embeddings":
            texts = [r.text for r in requests if isinstance(r, EmbeddingRequest)]
            if len(texts) != len(requests):
                raise ProviderError(f"chat request {requests[0].custom_id} sent to the embeddings endpoint")
            response = self._once.embeddings.create(model=model, input=texts, dimensions=self.dimensions,
                                                    encoding_format="float")
        else:
            (request,) = requests
            if not isinstance(request, ChatRequest):
                raise ProviderError(f"embedding request {request.custom_id} sent to the chat endpoint")
            response = self._once.chat.completions.create(**openai_format.chat_body(request, model=model))
        return response.model_dump(mode="json")

    @staticmethod
    def _split_embeddings(body: dict, group: list[tuple[int, Request]]) -> list[Result]:
        """One result per input of a grouped call; the call's token usage shared by text length."""
        data = {item.get("index"): item for item in body.get("data") or []}
        total = int((body.get("usage") or {}).get("prompt_tokens") or 0)
        lengths = [max(1, len(request.text)) for _, request in group if isinstance(request, EmbeddingRequest)]
        shares = [total * n // sum(lengths) for n in lengths]
        shares[-1] += total - sum(shares)
        results = []
        for index, ((number, request), tokens) in enumerate(zip(group, shares, strict=True)):
            item = data.get(index)
            part = {"data": [item] if item else [], "usage": {"prompt_tokens": tokens}}
            results.append(openai_format.parse_response_body(part, endpoint="embeddings", custom_id=request.custom_id,
                                                             source="realtime", line_no=number))
        return results

    @staticmethod
    def _failed(group: list[tuple[int, Request]], error: str, *, retryable: bool) -> list[Result]:
        return [Result(request.custom_id, "realtime", number, error=error, retryable=retryable)
                for number, request in group]

    # -- errors, retries, secrets ---------------------------------------------------------------------
    def _wait(self, state: RetryCallState) -> float:
        """`Retry-After` (or `retry-after-ms`) when the service sent one, else exponential with jitter."""
        exc = state.outcome.exception() if state.outcome else None
        hinted = _retry_after(exc) if exc is not None else None
        if hinted is not None:
            return min(hinted, _MAX_WAIT_SECONDS)
        delay = min(self.backoff_initial * 2 ** (state.attempt_number - 1), self.backoff_max)
        return delay * (0.75 + 0.25 * random.random())

    @contextmanager
    def _api(self, doing: str) -> Iterator[None]:
        """Turn SDK and transport errors into `ProviderError`s that say what failed and what to do."""
        try:
            yield
        except openai.APIStatusError as exc:
            self._scrub(exc)
            raise self._status_error(exc, doing) from exc
        except openai.APIConnectionError as exc:
            self._scrub(exc)
            raise ProviderError(f"{self.service} could not be reached while {doing}: {exc}; retry later",
                                retryable=True) from exc
        except httpx2.HTTPError as exc:
            self._scrub(exc)
            raise ProviderError(f"{self.service}: the connection broke while {doing}: {self._redact(str(exc))}; "
                                "retry later", retryable=True) from exc

    def _scrub(self, exc: BaseException) -> None:
        """Redact the key from the SDK's own exception too: it stays chained as the cause, and Dagster's
        event log, tracebacks and the console print causes."""
        exc.args = tuple(self._redact(a) if isinstance(a, str) else a for a in exc.args)
        if isinstance(getattr(exc, "message", None), str):
            exc.message = self._redact(exc.message)  # type: ignore[attr-defined]
        if hasattr(exc, "body"):
            exc.body = self._redact_value(exc.body)  # type: ignore[attr-defined]

    def _redact_value(self, value: object) -> object:
        if isinstance(value, str):
            return self._redact(value)
        if isinstance(value, dict):
            return {k: self._redact_value(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self._redact_value(v) for v in value]
        return value

    def _status_error(self, exc: openai.APIStatusError, doing: str) -> ProviderError:
        detail = self._describe(exc)
        status = exc.status_code
        if status == 401:
            return ProviderError(f"{self.service} refused the credentials while {doing} ({detail}); check "
                                 f"{self.key_variable}")
        if status == 403:
            return ProviderError(f"{self.service} denied access while {doing} ({detail}); check the key's "
                                 "permissions and the project / deployment")
        if status == 429 and exc.code == "insufficient_quota":
            return ProviderError(f"{self.service} reports the account out of quota while {doing} ({detail}); add "
                                 "credits or raise the quota, then retry", retryable=True)
        retryable = _transient(exc)
        advice = "retry later" if retryable else "fix the request; retrying as is will fail again"
        return ProviderError(f"{self.service} answered HTTP {status} while {doing}: {detail}; {advice}",
                             retryable=retryable)

    def _describe(self, exc: openai.APIStatusError) -> str:
        body = exc.body if isinstance(exc.body, dict) else {}
        message = str(body.get("message") or exc.message)
        code = f" [{exc.code}]" if exc.code else ""
        request_id = f" (request id {exc.request_id})" if exc.request_id else ""
        return self._redact(f"{message}{code}{request_id}")

    def _redact(self, text: str) -> str:
        """`text` without the API key (services sometimes echo a masked or whole key in errors)."""
        key = getattr(self.client, "api_key", "") or ""
        if len(key) >= 8:
            text = text.replace(key, "[redacted]")
        return _SECRET_PATTERN.sub("[redacted]", text)


class OpenAIProvider(OpenAIStyleProvider):
    """OpenAI Batch API: embeddings (`text-embedding-3-small`, `dimensions` as given) and chat
    (`gpt-4o-mini`). Lines use `url` `/v1/embeddings` or `/v1/chat/completions`; embedding lines ask
    for `encoding_format: "base64"` (float32 bytes: output files ~4x smaller than JSON floats)."""

    name = "openai"
    service = "OpenAI"
    key_variable = "OPENAI_API_KEY"
    LIMITS = ProviderLimits(
        max_records_per_job=50_000,
        max_bytes_per_file=200_000_000,  # "200 MB", read as the smaller decimal megabytes
        max_embedding_inputs_per_job=50_000,
        max_input_tokens=8191,
        quota_kind=QUOTA_KINDS["openai"],
    )
    DEFAULT_MODELS: ClassVar[dict[str, str]] = {"embeddings": "text-embedding-3-small", "chat": "gpt-4o-mini"}

    def __init__(self, client: openai.OpenAI, **options: Any) -> None:
        super().__init__(client, limits=options.pop("limits", self.LIMITS), **options)

    def default_model(self, endpoint: Endpoint) -> str:
        return self.DEFAULT_MODELS[endpoint]

    def format_line(self, request: Request, *, endpoint: Endpoint, model: str) -> bytes:
        return openai_format.request_line(request, endpoint=endpoint, model=model, url_prefix="/v1",
                                          dimensions=self.dimensions, encoding_format="base64")

    def _batch_endpoint(self, endpoint: Endpoint) -> str:
        return "/v1/embeddings" if endpoint == "embeddings" else "/v1/chat/completions"


def _transient(exc: BaseException) -> bool:
    """Worth asking again: connection errors, timeouts, 408/409, 429 (not an empty account), 5xx."""
    if isinstance(exc, openai.APIConnectionError):
        return True
    if isinstance(exc, openai.APIStatusError):
        if exc.status_code == 429:
            return exc.code != "insufficient_quota"
        return exc.status_code in (408, 409) or exc.status_code >= 500
    return False


def _is_quota(exc: BaseException) -> bool:
    """A 429 for the enqueued-token quota: waiting seconds will not help, requeue the shard."""
    if not isinstance(exc, openai.APIStatusError) or exc.status_code != 429:
        return False
    return exc.code in QUOTA_ERROR_CODES or "enqueued token" in str(exc.message).lower()


def _create_may_retry(exc: BaseException) -> bool:
    """Batch creation retries transient errors, except an enqueued-token quota refusal."""
    return _transient(exc) and not _is_quota(exc)


def _retry_after(exc: BaseException) -> float | None:
    if not isinstance(exc, openai.APIStatusError):
        return None
    for header, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        value = exc.response.headers.get(header)
        if value is None:
            continue
        try:
            seconds = float(value) * scale
        except ValueError:
            continue
        if seconds >= 0:
            return seconds
    return None


def _log_retry(doing: str) -> Any:
    def before_sleep(state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        log.warning("attempt %d failed while %s (%s); looking for the batch by token before trying again",
                    state.attempt_number, doing, type(exc).__name__)
    return before_sleep
