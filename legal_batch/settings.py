"""Settings from the environment (and a `.env` file): the one place configuration is read."""

from __future__ import annotations

import json
import os
from datetime import datetime
from decimal import Decimal
from functools import lru_cache
from pathlib import Path
from typing import Literal

from dotenv import load_dotenv
from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from legal_batch.core import cost
from legal_batch.core.quota import QuotaPolicy

EmbeddingsProvider = Literal["local", "openai", "bedrock"]
ChatProvider = Literal["local", "azure_openai", "openai", "bedrock"]


class Settings(BaseSettings):
    """Every `LEGAL_BATCH_*` variable; the SDKs read their own standard variables themselves.

    An empty value (`LEGAL_BATCH_POLL_INTERVAL=`, as `.env.example` has them) is the same as no value:
    the default applies."""

    model_config = SettingsConfigDict(env_prefix="LEGAL_BATCH_", env_file=".env", extra="ignore",
                                      env_ignore_empty=True, populate_by_name=True)

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
    embedding_dimensions: int = Field(default=1024, ge=1, le=16_000, description="Vector size: 256, 512 or 1024 for "
                                      "Titan Text Embeddings V2; up to 1536 (text-embedding-3-small) or 3072 (-large).")
    schema_name: str = Field(default="legal_batch", validation_alias="LEGAL_BATCH_SCHEMA", pattern=r"^[a-z_][a-z0-9_]{0,62}$",
                         description="The Postgres schema our own tables live in (ledger, chunks, cache, migrations "
                         "record); nothing is created outside it but the pgvector extension and a vector table "
                         "you name.")
    source_table: str | None = Field(default=None, description="Your table (or view) of cases, `schema.table` or a "
                                     "table in `public`; unset → the built-in court_cases.")
    source_id_column: str = Field(default="id", description="Source: the case id column (uuid, unique).")
    source_text_column: str = Field(default="full_text", description="Source: the judgment text column.")
    source_citation_column: str | None = Field(default=None, description="Source: the citation column (unset → "
                                               "not read; the built-in court_cases has neutral_citation).")
    source_name_column: str | None = Field(default=None, description="Source: the case name column (unset → not "
                                           "read).")
    source_court_column: str | None = Field(default=None, description="Source: the court column (unset → not read).")
    source_date_column: str | None = Field(default=None, description="Source: the decision date column, a date or "
                                           "timestamp (unset → not read).")
    source_headnote_column: str | None = Field(default=None, description="Source: the headnote column, embedded as "
                                               "a chunk of its case and written by the headnotes flow (unset → "
                                               "none: the headnotes flow has nowhere to write).")
    embeddings_table: str | None = Field(default=None, description="The pgvector table vectors are written to, "
                                         "`schema.table` or a table in `public`; created when missing; unset → "
                                         "case_embeddings in our schema.")
    embeddings_storage: Literal["vector", "halfvec"] = Field(
        default="vector", description="How the vector table stores vectors: vector (float32) or halfvec (float16: "
        "half the table and HNSW index, up to 4,000 dimensions indexed). Our empty table is converted; a table "
        "holding the other type is one line at start.")
    embeddings_sinks: str = Field(default="pgvector", description="Where vectors are stored, a comma list of "
                                  "pgvector, chroma, weaviate (legal_batch/sinks/registry.py).")
    embeddings_source: str | None = Field(default=None, description="A record source read into the corpus "
                                          "(court_cases) before each chunking pass: dynamodb "
                                          "(legal_batch/sources/registry.py); unset → the corpus only. "
                                          "`embeddings run --source` wins.")
    dynamodb_table: str | None = Field(default=None, description="dynamodb source: the table of records (its key "
                                       "is read from the table; boto3's AWS_* variables apply).")
    dynamodb_text_attribute: str = Field(default="text", description="dynamodb source: the attribute holding "
                                         "the text to embed (a string).")
    dynamodb_status_attribute: str = Field(default="embedding_status", description="dynamodb source: the "
                                           "attribute the outcome is written to (SUCCESS or FAILED, with "
                                           "<attr>_model, <attr>_at, <attr>_error); items with either are not "
                                           "read again.")
    dynamodb_page_size: int = Field(default=100, ge=1, le=1000, description="dynamodb source: items per Scan "
                                    "page.")
    dynamodb_pages_per_pass: int = Field(default=100, ge=1, description="dynamodb source: Scan pages read per "
                                         "chunking pass (one planning run or planner-sensor tick); the next "
                                         "pass resumes from the cursor.")
    chroma_url: str | None = Field(default=None, description="Chroma server (http[s]://host:port); unset → an "
                                   "embedded persistent Chroma under $LEGAL_BATCH_HOME/chroma.")
    chroma_collection: str | None = Field(default=None, description="Unset → legal_batch-<model>-<dimensions>.")
    weaviate_url: str | None = Field(default=None, description="Weaviate REST endpoint (http[s]://host:port); "
                                     "required by the weaviate sink.")
    weaviate_grpc_url: str | None = Field(default=None, description="Weaviate gRPC endpoint; unset → the REST "
                                          "host on port 50051 (443 when the REST URL is https on 443).")
    weaviate_api_key: str | None = Field(default=None, description="Weaviate API key (sent as a bearer token).")
    weaviate_collection: str | None = Field(default=None, description="Unset → LegalBatch_<model>_<dimensions>.")
    chunk_max_tokens: int = 512
    chunk_overlap_tokens: int = 64
    chunk_workers: int = Field(default_factory=lambda: os.cpu_count() or 1, ge=1, le=256,
                               description="Processes that chunk judgments (the tokenizer's work); 1 → in the "
                               "main process, no pool. Unset → one per CPU.")
    shard_max_records: int | None = Field(default=None, description="Cap below the provider's own per-job limit.")
    max_attempts: int = 3
    ingest_max_attempts: int = Field(default=3, ge=1, description="Ingest runs the job-status sensor launches "
                                     "for one finished shard (a failed one is retried) before it stops and says so.")
    poll_interval: float = Field(default=60.0, ge=0, description="Seconds between status polls of `run --wait` "
                                 "(its --poll-interval wins).")
    openai_enqueued_token_limit: int | None = Field(
        default=None, gt=0, description="OpenAI: enqueued-token quota per model (your organisation's limits page; "
        "tier 1: 3,000,000 for text-embedding-3, 2,000,000 for gpt-4o-mini). Unset → learned from refusals.")
    azure_enqueued_token_limit: int | None = Field(
        default=None, gt=0, description="Azure OpenAI Global Batch: enqueued-token quota per deployment. Unset → "
        "learned from refusals.")
    bedrock_max_jobs_in_progress: int = Field(
        default=10, gt=0, description="Bedrock: batch jobs in progress per model per region (Service Quotas).")
    local_enqueued_token_limit: int | None = Field(
        default=None, gt=0, description="local provider: an enqueued-token quota to schedule under (rehearsals).")
    quotas: dict[str, int] = Field(
        default_factory=dict, description='Queue quotas per provider or provider/model, JSON, e.g. '
        '{"openai/text-embedding-3-large": 500000000, "bedrock": 20}; wins over the per-provider settings.')
    quota_margin: float = Field(default=0.05, ge=0, lt=1, description="Share of an enqueued-token quota kept free.")
    shards_per_quota: int = Field(default=4, ge=1, description="Shards are cut to at most quota / this many tokens, "
                                  "so several are in flight and the queue refills as each finishes.")
    budget_usd: str | None = Field(
        default=None, description='Spend cap in USD: a number for all flows together, or JSON per flow, e.g. '
        '{"embeddings": 20, "headnotes": 150, "*": 160}.')
    prices: dict[str, tuple[float, float]] = Field(
        default_factory=dict, description='Prices to add or override, USD per 1M tokens (input, output) at the '
        'real-time rate, JSON, e.g. {"my-model": [0.15, 0.6]}; unset → the built-in list (core/cost.py).')
    batch_discount: float = Field(default=0.5, description="Share of the real-time price a batch job saves, every "
                                  "provider.")
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
    headnote_prompt: Path | None = Field(
        default=None, description="The headnote prompt template (TOML: instructions, output language and style, "
        "citation wording; see legal_batch/flows/headnotes/headnote_prompt.toml); unset → the built-in one. "
        "`legal-batch headnotes run --prompt PATH` wins for its run; the text is kept with each shard planned.")
    headnote_min_citation_rate: float = Field(default=0.5, ge=0, le=1, description="Check: citation mention floor.")
    headnote_overwrite: bool = Field(default=False, description="Also regenerate existing headnotes.")
    headnote_regenerate_stale: bool = Field(default=False, description="Also regenerate headnotes flagged stale "
                                            "(their case's text changed after they were written).")
    headnote_overwrite_before: datetime | None = Field(
        default=None, description="With overwrite: regenerate headnotes generated before this instant "
        "(unset → before the planning process started). `legal-batch headnotes run --overwrite` passes its own "
        "cut-off in the run's config instead; either is kept with each shard planned."
    )

    @field_validator("budget_usd")
    @classmethod
    def _valid_budget(cls, value: str | None) -> str | None:
        _budgets(value)
        return value

    def quota_policy(self) -> QuotaPolicy:
        """The submit gate's configuration: queue quotas, margin and spend caps."""
        configured: dict[str, int] = {"bedrock": self.bedrock_max_jobs_in_progress}
        names = {"bedrock": "LEGAL_BATCH_BEDROCK_MAX_JOBS_IN_PROGRESS"}
        for provider, value, name in (("openai", self.openai_enqueued_token_limit, "OPENAI_ENQUEUED_TOKEN_LIMIT"),
                                      ("azure_openai", self.azure_enqueued_token_limit, "AZURE_ENQUEUED_TOKEN_LIMIT"),
                                      ("local", self.local_enqueued_token_limit, "LOCAL_ENQUEUED_TOKEN_LIMIT")):
            if value is not None:
                configured[provider] = value
                names[provider] = f"LEGAL_BATCH_{name}"
        for key, value in self.quotas.items():
            configured[key] = int(value)
            names[key] = f"LEGAL_BATCH_QUOTAS[{key!r}]"
        return QuotaPolicy(configured=configured, setting_names=names, margin=self.quota_margin,
                           shards_per_quota=self.shards_per_quota, budget_usd=_budgets(self.budget_usd),
                           retry_after_s=self.poll_interval)

    @property
    def home_dir(self) -> Path:
        path = self.home.expanduser().resolve()
        path.mkdir(parents=True, exist_ok=True)
        return path


def _budgets(value: str | None) -> dict[str, Decimal]:
    """`LEGAL_BATCH_BUDGET_USD`: a number (all flows) or a JSON object of flow → USD (`*` = all)."""
    if value is None or not value.strip():
        return {}
    text = value.strip()
    try:
        parsed = json.loads(text) if text.startswith("{") else {"*": text}
        budgets = {str(k): Decimal(str(v)) for k, v in parsed.items()}
    except (ValueError, ArithmeticError, AttributeError) as exc:
        raise ValueError(f"LEGAL_BATCH_BUDGET_USD={value!r} is neither a number of USD nor a JSON object of flow → "
                         'USD, e.g. 25 or {"embeddings": 20, "headnotes": 150}') from exc
    negative = [k for k, v in budgets.items() if v < 0 or not v.is_finite()]
    if negative:
        raise ValueError(f"LEGAL_BATCH_BUDGET_USD={value!r}: the cap for {negative[0]} must be a finite amount ≥ 0")
    return budgets


@lru_cache(maxsize=1)
def _cached() -> Settings:
    # A `.env` file also carries the SDKs' own variables (OPENAI_API_KEY, AWS_*): put them in the
    # environment (never overriding what is already set) so the SDKs read them unchanged.
    load_dotenv(".env", override=False)
    from pydantic import ValidationError
    from pydantic_settings import SettingsError

    from legal_batch.core.errors import UserError

    try:
        settings = Settings()
    except ValidationError as exc:
        raise UserError(_describe_invalid(exc)) from None
    except SettingsError as exc:  # a JSON setting that is not JSON
        raise UserError(_describe_unparsable(exc)) from None
    cost.configure(prices=settings.prices, batch_discount=settings.batch_discount)
    return settings


def get_settings(*, fresh: bool = False) -> Settings:
    """The process's settings; `fresh=True` re-reads the environment (tests change it).

    Raises `UserError` naming each invalid variable, its value and what it should be."""
    if fresh:
        _cached.cache_clear()
    return _cached()


def _variable(field: str) -> str:
    prefix = Settings.model_config.get('env_prefix', '')
    return field.upper() if field.upper().startswith(prefix) else f"{prefix}{field.upper()}"


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
