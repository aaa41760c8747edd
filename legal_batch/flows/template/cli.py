"""`legal-batch template`: run the template flow over a folder of tabular files, and copy out the example.

Thin: staging, real-time answers, fallback and outputs are `core.template.flow` functions (the
ones `template_inputs` calls); batch mode drives the flow's Dagster jobs through `FlowDriver`.
Running the same command again continues the same run (nothing is staged or submitted twice).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Annotated, Literal

import orjson
import typer
from rich.console import Console

from legal_batch.core.wording import plural
from legal_batch.settings import get_settings

app = typer.Typer(help="Template-driven structured processing of tabular files: a prompt template and a JSON "
                       "Schema in, validated result columns out (batch or real time).", no_args_is_help=True)
console = Console(width=None if sys.stdout.isatty() else 140)
err = Console(stderr=True)

EXAMPLE_DIR = Path(__file__).resolve().parent / "example"
_PROVIDER_ENV = "LEGAL_BATCH_TEMPLATE_PROVIDER"


def _say(text: str) -> None:
    """One unwrapped line (paths stay whole), no markup (user text may hold brackets)."""
    console.print(text, markup=False, soft_wrap=True, highlight=False)


def _error(text: str) -> None:
    err.print(text, style="red", markup=False, soft_wrap=True, highlight=False)


def _connect():
    from legal_batch.core.errors import UserError
    from legal_batch.db import DatabaseError, connect, database_url, upgrade

    url = database_url(get_settings())
    try:
        upgrade(url)
        return connect(url)
    except DatabaseError as exc:
        raise UserError(str(exc)) from None


@app.command("run")
def run(
    input_path: Annotated[Path, typer.Option("--input", help="Input file or folder (.csv, .tsv, .parquet, and "
                                             ".gz forms; train/, val/, test/ subfolders are splits).")],
    templates: Annotated[Path, typer.Option(help="Folder holding prompts.json (or the file itself).")],
    schema: Annotated[Path, typer.Option(help="JSON Schema of one result object.")],
    output: Annotated[Path, typer.Option(help="Output folder: same layout and formats as the input.")],
    mode: Annotated[Literal["auto", "batch", "realtime"], typer.Option(
        help="auto: batch from --batch-threshold records on (and the provider's minimum per job).")] = "auto",
    provider: Annotated[Literal["local", "openai", "azure_openai", "bedrock"] | None, typer.Option(
        envvar=_PROVIDER_ENV, help="Provider (default: local).")] = None,
    wait: Annotated[bool, typer.Option(help="Batch: poll until every job is ingested, then write outputs.")] = False,
    poll_interval: Annotated[float | None, typer.Option(
        help="Seconds between polls (default: LEGAL_BATCH_POLL_INTERVAL, 60).")] = None,
    timeout: Annotated[float | None, typer.Option(help="Give up waiting after S seconds.")] = None,
    prefix: Annotated[str, typer.Option(help="Prefix of the result columns.")] = "llm_",
    batch_threshold: Annotated[int | None, typer.Option(
        help="auto mode: batch from this many records on (default LEGAL_BATCH_TEMPLATE_BATCH_THRESHOLD, 1000).")] = None,
    max_field_chars: Annotated[int | None, typer.Option(
        help="Truncate longer placeholder values (default LEGAL_BATCH_TEMPLATE_MAX_FIELD_CHARS, 20000).")] = None,
    name: Annotated[str | None, typer.Option(help="Run name in the summary file name (default: input name).")] = None,
    fresh: Annotated[bool, typer.Option(help="Start a new run even if this one was staged before.")] = False,
) -> None:
    """Stage the rows, answer them (batch or real time, with real-time fallback), write the outputs.

    Without --wait a batch run submits its jobs and returns; run the same command with --wait to
    collect the results (it continues the same run)."""
    from legal_batch.flows.template.errors import TemplateError
    from legal_batch.flows.template.outputs import finish_run, progress_line
    from legal_batch.flows.template.runs import TemplateRunConfig, stage_inputs
    from legal_batch.providers.base import ProviderError
    from legal_batch.resources.providers import make_provider

    settings = get_settings()
    provider_name = provider or settings.template_provider
    if poll_interval is not None and poll_interval < 0:
        _error(f"--poll-interval {poll_interval:g} is out of range: give 0 or more")
        raise typer.Exit(2)
    poll_interval = settings.poll_interval if poll_interval is None else poll_interval
    try:
        config = TemplateRunConfig(
            input_path=input_path, templates=templates, schema_path=schema, output_path=output,
            mode=mode, prefix=prefix, batch_threshold=batch_threshold or settings.template_batch_threshold,
            max_field_chars=max_field_chars or settings.template_max_field_chars, name=name,
        )
        with _connect() as conn:
            staged = stage_inputs(conn, config, provider=make_provider(provider_name, settings), fresh=fresh)
    except (TemplateError, ProviderError) as exc:
        _error(str(exc))
        raise typer.Exit(2) from None
    run_row = staged.run
    _say(f"template run {run_row.id} ({run_row.name}) "
                  f"{'continued' if staged.resumed else 'staged'}: {plural(run_row.record_count, 'record')} in "
                  f"{plural(staged.files, 'file')}, provider {run_row.provider} ({run_row.model})")
    _say(f"  {run_row.execution}: {run_row.mode_note}")
    if staged.truncation.rows_affected:
        _say(f"  {plural(staged.truncation.rows_affected, 'row')} had fields truncated at {run_row.max_field_chars} "
                      f"characters: {dict(staged.truncation.fields_truncated)}")
    failed_runs: list[str] = []
    if run_row.execution == "batch" and run_row.finished_at is None:
        failed_runs = _run_batch(provider_name, wait=wait, poll_interval=poll_interval, timeout=timeout)
    try:
        with _connect() as conn:
            progress = finish_run(conn, run_row.id, provider_for=lambda n: make_provider(n, get_settings()))
    except (TemplateError, ProviderError) as exc:
        _error(str(exc))
        raise typer.Exit(1) from None
    if progress.realtime.requested:
        fallback = f" ({progress.realtime.fallback} as fallback after batch failures)" if progress.realtime.fallback else ""
        _say(f"  answered {plural(progress.realtime.requested, 'row')} in real time{fallback}, "
                      f"{plural(progress.realtime.errors, 'provider error')}")
    if not progress.finished:
        _say(progress_line(progress))
        _say("results are still in provider batch jobs: run the same command with --wait to collect "
                      "them and write the outputs (nothing is submitted twice)")
        if failed_runs:
            raise typer.Exit(1)
        return
    _print_outputs(progress.outputs, progress.summary_path)


def _run_batch(provider_name: str, *, wait: bool, poll_interval: float, timeout: float | None) -> list[str]:
    """Plan, submit and (with `wait`) poll and ingest through the flow's Dagster jobs; failed run ids."""
    from legal_batch.definitions import FLOWS_BY_NAME, defs
    from legal_batch.driver import FlowDriver

    # the provider is the planning run's config; each shard keeps it on its job row for submit and ingest
    flow_run = FlowDriver(FLOWS_BY_NAME["template"], defs, flow="template", echo=_say,
                          plan_config={"provider": provider_name}).run(
        wait=wait, poll_interval=poll_interval, timeout=timeout)
    if flow_run.failed_runs:
        _error(f"{plural(len(flow_run.failed_runs), 'Dagster run')} failed: {', '.join(flow_run.failed_runs)}; see "
               "`dagster dev` → Runs. Rows of refused or failed jobs are answered in real time.")
    return flow_run.failed_runs


def _print_outputs(outputs: list[str], summary_path: str | None) -> None:
    _say("outputs written:")
    for path in outputs:
        _say(f"  {path}")
    if summary_path is None:
        return
    _say(f"processing summary: {summary_path}")
    try:
        summary = orjson.loads(Path(summary_path).read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return
    _say(f"  {plural(summary['records'], 'record')}: {summary['successes']} success, {summary['failures']} error, "
                  f"validation rate {summary['validation_rate']:.1%}; batch used: {summary['batch_used']}")
    if summary.get("fallback_note"):
        _say(f"  note: {summary['fallback_note']}")


@app.command("example")
def example(output: Annotated[Path, typer.Option(help="Folder to copy the example into.")]) -> None:
    """Copy the example (case summaries in train/val/test splits, prompts.json, schema.json) to a folder."""
    target = output.resolve()
    shutil.copytree(EXAMPLE_DIR, target, dirs_exist_ok=True)
    _say(f"example copied to {target}. Run it with:\n"
                  f"  legal-batch template run --input {target / 'data'} --templates {target / 'templates'} "
                  f"--schema {target / 'schema.json'} --output {target / 'output'}")
