"""The provider protocol: one small typed interface, four implementations.

A provider formats request lines, uploads and submits a request file as a batch job, polls it
(normalised state and counts), downloads its output and error files, streams results from them,
cancels, finds a job again by our client token, and offers a real-time path for small sets and
fallback. Limits are stated per provider in `ProviderLimits`. A provider that can report many
jobs in one call says so by implementing `PollsMany`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Literal, Protocol, runtime_checkable

import numpy as np

ProviderName = Literal["local", "openai", "azure_openai", "bedrock"]
Endpoint = Literal["embeddings", "chat"]
JobState = Literal["pending", "running", "completed", "partial", "failed", "cancelled", "expired"]

QuotaKind = Literal["enqueued_tokens", "jobs"]
QUOTA_KINDS: dict[str, QuotaKind] = {
    "openai": "enqueued_tokens", "azure_openai": "enqueued_tokens", "bedrock": "jobs", "local": "enqueued_tokens"}
"""What each provider's queue quota counts per model: input tokens of unfinished batch jobs (OpenAI,
Azure OpenAI — and `local`, when given one to rehearse with) or jobs in progress (Bedrock)."""

TERMINAL_STATES: frozenset[str] = frozenset({"completed", "partial", "failed", "cancelled", "expired"})


class ProviderError(RuntimeError):
    """A provider call failed; `retryable` says whether trying again later can succeed."""

    def __init__(self, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable


class ProviderQuotaError(ProviderError):
    """The provider refused a new job for quota (enqueued tokens, concurrent jobs): requeue with backoff."""

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        super().__init__(message, retryable=True)
        self.retry_after = retry_after


class UnsupportedRequest(ProviderError):
    """The provider cannot serve this kind of request (e.g. embeddings on Azure batch)."""


@dataclass(frozen=True)
class ProviderLimits:
    """Per-job limits a shard must respect."""

    max_records_per_job: int
    max_bytes_per_file: int
    min_records_per_job: int = 1
    max_embedding_inputs_per_job: int | None = None
    max_input_tokens: int = 8191
    """Largest single request input (tokens) the model accepts."""
    quota_kind: QuotaKind | None = None
    """What the provider's queue quota counts per model: input tokens of unfinished jobs (OpenAI,
    Azure OpenAI) or jobs in progress (Bedrock); None when it has no queue quota."""


@dataclass(frozen=True)
class EmbeddingRequest:
    custom_id: str
    text: str


@dataclass(frozen=True)
class ChatRequest:
    custom_id: str
    system: str
    user: str
    max_tokens: int = 600
    temperature: float = 0.1
    prefill: str = ""
    """Text the assistant's answer starts with (Bedrock Claude prefill); local and OpenAI ignore it."""
    json_schema: dict | None = None
    """Output schema for structured answers; providers pass it on where supported."""


Request = EmbeddingRequest | ChatRequest


@dataclass(frozen=True)
class JobStatus:
    """A provider job's state, normalised, with the raw status and counts."""

    state: JobState
    raw_status: str
    total: int | None = None
    completed: int | None = None
    failed: int | None = None
    output_location: str | None = None
    error_location: str | None = None
    message: str | None = None
    quota_exceeded: bool = False
    """The job failed only because of a provider quota (e.g. `token_limit_exceeded` on an enqueued-token
    limit): the shard is requeued with back-off and its items keep their attempts."""

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL_STATES


@dataclass(frozen=True)
class SubmittedJob:
    provider_job_id: str
    input_location: str
    status: JobStatus


@dataclass(frozen=True)
class Result:
    """One result line: a vector or a text, or an error, with where it came from."""

    custom_id: str | None
    source: str
    line_no: int
    vector: np.ndarray | None = None
    text: str | None = None
    finish_reason: str | None = None
    input_tokens: int = 0
    output_tokens: int = 0
    error: str | None = None
    retryable: bool = True
    """For errors: whether asking again may succeed (server errors, expiry) or not (invalid request)."""
    extra: dict = field(default_factory=dict)

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line_no}"


@runtime_checkable
class BatchProvider(Protocol):
    name: ProviderName
    limits: ProviderLimits

    def default_model(self, endpoint: Endpoint) -> str: ...

    def format_line(self, request: Request, *, endpoint: Endpoint, model: str) -> bytes:
        """One JSONL request line (with its newline) in the provider's batch input format."""
        ...

    def submit(
        self, *, request_file: Path, endpoint: Endpoint, model: str, client_token: str, shard_key: str
    ) -> SubmittedJob:
        """Upload the request file and create the batch job, tagged with `client_token`."""
        ...

    def find_job(self, *, client_token: str) -> SubmittedJob | None:
        """The job created with `client_token`, if any (reconciliation after a crash)."""
        ...

    def poll(self, provider_job_id: str) -> JobStatus: ...

    def download(self, provider_job_id: str, status: JobStatus, dest: Path) -> list[Path]:
        """Write every output and error file of a terminal job under `dest`; return their paths."""
        ...

    def iter_results(self, files: Sequence[Path], *, endpoint: Endpoint) -> Iterator[Result]:
        """Stream results from downloaded files, line by line, never the whole file in memory."""
        ...

    def cancel(self, provider_job_id: str) -> None: ...

    def realtime(self, requests: Iterable[Request], *, endpoint: Endpoint, model: str) -> Iterator[Result]:
        """Serve requests directly (small sets, fallback), with bounded concurrency and retries."""
        ...


@runtime_checkable
class PollsMany(Protocol):
    """An optional capability of a `BatchProvider`: the status of many jobs in a few calls (OpenAI and
    Azure OpenAI list their batches, 100 a page). Without it, jobs are polled one `poll` at a time."""

    def poll_many(self, provider_job_ids: Sequence[str], *,
                  created_after: datetime | None = None) -> dict[str, JobStatus]:
        """The status of each job found, by provider job id. `created_after`: none of the jobs was
        created before it (a hint for where to stop looking). Jobs left out of the answer (not found,
        or a status the provider cannot normalise) are for the caller to `poll` one by one."""
        ...
