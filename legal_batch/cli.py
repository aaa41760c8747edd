"""The `legal-batch` console script. Thin: every verb calls the code the Dagster assets call, and
the flow verbs run the flow's own Dagster jobs in process against the persistent instance."""

from __future__ import annotations

import os
import sys
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from legal_batch.resources.settings import get_settings

app = typer.Typer(help="Provider batch-API workloads over court judgments.", no_args_is_help=True,
                  pretty_exceptions_show_locals=False)
db_app = typer.Typer(help="The database: upgrade, url, start, stop.", no_args_is_help=True)
demo_app = typer.Typer(help="Demo corpus and the end-to-end demo.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(demo_app, name="demo")
console = Console(width=None if sys.stdout.isatty() else 140)
err = Console(stderr=True)


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=err, transient=False)


def _url() -> str:
    from legal_batch.db import database_url

    return database_url(get_settings())


def _connect():
    from legal_batch.db import connect, upgrade

    url = _url()
    upgrade(url)
    return connect(url)


# -- db -----------------------------------------------------------------------------------------------

@db_app.command("upgrade")
def db_upgrade() -> None:
    """Apply pending schema migrations (idempotent)."""
    from legal_batch.db import upgrade

    applied = upgrade(_url())
    console.print(f"applied: {', '.join(applied)}" if applied else "schema is up to date")


@db_app.command("url")
def db_url() -> None:
    """Print the connection URL of the database in use (starts the embedded server if needed)."""
    print(_url())


@db_app.command("start")
def db_start() -> None:
    """Start the embedded server (no-op with LEGAL_BATCH_DATABASE_URL)."""
    console.print(f"running: {_url()}")


@db_app.command("stop")
def db_stop() -> None:
    """Stop the embedded server under $LEGAL_BATCH_HOME/pg."""
    from legal_batch.db import embedded

    settings = get_settings()
    if settings.database_url:
        console.print("LEGAL_BATCH_DATABASE_URL is set: no embedded server to stop")
        return
    stopped = embedded.stop(settings.home_dir)
    console.print("embedded Postgres stopped" if stopped else "embedded Postgres was not running")


@app.command("dagster-home")
def dagster_home_command() -> None:
    """Create (if needed) and print the Dagster home under $LEGAL_BATCH_HOME, for `dagster dev`."""
    from legal_batch.flows.runner import dagster_home

    print(dagster_home())


# -- demo ---------------------------------------------------------------------------------------------

@demo_app.command("seed")
def demo_seed(cases: Annotated[int, typer.Option(help="Number of judgments.")] = 1000,
              seed: Annotated[int, typer.Option(help="Corpus seed (same seed, same cases).")] = 42) -> None:
    """Write N deterministic synthetic Hong Kong judgments (existing ones are kept)."""
    from legal_batch.core.seed import seed_demo_cases

    with _connect() as conn, _progress() as progress:
        task = progress.add_task("seeding court_cases", total=cases)
        inserted = seed_demo_cases(conn, cases=cases, seed=seed,
                                   on_progress=lambda n: progress.advance(task, n))
    console.print(f"{inserted} new cases ({cases - inserted} already present)")


@demo_app.command("run")
def demo_run(cases: Annotated[int, typer.Option(help="Number of demo judgments.")] = 1000,
             poll_interval: Annotated[float, typer.Option(help="Seconds between status polls.")] = 1.0,
             query: Annotated[str, typer.Option(help="Search query shown at the end.")] =
             "adverse possession of land by fencing a garden for twelve years") -> None:
    """Seed, then run the embeddings pipeline through its whole batch lifecycle, then search; then the
    headnotes pipeline (local provider by default) and show one generated headnote."""
    settings = get_settings()
    console.print(f"[bold]legal_batch demo[/bold] — home {settings.home_dir}, provider "
                  f"{settings.embeddings_provider}")
    console.print(f"database: {_url()}")
    demo_seed(cases=cases, seed=42)
    run = _flow_run("embeddings", limit=None, wait=True, poll_interval=poll_interval, timeout=None)
    if not run.submitted:
        console.print("[green]nothing new to submit: every chunk is already embedded or in flight[/green]")
    jobs(flow="embeddings")
    search(query=query, k=5)
    console.print(f"[bold]headnotes[/bold] — provider {settings.headnotes_provider}")
    _flow_run("headnotes", limit=None, wait=True, poll_interval=poll_interval, timeout=None)
    jobs(flow="headnotes")
    _show_headnote()
    _demo_template(poll_interval=poll_interval)


def _demo_template(*, poll_interval: float) -> None:
    """The template flow on its bundled example (train/val/test CSVs), in batch mode on the local provider."""
    from legal_batch.flows.template import cli as template_cli

    example = template_cli.EXAMPLE_DIR
    output = get_settings().home_dir / "template_demo_output"
    console.print(f"[bold]template flow[/bold] — example {example} → {output}")
    template_cli.run(input_path=example / "data", templates=example / "templates", schema=example / "schema.json",
                     output=output, mode="batch", provider="local", wait=True, poll_interval=poll_interval,
                     timeout=None, prefix="llm_", batch_threshold=None, max_field_chars=None, name="demo",
                     fresh=False)


def _show_headnote() -> None:
    with _connect() as conn:
        row = conn.execute("SELECT case_name, neutral_citation, headnote_model, headnote FROM court_cases"
                           " WHERE headnote IS NOT NULL ORDER BY id LIMIT 1").fetchone()
    if row is None:
        console.print("no headnote generated yet: run `legal-batch headnotes run --wait`")
        return
    name, citation, model, headnote = row
    console.print(f"[bold]headnote of {name} {citation}[/bold] ({model}):\n{headnote}")


# -- flows --------------------------------------------------------------------------------------------

def _flow_defs(flow: str):
    from legal_batch.definitions import FLOWS_BY_NAME, defs

    return FLOWS_BY_NAME[flow], defs


def _flow_run(flow: str, *, limit: int | None, wait: bool, poll_interval: float, timeout: float | None):
    from legal_batch.flows.runner import FlowRunner

    flow_defs, defs = _flow_defs(flow)
    runner = FlowRunner(flow_defs, defs, flow=flow, echo=console.print)
    run = runner.run(limit=limit, wait=wait, poll_interval=poll_interval, timeout=timeout)
    if run.failed_runs:
        err.print(f"[red]{len(run.failed_runs)} Dagster runs failed: {', '.join(run.failed_runs)}[/red]")
        raise typer.Exit(1)
    return run


_OVERWRITE_OPTION = typer.Option(
    "--overwrite", help="Also regenerate results that already exist (made before this command started); "
    "flows without results to overwrite refuse it.")


def _set_overwrite(flow: str, overwrite_env: str | None, overwrite: bool) -> None:
    """`--overwrite`: set the flow's overwrite variable (and its cut-off, now) for this process."""
    if not overwrite:
        return
    if overwrite_env is None:
        raise typer.BadParameter(f"the {flow} flow has no --overwrite", param_hint="--overwrite")
    from datetime import UTC, datetime

    os.environ[overwrite_env] = "true"
    os.environ[f"{overwrite_env}_BEFORE"] = datetime.now(UTC).isoformat()
    get_settings(fresh=True)


def _flow_app(flow: str, *, overwrite_env: str | None = None) -> typer.Typer:
    """The flow's verbs; `overwrite_env` names the variable `--overwrite` turns on (flows that have one)."""
    sub = typer.Typer(help=f"The {flow} flow: export, submit, status, ingest, run.", no_args_is_help=True)

    @sub.command("export")
    def export(limit: Annotated[int | None, typer.Option(help="At most N source records.")] = None,
               overwrite: Annotated[bool, _OVERWRITE_OPTION] = False) -> None:
        """Prepare candidates and cut them into shards (request files are written on submit)."""
        from legal_batch.flows.runner import FlowRun, FlowRunner

        _set_overwrite(flow, overwrite_env, overwrite)
        flow_defs, defs = _flow_defs(flow)
        runner = FlowRunner(flow_defs, defs, flow=flow, echo=console.print)
        runner.plan(FlowRun(flow), limit=limit)

    @sub.command("submit")
    def submit() -> None:
        """Write and submit every planned shard (each exactly once)."""
        from legal_batch.flows.runner import FlowRun, FlowRunner

        flow_defs, defs = _flow_defs(flow)
        run = FlowRun(flow)
        FlowRunner(flow_defs, defs, flow=flow, echo=console.print).submit_pending(run)
        if not run.submitted:
            console.print("no planned shards to submit")

    @sub.command("status")
    def status() -> None:
        """Poll open provider jobs once and show the ledger."""
        from legal_batch.core import batch
        from legal_batch.resources.providers import make_provider

        with _connect() as conn:
            polled = batch.poll_open_jobs(conn, lambda name: make_provider(name, get_settings()), flow=flow)
            for entry in polled:
                console.print(f"{entry.job.shard_key}: {entry.job.provider_job_id} {entry.status.raw_status} "
                              f"({entry.status.completed or 0}/{entry.status.total or 0} done)")
        jobs(flow=flow)

    @sub.command("ingest")
    def ingest() -> None:
        """Poll once, then download and ingest every finished shard."""
        from legal_batch.flows.runner import FlowRun, FlowRunner

        flow_defs, defs = _flow_defs(flow)
        left = FlowRunner(flow_defs, defs, flow=flow, echo=console.print).tick_status(FlowRun(flow))
        console.print(f"{left} jobs still open")

    @sub.command("run")
    def run(limit: Annotated[int | None, typer.Option(help="At most N source records.")] = None,
            wait: Annotated[bool, typer.Option(help="Poll until every job is ingested.")] = False,
            poll_interval: Annotated[float, typer.Option(help="Seconds between polls (production: ~60).")] = 60.0,
            timeout: Annotated[float | None, typer.Option(help="Give up waiting after S seconds.")] = None,
            overwrite: Annotated[bool, _OVERWRITE_OPTION] = False) -> None:
        """Export and submit; with --wait, poll and ingest until done (retrying retryable items)."""
        _set_overwrite(flow, overwrite_env, overwrite)
        result = _flow_run(flow, limit=limit, wait=wait, poll_interval=poll_interval, timeout=timeout)
        if not result.submitted:
            console.print(f"nothing new to submit for {flow}")
        jobs(flow=flow)

    return sub


_OVERWRITE_ENV = {"headnotes": "LEGAL_BATCH_HEADNOTE_OVERWRITE"}
for _flow in ("embeddings", "headnotes"):
    app.add_typer(_flow_app(_flow, overwrite_env=_OVERWRITE_ENV.get(_flow)), name=_flow)
app.add_typer(__import__("legal_batch.flows.template.cli", fromlist=["app"]).app, name="template")


# -- ledger and search --------------------------------------------------------------------------------

@app.command("jobs")
def jobs(flow: Annotated[str | None, typer.Option(help="Only this flow.")] = None) -> None:
    """The ledger: one row per provider job, and items by state."""
    from legal_batch.core import ledger

    with _connect() as conn:
        rows = ledger.list_jobs(conn, flow=flow)
        table = Table(title="batch_jobs")
        for column in ("shard", "provider", "job id", "state", "requests", "done", "retry", "failed", "est $",
                       "actual $"):
            table.add_column(column, no_wrap=column in ("shard", "job id"))
        for job in rows:
            table.add_row(job.shard_key, job.provider, job.provider_job_id or "-", job.state, str(job.request_count),
                          str(job.items_done if job.items_done is not None else "-"),
                          str(job.items_retryable if job.items_retryable is not None else "-"),
                          str(job.items_failed if job.items_failed is not None else "-"),
                          f"{job.est_cost_usd or 0:.4f}", f"{job.actual_cost_usd or 0:.4f}")
        console.print(table)
        flows = [flow] if flow else sorted({j.flow for j in rows})
        for name in flows:
            summary = ledger.summary(conn, name)
            items = ", ".join(f"{state} {count}" for state, count in sorted(summary.items_by_state.items()))
            console.print(f"[bold]{name}[/bold]: jobs {dict(sorted(summary.jobs_by_state.items()))}; "
                          f"items: {items or 'none'}")


@app.command("search")
def search(query: Annotated[str, typer.Argument(help="What to look for.")],
           k: Annotated[int, typer.Option(help="Number of chunks.")] = 5) -> None:
    """Semantic search over case_embeddings with the configured embeddings provider."""
    from legal_batch.core.search import search as run_search
    from legal_batch.providers.base import EmbeddingRequest
    from legal_batch.resources.providers import make_provider

    settings = get_settings()
    provider = make_provider(settings.embeddings_provider, settings)
    model = settings.embedding_model or provider.default_model("embeddings")
    result = next(iter(provider.realtime([EmbeddingRequest("query", query)], endpoint="embeddings", model=model)))
    if result.vector is None:
        err.print(f"[red]could not embed the query: {result.error}[/red]")
        raise typer.Exit(1)
    with _connect() as conn:
        hits = run_search(conn, result.vector, model=model, k=k)
    console.print(f"[bold]top {k} chunks for[/bold] “{query}”")
    if not hits:
        console.print("no embeddings yet: run `legal-batch embeddings run --wait`")
    for rank, hit in enumerate(hits, start=1):
        text = " ".join(hit.chunk_text.split())
        console.print(f"{rank}. [bold]{hit.case_name}[/bold] {hit.neutral_citation} ({hit.court}) — chunk "
                      f"{hit.chunk_index} ({hit.chunk_type}), score {hit.score:.3f}\n   {text[:300]}…")


@app.command("verify")
def verify(flow: Annotated[str | None, typer.Option(help="Only this flow.")] = None) -> None:
    """Prove from the database alone that every item is in exactly one state and nothing is lost."""
    from legal_batch.core.verify import verify as run_verify
    from legal_batch.definitions import DONE_WITHOUT_RESULT

    flows = {name: sql for name, sql in DONE_WITHOUT_RESULT.items() if flow is None or name == flow}
    with _connect() as conn:
        report = run_verify(conn, flows)
    for name in flows:
        console.print(f"{name}: {report.checked_items[name]} items in {report.checked_jobs[name]} jobs checked")
    for violation in report.violations:
        console.print(f"[red]✗ {violation.flow}: {violation.rule}: {violation.count}[/red] "
                      f"(e.g. {', '.join(violation.examples)})\n  what to do: {violation.repair}")
    if not report.ok:
        raise typer.Exit(1)
    console.print("[green]ledger consistent: every item is in exactly one state[/green]")


def main() -> None:
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
