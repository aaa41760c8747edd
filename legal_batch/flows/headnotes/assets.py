"""Headnotes of court judgments, written back to `court_cases`, through provider batch jobs.

`headnote_candidates` → `headnote_request_files` → `headnote_batch_jobs` → `headnote_batch_outputs`
→ `court_case_headnotes`, one dynamic partition per shard (see `flows.batch_assets`).

Configuration (`LEGAL_BATCH_*`): `HEADNOTES_PROVIDER`, `HEADNOTE_MODEL`, `HEADNOTE_FEW_SHOT`,
`HEADNOTE_MAX_CHARS`, `HEADNOTE_MAX_TOKENS`, `HEADNOTE_TEMPERATURE`, `HEADNOTE_PROMPT` (the prompt
template; for one run `prompt` in `headnote_candidates`' config, as `legal-batch headnotes run --prompt`
does), and `HEADNOTE_OVERWRITE` (with `HEADNOTE_OVERWRITE_BEFORE`) to regenerate existing headnotes —
or, for one run, `overwrite` (and `overwrite_before`) in the config, as `--overwrite` does.
What a shard was planned with is kept on its job row (`batch_jobs.params`) and used for its request
file, submit and ingest, whichever process runs them.
"""

from __future__ import annotations

from datetime import UTC, datetime

import dagster as dg
import psycopg

from legal_batch.core import ledger
from legal_batch.core.user_tables import CaseSource
from legal_batch.flows.batch_assets import CandidatesConfig, FlowNames, build_flow_definitions
from legal_batch.flows.catalog import COURT_CASES, COURT_CASES_SCHEMA, OWNERS, SOURCES_GROUP
from legal_batch.flows.headnotes.checks import HEADNOTE_CHECK_SPECS, headnote_checks
from legal_batch.flows.headnotes.flow import (
    BUILT_IN_EXAMPLES,
    DONE_WITHOUT_RESULT_SQL,
    HeadnotesFlow,
    few_shot_examples,
    flag_stale_headnotes,
)
from legal_batch.flows.headnotes.prompt_template import PromptTemplate, load_prompt
from legal_batch.flows.registry import provider_name_for
from legal_batch.providers.base import BatchProvider
from legal_batch.resources import get_settings
from legal_batch.resources.providers import make_provider
from legal_batch.settings import Settings

NAMES = FlowNames(flow="headnotes", prefix="headnote", results="court_case_headnotes")

HEADNOTE_CORPUS = dg.AssetSpec(
    "headnote_corpus", group_name=SOURCES_GROUP, kinds={"postgres"}, owners=OWNERS, tags={"layer": "source"},
    description="Law reporters' headnotes, the few-shot examples of headnote requests (newest first). Grain: one "
                "headnote. Loaded by the user; while it is empty, built-in examples are used.",
    metadata={"dagster/table_name": "headnote_corpus", "dagster/column_schema": dg.TableSchema(columns=[
        dg.TableColumn("id", "bigint", constraints=dg.TableColumnConstraints(nullable=False, unique=True)),
        dg.TableColumn("headnote_text", "text", constraints=dg.TableColumnConstraints(nullable=False)),
        dg.TableColumn("created_at", "timestamptz", constraints=dg.TableColumnConstraints(nullable=False)),
    ])},
)

HEADNOTE_COLUMNS = dg.TableSchema(
    columns=[column for column in COURT_CASES_SCHEMA.columns
             if column.name in ("id", "headnote", "headnote_model", "headnote_generated_at")],
)
"""The asset is these columns of court_cases (the rest belong to the court_cases source)."""
PROCESS_STARTED = datetime.now(UTC)
"""Default overwrite cut-off: with `LEGAL_BATCH_HEADNOTE_OVERWRITE` and no `..._OVERWRITE_BEFORE`,
headnotes generated before this process started are regenerated, never the ones it writes."""


def run_prompt(config: CandidatesConfig | None, settings: Settings) -> PromptTemplate:
    """The prompt template a run plans with: its config's `prompt` (`--prompt`), else
    `LEGAL_BATCH_HEADNOTE_PROMPT`, else the built-in one. A file that cannot be used is a `UserError`."""
    if config is not None and config.prompt:
        return load_prompt(config.prompt, setting="prompt (the run's config, --prompt)")
    return load_prompt(settings.headnote_prompt)


def make_flow(provider: BatchProvider, config: CandidatesConfig | None, *,
              job: ledger.Shard | None = None) -> HeadnotesFlow:
    """For planning: the settings, with the run's `overwrite` (and cut-off) from its config. For a
    shard: what it was planned with (its job row), whichever process writes, submits or ingests it."""
    settings = get_settings()
    source = CaseSource.from_settings(settings)
    if job is not None and job.params is not None:
        return HeadnotesFlow.for_job(model=job.model, params=job.params, source=source)
    overwrite = settings.headnote_overwrite or bool(config and config.overwrite)
    before = (datetime.fromisoformat(config.overwrite_before) if config and config.overwrite_before
              else settings.headnote_overwrite_before or PROCESS_STARTED)
    return HeadnotesFlow(
        model=settings.headnote_model or provider.default_model("chat"),
        few_shot=settings.headnote_few_shot,
        max_chars=settings.headnote_max_chars,
        max_tokens=settings.headnote_max_tokens,
        temperature=settings.headnote_temperature,
        limit_cases=config.limit if config else None,
        overwrite=overwrite,
        overwrite_before=before if overwrite else None,
        # `ProviderLimits.max_input_tokens` is the embedding input limit (see `batch.plan`): headnote
        # prompts are bounded by HEADNOTE_MAX_CHARS (150,000 characters ≈ 40K tokens), within every
        # supported chat model's context.
        max_input_tokens=None,
        prompt=run_prompt(config, settings),
        regenerate_stale=settings.headnote_regenerate_stale,
        source=source,
    )


def estimate_candidates(context: dg.AssetExecutionContext, conn: psycopg.Connection, config: CandidatesConfig) -> dict:
    """Before planning: what every current candidate would cost (the run's estimate), and the ledger's
    totals so far; this is metadata on `headnote_candidates`."""
    settings = get_settings()
    flow = make_flow(make_provider(provider_name_for("headnotes", settings), settings), config)
    flag_stale_headnotes(conn, flow.source)
    estimate = flow.estimate(conn)
    examples = few_shot_examples(conn, count=flow.few_shot)
    built_in = bool(examples) and all(text in BUILT_IN_EXAMPLES for text in examples)
    notice = (f"headnote_corpus is empty: the prompt's few-shot examples are the {len(examples)} built-in ones "
              "(the form, not a house style); add headnotes to headnote_corpus to set yours") if built_in else None
    if notice:
        context.log.warning(notice)
    totals = ledger.summary(conn, NAMES.flow)
    cases = flow.source.select("id", "full_text", "headnote")
    without_text = conn.execute(
        f"SELECT count(*) FROM {cases} AS k"
        " WHERE headnote IS NULL AND (full_text IS NULL OR btrim(full_text) = '')"
    ).fetchone()[0]
    stale = conn.execute("SELECT count(*) FROM case_headnotes WHERE stale_since IS NOT NULL").fetchone()[0]
    context.log.info(
        f"{estimate.requests} cases need a headnote ({flow.model}): ~{estimate.est_input_tokens:,} input tokens, "
        f"at most {estimate.est_output_tokens_max:,} output tokens, est. ${estimate.est_batch_usd:.4f} at batch "
        f"price (${estimate.realtime_equivalent_usd:.4f} real-time)"
        + ("" if estimate.priced else f"; no price known for {flow.model}: set LEGAL_BATCH_PRICES"))
    return {
        "model": flow.model,
        "overwrite": flow.overwrite,
        "prompt_template": flow.prompt.source,
        "few_shot_examples": "built-in" if built_in else "headnote_corpus" if examples else "none",
        **({"notice": notice} if notice else {}),
        "cases_without_text": without_text,
        "headnotes_stale": stale,
        "regenerate_stale": flow.regenerate_stale,
        "run_est_requests": estimate.requests,
        "run_est_input_tokens": estimate.est_input_tokens,
        "run_est_output_tokens_max": estimate.est_output_tokens_max,
        "run_est_batch_usd": estimate.est_batch_usd,
        "run_realtime_equivalent_usd": estimate.realtime_equivalent_usd,
        "batch_discount": estimate.batch_discount,
        "priced": estimate.priced,
        "ledger_est_cost_usd": float(totals.est_cost_usd),
        "ledger_actual_cost_usd": float(totals.actual_cost_usd),
    }


def table_rows(conn: psycopg.Connection) -> int:
    """Cases of the source that have a headnote (generated or loaded)."""
    cases = CaseSource.from_settings(get_settings()).select("id", "headnote")
    return conn.execute(f"SELECT count(*) FROM {cases} AS k"
                        " WHERE headnote IS NOT NULL").fetchone()[0]


def check_headnotes(conn: psycopg.Connection, job: ledger.Shard) -> list[dg.AssetCheckResult]:
    settings = get_settings()
    max_tokens = int((job.params or {}).get("max_tokens", settings.headnote_max_tokens))  # as submitted
    return headnote_checks(conn, job, max_tokens=max_tokens, min_citation_rate=settings.headnote_min_citation_rate,
                           source=CaseSource.from_settings(settings))


DEFS = build_flow_definitions(
    NAMES,
    make_flow=make_flow,
    prepare=estimate_candidates,
    result_check_specs=HEADNOTE_CHECK_SPECS,
    result_checks=check_headnotes,
    done_without_result_sql=DONE_WITHOUT_RESULT_SQL,
    overwritable=True,
    prompted=True,
    sources=[COURT_CASES, HEADNOTE_CORPUS],
    configured_provider=get_settings().headnotes_provider,
    results_table="court_cases",
    results_schema=HEADNOTE_COLUMNS,
    table_rows=table_rows,
    descriptions={
        "candidates": "Court judgments that need a headnote. Grain: one case (subject key = case id, custom id "
                      "case-<uuid>). Cases with non-empty full_text and no headnote (with overwrite in the run's "
                      "config or LEGAL_BATCH_HEADNOTE_OVERWRITE, also older ones) and no open or failed ledger item are "
                      "cut into shards under the provider's limits. Metadata: the run's estimated tokens and "
                      "cost (output at max_tokens per request) at batch and real-time prices. Idempotent: "
                      "in-flight and done cases are never planned again.",
        "request_files": "One shard's JSONL request file: one chat-completion line per case with the law "
                         "reporter's instructions, the shard's few-shot examples (newest in headnote_corpus, "
                         "the same for every line) and the judgment, cut at a paragraph boundary with a visible "
                         "marker beyond LEGAL_BATCH_HEADNOTE_MAX_CHARS or the provider's input limit. Rewritten "
                         "identically until submitted.",
        "batch_jobs": "The provider batch job of one shard. Submitted once: the ledger row and client token are "
                      "written before the provider call, and a crash in between is reconciled, not resubmitted.",
        "batch_outputs": "The downloaded output and error files of one finished provider job.",
        "results": "Headnotes in court_cases (headnote, headnote_model, headnote_generated_at). Grain: one case. "
                   "Empty answers, refusals, answers cut at max_tokens and error lines are not written; their "
                   "items are retried with the reason. Only cases still without a headnote are updated unless "
                   "overwrite is on. One transaction per shard: headnotes and ledger items together; re-ingest "
                   "changes nothing.",
    },
)
