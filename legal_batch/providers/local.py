"""The `local` provider: offline, deterministic, no credentials — the embedded default.

It goes through the same asynchronous lifecycle as a real batch API: a job is created
(`validating`), moves to `in_progress` on the next poll, and is processed on the poll after that
(`completed`, or `expired` with partial output), writing output and error files in the OpenAI
formats. Embedding requests ask for `encoding_format: "base64"`, as the OpenAI provider's do, and
each line is answered in the format it asks for (`float`, the API's default, when it names none).
Failure injection: `fail_rate` (a deterministic fraction of requests fail with a server
error) and `expire_fraction` (a job expires after that fraction of its requests).
"""

from __future__ import annotations

import atexit
import hashlib
import os
import shutil
import uuid
from collections.abc import Iterable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import orjson
import pybase64

from legal_batch.core.jsonl import atomic_writer, dumps_line, iter_lines
from legal_batch.core.tokens import count_tokens
from legal_batch.providers import local_models, openai_format
from legal_batch.providers.base import (
    QUOTA_KINDS,
    ChatRequest,
    EmbeddingRequest,
    Endpoint,
    JobState,
    JobStatus,
    ProviderError,
    ProviderLimits,
    Request,
    Result,
    SubmittedJob,
)

_STATES: dict[str, JobState] = {
    "validating": "pending",
    "in_progress": "running",
    "completed": "completed",
    "expired": "expired",
    "failed": "failed",
    "cancelled": "cancelled",
}


class LocalProvider:
    """Batch jobs kept as folders under `root` (`$LEGAL_BATCH_HOME/local_provider`)."""

    name = "local"

    def __init__(
        self,
        root: Path,
        *,
        dimensions: int = 1024,
        fail_rate: float = 0.0,
        expire_fraction: float | None = None,
        max_records_per_job: int = 5_000,
        parse_workers: int | None = None,
        embed_workers: int | None = None,
    ) -> None:
        """`parse_workers`: processes that parse a large JSON-float output file (default: the CPUs
        beyond two, see `OpenAIStyleProvider`); `embed_workers`: processes the local model embeds a
        large job on (default: one per CPU)."""
        self.root = root
        self.embed_workers = embed_workers or (os.cpu_count() or 1)
        self.parse_workers = parse_workers or max(1, (os.cpu_count() or 1) - 2)
        self.dimensions = dimensions
        self.fail_rate = fail_rate
        self.expire_fraction = expire_fraction
        self.limits = ProviderLimits(
            max_records_per_job=max_records_per_job,
            max_bytes_per_file=200 * 1024 * 1024,
            max_embedding_inputs_per_job=50_000,
            max_input_tokens=8191,
            quota_kind=QUOTA_KINDS["local"],
        )

    def default_model(self, endpoint: Endpoint) -> str:
        return local_models_name(endpoint)

    # -- request files ---------------------------------------------------------------------------
    def format_line(self, request: Request, *, endpoint: Endpoint, model: str) -> bytes:
        return openai_format.request_line(request, endpoint=endpoint, model=model, dimensions=self.dimensions,
                                          encoding_format="base64")

    # -- lifecycle -------------------------------------------------------------------------------
    def _dir(self, job_id: str) -> Path:
        if not job_id.startswith("local-") or "/" in job_id or ".." in job_id:
            raise ProviderError(f"not a local provider job id: {job_id!r}")
        return self.root / job_id

    def _load(self, job_id: str) -> dict:
        path = self._dir(job_id) / "job.json"
        if not path.exists():
            raise ProviderError(f"local job {job_id} does not exist under {self.root}")
        return orjson.loads(path.read_bytes())

    def _save(self, job: dict) -> None:
        with atomic_writer(self._dir(job["id"]) / "job.json") as handle:
            handle.write(orjson.dumps(job, option=orjson.OPT_INDENT_2))

    def submit(
        self, *, request_file: Path, endpoint: Endpoint, model: str, client_token: str, shard_key: str
    ) -> SubmittedJob:
        job_id = f"local-{uuid.uuid4().hex[:16]}"
        folder = self._dir(job_id)
        folder.mkdir(parents=True)
        shutil.copyfile(request_file, folder / "input.jsonl")
        job = {
            "id": job_id,
            "status": "validating",
            "endpoint": endpoint,
            "model": model,
            "metadata": {"client_token": client_token, "shard_key": shard_key},
            "created_at": _now(),
            "request_counts": {"total": 0, "completed": 0, "failed": 0},
        }
        self._save(job)
        return SubmittedJob(job_id, str(folder / "input.jsonl"), self._status(job))

    def find_job(self, *, client_token: str) -> SubmittedJob | None:
        if not self.root.exists():
            return None
        for path in sorted(self.root.glob("local-*/job.json")):
            job = orjson.loads(path.read_bytes())
            if job.get("metadata", {}).get("client_token") == client_token:
                return SubmittedJob(job["id"], str(path.parent / "input.jsonl"), self._status(job))
        return None

    def poll(self, provider_job_id: str) -> JobStatus:
        """Each poll moves the job one step: validating → in_progress → completed (processed)."""
        job = self._load(provider_job_id)
        if job["status"] == "validating":
            job["status"] = "in_progress"
            self._save(job)
        elif job["status"] == "in_progress":
            self._process(job)
        return self._status(job)

    def cancel(self, provider_job_id: str) -> None:
        job = self._load(provider_job_id)
        if job["status"] in ("validating", "in_progress"):
            job["status"] = "cancelled"
            self._save(job)

    def download(self, provider_job_id: str, status: JobStatus, dest: Path) -> list[Path]:
        """Copy the job's output and error files to `dest`, each replaced atomically (an ingest
        reading the previous copy keeps reading a whole file)."""
        folder = self._dir(provider_job_id)
        dest.mkdir(parents=True, exist_ok=True)
        files = []
        for name in ("output.jsonl", "errors.jsonl"):
            if (folder / name).exists():
                with (folder / name).open("rb") as source, atomic_writer(dest / name) as out:
                    shutil.copyfileobj(source, out, 1 << 20)
                files.append(dest / name)
        return files

    def iter_results(self, files: Sequence[Path], *, endpoint: Endpoint) -> Iterator[Result]:
        return openai_format.iter_results(files, endpoint=endpoint, workers=self.parse_workers)

    def realtime(self, requests: Iterable[Request], *, endpoint: Endpoint, model: str) -> Iterator[Result]:
        for number, request in enumerate(requests, start=1):
            if self._fails(request.custom_id):
                yield Result(request.custom_id, "realtime", number, error="server_error: injected failure")
                continue
            try:
                body = self._respond(request, model=model)
            except local_models.Unanswerable as exc:
                yield Result(request.custom_id, "realtime", number, error=f"HTTP 400 invalid_request: {exc}",
                             retryable=False)
                continue
            yield openai_format.parse_response_body(
                body, endpoint=endpoint, custom_id=request.custom_id, source="realtime", line_no=number
            )

    # -- the "service" ---------------------------------------------------------------------------
    def _fails(self, custom_id: str, salt: str = "") -> bool:
        """Deterministic per (request, job): a retried request in a new job may succeed."""
        if self.fail_rate <= 0:
            return False
        digest = int(hashlib.sha256(f"{salt}:{custom_id}".encode()).hexdigest()[:8], 16)
        return digest / 0xFFFFFFFF < self.fail_rate

    def _respond(self, request: Request, *, model: str, base64: bool = False) -> dict:
        """The response body (an embedding as base64 when `base64`, else a list of floats); raises
        `local_models.Unanswerable` for a request the model has no answer to (a text without features
        to embed, a judgment without a holding or disposition), which fails that item with the reason,
        like a provider's 400 for an invalid request."""
        if isinstance(request, EmbeddingRequest):
            return _embedding_body(_embed_one((request.text, self.dimensions)), model=model, base64=base64)
        return _chat_completion(request, model=model)

    def _process(self, job: dict) -> None:
        folder = self._dir(job["id"])
        lines = list(iter_lines(folder / "input.jsonl"))
        cutoff = len(lines)
        if self.expire_fraction is not None:
            cutoff = int(len(lines) * self.expire_fraction)
        completed = failed = 0
        vectors = self._embed_all(lines[:cutoff], salt=job["metadata"]["shard_key"])
        with atomic_writer(folder / "output.jsonl") as out, atomic_writer(folder / "errors.jsonl") as err:
            for index, (line_no, raw) in enumerate(lines):
                try:
                    line = orjson.loads(raw)
                    custom_id = line["custom_id"]
                except (orjson.JSONDecodeError, KeyError, TypeError):
                    failed += 1
                    err.write(_error_line(None, 400, "invalid_request", f"input line {line_no} is not valid"))
                    continue
                if index >= cutoff:
                    failed += 1
                    err.write(dumps_line({"id": _rid(), "custom_id": custom_id, "response": None,
                                          "error": {"code": "batch_expired",
                                                    "message": "This request could not be executed before the "
                                                               "completion window expired."}}))
                    continue
                if self._fails(custom_id, job["metadata"]["shard_key"]):
                    failed += 1
                    err.write(_error_line(custom_id, 500, "server_error", "injected failure"))
                    continue
                request = _request_of(line)
                base64 = (line.get("body") or {}).get("encoding_format") == "base64"
                try:
                    body = (_embedding_body(vectors[index], model=job["model"], base64=base64) if index in vectors
                            else self._respond(request, model=job["model"], base64=base64))
                except local_models.Unanswerable as exc:
                    failed += 1
                    err.write(_error_line(custom_id, 400, "invalid_request", str(exc)))
                    continue
                out.write(dumps_line({"id": _rid(), "custom_id": custom_id,
                                      "response": {"status_code": 200, "request_id": _rid(), "body": body},
                                      "error": None}))
                completed += 1
        job["request_counts"] = {"total": len(lines), "completed": completed, "failed": failed}
        job["status"] = "expired" if cutoff < len(lines) else "completed"
        job["finished_at"] = _now()
        self._save(job)

    def _embed_all(self, lines: list[tuple[int, bytes]], *, salt: str) -> dict[int, tuple[bytes, int] | str]:
        """The embeddings of a large job's embedding requests (line index → (vector, tokens), or why the
        model cannot answer), computed on every core; {} for a small job (answered line by line)."""
        if self.embed_workers < 2 or len(lines) < _POOL_FROM:
            return {}
        from legal_batch.core.chunk_pool import ChunkPool, WorkerDied

        wanted: list[tuple[int, str]] = []
        for index, (_, raw) in enumerate(lines):
            try:
                line = orjson.loads(raw)
                body, custom_id = line.get("body") or {}, line["custom_id"]
            except (orjson.JSONDecodeError, KeyError, TypeError, AttributeError):
                continue
            if "input" in body and not self._fails(custom_id, salt):
                wanted.append((index, _request_of(line).text))  # type: ignore[union-attr]
        pool = _POOLS.get(self.embed_workers)
        if pool is None:  # one per process, kept: starting workers costs seconds, a job a few more
            pool = _POOLS[self.embed_workers] = ChunkPool(self.embed_workers, sub_batch=256)
            atexit.register(pool.close)
        try:
            answers = pool.submit(_embed_one, [(text, self.dimensions) for _, text in wanted]).result()
        except WorkerDied:  # a worker was killed: answer line by line in this process instead
            pool.restart()
            return {}
        return {index: answer for (index, _), answer in zip(wanted, answers, strict=True)}

    def _status(self, job: dict) -> JobStatus:
        counts = job.get("request_counts") or {}
        folder = self._dir(job["id"])
        done = job["status"] in ("completed", "expired")
        return JobStatus(
            state=_STATES[job["status"]],
            raw_status=job["status"],
            total=counts.get("total"),
            completed=counts.get("completed"),
            failed=counts.get("failed"),
            output_location=str(folder / "output.jsonl") if done else None,
            error_location=str(folder / "errors.jsonl") if done else None,
        )


_POOL_FROM = 2_000
"""Embedding requests in a job from which the local model runs on every core."""
_POOLS: dict = {}
"""The process's pool of embedding workers (by size), started for the first large job."""


def _embed_one(item: tuple[str, int]) -> tuple[bytes, int] | str:
    """In a worker: one text's vector (float32 bytes: cheap to send back) and token count, or why the
    model has no answer."""
    text, dims = item
    try:
        return local_models.embed(text, dims=dims).astype("<f4", copy=False).tobytes(), count_tokens(text)
    except local_models.Unanswerable as exc:
        return str(exc)


def _embedding_body(answer: tuple[bytes, int] | str, *, model: str, base64: bool) -> dict:
    if isinstance(answer, str):
        raise local_models.NoFeatures(answer)
    vector, tokens = answer
    return {"object": "list", "data": [{"object": "embedding", "index": 0,
                                        # base64: the little-endian float32 bytes, as the API gives them
                                        "embedding": pybase64.b64encode(vector).decode("ascii") if base64
                                        else np.frombuffer(vector, dtype="<f4").tolist()}],
            "model": model, "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}


def local_models_name(endpoint: Endpoint) -> str:
    return "local-lexical-v1" if endpoint == "embeddings" else "local-extractive-v1"


def _request_of(line: dict) -> Request:
    body = line.get("body") or {}
    if "input" in body:
        text = body["input"] if isinstance(body["input"], str) else " ".join(body["input"])
        return EmbeddingRequest(line["custom_id"], text)
    messages = body.get("messages") or []
    system = next((m.get("content", "") for m in messages if m.get("role") == "system"), "")
    user = next((m.get("content", "") for m in messages if m.get("role") == "user"), "")
    schema = ((body.get("response_format") or {}).get("json_schema") or {}).get("schema")
    return ChatRequest(line["custom_id"], system, user, json_schema=schema)


def _chat_completion(request: ChatRequest, *, model: str) -> dict:
    if request.json_schema is not None:
        content = orjson.dumps(local_models.schema_shaped(request.json_schema, request.user)).decode()
    else:
        content = local_models.extractive_headnote(request.user)
    prompt_tokens = count_tokens(request.system) + count_tokens(request.user)
    return {
        "id": f"chatcmpl-{_rid()}",
        "object": "chat.completion",
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": count_tokens(content),
                  "total_tokens": prompt_tokens + count_tokens(content)},
    }


def _error_line(custom_id: str | None, status: int, code: str, message: str) -> bytes:
    return dumps_line({"id": _rid(), "custom_id": custom_id,
                       "response": {"status_code": status, "request_id": _rid(),
                                    "body": {"error": {"code": code, "message": message, "type": code}}},
                       "error": None})


def _rid() -> str:
    return uuid.uuid4().hex[:24]


def _now() -> str:
    return datetime.now(UTC).isoformat()
