"""The `bedrock` provider: AWS Bedrock batch inference (model invocation jobs) through boto3.

Configuration is boto3's own (`AWS_REGION`, credentials, `AWS_ENDPOINT_URL_S3`,
`AWS_ENDPOINT_URL_BEDROCK`, `AWS_ENDPOINT_URL_BEDROCK_RUNTIME`, profiles) plus
`LEGAL_BATCH_S3_BUCKET`, `LEGAL_BATCH_S3_PREFIX` (default `legal-batch`) and
`LEGAL_BATCH_BEDROCK_ROLE_ARN` (the service role Bedrock assumes to read and write the bucket), which
the provider factory (`resources/providers.py`) reads and passes in.

Layout in the bucket (every key built from our own validated parts, never from provider output):
`<prefix>/requests/<shard_key>.jsonl` is the request file of a shard; Bedrock writes its output
under `<prefix>/outputs/<shard_key>/<jobId>/`: one `<input name>.jsonl.out` per input file and a
`manifest.json.out` with record and token counts.

Limits (Bedrock quotas, per region; re-check for your account): at least 100 and at most 50,000
records per job (45,000 by default, leaving headroom), 1 GB per input file, 20 concurrent jobs,
Titan Text Embeddings V2 takes at most 8,192 tokens per input. A job's timeout is 24–168 hours
(72 by default). Job names match `[a-zA-Z0-9]{1,63}(-*[a-zA-Z0-9\\+\\-\\.]){0,63}` (63 characters
at most); the job name carries the shard key and our client token, the client token is also sent
as `clientRequestToken`, so a create retried after a crash returns the same job and `find_job`
finds it by name.

Retries, one layer per client: the `s3` and `bedrock` clients use botocore's standard retries
(throttling, 5xx, connection errors; a create retried sends the same `clientRequestToken`, so it
returns the same job); the `runtime` client has botocore's retries off and the real-time path
retries InvokeModel itself (`realtime_attempts`, exponential back-off with jitter).

Record formats: `{"recordId": custom_id, "modelInput": <InvokeModel body>}`; outputs are
`{recordId, modelInput, modelOutput}` or `{recordId, modelInput, error: {errorCode, errorMessage}}`
in no particular order (always joined on `recordId`). Supported models: Amazon Titan Text
Embeddings (V2 with `dimensions` and `normalize`) and Anthropic Claude messages.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import re
import threading
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import numpy as np
import orjson
from boto3.exceptions import S3UploadFailedError
from boto3.s3.transfer import TransferConfig
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    NoCredentialsError,
    NoRegionError,
    ReadTimeoutError,
)
from tenacity import Retrying, retry_if_exception, stop_after_attempt, wait_exponential_jitter

from legal_batch.core.jsonl import disk_full, dumps_line, iter_objects
from legal_batch.providers.base import (
    QUOTA_KINDS,
    ChatRequest,
    EmbeddingRequest,
    Endpoint,
    JobState,
    JobStatus,
    ProviderError,
    ProviderLimits,
    ProviderQuotaError,
    Request,
    Result,
    SubmittedJob,
    UnsupportedRequest,
)
from legal_batch.providers.openai_format import first_non_number

log = logging.getLogger("legal_batch")

DEFAULT_EMBEDDING_MODEL = "amazon.titan-embed-text-v2:0"
DEFAULT_CHAT_MODEL = "anthropic.claude-3-haiku-20240307-v1:0"
ANTHROPIC_VERSION = "bedrock-2023-05-31"
HARD_MAX_RECORDS_PER_JOB = 50_000
DEFAULT_MAX_RECORDS_PER_JOB = 45_000
MIN_RECORDS_PER_JOB = 100
MAX_BYTES_PER_FILE = 1024**3
DEFAULT_MAX_JOBS_IN_PROGRESS = 10
"""Jobs in progress per model per region assumed when `LEGAL_BATCH_BEDROCK_MAX_JOBS_IN_PROGRESS` is
unset: AWS documents the quota per model (Service Quotas); its own samples use 10."""
TITAN_V2_MAX_INPUT_TOKENS = 8_192
TITAN_V2_DIMENSIONS = (256, 512, 1024)
DEFAULT_TIMEOUT_HOURS = 72
MANIFEST_NAME = "manifest.json.out"
OUTPUT_SUFFIX = ".jsonl.out"

_STATES: dict[str, JobState] = {
    "Submitted": "pending",
    "Validating": "pending",
    "Scheduled": "pending",
    "InProgress": "running",
    "Stopping": "running",
    "Completed": "completed",
    "PartiallyCompleted": "partial",
    "Failed": "failed",
    "Stopped": "cancelled",
    "Expired": "expired",
}

# Patterns from botocore's `bedrock` service model.
JOB_NAME_RE = re.compile(r"[a-zA-Z0-9]{1,63}(-*[a-zA-Z0-9\+\-\.]){0,63}")
CLIENT_TOKEN_RE = re.compile(r"[a-zA-Z0-9]{1,256}(-*[a-zA-Z0-9]){0,256}")
ROLE_ARN_RE = re.compile(r"arn:aws(-[^:]+)?:iam::([0-9]{12})?:role/.+")
S3_URI_RE = re.compile(r"s3://[a-z0-9][-.a-z0-9]{1,61}[a-z0-9](?:/[-!_*'().a-z0-9A-Z]+(?:/[-!_*'().a-z0-9A-Z]+)*)?/?")
JOB_ARN_RE = re.compile(r"arn:aws(-[^:]+)?:bedrock:[a-z0-9-]{1,20}:[0-9]{12}:model-invocation-job/(?P<id>[a-z0-9]{12})")
JOB_ID_RE = re.compile(r"[a-z0-9]{12}")
BUCKET_RE = re.compile(r"[a-z0-9][-.a-z0-9]{1,61}[a-z0-9]")
KEY_SEGMENT_RE = re.compile(r"[-!_*'().a-zA-Z0-9]+")
SHARD_KEY_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
MAX_JOB_NAME = 63

_QUOTA_CODES = frozenset({"ServiceQuotaExceededException", "ThrottlingException", "TooManyRequestsException"})
_TRANSIENT_CODES = frozenset({
    "ThrottlingException", "TooManyRequestsException", "ServiceUnavailableException", "InternalServerException",
    "ModelTimeoutException", "ModelNotReadyException", "ModelErrorException", "RequestTimeout",
    "RequestTimeoutException", "SlowDown",
})
_NETWORK_ERRORS = (EndpointConnectionError, ConnectionClosedError, ConnectTimeoutError, ReadTimeoutError)
_FINISH_REASONS = {"end_turn": "stop", "stop_sequence": "stop", "max_tokens": "length", "tool_use": "tool_calls"}


@dataclass(frozen=True)
class Manifest:
    """Counts from a job's `manifest.json.out`."""

    total_records: int
    processed_records: int
    success_records: int
    error_records: int
    input_tokens: int
    output_tokens: int


def read_manifest(path: Path) -> Manifest:
    """Parse a downloaded `manifest.json.out` (missing counts read as 0)."""
    try:
        data = orjson.loads(path.read_bytes())
    except orjson.JSONDecodeError as exc:
        raise ProviderError(f"{path} is not a valid Bedrock manifest ({exc})") from None
    if not isinstance(data, dict):
        raise ProviderError(f"{path} is not a valid Bedrock manifest (not a JSON object)")

    def count(name: str) -> int:
        value = data.get(name)
        return int(value) if isinstance(value, int | float) else 0

    return Manifest(count("totalRecordCount"), count("processedRecordCount"), count("successRecordCount"),
                    count("errorRecordCount"), count("inputTokenCount"), count("outputTokenCount"))


_SESSION_LOCK = threading.Lock()


@functools.cache
def _session() -> boto3.session.Session:
    """One boto3 session per process, as `boto3.client` uses: service models are parsed once, and
    region, endpoints and credentials are still read from the environment when first needed."""
    return boto3.session.Session()


def aws_clients(*, max_retries: int = 5, fallback_region: str | None = None) -> dict[str, Any]:
    """The `s3`, `bedrock` and `runtime` clients `BedrockProvider` takes, from boto3's own
    configuration (region, endpoints, credentials, profiles).

    `max_retries`: botocore's standard retries of the `s3` and `bedrock` clients, its `max_attempts`
    (in botocore: retries after the first call, so 5 means up to 6 calls). The `runtime` client does
    not retry: `BedrockProvider.realtime` does (see the module docstring). `fallback_region`: the
    region when boto3 finds none."""
    retrying = Config(retries={"mode": "standard", "max_attempts": max_retries})
    once = Config(retries={"mode": "standard", "max_attempts": 0})
    try:
        with _SESSION_LOCK:  # boto3 sessions are not thread-safe; the clients they make are
            session = _session()
            region = session.region_name or fallback_region
            clients = {name: session.client(name, region_name=region,
                                             config=once if name == "bedrock-runtime" else retrying)
                       for name in ("s3", "bedrock", "bedrock-runtime")}
    except NoRegionError:
        raise ProviderError("no AWS region configured: set AWS_REGION (or AWS_DEFAULT_REGION, or a region in "
                            "your AWS profile) for the bedrock provider") from None
    return {"s3": clients["s3"], "bedrock": clients["bedrock"], "runtime": clients["bedrock-runtime"]}


def job_name_for(*, client_token: str, shard_key: str | None = None) -> str:
    """The job name: `<shard key>-<token part>` (63 characters at most, the service's pattern).

    The token part is the client token itself when it is name-safe, else a digest of it, so the
    name can be found again from the token alone (`find_job`)."""
    token_part = _token_part(client_token)
    if shard_key:
        room = MAX_JOB_NAME - len(token_part) - 1
        shard_part = re.sub(r"[^A-Za-z0-9-]+", "-", shard_key)[:room].strip("-")
        if shard_part:
            name = f"{shard_part}-{token_part}"
            if JOB_NAME_RE.fullmatch(name):
                return name
    return token_part


def _token_part(client_token: str) -> str:
    if len(client_token) <= 40 and JOB_NAME_RE.fullmatch(client_token):
        return client_token
    return "lb-" + hashlib.sha256(client_token.encode()).hexdigest()[:32]


class BedrockProvider:
    """Bedrock batch inference and InvokeModel; one instance per process is enough (clients are thread-safe)."""

    name = "bedrock"

    def __init__(
        self,
        *,
        s3: Any,
        bedrock: Any,
        runtime: Any,
        bucket: str,
        role_arn: str,
        prefix: str = "legal-batch",
        dimensions: int = 1024,
        timeout_hours: int = DEFAULT_TIMEOUT_HOURS,
        max_records_per_job: int = DEFAULT_MAX_RECORDS_PER_JOB,
        multipart_threshold: int = 64 * 1024 * 1024,
        realtime_concurrency: int = 4,
        realtime_attempts: int = 6,
        realtime_backoff_s: tuple[float, float] = (1.0, 30.0),
    ) -> None:
        """`realtime_backoff_s` is (first wait, longest wait) between InvokeModel retries."""
        if not BUCKET_RE.fullmatch(bucket) or ".." in bucket:
            raise ProviderError(f"LEGAL_BATCH_S3_BUCKET={bucket!r} is not a valid S3 bucket name")
        if not ROLE_ARN_RE.fullmatch(role_arn):
            raise ProviderError(f"LEGAL_BATCH_BEDROCK_ROLE_ARN={role_arn!r} is not an IAM role ARN "
                                "(arn:aws:iam::<account>:role/<name>)")
        segments = [s for s in prefix.strip("/").split("/") if s]
        if not segments or any(not KEY_SEGMENT_RE.fullmatch(s) or s in (".", "..") for s in segments):
            raise ProviderError(f"LEGAL_BATCH_S3_PREFIX={prefix!r} must be one or more path segments of "
                                "letters, digits and -!_*'().")
        if dimensions not in TITAN_V2_DIMENSIONS:
            raise ProviderError(f"LEGAL_BATCH_EMBEDDING_DIMENSIONS={dimensions}: Titan Text Embeddings V2 "
                                f"supports {', '.join(map(str, TITAN_V2_DIMENSIONS))}")
        if not 24 <= timeout_hours <= 168:
            raise ProviderError(f"Bedrock job timeout {timeout_hours} h is outside 24–168 hours")
        if not MIN_RECORDS_PER_JOB <= max_records_per_job <= HARD_MAX_RECORDS_PER_JOB:
            raise ProviderError(f"max_records_per_job={max_records_per_job} must be within "
                                f"{MIN_RECORDS_PER_JOB}–{HARD_MAX_RECORDS_PER_JOB}")
        self.s3 = s3
        self.bedrock = bedrock
        self.runtime = runtime
        self.bucket = bucket
        self.role_arn = role_arn
        self.prefix = "/".join(segments)
        self.dimensions = dimensions
        self.timeout_hours = timeout_hours
        self.transfer = TransferConfig(multipart_threshold=multipart_threshold,
                                       multipart_chunksize=max(multipart_threshold, 5 * 1024 * 1024))
        self.realtime_concurrency = max(1, realtime_concurrency)
        self.realtime_attempts = max(1, realtime_attempts)
        self.realtime_backoff_s = realtime_backoff_s
        self.limits = ProviderLimits(
            max_records_per_job=max_records_per_job,
            max_bytes_per_file=MAX_BYTES_PER_FILE,
            min_records_per_job=MIN_RECORDS_PER_JOB,
            max_input_tokens=TITAN_V2_MAX_INPUT_TOKENS,
            quota_kind=QUOTA_KINDS["bedrock"],
        )

    def default_model(self, endpoint: Endpoint) -> str:
        return DEFAULT_EMBEDDING_MODEL if endpoint == "embeddings" else DEFAULT_CHAT_MODEL

    # -- request files ---------------------------------------------------------------------------
    def format_line(self, request: Request, *, endpoint: Endpoint, model: str) -> bytes:
        """`{"recordId": custom_id, "modelInput": <InvokeModel body>}` and a newline."""
        return dumps_line({"recordId": request.custom_id,
                           "modelInput": self.model_input(request, endpoint=endpoint, model=model)})

    def model_input(self, request: Request, *, endpoint: Endpoint, model: str) -> dict:
        """The InvokeModel body of one request: Titan embeddings or a Claude messages body.

        Claude: `json_schema` is not passed on (InvokeModel has no response format); ask for JSON in
        the prompt and start the answer with `prefill` (its trailing whitespace is dropped, which
        the messages API refuses)."""
        if isinstance(request, EmbeddingRequest):
            if endpoint != "embeddings":
                raise UnsupportedRequest(f"embedding request {request.custom_id} sent to the {endpoint} endpoint")
            if "titan-embed-text-v2" in model:
                return {"inputText": request.text, "dimensions": self.dimensions, "normalize": True}
            if "titan-embed" in model:
                return {"inputText": request.text}
            raise UnsupportedRequest(f"embedding model {model!r} is not supported by the bedrock provider; use "
                                     f"{DEFAULT_EMBEDDING_MODEL} (LEGAL_BATCH_EMBEDDING_MODEL)")
        if endpoint != "chat":
            raise UnsupportedRequest(f"chat request {request.custom_id} sent to the {endpoint} endpoint")
        if "anthropic.claude" not in model:
            raise UnsupportedRequest(f"chat model {model!r} is not supported by the bedrock provider; use an "
                                     f"Anthropic Claude model such as {DEFAULT_CHAT_MODEL}")
        return _claude_body(request)

    # -- lifecycle -------------------------------------------------------------------------------
    def request_key(self, shard_key: str) -> str:
        return f"{self.prefix}/requests/{_checked_shard_key(shard_key)}.jsonl"

    def output_key_prefix(self, shard_key: str) -> str:
        return f"{self.prefix}/outputs/{_checked_shard_key(shard_key)}/"

    def submit(
        self, *, request_file: Path, endpoint: Endpoint, model: str, client_token: str, shard_key: str
    ) -> SubmittedJob:
        """Upload the request file (multipart above the threshold), then create the job.

        Quota refusals (`ServiceQuotaExceededException`, throttling after retries) raise
        `ProviderQuotaError`; a `ValidationException` is not retryable."""
        if not CLIENT_TOKEN_RE.fullmatch(client_token):
            raise ProviderError(f"client token {client_token!r} of shard {shard_key} does not fit Bedrock's "
                                f"clientRequestToken pattern {CLIENT_TOKEN_RE.pattern}")
        size = request_file.stat().st_size
        if size > MAX_BYTES_PER_FILE:
            raise ProviderError(f"request file {request_file} of shard {shard_key} is {size} bytes, over Bedrock's "
                                f"{MAX_BYTES_PER_FILE} byte limit per file; lower LEGAL_BATCH_SHARD_MAX_RECORDS")
        input_key = self.request_key(shard_key)
        input_uri = f"s3://{self.bucket}/{input_key}"
        output_uri = f"s3://{self.bucket}/{self.output_key_prefix(shard_key)}"
        for uri in (input_uri, output_uri):
            if not S3_URI_RE.fullmatch(uri):
                raise ProviderError(f"{uri} does not fit Bedrock's S3 URI pattern; check LEGAL_BATCH_S3_PREFIX")
        self._upload(request_file, input_key, shard_key=shard_key)
        name = job_name_for(client_token=client_token, shard_key=shard_key)
        try:
            response = self.bedrock.create_model_invocation_job(
                jobName=name,
                clientRequestToken=client_token,
                roleArn=self.role_arn,
                modelId=model,
                inputDataConfig={"s3InputDataConfig": {"s3Uri": input_uri, "s3InputFormat": "JSONL"}},
                outputDataConfig={"s3OutputDataConfig": {"s3Uri": output_uri}},
                timeoutDurationInHours=self.timeout_hours,
            )
        except ClientError as exc:
            if _code(exc) == "ConflictException":  # the name exists: our own job from an earlier attempt?
                found = self.find_job(client_token=client_token)
                if found is not None:
                    return found
            raise _error(exc, f"creating Bedrock job {name} for shard {shard_key}", quota=True) from None
        except BotoCoreError as exc:
            raise _error(exc, f"creating Bedrock job {name} for shard {shard_key}") from None
        arn = _checked_arn(str(response["jobArn"]))
        log.info("bedrock: submitted shard %s as %s (%s)", shard_key, arn, name)
        return SubmittedJob(arn, input_uri, JobStatus(state="pending", raw_status="Submitted"))

    def _upload(self, request_file: Path, key: str, *, shard_key: str) -> None:
        try:
            self.s3.upload_file(str(request_file), self.bucket, key, Config=self.transfer)
        except (S3UploadFailedError, ClientError, BotoCoreError) as exc:
            raise ProviderError(
                f"uploading {request_file} of shard {shard_key} to s3://{self.bucket}/{key} failed: {exc}; check "
                "LEGAL_BATCH_S3_BUCKET exists and the AWS credentials may write to it, then submit again",
                retryable=True,
            ) from None

    def find_job(self, *, client_token: str) -> SubmittedJob | None:
        """The job created with `client_token`: listed by the token part of its name, matched on the token."""
        token_part = _token_part(client_token)
        fallback: dict | None = None
        try:
            pages = self.bedrock.get_paginator("list_model_invocation_jobs").paginate(nameContains=token_part)
            for page in pages:
                for summary in page.get("invocationJobSummaries", []):
                    if summary.get("clientRequestToken") == client_token:
                        return self._submitted(summary)
                    name = str(summary.get("jobName", ""))
                    if fallback is None and (name == token_part or name.endswith(f"-{token_part}")):
                        fallback = summary
        except (ClientError, BotoCoreError) as exc:
            raise _error(exc, f"listing Bedrock jobs for client token {client_token}") from None
        return self._submitted(fallback) if fallback is not None else None

    def _submitted(self, job: dict) -> SubmittedJob:
        uri = ((job.get("inputDataConfig") or {}).get("s3InputDataConfig") or {}).get("s3Uri", "")
        return SubmittedJob(_checked_arn(str(job["jobArn"])), str(uri), self._status(job))

    def poll(self, provider_job_id: str) -> JobStatus:
        return self._status(self._get(provider_job_id))

    def _get(self, provider_job_id: str) -> dict:
        arn = _checked_arn(provider_job_id)
        try:
            return self.bedrock.get_model_invocation_job(jobIdentifier=arn)
        except (ClientError, BotoCoreError) as exc:
            raise _error(exc, f"reading Bedrock job {arn}") from None

    def _status(self, job: dict) -> JobStatus:
        raw = str(job.get("status"))
        state = _STATES.get(raw)
        if state is None:
            raise ProviderError(f"Bedrock job {job.get('jobArn')} has an unknown status {raw!r}; update "
                                "legal_batch.providers.bedrock for it")
        output = self._output_prefix(job)
        return JobStatus(
            state=state,
            raw_status=raw,
            total=job.get("totalRecordCount"),
            completed=job.get("successRecordCount"),
            failed=job.get("errorRecordCount"),
            output_location=f"s3://{self.bucket}/{output}" if output else None,
            message=job.get("message"),
        )

    def _output_prefix(self, job: dict) -> str | None:
        """`<prefix>/outputs/<shard_key>/<jobId>/`, rebuilt from our own parts once the job's output
        URI is confirmed to be one of ours (None for a job that is not)."""
        job_id = _checked_arn(str(job.get("jobArn", ""))).rsplit("/", 1)[-1]
        uri = ((job.get("outputDataConfig") or {}).get("s3OutputDataConfig") or {}).get("s3Uri", "")
        ours = f"s3://{self.bucket}/{self.prefix}/outputs/"
        if not isinstance(uri, str) or not uri.startswith(ours):
            return None
        shard_key = uri[len(ours):].strip("/")
        if not SHARD_KEY_RE.fullmatch(shard_key) or ".." in shard_key:
            return None
        return f"{self.output_key_prefix(shard_key)}{job_id}/"

    def download(self, provider_job_id: str, status: JobStatus, dest: Path) -> list[Path]:
        """Every `*.jsonl.out` and `manifest.json.out` under the job's output prefix, streamed to `dest`.

        A job that wrote nothing (failed validation, stopped early) gives an empty list."""
        job = self._get(provider_job_id)
        prefix = self._output_prefix(job)
        if prefix is None:
            raise ProviderError(f"Bedrock job {provider_job_id} does not write under s3://{self.bucket}/"
                                f"{self.prefix}/outputs/; it was not created by this configuration")
        dest.mkdir(parents=True, exist_ok=True)
        files: list[Path] = []
        try:
            for page in self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
                for obj in page.get("Contents", []):
                    relative = str(obj["Key"])[len(prefix):]
                    if not (relative.endswith(OUTPUT_SUFFIX) or relative.rsplit("/", 1)[-1] == MANIFEST_NAME):
                        continue
                    target = _safe_target(dest, relative)
                    if target is None:
                        log.warning("bedrock: skipped output object with an unsafe name: %r", obj["Key"])
                        continue
                    target.parent.mkdir(parents=True, exist_ok=True)
                    partial = target.with_name(target.name + ".part")
                    try:
                        self.s3.download_file(self.bucket, obj["Key"], str(partial), Config=self.transfer)
                        os.replace(partial, target)
                    except BaseException as exc:
                        partial.unlink(missing_ok=True)
                        if isinstance(exc, OSError) and (full := disk_full(target, exc)) is not None:
                            raise full from exc
                        raise
                    files.append(target)
        except (ClientError, BotoCoreError) as exc:
            raise _error(exc, f"downloading the output of Bedrock job {provider_job_id} from "
                              f"s3://{self.bucket}/{prefix}") from None
        manifests = [f for f in files if f.name == MANIFEST_NAME]
        if manifests:
            manifest = read_manifest(manifests[0])
            log.info("bedrock: job %s output: %d of %d records processed (%d ok, %d errors), %d input tokens",
                     provider_job_id, manifest.processed_records, manifest.total_records, manifest.success_records,
                     manifest.error_records, manifest.input_tokens)
        return sorted(files)

    def iter_results(self, files: Sequence[Path], *, endpoint: Endpoint) -> Iterator[Result]:
        """Results from `*.jsonl.out` files, line by line (the manifest and other files are skipped).

        Claude text is returned as the model wrote it: a prefill is NOT prepended (the flow that set
        it knows it). Error lines are retryable for throttling, timeouts and 5xx, not for 4xx
        validation errors (unknown codes: not retryable)."""
        for path in files:
            if not path.name.endswith(OUTPUT_SUFFIX):
                continue
            source = path.name
            for line_no, obj, problem in iter_objects(path):
                if obj is None:
                    yield Result(None, source, line_no, error=problem, retryable=True)
                else:
                    yield _result_of(obj, endpoint=endpoint, source=source, line_no=line_no)

    def cancel(self, provider_job_id: str) -> None:
        """Stop the job (its finished records stay in the output); a job already finished is left alone."""
        arn = _checked_arn(provider_job_id)
        try:
            self.bedrock.stop_model_invocation_job(jobIdentifier=arn)
        except ClientError as exc:
            if _code(exc) == "ValidationException" and self.poll(arn).terminal:
                return
            raise _error(exc, f"stopping Bedrock job {arn}") from None
        except BotoCoreError as exc:
            raise _error(exc, f"stopping Bedrock job {arn}") from None

    # -- real time -------------------------------------------------------------------------------
    def realtime(self, requests: Iterable[Request], *, endpoint: Endpoint, model: str) -> Iterator[Result]:
        """InvokeModel per request, `realtime_concurrency` at a time, results in request order.

        Throttling, timeouts, 5xx and network errors are retried with exponential back-off and
        jitter (`realtime_attempts` in all; the runtime client itself does not retry); what still
        fails becomes a `Result` with the error."""
        window = 2 * self.realtime_concurrency
        pool = ThreadPoolExecutor(max_workers=self.realtime_concurrency, thread_name_prefix="bedrock-invoke")
        pending: deque[Future[Result]] = deque()
        try:
            for number, request in enumerate(requests, start=1):
                pending.append(pool.submit(self._invoke, request, endpoint=endpoint, model=model, line_no=number))
                if len(pending) >= window:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            pool.shutdown(wait=True, cancel_futures=True)

    def _invoke(self, request: Request, *, endpoint: Endpoint, model: str, line_no: int) -> Result:
        try:
            body = orjson.dumps(self.model_input(request, endpoint=endpoint, model=model))
        except UnsupportedRequest as exc:
            return Result(request.custom_id, "realtime", line_no, error=str(exc), retryable=False)
        first, longest = self.realtime_backoff_s
        retrying = Retrying(retry=retry_if_exception(_transient), stop=stop_after_attempt(self.realtime_attempts),
                            wait=wait_exponential_jitter(initial=first, max=longest), reraise=True)
        try:
            response = retrying(self.runtime.invoke_model, modelId=model, body=body,
                                contentType="application/json", accept="application/json")
            output = orjson.loads(response["body"].read())
        except ClientError as exc:
            code = _code(exc)
            message = exc.response.get("Error", {}).get("Message", "")
            return Result(request.custom_id, "realtime", line_no, error=f"{code}: {message}",
                          retryable=_transient(exc))
        except BotoCoreError as exc:
            return Result(request.custom_id, "realtime", line_no, error=f"InvokeModel failed: {exc}",
                          retryable=isinstance(exc, _NETWORK_ERRORS))
        except orjson.JSONDecodeError as exc:
            return Result(request.custom_id, "realtime", line_no, error=f"response is not valid JSON ({exc})")
        if not isinstance(output, dict):
            return Result(request.custom_id, "realtime", line_no, error="response is not a JSON object")
        return _parse_output(output, endpoint=endpoint, custom_id=request.custom_id, source="realtime",
                             line_no=line_no)


# -- formats ---------------------------------------------------------------------------------------

def _claude_body(request: ChatRequest) -> dict:
    messages: list[dict] = [{"role": "user", "content": request.user}]
    prefill = request.prefill.rstrip()
    if prefill:
        messages.append({"role": "assistant", "content": prefill})
    body: dict = {
        "anthropic_version": ANTHROPIC_VERSION,
        "max_tokens": request.max_tokens,
        "temperature": request.temperature,
        "messages": messages,
    }
    if request.system:
        body["system"] = request.system
    return body


def _result_of(obj: dict, *, endpoint: Endpoint, source: str, line_no: int) -> Result:
    record_id = obj.get("recordId")
    custom_id = record_id if isinstance(record_id, str) and record_id else None
    if custom_id is None:
        return Result(None, source, line_no, error=f"line has no recordId (got {record_id!r})", retryable=True)
    error = obj.get("error")
    if error:
        if isinstance(error, dict):
            code, message = str(error.get("errorCode", "error")), str(error.get("errorMessage", ""))
        else:
            code, message = "error", str(error)
        return Result(custom_id, source, line_no, error=f"{code}: {message}", retryable=_retryable_code(code))
    output = obj.get("modelOutput")
    if not isinstance(output, dict):
        return Result(custom_id, source, line_no, error="line has neither modelOutput nor error", retryable=True)
    return _parse_output(output, endpoint=endpoint, custom_id=custom_id, source=source, line_no=line_no)


def _parse_output(output: dict, *, endpoint: Endpoint, custom_id: str | None, source: str, line_no: int) -> Result:
    """A model output body (Titan embedding or Claude message) as a `Result`."""
    if endpoint == "embeddings":
        embedding = output.get("embedding")
        if embedding is None:
            embedding = (output.get("embeddingsByType") or {}).get("float")
        if not isinstance(embedding, list) or not embedding:
            return Result(custom_id, source, line_no, error="modelOutput has no embedding", retryable=True)
        if (bad := first_non_number(embedding)) is not None:
            return Result(custom_id, source, line_no, error=f"embedding is not a list of numbers: {bad}")
        try:
            vector = np.asarray(embedding, dtype=np.float32)
        except (TypeError, ValueError) as exc:
            return Result(custom_id, source, line_no, error=f"embedding is not a list of numbers: {exc}")
        if vector.ndim != 1:
            return Result(custom_id, source, line_no, error=f"embedding has shape {vector.shape}, not a vector")
        return Result(custom_id, source, line_no, vector=vector,
                      input_tokens=_int(output.get("inputTextTokenCount")))
    content = output.get("content")
    if not isinstance(content, list):
        return Result(custom_id, source, line_no, error="modelOutput has no content", retryable=True)
    texts = [b.get("text") for b in content if isinstance(b, dict) and b.get("type") == "text"]
    if not texts or not all(isinstance(t, str) for t in texts):
        return Result(custom_id, source, line_no, error="modelOutput has no text content", retryable=True)
    usage = output.get("usage") if isinstance(output.get("usage"), dict) else {}
    stop_reason = output.get("stop_reason")
    return Result(
        custom_id, source, line_no,
        text="".join(texts),
        finish_reason=_FINISH_REASONS.get(str(stop_reason), stop_reason) if stop_reason is not None else None,
        input_tokens=_int(usage.get("input_tokens")),
        output_tokens=_int(usage.get("output_tokens")),
    )


def _int(value: object) -> int:
    return int(value) if isinstance(value, int | float) else 0


def _retryable_code(code: str) -> bool:
    """Error codes of output lines: numbers are HTTP statuses (5xx, 408, 429 retryable), names are
    exception types (throttling, timeouts, service and model errors retryable)."""
    if code.isdigit():
        status = int(code)
        return status >= 500 or status in (408, 429)
    lowered = code.lower()
    return code in _TRANSIENT_CODES or any(word in lowered for word in ("throttl", "timeout", "timedout",
                                                                         "unavailable", "internal"))


# -- errors and validation -------------------------------------------------------------------------

def _code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _transient(exc: BaseException) -> bool:
    if isinstance(exc, ClientError):
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
        return _code(exc) in _TRANSIENT_CODES or status >= 500 or status == 429
    return isinstance(exc, _NETWORK_ERRORS)


def _error(exc: Exception, action: str, *, quota: bool = False) -> ProviderError:
    """A boto3 exception as a ProviderError saying what failed and what to do."""
    if isinstance(exc, ClientError):
        code = _code(exc)
        message = exc.response.get("Error", {}).get("Message", "")
        if quota and code in _QUOTA_CODES:
            return ProviderQuotaError(f"{action}: {code}: {message}; the shard is requeued, not failed (the "
                                      "jobs-in-progress quota is per model per region; set "
                                      "LEGAL_BATCH_BEDROCK_MAX_JOBS_IN_PROGRESS to your account's value)")
        if code == "ValidationException":
            return ProviderError(f"{action}: Bedrock refused the request: {message}", retryable=False)
        if code in ("AccessDeniedException", "UnrecognizedClientException"):
            return ProviderError(f"{action}: {code}: {message}; check the AWS credentials and that they may "
                                 "use Bedrock and pass LEGAL_BATCH_BEDROCK_ROLE_ARN", retryable=True)
        if code == "ResourceNotFoundException":
            return ProviderError(f"{action}: {code}: {message}", retryable=False)
        return ProviderError(f"{action}: {code}: {message}", retryable=True)
    if isinstance(exc, NoCredentialsError):
        return ProviderError(f"{action}: no AWS credentials found; set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY "
                             "or AWS_PROFILE", retryable=True)
    return ProviderError(f"{action}: {exc}", retryable=isinstance(exc, _NETWORK_ERRORS))


def _checked_arn(value: str) -> str:
    """A Bedrock job ARN (or bare 12-character job id) from our ledger or a provider answer."""
    if JOB_ARN_RE.fullmatch(value) or JOB_ID_RE.fullmatch(value):
        return value
    raise ProviderError(f"{value!r} is not a Bedrock model invocation job ARN")


def _checked_shard_key(shard_key: str) -> str:
    if not SHARD_KEY_RE.fullmatch(shard_key) or ".." in shard_key:
        raise ProviderError(f"shard key {shard_key!r} cannot be used in an S3 key (letters, digits, . _ - only)")
    return shard_key


def _safe_target(dest: Path, relative: str) -> Path | None:
    """`dest/relative` when every part of `relative` is a plain file or folder name, else None."""
    parts = relative.split("/")
    if any(not KEY_SEGMENT_RE.fullmatch(p) or p in (".", "..") for p in parts):
        return None
    return dest.joinpath(*parts)
