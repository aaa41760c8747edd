"""Building providers from settings: the one place a provider name becomes a client.

The provider modules read no settings and no environment of their own: what they need beyond their
SDK's standard variables (the settings, the Azure batch deployment, a missing key to name) is read
here and passed to their constructors. SDK modules are imported only when their provider is built.
"""

from __future__ import annotations

import os
from typing import Any

from legal_batch.providers.base import BatchProvider, ProviderError
from legal_batch.settings import Settings

AZURE_DEPLOYMENT_VARIABLE = "AZURE_OPENAI_BATCH_DEPLOYMENT"
"""The name of the Azure OpenAI Global Batch deployment every azure_openai line names."""


def make_provider(name: str, settings: Settings, **options: Any) -> BatchProvider:
    """The provider `name`, configured from settings and the SDKs' standard environment variables.

    `options` go to the provider's constructor (e.g. fewer attempts, shorter back-offs), except
    `max_retries`: the SDK client's own retries (openai: 4; botocore: 5 retries after the first call)."""
    if name == "local":
        return _local(settings, **options)
    if name == "openai":
        return _openai(settings, **options)
    if name == "azure_openai":
        return _azure_openai(settings, **options)
    if name == "bedrock":
        return _bedrock(settings, **options)
    raise ValueError(f"unknown provider {name!r}: use one of local, openai, azure_openai, bedrock")


def _local(settings: Settings, **options: Any) -> BatchProvider:
    from legal_batch.providers.local import LocalProvider

    return LocalProvider(settings.home_dir / "local_provider", dimensions=settings.embedding_dimensions,
                         fail_rate=settings.local_fail_rate, expire_fraction=settings.local_expire_fraction,
                         **options)


def _openai(settings: Settings, *, max_retries: int = 4, **options: Any) -> BatchProvider:
    """A provider on `openai.OpenAI()`: the SDK reads `OPENAI_API_KEY` and `OPENAI_BASE_URL` itself."""
    import openai

    from legal_batch.providers.openai import OpenAIProvider

    if not os.environ.get("OPENAI_API_KEY"):
        raise ProviderError("the openai provider needs OPENAI_API_KEY (and OPENAI_BASE_URL for a service other "
                            "than api.openai.com); it is not set")
    try:
        client = openai.OpenAI(max_retries=max_retries)
    except openai.OpenAIError as exc:
        raise ProviderError(f"cannot configure the OpenAI client: {exc}") from exc
    return OpenAIProvider(client, dimensions=settings.embedding_dimensions, **options)


def _azure_openai(settings: Settings, *, max_retries: int = 4, **options: Any) -> BatchProvider:
    """A provider on `openai.AzureOpenAI()` (the SDK reads its own variables) and the deployment
    named by `AZURE_OPENAI_BATCH_DEPLOYMENT`."""
    import openai

    from legal_batch.providers.azure_openai import AzureOpenAIProvider

    missing = [name for name in ("AZURE_OPENAI_ENDPOINT", "OPENAI_API_VERSION", AZURE_DEPLOYMENT_VARIABLE)
               if not os.environ.get(name)]
    if not (os.environ.get("AZURE_OPENAI_API_KEY") or os.environ.get("AZURE_OPENAI_AD_TOKEN")):
        missing.insert(1, "AZURE_OPENAI_API_KEY (or AZURE_OPENAI_AD_TOKEN)")
    if missing:
        raise ProviderError(f"the azure_openai provider needs {', '.join(missing)}; not set. "
                            f"{AZURE_DEPLOYMENT_VARIABLE} is the name of your Global Batch deployment "
                            "(e.g. of gpt-4o-mini), OPENAI_API_VERSION e.g. 2024-10-21")
    try:
        client = openai.AzureOpenAI(max_retries=max_retries)
    except (openai.OpenAIError, ValueError) as exc:
        raise ProviderError(f"cannot configure the Azure OpenAI client: {exc}") from exc
    return AzureOpenAIProvider(client, deployment=os.environ[AZURE_DEPLOYMENT_VARIABLE],
                               dimensions=settings.embedding_dimensions, **options)


def _bedrock(settings: Settings, *, max_retries: int = 5, **options: Any) -> BatchProvider:
    """Clients from boto3's own configuration (region, endpoints, credentials; `AWS_REGION` is the
    region's fallback, as the other AWS SDKs read it), and the bucket, prefix and service role."""
    from legal_batch.providers.bedrock import BedrockProvider, aws_clients

    if not settings.s3_bucket:
        raise ProviderError("LEGAL_BATCH_S3_BUCKET is not set: the bedrock provider needs an S3 bucket for "
                            "request and output files (Bedrock reads and writes it with the service role)")
    if not settings.bedrock_role_arn:
        raise ProviderError("LEGAL_BATCH_BEDROCK_ROLE_ARN is not set: the bedrock provider needs the IAM "
                            "service role Bedrock assumes to read the requests and write the outputs")
    clients = aws_clients(max_retries=max_retries, fallback_region=os.environ.get("AWS_REGION") or None)
    return BedrockProvider(**clients, bucket=settings.s3_bucket, role_arn=settings.bedrock_role_arn,
                           prefix=settings.s3_prefix, dimensions=settings.embedding_dimensions, **options)
