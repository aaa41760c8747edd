"""Template-driven structured processing of tabular files, through provider batch jobs or real time.

`template_inputs` → `template_request_files` → `template_batch_jobs` → `template_batch_outputs`
→ `template_results`, one dynamic partition per shard (see `flows.batch_assets`).

`template_inputs` stages the run configured in `LEGAL_BATCH_TEMPLATE_*` (input, templates, schema,
output; idempotent: the same files and options are staged once) and finishes every open run
(real-time runs, real-time fallback for rows whose batch request failed, output files and the
processing summary once every row is answered). The CLI (`legal-batch template run`) stages its
own runs and drives the same jobs.
"""

from __future__ import annotations

import dagster as dg
import psycopg

from legal_batch.core import ledger
from legal_batch.flows.batch_assets import CandidatesConfig, FlowNames, build_flow_definitions
from legal_batch.flows.catalog import OWNERS, SOURCES_GROUP
from legal_batch.flows.template.errors import TemplateError
from legal_batch.flows.template.flow import DONE_WITHOUT_RESULT_SQL, TemplateFlow
from legal_batch.flows.template.outputs import finish_open_runs, has_pending_work, progress_line
from legal_batch.flows.template.runs import FLOW, TemplateRunConfig, find_run, stage_inputs
from legal_batch.providers.base import BatchProvider
from legal_batch.resources import Settings, get_settings
from legal_batch.resources.providers import make_provider

NAMES = FlowNames(flow=FLOW, prefix="template", results="template_results")


def make_flow(provider: BatchProvider, config: CandidatesConfig | None, *,
              job: ledger.Shard | None = None) -> TemplateFlow:
    return TemplateFlow(provider=provider.name, model=job.model if job else provider.default_model("chat"),
                        limit=config.limit if config else None)


def config_from_settings(settings: Settings) -> TemplateRunConfig | None:
    """The run configured by `LEGAL_BATCH_TEMPLATE_*`, or None when no input is set.

    Raises `TemplateError` naming the missing variables when the input is set without the rest."""
    if settings.template_input is None:
        return None
    missing = [f"LEGAL_BATCH_TEMPLATE_{name.upper()}" for name in ("templates", "schema", "output")
               if getattr(settings, f"template_{name}") is None]
    if missing:
        raise TemplateError(f"LEGAL_BATCH_TEMPLATE_INPUT is set but {', '.join(missing)} "
                            f"{'is' if len(missing) == 1 else 'are'} not; set them or unset the input")
    return TemplateRunConfig(
        input_path=settings.template_input, templates=settings.template_templates,  # type: ignore[arg-type]
        schema_path=settings.template_schema, output_path=settings.template_output,  # type: ignore[arg-type]
        mode=settings.template_mode, prefix=settings.template_prefix,
        batch_threshold=settings.template_batch_threshold, max_field_chars=settings.template_max_field_chars,
    )


def stage_and_finish(context: dg.AssetExecutionContext, conn: psycopg.Connection,
                     config: CandidatesConfig) -> dict:
    """Stage the configured run (if any), then finish every open run; metadata for `template_inputs`."""
    settings = get_settings()
    metadata: dict = {}
    run_config = config_from_settings(settings)
    if run_config is not None:
        staged = stage_inputs(conn, run_config, provider=make_provider(settings.template_provider, settings))
        run = staged.run
        context.log.info(f"template run {run.id} ({run.name}) {'found again' if staged.resumed else 'staged'}: "
                         f"{run.record_count} records in {staged.files} files; {run.execution}: {run.mode_note}")
        metadata.update({"run_id": run.id, "records_staged": 0 if staged.resumed else run.record_count,
                         "execution": run.execution or "", "mode_note": run.mode_note or "",
                         "truncation": dg.MetadataValue.json(staged.truncation.as_dict())})
    progress = finish_open_runs(conn, provider_for=lambda name: make_provider(name, get_settings()),
                                on_progress=lambda n: context.log.debug(f"{n} rows answered in real time"))
    for entry in progress:
        (context.log.warning if entry.error else context.log.info)(progress_line(entry))
    metadata.update({
        "runs_open": sum(1 for p in progress if not p.finished),
        "runs_blocked": dg.MetadataValue.json({str(p.run.id): p.error for p in progress if p.error}),
        "rows_answered_in_real_time": sum(p.realtime.requested for p in progress),
        "runs_finished": dg.MetadataValue.json(
            {str(p.run.id): p.summary_path for p in progress if p.finished}),
    })
    return metadata


def has_template_work(conn: psycopg.Connection) -> bool:
    """The configured run is not staged yet, or an open run needs real time or its outputs."""
    settings = get_settings()
    try:
        run_config = config_from_settings(settings)
        if run_config is not None and find_run(
                conn, run_config, provider=make_provider(settings.template_provider, settings)) is None:
            return True
    except TemplateError:
        return True  # the `template_inputs` run reports what is wrong
    return has_pending_work(conn)


def responses_check(conn: psycopg.Connection, job: ledger.Shard) -> list[dg.AssetCheckResult]:
    """Every done item of the shard has its response in `template_results`."""
    missing = conn.execute(f"SELECT count(*) FROM ({DONE_WITHOUT_RESULT_SQL} AND i.job_id = %s) AS m",
                           (job.id,)).fetchone()[0]
    return [dg.AssetCheckResult(check_name="responses_recorded", passed=missing == 0,
                                metadata={"done_items_without_response": missing})]


TEMPLATE_INPUT_FILES = dg.AssetSpec(
    "template_input_files", group_name=SOURCES_GROUP, kinds={"csv", "parquet", "file"}, owners=OWNERS,
    tags={"layer": "source"},
    description="The template flow's inputs: CSV/TSV/Parquet files (one file or train/val/test splits), the "
                "prompt templates (prompts.json) and the JSON Schema of one result — LEGAL_BATCH_TEMPLATE_INPUT, "
                "_TEMPLATES and _SCHEMA, or `legal-batch template run`'s arguments. Read, never written.",
)

TEMPLATE_RESULTS_SCHEMA = dg.TableSchema(
    columns=[
        dg.TableColumn("run_id", "bigint", description="template_runs.id",
                       constraints=dg.TableColumnConstraints(nullable=False)),
        dg.TableColumn("file_key", "text", description="The input file, relative to the input (e.g. train/cases.csv).",
                       constraints=dg.TableColumnConstraints(nullable=False)),
        dg.TableColumn("row_no", "integer", description="1-based data row of the file.",
                       constraints=dg.TableColumnConstraints(nullable=False)),
        dg.TableColumn("response_text", "text", description="The raw answer; parsed and validated into the "
                       "output files' columns."),
        dg.TableColumn("provider_error", "text"),
        dg.TableColumn("model", "text", constraints=dg.TableColumnConstraints(nullable=False)),
        dg.TableColumn("via", "text", description="batch or realtime",
                       constraints=dg.TableColumnConstraints(nullable=False)),
        dg.TableColumn("created_at", "timestamptz", constraints=dg.TableColumnConstraints(nullable=False)),
    ],
    constraints=dg.TableConstraints(other=["PRIMARY KEY (run_id, file_key, row_no)"]),
)


def table_rows(conn: psycopg.Connection) -> int:
    """Every answered row in template_results (all runs)."""
    return conn.execute("SELECT count(*) FROM template_results").fetchone()[0]


responses_spec = dg.AssetCheckSpec("responses_recorded", asset=NAMES.results,
                                   description="Every done request of the shard has its response in template_results.")

DEFS = build_flow_definitions(
    NAMES,
    make_flow=make_flow,
    prepare=stage_and_finish,
    has_unprepared=has_template_work,
    result_check_specs=[responses_spec],
    result_checks=responses_check,
    candidates_name="template_inputs",
    done_without_result_sql=DONE_WITHOUT_RESULT_SQL,
    sources=[TEMPLATE_INPUT_FILES],
    configured_provider=get_settings().template_provider,
    results_table="template_results",
    results_schema=TEMPLATE_RESULTS_SCHEMA,
    table_rows=table_rows,
    descriptions={
        "candidates": "Rows of the template flow's input files, staged with their rendered prompts. Grain: one "
                      "row (run_id, file_key, row_no) in template_rows. Stages the run configured in "
                      "LEGAL_BATCH_TEMPLATE_* (once per unchanged input and options), chooses batch or real time, "
                      "answers real-time runs and batch fallbacks, writes finished runs' output files and "
                      "processing summaries, then cuts unsent rows of batch runs into shards.",
        "request_files": "One shard's JSONL request file in the provider's batch format. Grain: one chat request "
                         "per input row; key: custom_id r<run_id>-f<file_no>-<row_no>. Rewritten identically until "
                         "submitted.",
        "batch_jobs": "The provider batch job of one shard. Submitted once: the ledger row and client token are "
                      "written before the provider call, and a crash in between is reconciled, not resubmitted. "
                      "A refused job's rows fall back to real time.",
        "batch_outputs": "The downloaded output and error files of one finished provider job.",
        "results": "Raw responses of the template flow (template_results). Grain: (run_id, file_key, row_no). One "
                   "transaction per shard: responses upserted and ledger items closed together; rows without a "
                   "response fall back to real time. Parsing and validation happen when outputs are written.",
    },
)
