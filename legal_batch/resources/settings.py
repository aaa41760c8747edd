"""Settings from the environment (and a `.env` file): the one place configuration is read."""

from __future__ import annotations

from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Literal

from dotenv import load_dotenv
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

EmbeddingsProvider = Literal["local", "openai", "bedrock"]
ChatProvider = Literal["local", "azure_openai", "openai", "bedrock"]


class Settings(BaseSettings):
    """Every `LEGAL_BATCH_*` variable; the SDKs read their own standard variables themselves.

    An empty value (`LEGAL_BATCH_POLL_INTERVAL=`, as `.env.example` has them) is the same as no value:
    the default applies."""

    model_config = SettingsConfigDict(env_prefix="LEGAL_BATCH_", env_file=".env", extra="ignore",
                                      env_ignore_empty=True)

    home: Path = Field(default=Path(".legal_batch"), description="State folder: embedded database, files, Dagster home.")
    database_url: str | None = Field(default=None, description="Postgres with pgvector; unset → embedded server.")
    embeddings_provider: EmbeddingsProvider = "local"
    headnotes_provider: ChatProvider = "local"
    template_provider: ChatProvider = "local"
    template_input: Path | None = Field(default=None, description="template flow (Dagster): input file or folder "
                                        "(train/, val/, test/ splits allowed); unset → only runs staged by the CLI.")
    template_templates: Path | None = Field(default=None, description="template flow: folder with prompts.json.")
    template_schema: Path | None = Field(default=None, description="template flow: JSON Schema of one result.")
    template_output: Path | None = Field(default=None, description="template flow: output folder.")
    template_mode: Literal["auto", "batch", "realtime"] = "auto"
    template_prefix: str = Field(default="llm_", description="template flow: prefix of the result columns.")
    template_batch_threshold: int = Field(default=1_000, description="template flow, auto mode: batch from this "
                                          "many records on (and at least the provider's minimum per job).")
    template_max_field_chars: int = Field(default=20_000, description="template flow: longer placeholder values "
                                          "are truncated (and counted in the summary).")
    embedding_model: str | None = Field(default=None, description="Unset → the provider's default model.")
    embedding_dimensions: int = 1024
    chunk_max_tokens: int = 512
    chunk_overlap_tokens: int = 64
    shard_max_records: int | None = Field(default=None, description="Cap below the provider's own per-job limit.")
    max_attempts: int = 3
    poll_interval: float = Field(default=60.0, ge=0, description="Seconds between status polls of `run --wait` "
                                 "(its --poll-interval wins).")
    s3_bucket: str | None = None
    s3_prefix: str = "legal-batch"
    bedrock_role_arn: str | None = None
    local_fail_rate: float = Field(default=0.0, description="local provider: fraction of requests that fail.")
    local_expire_fraction: float | None = Field(
        default=None, description="local provider: jobs expire after this fraction of requests."
    )
    headnote_model: str | None = Field(default=None, description="Unset → the provider's default chat model "
                                       "(Azure: the batch deployment).")
    headnote_few_shot: int = Field(default=3, description="Few-shot examples from headnote_corpus, newest first.")
    headnote_max_chars: int = Field(default=150_000, description="Judgment text is cut at a paragraph boundary here.")
    headnote_max_tokens: int = 600
    headnote_temperature: float = 0.1
    headnote_overwrite: bool = Field(default=False, description="Also regenerate existing headnotes.")
    headnote_overwrite_before: datetime | None = Field(
        default=None, description="With overwrite: regenerate headnotes generated before this instant "
        "(unset → before this process started); `legal-batch headnotes run --overwrite` sets it."
    )

    @property
    def home_dir(self) -> Path:
        path = self.home.expanduser().resolve()
        path.mkdir(parents=True, exist_ok=True)
        return path


@lru_cache(maxsize=1)
def _cached() -> Settings:
    # A `.env` file also carries the SDKs' own variables (OPENAI_API_KEY, AWS_*): put them in the
    # environment (never overriding what is already set) so the SDKs read them unchanged.
    load_dotenv(".env", override=False)
    from pydantic import ValidationError
    from pydantic_settings import SettingsError

    from legal_batch.core.errors import UserError

    try:
        return Settings()
    except ValidationError as exc:
        raise UserError(_describe_invalid(exc)) from None
    except SettingsError as exc:  # a JSON setting that is not JSON
        raise UserError(_describe_unparsable(exc)) from None


def get_settings(*, fresh: bool = False) -> Settings:
    """The process's settings; `fresh=True` re-reads the environment (tests change it).

    Raises `UserError` naming each invalid variable, its value and what it should be."""
    if fresh:
        _cached.cache_clear()
    return _cached()


def _variable(field: str) -> str:
    return f"{Settings.model_config.get('env_prefix', '')}{field.upper()}"


def _default(field: str) -> str:
    info = Settings.model_fields.get(field)
    if info is None or info.default_factory is not None or info.default is None:
        return ""
    return f" (default: {info.default})"


def _describe_invalid(exc) -> str:
    """One line: every invalid variable with its value, what it should be, and its default."""
    problems = []
    for error in exc.errors(include_url=False):
        field = str(error["loc"][0]) if error["loc"] else ""
        expected = error["msg"].removeprefix("Input ").removeprefix("Value error, ")
        problems.append(f"{_variable(field)}={str(error['input'])[:80]!r} is not valid: {expected}; "
                        f"correct it, or unset it{_default(field)}")
    return "; ".join(problems)


def _describe_unparsable(exc: Exception) -> str:
    """One line for a value pydantic-settings could not even parse (a JSON setting that is not JSON)."""
    import os
    import re

    match = re.search(r'field "(\w+)"', str(exc))
    if match is None:
        return f"a LEGAL_BATCH_ setting cannot be read: {exc}"
    field = match.group(1)
    value = os.environ.get(_variable(field), "")
    return f"{_variable(field)}={value[:80]!r} is not valid JSON; correct it, or unset it{_default(field)}"
