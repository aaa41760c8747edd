"""The `azure_openai` provider: Azure OpenAI Global Batch through the real `openai` SDK.

Configured by the SDK's standard variables (`AZURE_OPENAI_ENDPOINT`, `AZURE_OPENAI_API_KEY` or
`AZURE_OPENAI_AD_TOKEN`, `OPENAI_API_VERSION`) plus `AZURE_OPENAI_BATCH_DEPLOYMENT`, the name of a
Global Batch deployment (e.g. of gpt-4o-mini), which the provider factory
(`resources/providers.py`) reads and passes in. Everything but the differences below is shared with
the `openai` provider (`OpenAIStyleProvider`), its retries too (one layer per call: see its module
docstring).

Differences from OpenAI: lines use `url` `/chat/completions` and `body.model` = the deployment name,
the same on every line (no BOM, no duplicate `custom_id`); ≤ 100,000 requests and 200 MB per job;
embeddings are not supported in batch (refused with `UnsupportedRequest`); uploads are processed
asynchronously (the batch is created once the file is `processed`); an empty error file is normal;
output files are kept 14–30 days.
"""

from __future__ import annotations

import time
from typing import Any

import openai

from legal_batch.providers import openai_format
from legal_batch.providers.base import (
    QUOTA_KINDS,
    Endpoint,
    ProviderError,
    ProviderLimits,
    Request,
    UnsupportedRequest,
)
from legal_batch.providers.openai import OpenAIStyleProvider

NO_EMBEDDINGS = ("Azure OpenAI Global Batch does not support embeddings; use "
                 "LEGAL_BATCH_EMBEDDINGS_PROVIDER=openai or bedrock")


class AzureOpenAIProvider(OpenAIStyleProvider):
    """Azure OpenAI Global Batch: chat completions on one batch deployment."""

    name = "azure_openai"
    service = "Azure OpenAI"
    key_variable = "AZURE_OPENAI_API_KEY"
    retention_days = "14 to 30"
    LIMITS = ProviderLimits(
        max_records_per_job=100_000,
        max_bytes_per_file=200_000_000,  # "200 MB", read as the smaller decimal megabytes
        max_input_tokens=120_000,  # chat only: gpt-4o-mini's 128K context, less room for the answer
        quota_kind=QUOTA_KINDS["azure_openai"],
    )

    def __init__(self, client: openai.AzureOpenAI, *, deployment: str, file_ready_timeout: float = 600.0,
                 **options: Any) -> None:
        """`deployment`: the Global Batch deployment every line names as `body.model`.
        `file_ready_timeout`: seconds to wait for an upload to be processed before creating the batch."""
        super().__init__(client, limits=options.pop("limits", self.LIMITS), **options)
        self.deployment = deployment
        self.file_ready_timeout = file_ready_timeout

    def default_model(self, endpoint: Endpoint) -> str:
        """The batch deployment for chat; embeddings are refused."""
        self._check_endpoint(endpoint)
        return self.deployment

    def format_line(self, request: Request, *, endpoint: Endpoint, model: str) -> bytes:
        """An OpenAI-envelope line with `url` `/chat/completions` and `body.model` = the deployment
        (whatever `model` says: Azure routes batch lines by deployment)."""
        self._check_endpoint(endpoint)
        return openai_format.request_line(request, endpoint=endpoint, model=self.deployment, url_prefix="",
                                          dimensions=None)

    def _batch_endpoint(self, endpoint: Endpoint) -> str:
        return "/chat/completions"

    def _realtime_model(self, model: str) -> str:
        return self.deployment

    def _check_endpoint(self, endpoint: Endpoint) -> None:
        if endpoint == "embeddings":
            raise UnsupportedRequest(NO_EMBEDDINGS)

    def _await_file_ready(self, file: Any) -> None:
        """Azure processes uploads asynchronously: wait (bounded) until the file is `processed`."""
        deadline = time.monotonic() + self.file_ready_timeout
        delay = 0.5
        while file.status in ("pending", "uploaded", "running"):
            if time.monotonic() > deadline:
                raise ProviderError(f"Azure OpenAI has not processed the uploaded file {file.id} after "
                                    f"{self.file_ready_timeout:.0f} s (status {file.status}); submit again later",
                                    retryable=True)
            time.sleep(delay)
            delay = min(delay * 2, 10.0)
            file = self.client.files.retrieve(file.id)
        if file.status == "error":
            raise ProviderError(f"Azure OpenAI could not process the uploaded file {file.id}: "
                                f"{file.status_details or 'no details given'}; check the request file's lines")
