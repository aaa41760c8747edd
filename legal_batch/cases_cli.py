"""`legal-batch cases`: load judgments from files into `court_cases`. Thin: the work is
`core.corpus_import`; this turns its callbacks into a progress bar and lines on stderr."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

app = typer.Typer(help="The judgments: import them from files.", no_args_is_help=True)
console = Console(width=None if sys.stdout.isatty() else 140)
err = Console(stderr=True)


@app.command("import")
def import_cases(
    path: Annotated[Path, typer.Argument(help="A file, or a folder of files (searched recursively).",
                                         show_default=False)],
    format: Annotated[str | None, typer.Option(
        "--format", metavar="FORMAT",
        help="jsonl, csv, parquet or cap (default: each file's, from its name and contents).")] = None,
    id_field: Annotated[str | None, typer.Option(
        metavar="FIELD", help="The record's id field (default: id, case_id or uuid).")] = None,
    text_field: Annotated[str | None, typer.Option(
        metavar="FIELD", help="The record's text field (default: full_text, text, body or content).")] = None,
    mapping: Annotated[list[str] | None, typer.Option(
        "--map", metavar="COLUMN=FIELD",
        help="The field that fills a court_cases column, e.g. --map court=tribunal (repeatable; a dotted "
             "path reads nested JSON: --map court=court.name).")] = None,
) -> None:
    """Load JSONL, JSON, CSV/TSV, Parquet or Caselaw Access Project files (also .gz, .xz, .bz2) into
    court_cases: new cases inserted, changed ones updated, the same ones left alone. Lines that
    cannot be loaded are listed on stderr as file:line and skipped; the exit code is 1 if any was."""
    from legal_batch.cli import _connect
    from legal_batch.core import corpus_import

    fields = corpus_import.field_map(id_field=id_field, text_field=text_field, mapping=mapping or ())
    sources = corpus_import.find_sources(path, format=format)
    progress = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                        TimeRemainingColumn(), console=err, transient=False)

    def say(line: object) -> None:
        progress.console.print(str(line), markup=False, highlight=False, soft_wrap=True)

    with _connect() as conn, progress:
        task = progress.add_task("importing", total=sources.total_bytes)

        def advance(state: corpus_import.ImportProgress) -> None:
            progress.update(task, completed=state.bytes_done,
                            description=f"{state.file} — {state.records_read:,} records")

        report = corpus_import.import_cases(conn, sources, fields, on_skip=say,
                                            on_note=lambda note: say(f"note: {note}"), on_progress=advance)
    for line in report.summary():
        console.print(line, markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(report.exit_code)
