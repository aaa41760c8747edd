"""Building providers from settings: the one place a provider name becomes a client."""

from __future__ import annotations

from legal_batch.flows.registry import entry
from legal_batch.providers.base import BatchProvider, ProviderName
from legal_batch.settings import Settings


def provider_name_for(flow: str, settings: Settings) -> ProviderName:
    """The provider the flow is configured to use (its `LEGAL_BATCH_<FLOW>_PROVIDER`)."""
    return entry(flow).provider_name(settings)  # type: ignore[return-value]


def make_provider(name: str, settings: Settings) -> BatchProvider:
    """The provider `name`, configured from settings and the SDKs' standard environment variables."""
    if name == "local":
        from legal_batch.providers.local import LocalProvider

        return LocalProvider(
            settings.home_dir / "local_provider",
            dimensions=settings.embedding_dimensions,
            fail_rate=settings.local_fail_rate,
            expire_fraction=settings.local_expire_fraction,
        )
    if name == "openai":
        from legal_batch.providers.openai import OpenAIProvider

        return OpenAIProvider.from_settings(settings)
    if name == "azure_openai":
        from legal_batch.providers.azure_openai import AzureOpenAIProvider

        return AzureOpenAIProvider.from_settings(settings)
    if name == "bedrock":
        from legal_batch.providers.bedrock import BedrockProvider

        return BedrockProvider.from_settings(settings)
    raise ValueError(f"unknown provider {name!r}: use one of local, openai, azure_openai, bedrock")
