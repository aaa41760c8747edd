"""The `legal-batch` console script. Thin: every verb calls the code the Dagster assets call, and
the flow verbs run the flow's own Dagster jobs in process against the persistent instance.

A mistake of the user's — a setting, an argument, an unreachable database, a provider without its
credentials — is one line on stderr naming it, its value and what to do, with exit code 2 (see
`main`); the configuration a flow needs is checked before any Dagster run is launched."""

from __future__ import annotations

import inspect
import sys
from collections.abc import Callable
from enum import StrEnum
from typing import Annotated, NoReturn

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from typer.core import TyperOption

from legal_batch.core.errors import RunFailed, UserError
from legal_batch.core.wording import plural
from legal_batch.db.connection import DatabaseError
from legal_batch.flows.registry import FLOWS, flow_names
from legal_batch.settings import get_settings
from legal_batch.sinks.registry import parse_sink_names, sink_names


def _flag_type(display_type_rich: Callable) -> Callable:
    """A flag takes no value: show no type for it (typer's help prints `<bool>` after every flag)."""

    def display(self: TyperOption, ctx: typer.Context) -> str | None:
        return None if self.is_flag else display_type_rich(self, ctx)

    return display


TyperOption.display_type_rich = _flag_type(TyperOption.display_type_rich)  # type: ignore[method-assign]

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
    """A connection to an up-to-date schema whose source and vector tables (as the settings name them)
    are usable; a database that cannot be used is a `UserError`."""
    from legal_batch.core.user_tables import check_tables
    from legal_batch.db import DatabaseError, connect, upgrade

    url = _url()
    try:
        upgrade(url)
        conn = connect(url)
    except DatabaseError as exc:
        raise UserError(str(exc)) from None
    try:
        check_tables(conn, get_settings())
    except BaseException:
        conn.close()
        raise
    return conn


def _at_least(option: str, value: float | None, minimum: float) -> None:
    if value is not None and value < minimum:
        raise UserError(f"{option} {value:g} is out of range: give {minimum:g} or more")


def _check_flow(flow: str) -> None:
    """Check what the flow's runs need — valid settings, its provider's settings and credentials, a
    reachable database — before any run is launched (a run would fail with the cause buried in it)."""
    _provider(flow)
    _connect().close()


def _provider(flow: str, name: str | None = None):
    """The flow's provider (`name`, or the configured one); missing settings or credentials are a
    `UserError` naming the flow's provider variable."""
    from legal_batch.flows.registry import provider_name_for
    from legal_batch.providers.base import ProviderError
    from legal_batch.resources.providers import make_provider

    settings = get_settings()
    name = name or provider_name_for(flow, settings)  # type: ignore[arg-type]
    try:
        return make_provider(name, settings)
    except ProviderError as exc:
        raise UserError(f"the {flow} flow's provider (LEGAL_BATCH_{flow.upper()}_PROVIDER={name}) cannot be "
                        f"used: {exc}") from None


# -- db -----------------------------------------------------------------------------------------------

@db_app.command("upgrade")
def db_upgrade() -> None:
    """Apply pending schema migrations (idempotent)."""
    from legal_batch.db import DatabaseError, upgrade

    try:
        applied = upgrade(_url())
    except DatabaseError as exc:
        raise UserError(str(exc)) from None
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
    from legal_batch.driver import dagster_home

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
    console.print(f"{plural(inserted, 'new case')} ({cases - inserted} already present)")


@demo_app.command("run")
def demo_run(cases: Annotated[int, typer.Option(help="Number of demo judgments.")] = 1000,
             poll_interval: Annotated[float, typer.Option(help="Seconds between status polls.")] = 1.0,
             query: Annotated[str, typer.Option(help="Search query shown at the end.")] =
             "adverse possession of land by fencing a garden for twelve years") -> None:
    """Seed, then run the embeddings pipeline through its whole batch lifecycle, then search; then the
    headnotes pipeline (local provider by default) and show one generated headnote."""
    settings = get_settings()
    for flow in ("embeddings", "headnotes"):
        _check_flow(flow)
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


def _flow_run(flow: str, *, limit: int | None, wait: bool, poll_interval: float, timeout: float | None,
              plan_config: dict | None = None):
    from legal_batch.driver import FlowDriver

    _check_flow(flow)
    flow_defs, defs = _flow_defs(flow)
    runner = FlowDriver(flow_defs, defs, flow=flow, echo=console.print, plan_config=plan_config)
    return runner.finish(runner.run(limit=limit, wait=wait, poll_interval=poll_interval, timeout=timeout))


def _report(run) -> None:
    """What went wrong in this run, grouped (reason → count → an example with file:line and job), and
    a non-zero exit when items failed, a check of severity ERROR failed or a Dagster run failed.
    Budget-held shards exit 3."""
    lines = run.report()
    for line in lines:
        err.print(f"[red]✗ {line}[/red]" if not line.startswith("check") or "(ERROR)" in line
                  else f"[yellow]! {line}[/yellow]", highlight=False, soft_wrap=True)
    if not run.ok:
        raise typer.Exit(1)
    if run.budget_blocked:
        err.print(f"[yellow]{plural(run.budget_blocked, 'shard')} wait for budget (LEGAL_BATCH_BUDGET_USD)[/yellow]")
        raise typer.Exit(3)


_OVERWRITE_OPTION = typer.Option(
    "--overwrite", help="Also regenerate results that already exist (made before this command started).")


_PROMPT_OPTION = typer.Option(
    "--prompt", metavar="PATH", help="The prompt template (TOML) for the shards this command plans (default: "
    "LEGAL_BATCH_HEADNOTE_PROMPT, else the built-in one; see legal_batch/flows/headnotes/headnote_prompt.toml).")


def _prompt_config(flow: str, prompted: bool, prompt: str | None) -> dict:
    """`--prompt`: the planning run's config (the template file, checked here so that a file that
    cannot be used is one line before any run); each shard planned keeps the template's text."""
    if not prompted:
        if prompt is not None:
            raise typer.BadParameter(f"the {flow} flow has no prompt template", param_hint="--prompt")
        return {}
    from pathlib import Path

    from legal_batch.flows.headnotes.prompt_template import load_prompt

    if prompt is None:
        load_prompt(get_settings().headnote_prompt)
        return {}
    load_prompt(prompt, setting="--prompt")
    return {"prompt": str(Path(prompt).expanduser().resolve())}


def _plan_config(flow: str, overwritable: bool, overwrite: bool) -> dict:
    """`--overwrite`: the planning run's config (overwrite, and its cut-off: now). The shards it plans
    keep both on their job rows, so a later `submit`, `ingest` or the daemon's runs use them too."""
    if not overwrite:
        return {}
    if not overwritable:
        raise typer.BadParameter(f"the {flow} flow has no --overwrite", param_hint="--overwrite")
    from datetime import UTC, datetime

    return {"overwrite": True, "overwrite_before": datetime.now(UTC).isoformat()}


_SINK_OPTION = typer.Option(
    "--sink", metavar="NAMES", help="Vector sinks for the shards this command plans, a comma list of "
    f"{', '.join(sink_names())} (default: LEGAL_BATCH_EMBEDDINGS_SINKS, pgvector).")
_SOURCE_OPTION = typer.Option(
    "--source", metavar="NAME", help="Read this record source into the corpus first: dynamodb "
    "(LEGAL_BATCH_DYNAMODB_TABLE; default: LEGAL_BATCH_EMBEDDINGS_SOURCE, none).")


def _store_config(flow: str, stores_vectors: bool, sink: str | None, source: str | None) -> dict:
    """`--sink`, `--source`: the planning run's config, checked here — names, settings, and every further
    sink reachable and of the right dimension — so a mistake is one line before any run or request."""
    if not stores_vectors:
        for value, option in ((sink, "--sink"), (source, "--source")):
            if value is not None:
                raise typer.BadParameter(f"the {flow} flow stores no vectors", param_hint=option)
        return {}
    from legal_batch.flows.embeddings.record_sources import check_source_name, open_source
    from legal_batch.flows.embeddings.replicas import check_sinks

    settings = get_settings()
    names = parse_sink_names(sink if sink is not None else settings.embeddings_sinks,
                             setting="--sink" if sink is not None else "LEGAL_BATCH_EMBEDDINGS_SINKS")
    model = settings.embedding_model or _provider(flow).default_model("embeddings")
    check_sinks(names, model=model, dimensions=settings.embedding_dimensions, settings=settings)
    record_source = check_source_name(source if source is not None else settings.embeddings_source,
                                      setting="--source" if source is not None else "LEGAL_BATCH_EMBEDDINGS_SOURCE")
    if record_source is not None:
        open_source(record_source, settings)
    config: dict = {}
    if sink is not None:
        config["sinks"] = ",".join(names)
    if source is not None:
        config["source"] = record_source
    return config


def _without(parameter: str, command: Callable) -> Callable:
    """`command` as the CLI sees it without `parameter`: the option is not offered (nor listed in
    --help), and the parameter keeps its default."""
    signature = inspect.signature(command, eval_str=True)
    command.__signature__ = signature.replace(  # type: ignore[attr-defined]
        parameters=[p for p in signature.parameters.values() if p.name != parameter])
    return command


def _flow_app(flow: str, *, overwritable: bool = False, prompted: bool = False,
              stores_vectors: bool = False) -> typer.Typer:
    """The flow's verbs; only flows with results to regenerate (`overwritable`) offer --overwrite,
    only flows with a prompt template (`prompted`) offer --prompt, only flows that store vectors
    (`stores_vectors`) offer --sink and --source."""
    sub = typer.Typer(help=f"The {flow} flow: export, submit, status, ingest, run.", no_args_is_help=True)
    overwrite_option: Callable[[Callable], Callable] = (
        (lambda command: command) if overwritable else (lambda command: _without("overwrite", command)))
    prompt_option: Callable[[Callable], Callable] = (
        (lambda command: command) if prompted else (lambda command: _without("prompt", command)))

    def store_options(command: Callable) -> Callable:
        return command if stores_vectors else _without("source", _without("sink", command))

    @sub.command("export")
    @overwrite_option
    @prompt_option
    @store_options
    def export(limit: Annotated[int | None, typer.Option(help="At most N source records.")] = None,
               overwrite: Annotated[bool, _OVERWRITE_OPTION] = False,
               prompt: Annotated[str | None, _PROMPT_OPTION] = None,
               sink: Annotated[str | None, _SINK_OPTION] = None,
               source: Annotated[str | None, _SOURCE_OPTION] = None) -> None:
        """Prepare candidates and cut them into shards (request files are written on submit)."""
        from legal_batch.driver import FlowDriver, FlowRun

        _at_least("--limit", limit, 1)
        plan_config = {**_plan_config(flow, overwritable, overwrite), **_prompt_config(flow, prompted, prompt)}
        _check_flow(flow)
        plan_config.update(_store_config(flow, stores_vectors, sink, source))
        flow_defs, defs = _flow_defs(flow)
        runner = FlowDriver(flow_defs, defs, flow=flow, echo=console.print, plan_config=plan_config)
        runner.plan(FlowRun(flow), limit=limit)

    @sub.command("submit")
    def submit() -> None:
        """Write and submit every planned shard (each exactly once)."""
        from legal_batch.driver import FlowDriver, FlowRun

        _check_flow(flow)
        flow_defs, defs = _flow_defs(flow)
        run = FlowRun(flow)
        FlowDriver(flow_defs, defs, flow=flow, echo=console.print).submit_pending(run)
        if not run.submitted:
            console.print("no planned shards to submit")

    @sub.command("status")
    def status() -> None:
        """Poll open provider jobs once and show the ledger."""
        from legal_batch.core import batch

        with _connect() as conn:
            polled = batch.poll_open_jobs(conn, lambda name: _provider(flow, name), flow=flow)
            for entry in polled:
                console.print(f"{entry.job.shard_key}: {entry.job.provider_job_id} {entry.status.raw_status} "
                              f"({entry.status.completed or 0}/{entry.status.total or 0} done)")
        jobs(flow=flow)

    @sub.command("ingest")
    def ingest() -> None:
        """Poll once, then download and ingest every finished shard."""
        from legal_batch.driver import FlowDriver

        _check_flow(flow)
        flow_defs, defs = _flow_defs(flow)
        runner = FlowDriver(flow_defs, defs, flow=flow, echo=console.print)
        state = runner.new_run()
        left = runner.tick_status(state)
        console.print(f"{plural(left, 'job')} still open")
        _report(runner.finish(state))

    @sub.command("run")
    @overwrite_option
    @prompt_option
    @store_options
    def run(limit: Annotated[int | None, typer.Option(help="At most N source records.")] = None,
            wait: Annotated[bool, typer.Option(help="Poll until every job is ingested.")] = False,
            poll_interval: Annotated[float | None, typer.Option(
                help="Seconds between polls (default: LEGAL_BATCH_POLL_INTERVAL, 60).")] = None,
            timeout: Annotated[float | None, typer.Option(help="Give up waiting after S seconds.")] = None,
            overwrite: Annotated[bool, _OVERWRITE_OPTION] = False,
            prompt: Annotated[str | None, _PROMPT_OPTION] = None,
            sink: Annotated[str | None, _SINK_OPTION] = None,
            source: Annotated[str | None, _SOURCE_OPTION] = None) -> None:
        """Export and submit; with --wait, poll and ingest until done (retrying retryable items)."""
        _at_least("--limit", limit, 1)
        _at_least("--poll-interval", poll_interval, 0)
        plan_config = {**_plan_config(flow, overwritable, overwrite), **_prompt_config(flow, prompted, prompt)}
        _check_flow(flow)
        plan_config.update(_store_config(flow, stores_vectors, sink, source))
        interval = get_settings().poll_interval if poll_interval is None else poll_interval
        result = _flow_run(flow, limit=limit, wait=wait, poll_interval=interval, timeout=timeout,
                           plan_config=plan_config)
        if not result.submitted:
            console.print(f"nothing new to submit for {flow}")
        jobs(flow=flow)
        _report(result)

    return sub


for _entry in FLOWS:
    app.add_typer(_flow_app(_entry.name, overwritable=_entry.overwritable, prompted=_entry.prompted,
                            stores_vectors=_entry.stores_vectors)
                  if _entry.standard_cli
                  else _entry.cli_app(), name=_entry.name)
app.add_typer(__import__("legal_batch.cases_cli", fromlist=["app"]).app, name="cases")
app.command("eval")(__import__("legal_batch.eval_cli", fromlist=["evaluate"]).evaluate)


# -- ledger and search --------------------------------------------------------------------------------

FlowChoice = StrEnum("FlowChoice", [(name, name) for name in flow_names()])
"""The registered flows, as the choices of `--flow`."""
_FLOW_OPTION = typer.Option(help="Only this flow.")


@app.command("jobs")
def jobs(flow: Annotated[FlowChoice | None, _FLOW_OPTION] = None) -> None:
    """The ledger: one row per provider job, and items by state."""
    flow = None if flow is None else str(flow)
    from legal_batch.core import ledger, quota, vector_cache
    from legal_batch.providers.base import QUOTA_KINDS

    with _connect() as conn:
        rows = ledger.list_jobs(conn, flow=flow)
        table = Table(title="batch_jobs")
        for column in ("shard", "provider", "job id", "state", "requests", "tokens", "done", "retry", "failed",
                       "est $", "actual $"):
            table.add_column(column, no_wrap=column in ("shard", "job id"))
        for job in rows:
            state = job.state + (" (waiting)" if job.waiting_reason and job.state in ledger.WAITING_JOB_STATES else "")
            table.add_row(job.shard_key, job.provider, job.provider_job_id or "-", state, str(job.request_count),
                          f"{job.est_input_tokens or 0:,}",
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
                          f"items: {items or 'none'}; ${summary.actual_cost_usd:.4f} spent of "
                          f"${summary.est_cost_usd:.4f} estimated")
        saved = vector_cache.savings(conn, flow=flow)
        if saved.requests:
            console.print(f"[bold]cache[/bold]: {saved.line()}", highlight=False)
        policy = get_settings().quota_policy()
        for view in quota.queue_views(conn, kinds=QUOTA_KINDS, policy=policy, flow=flow):
            console.print(f"[bold]queue[/bold] {view.line()}", highlight=False)
        for scope, cap in sorted(policy.budget_usd.items()):
            spent = quota.committed_usd(conn, flow=None if scope == "*" else scope)
            console.print(f"[bold]budget[/bold] {'all flows' if scope == '*' else scope}: ${spent:.4f} spent or in "
                          f"flight of ${cap:f} ({policy.budget_setting})", highlight=False)


SinkChoice = StrEnum("SinkChoice", [(name, name) for name in sink_names()])
"""The registered vector sinks, as the choices of `search --sink`."""


def _search_sink(name: str, vector, *, model: str, dimensions: int, k: int, query: str) -> None:
    """Search a vector sink other than pgvector (its own index, its own stored text and metadata)."""
    from legal_batch.sinks.registry import open_sink

    sink = open_sink(name, model=model, dimensions=dimensions, settings=get_settings())
    try:
        hits = sink.search(vector, k=k)
    finally:
        sink.close()
    console.print(f"[bold]top {plural(k, 'chunk')} in {sink.where} for[/bold] “{query}”")
    if not hits:
        console.print(f"no vectors of {model} in {sink.where}: run `legal-batch embeddings run --wait` with "
                      f"{name} in LEGAL_BATCH_EMBEDDINGS_SINKS", markup=False)
    for rank, hit in enumerate(hits, start=1):
        text = " ".join(hit.text.split())
        console.print(f"{rank}. {hit.metadata.get('citation', '')} {hit.record_id} — chunk {hit.chunk_index} "
                      f"({hit.metadata.get('chunk_type', '')}), score {hit.score:.3f}\n   {text[:300]}…", markup=False)


@app.command("search")
def search(query: Annotated[str, typer.Argument(help="What to look for.")],
           k: Annotated[int, typer.Option(help="Number of chunks (1 or more).")] = 5,
           sink: Annotated[SinkChoice | None, typer.Option(
               help="The vector store to search (default: the first of LEGAL_BATCH_EMBEDDINGS_SINKS).")] = None,
           ) -> None:
    """Semantic search over the stored embeddings with the configured embeddings provider."""
    from legal_batch.core.user_tables import CaseSource
    from legal_batch.flows.embeddings.search import search as run_search
    from legal_batch.providers.base import EmbeddingRequest

    if not query.strip():
        raise UserError(f"the QUERY argument is empty ({query!r}): give the words to look for, e.g. "
                        "legal-batch search \"adverse possession\"")
    _at_least("--k", k, 1)
    settings = get_settings()
    provider = _provider("embeddings")
    model = settings.embedding_model or provider.default_model("embeddings")
    result = next(iter(provider.realtime([EmbeddingRequest("query", query)], endpoint="embeddings", model=model)))
    if result.vector is None:
        err.print(f"[red]could not embed the query: {result.error}[/red]")
        raise typer.Exit(1)
    chosen = str(sink) if sink is not None else parse_sink_names(settings.embeddings_sinks)[0]
    if chosen != "pgvector":
        _search_sink(chosen, result.vector, model=model, dimensions=settings.embedding_dimensions, k=k, query=query)
        return
    with _connect() as conn:
        hits = run_search(conn, result.vector, model=model, k=k, source=CaseSource.from_settings(settings))
        stored = [] if hits else conn.execute(
            "SELECT model, count(*) FROM embedding_sink GROUP BY model ORDER BY 2 DESC").fetchall()
    console.print(f"[bold]top {plural(k, 'chunk')} for[/bold] “{query}”")
    if not hits and stored:
        others = ", ".join(f"{plural(count, 'vector')} of {name}" for name, count in stored)
        console.print(f"no embeddings of {model} (stored: {others}): set LEGAL_BATCH_EMBEDDING_MODEL (and "
                      "LEGAL_BATCH_EMBEDDINGS_PROVIDER) to the model they were made with, or run "
                      "`legal-batch embeddings run --wait`", markup=False)
    elif not hits:
        console.print("no embeddings yet: run `legal-batch embeddings run --wait`")
    for rank, hit in enumerate(hits, start=1):
        text = " ".join(hit.chunk_text.split())
        console.print(f"{rank}. [bold]{hit.case_name}[/bold] {hit.neutral_citation} ({hit.court}) — chunk "
                      f"{hit.chunk_index} ({hit.chunk_type}), score {hit.score:.3f}\n   {text[:300]}…")


@app.command("verify")
def verify(flow: Annotated[FlowChoice | None, _FLOW_OPTION] = None) -> None:
    """Prove from the database alone that every item is in exactly one state and nothing is lost."""
    flow = None if flow is None else str(flow)
    from legal_batch.core.user_tables import CaseSource
    from legal_batch.core.verify import stale_results
    from legal_batch.core.verify import verify as run_verify
    from legal_batch.definitions import DONE_WITHOUT_RESULT
    from legal_batch.flows.registry import entry as registry_entry

    flows = {name: sql for name, sql in DONE_WITHOUT_RESULT.items() if flow is None or name == flow}
    source = CaseSource.from_settings(get_settings())
    with _connect() as conn:
        report = run_verify(conn, flows)
        stale = stale_results(conn, {name: registry_entry(name).stale_result_sql(source) for name in flows})
    for name in flows:
        console.print(f"{name}: {plural(report.checked_items[name], 'item')} in "
                      f"{plural(report.checked_jobs[name], 'job')} checked")
    for violation in report.violations:
        console.print(f"[red]✗ {violation.flow}: {violation.rule}: {violation.count}[/red] "
                      f"(e.g. {', '.join(violation.examples)})\n  what to do: {violation.repair}")
    for found in stale:
        noun = "sink row" if found.flow == "embeddings" else "result"
        console.print(f"[yellow]! {found.flow}: {plural(found.count, noun)} no longer match the source text[/yellow] "
                      f"(e.g. {', '.join(found.examples)})\n  what to do: {found.repair}", highlight=False)
    sinks_ok = True
    if "embeddings" in flows:
        from legal_batch.core.user_tables import VectorTable
        from legal_batch.flows.embeddings.replicas import verify_sinks

        settings = get_settings()
        with _connect() as conn:
            verdicts = verify_sinks(conn, names=parse_sink_names(settings.embeddings_sinks),
                                    table=VectorTable.from_settings(settings), settings=settings)
        for verdict in verdicts:
            sinks_ok = sinks_ok and verdict.ok
            console.print(("" if verdict.ok else "[red]✗ ") + f"embeddings: {verdict.line()}"
                          + ("" if verdict.ok else "[/red]\n  what to do: run `legal-batch embeddings run` (it "
                             "writes what a sink lacks from the vector table and the cache, and deletes what is "
                             "gone; no request)"), highlight=False)
    for warning in _failed_check_warnings(list(flows)):
        console.print(f"[yellow]! {warning}[/yellow]", highlight=False, soft_wrap=True)
    if not report.ok or not sinks_ok:
        raise typer.Exit(1)
    console.print("[green]ledger consistent: every item is in exactly one state[/green]")


@app.command("reset")
def reset(flow: Annotated[FlowChoice, typer.Option(help="The flow whose work to remove.", show_default=False)],
          yes: Annotated[bool, typer.Option("--yes", help="Do not ask before removing.")] = False,
          cache: Annotated[bool, typer.Option("--cache", help="Also empty the vector cache (embeddings).")] = False
          ) -> None:
    """Remove a flow's work: cancel its open provider jobs, then delete its ledger rows and results
    (chunks and vectors; headnotes it wrote; template runs) in one transaction. Shows what will go
    and asks first (unless --yes); the vector cache is kept unless --cache."""
    from legal_batch.core import reset as resetting
    from legal_batch.core.user_tables import CaseSource, VectorTable

    name = str(flow)
    settings = get_settings()
    source, table = CaseSource.from_settings(settings), VectorTable.from_settings(settings)
    with _connect() as conn:
        plan = resetting.plan_reset(conn, name, cache=cache, source=source, table=table)
        if plan.empty and not plan.open_jobs:
            console.print(f"nothing to remove for {name}")
            return
        console.print(f"[bold]reset {name}[/bold] will remove:")
        for line in plan.lines():
            console.print(f"  - {line}", highlight=False)
        if not yes:
            typer.confirm("Remove all of this?", abort=True)
        resetting.cancel_open_jobs(plan, lambda provider: _provider(name, provider), echo=console.print)
        removed = resetting.apply_reset(conn, plan, source=source, table=table, files_root=settings.home_dir / "files")
    console.print(f"[green]reset {name}: removed " + ", ".join(f"{count:,} {kind.replace('_', ' ')}"
                                                             for kind, count in removed.items()) + "[/green]")


def _failed_check_warnings(flows: list[str]) -> list[str]:
    """The asset checks of these flows whose latest evaluation failed, read from the Dagster
    instance the CLI and `make dev` share (warnings: the ledger itself may still be consistent)."""
    from legal_batch.definitions import FLOWS_BY_NAME
    from legal_batch.driver import instance

    dagster = instance()
    warnings = []
    for name in flows:
        for asset in FLOWS_BY_NAME[name].assets:
            for spec in asset.check_specs:
                record = dagster.get_latest_asset_check_evaluation_record(spec.key)
                event = record.event if record is not None else None
                evaluation = event.dagster_event.event_specific_data if event and event.dagster_event else None
                if evaluation is None or getattr(evaluation, "passed", True):
                    continue
                severity = getattr(getattr(evaluation, "severity", None), "value", "ERROR")
                figures = ", ".join(f"{k}={getattr(v, 'value', v)}" for k, v in list(evaluation.metadata.items())[:5]
                                    if not isinstance(getattr(v, "value", None), dict | list))
                warnings.append(f"{name}: check {spec.name} on {spec.asset_key.to_user_string()} failed "
                                f"({severity}, latest evaluation): {figures}")
    return warnings


def _one_line(message: str, code: int) -> NoReturn:
    """Print `message` as one line on stderr and exit with `code`."""
    typer.secho(" ".join(message.split()), err=True, fg="red")
    sys.exit(code)


# The exceptions the command-line parser raises for a bad argument (typer vendors its click: reach
# its base class through a public name).
_ParserError = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


def main() -> None:
    """The console script: one line on stderr, no traceback, for a mistake of the user's (`UserError`,
    a bad argument); a genuine bug still shows its traceback."""
    try:
        code = app(standalone_mode=False)
    except UserError as exc:
        _one_line(f"legal-batch: {exc}", exc.exit_code)
    except RunFailed as exc:
        _one_line(f"legal-batch: {exc}", 1)
    except DatabaseError as exc:  # e.g. unreachable for longer than a run waits for it
        _one_line(f"legal-batch: {exc}", 1)
    except _ParserError as exc:
        if type(exc).__name__ == "NoArgsIsHelpError":  # no arguments: the help was printed
            sys.exit(exc.exit_code)
        ctx = getattr(exc, "ctx", None)
        command = ctx.command_path if ctx is not None else "legal-batch"
        message = exc.format_message().replace("Value error, ", "")
        _one_line(f"{command}: {message} (see `{command} --help`)", exc.exit_code)
    except typer.Abort:
        _one_line("aborted", 1)
    except KeyboardInterrupt:
        sys.exit(130)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
