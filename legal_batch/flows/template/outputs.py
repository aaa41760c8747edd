"""Finishing template runs: the real-time fallback, then the output files (every input column plus
the validated result columns) and the processing summary."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from legal_batch.core.ledger import ITEM_CLOSED_WITHOUT_RESULT_STATES, ITEM_OPEN_STATES
from legal_batch.flows.template.errors import TemplateError
from legal_batch.flows.template.realtime import RealtimeReport, answer_realtime
from legal_batch.flows.template.results import (
    ProcessingSummary,
    append_results,
    result_columns_for,
    write_summary,
)
from legal_batch.flows.template.runs import (
    FLOW,
    SUBJECT_EXPR,
    SUBJECT_KEY_OF_RESULT,
    SUBJECT_SQL,
    TemplateRun,
    get_run,
    lock_key,
    truncation_stats,
)
from legal_batch.flows.template.schema import result_columns, schema_to_model
from legal_batch.flows.template.tabular import (
    InputFile,
    TabularWriter,
    output_path,
    read_rows,
)
from legal_batch.providers.base import BatchProvider, ProviderError

# -- outputs --------------------------------------------------------------------------------------

@dataclass
class TemplateRunSummary(ProcessingSummary):
    """The processing summary with what this run did: mode decision, provider, jobs and outputs."""

    run_id: int = 0
    mode: str = "auto"
    execution: str | None = None
    mode_note: str | None = None
    provider: str = ""
    model: str = ""
    batch_records: int = 0
    realtime_records: int = 0
    fallback_records: int = 0
    batch_jobs: list[dict[str, object]] = field(default_factory=list)
    truncation_by_split: dict[str, dict[str, object]] = field(default_factory=dict)
    outputs: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, object]:
        return {
            **super().as_dict(),
            "run_id": self.run_id,
            "mode": self.mode,
            "execution": self.execution,
            "mode_note": self.mode_note,
            "provider": self.provider,
            "model": self.model,
            "batch_records": self.batch_records,
            "realtime_records": self.realtime_records,
            "fallback_records": self.fallback_records,
            "batch_jobs": self.batch_jobs,
            "truncation_by_split": self.truncation_by_split,
            "outputs": self.outputs,
        }


@dataclass(frozen=True)
class WrittenOutputs:
    files: list[Path]
    summary_path: Path
    summary: TemplateRunSummary


def write_outputs(conn: psycopg.Connection, run: TemplateRun, *, now: datetime | None = None,
                  chunk_rows: int = 10_000) -> WrittenOutputs:
    """Write one output file per input file (same relative path, format and compression) and the
    processing summary, streaming each input again in chunks of ``chunk_rows``.

    Responses are joined on (file, row number), never on their order. Every original column is kept
    and the prefixed result columns are added. Raises ``TemplateError`` when an input file changed
    since it was staged (its rows would no longer match the prompts that were answered).
    """
    model = schema_to_model(run.schema_json)
    columns = result_columns(run.schema_json)
    summary = _summary_head(conn, run)
    written: list[Path] = []
    for key, split, file_format, compressed, row_count, size, mtime_ns in conn.execute(
        "SELECT file_key, split, format, compressed, row_count, size_bytes, mtime_ns FROM template_files"
        " WHERE run_id = %s ORDER BY file_no", (run.id,),
    ).fetchall():
        input_file = InputFile(_input_path(run, key), split, file_format, compressed)
        _check_unchanged(input_file.path, size, mtime_ns, run.id)
        target = output_path(input_file, run.input_path, run.output_path)
        rows = 0
        with TabularWriter(target, file_format, compressed) as writer:
            for frame in read_rows(input_file, chunk_rows=chunk_rows):
                answers = _answers(conn, run.id, key, rows + 1, rows + len(frame))
                results = []
                for offset in range(len(frame)):
                    row_no = rows + 1 + offset
                    text, error = answers.get(row_no, (None, f"no response was recorded for row {row_no} of {key}"))
                    result = result_columns_for(text, error, model, columns, prefix=run.prefix, prefill=run.prefill)
                    summary.add(result, split=split, prefix=run.prefix)
                    results.append(result)
                writer.write(append_results(frame, results, columns=columns, prefix=run.prefix,
                                            file=str(input_file.path)))
                rows += len(frame)
            if rows != row_count:
                raise TemplateError(f"{input_file.path} now has {rows} rows, {row_count} when template run {run.id} "
                                    "was staged; run the template flow again to start a new run")
        written.append(target)
    summary.outputs = [str(p) for p in written]
    path = write_summary(summary, run.output_path, now=now)
    return WrittenOutputs(written, path, summary)


def _input_path(run: TemplateRun, file_key: str) -> Path:
    root = Path(run.input_path)
    return root if root.is_file() else root / file_key


def _check_inputs_unchanged(conn: psycopg.Connection, run: TemplateRun) -> None:
    for key, size, mtime_ns in conn.execute(
            "SELECT file_key, size_bytes, mtime_ns FROM template_files WHERE run_id = %s ORDER BY file_no", (run.id,)):
        _check_unchanged(_input_path(run, key), size, mtime_ns, run.id)


def _check_unchanged(path: Path, size: int, mtime_ns: int, run_id: int) -> None:
    try:
        info = path.stat()
    except OSError as exc:
        raise TemplateError(f"input file {path} of template run {run_id} cannot be read again: "
                            f"{exc.strerror or exc}") from exc
    if (info.st_size, info.st_mtime_ns) != (size, mtime_ns):
        raise TemplateError(f"input file {path} changed after template run {run_id} was staged; its rows may no "
                            "longer match the answered prompts. Run the template flow again to start a new run")


def _answers(conn: psycopg.Connection, run_id: int, file_key: str, first: int,
             last: int) -> dict[int, tuple[str | None, str | None]]:
    return {
        row_no: (text, error)
        for row_no, text, error in conn.execute(
            "SELECT row_no, response_text, provider_error FROM template_results"
            " WHERE run_id = %s AND file_key = %s AND row_no BETWEEN %s AND %s",
            (run_id, file_key, first, last),
        )
    }


def _summary_head(conn: psycopg.Connection, run: TemplateRun) -> TemplateRunSummary:
    via = dict(conn.execute("SELECT via, count(*) FROM template_results WHERE run_id = %s GROUP BY via",
                            (run.id,)).fetchall())
    jobs = _run_jobs(conn, run.id)
    # shards below the provider's minimum per job are answered in real time by the shared machinery
    remainder = sum(j["answered"] for j in jobs if j["mode"] == "realtime")
    batched = via.get("batch", 0) - remainder
    fallback = via.get("realtime", 0) if run.execution == "batch" else 0
    notes = [note for note in (_fallback_note(run, jobs, fallback), _remainder_note(remainder)) if note]
    return TemplateRunSummary(
        name=run.name, batch_used=batched > 0,
        job_ids=[str(j["provider_job_id"]) for j in jobs if j["provider_job_id"]],
        fallback_note="; ".join(notes) or None, truncation=truncation_stats(conn, run.id),
        run_id=run.id, mode=run.mode, execution=run.execution, mode_note=run.mode_note, provider=run.provider,
        model=run.model, batch_records=batched, realtime_records=via.get("realtime", 0) + remainder,
        fallback_records=fallback, batch_jobs=jobs, truncation_by_split=_truncation_by_split(conn, run.id),
    )


def _run_jobs(conn: psycopg.Connection, run_id: int) -> list[dict[str, Any]]:
    """The ledger jobs (or real-time shards) that held rows of this run: their rows answered by the
    job, and their rows that fell back to real time."""
    rows = conn.execute(
        "SELECT j.shard_key, j.mode, j.provider_job_id, j.state, j.provider_status, j.last_error, count(*),"
        "       count(*) FILTER (WHERE x.via = 'batch'), count(*) FILTER (WHERE x.via = 'realtime')"
        " FROM batch_items i JOIN batch_jobs j ON j.id = i.job_id"
        f" CROSS JOIN LATERAL regexp_match(i.subject_key, {SUBJECT_SQL}) AS k(m)"
        " LEFT JOIN template_results x ON x.run_id = k.m[1]::bigint AND x.file_key = k.m[2]"
        "  AND x.row_no = k.m[3]::int"
        " WHERE i.flow = %s AND k.m[1]::bigint = %s"
        " GROUP BY j.id ORDER BY j.id",
        (FLOW, run_id),
    ).fetchall()
    return [
        {"shard_key": shard, "mode": mode, "provider_job_id": job_id, "state": state, "provider_status": status,
         "last_error": error, "records": records, "answered": answered, "fallback_records": fallback}
        for shard, mode, job_id, state, status, error, records, answered, fallback in rows
    ]


def _remainder_note(remainder: int) -> str | None:
    if not remainder:
        return None
    return (f"{remainder} records in a shard below the provider's minimum records per batch job were answered "
            "in real time")


def _fallback_note(run: TemplateRun, jobs: Sequence[Mapping[str, Any]], fallback: int) -> str | None:
    if run.execution != "batch":
        return run.mode_note
    if fallback == 0:
        return None
    failures = [
        f"job {job['provider_job_id'] or job['shard_key']} "
        + (f"ended {job['provider_status'] or job['state']}" if job["provider_job_id"] else "was not submitted")
        + (f" ({job['last_error']})" if job["last_error"] else "") + f": {job['fallback_records']} records"
        for job in jobs if job["fallback_records"]
    ]
    unsent = fallback - sum(job["fallback_records"] for job in jobs)
    if unsent > 0:
        failures.append(f"{unsent} records were rejected when planning (see batch_items.last_error)")
    return (f"batch processing failed for {fallback} of {run.record_count} records, which fell back to real time: "
            + "; ".join(failures))


def _truncation_by_split(conn: psycopg.Connection, run_id: int) -> dict[str, dict[str, object]]:
    return {
        split: {"rows_seen": seen, "rows_affected": affected}
        for split, seen, affected in conn.execute(
            "SELECT coalesce(split, 'unsplit'), count(*), count(*) FILTER (WHERE cardinality(truncated_fields) > 0)"
            " FROM template_rows WHERE run_id = %s GROUP BY 1 ORDER BY 1", (run_id,),
        )
    }


# -- finishing runs -------------------------------------------------------------------------------

@dataclass
class RunProgress:
    """Where a run stands after :func:`finish_run`."""

    run: TemplateRun
    records: int = 0
    answered: int = 0
    in_batch: int = 0
    """Rows in open batch jobs (or planned for one)."""
    waiting: int = 0
    """Rows with no answer and no open batch job (not planned yet, or left for the real-time path)."""
    realtime: RealtimeReport = field(default_factory=RealtimeReport)
    outputs: list[str] = field(default_factory=list)
    summary_path: str | None = None
    busy: bool = False
    """Another process is answering or writing this run right now; nothing was done."""
    error: str | None = None
    """Why the run could not be finished now (see :func:`finish_open_runs`)."""

    @property
    def finished(self) -> bool:
        return self.run.finished_at is not None


def finish_run(conn: psycopg.Connection, run_id: int, *, provider_for: Callable[[str], BatchProvider],
               wait_for_lock: bool = True, on_progress: Callable[[int], None] | None = None) -> RunProgress:
    """Answer what needs the real-time path (real-time runs and batch fallbacks), then, once every
    row has a response or an error, write the outputs and the summary and mark the run finished.

    Serialised per run by an advisory lock (``wait_for_lock=False``: return ``busy`` instead of
    waiting). A finished run is left as it is."""
    lock = lock_key(f"run:{run_id}")
    if wait_for_lock:
        conn.execute("SELECT pg_advisory_lock(%s)", (lock,))
    elif not conn.execute("SELECT pg_try_advisory_lock(%s)", (lock,)).fetchone()[0]:
        return RunProgress(get_run(conn, run_id), busy=True)
    try:
        run = get_run(conn, run_id)
        progress = RunProgress(run)
        if run.finished_at is None:
            _check_inputs_unchanged(conn, run)
            progress.realtime = answer_realtime(conn, run, provider_for(run.provider), on_progress=on_progress)
        _count(conn, progress)
        if run.finished_at is None and progress.answered == progress.records:
            written = write_outputs(conn, run)
            conn.execute("UPDATE template_runs SET outputs = %s, summary_path = %s, finished_at = now() WHERE id = %s",
                         (Jsonb([str(p) for p in written.files]), str(written.summary_path), run.id))
            progress.run = get_run(conn, run_id)
        progress.outputs = list(progress.run.outputs or [])
        progress.summary_path = progress.run.summary_path
        return progress
    finally:
        conn.execute("SELECT pg_advisory_unlock(%s)", (lock,))


def _count(conn: psycopg.Connection, progress: RunProgress) -> None:
    records, answered, in_batch = conn.execute(
        "SELECT count(*), count(x.row_no), count(*) FILTER (WHERE x.row_no IS NULL"
        "   AND i.state = ANY(%s))"
        " FROM template_rows r"
        " LEFT JOIN template_results x ON x.run_id = r.run_id AND x.file_key = r.file_key AND x.row_no = r.row_no"
        f" LEFT JOIN batch_items i ON i.flow = %s AND i.subject_key = {SUBJECT_EXPR}"
        " WHERE r.run_id = %s",
        (list(ITEM_OPEN_STATES), FLOW, progress.run.id),
    ).fetchone()
    progress.records, progress.answered, progress.in_batch = records, answered, in_batch
    progress.waiting = records - answered - in_batch


def open_run_ids(conn: psycopg.Connection) -> list[int]:
    return [row[0] for row in conn.execute("SELECT id FROM template_runs WHERE finished_at IS NULL ORDER BY id")]


def finish_open_runs(conn: psycopg.Connection, *, provider_for: Callable[[str], BatchProvider],
                     on_progress: Callable[[int], None] | None = None) -> list[RunProgress]:
    """:func:`finish_run` for every unfinished run; runs another process is working on are skipped.

    A run that cannot be finished now (its input changed, its provider is not configured here) is
    reported in ``error`` and the others go on."""
    done: list[RunProgress] = []
    for run_id in open_run_ids(conn):
        try:
            done.append(finish_run(conn, run_id, provider_for=provider_for, wait_for_lock=False,
                                   on_progress=on_progress))
        except (TemplateError, ProviderError) as exc:
            done.append(RunProgress(get_run(conn, run_id), error=str(exc)))
    return done


def has_pending_work(conn: psycopg.Connection) -> bool:
    """Whether an unfinished run has rows for the real-time path or is answered and awaits its outputs
    (cheap enough for a sensor tick)."""
    return bool(conn.execute(
        "SELECT EXISTS (SELECT 1 FROM template_runs t WHERE t.finished_at IS NULL AND ("
        "   t.execution = 'realtime'"
        "   OR NOT EXISTS (SELECT 1 FROM template_rows r WHERE r.run_id = t.id AND NOT EXISTS"
        "       (SELECT 1 FROM template_results x WHERE x.run_id = r.run_id AND x.file_key = r.file_key"
        "        AND x.row_no = r.row_no))"
        "   OR EXISTS (SELECT 1 FROM batch_items i WHERE i.flow = %s AND i.state = ANY(%s)"
        "       AND split_part(i.subject_key, ':', 1) = t.id::text AND NOT EXISTS"
        "       (SELECT 1 FROM template_results x WHERE x.run_id = t.id"
        f"        AND {SUBJECT_KEY_OF_RESULT} = i.subject_key))))",
        (FLOW, list(ITEM_CLOSED_WITHOUT_RESULT_STATES)),
    ).fetchone()[0])


def progress_line(progress: RunProgress) -> str:
    """One line for logs and the CLI."""
    run = progress.run
    if progress.busy:
        return f"template run {run.id}: another process is working on it"
    if progress.error:
        return f"template run {run.id} ({run.name}) cannot be finished now: {progress.error}"
    if progress.finished:
        return f"template run {run.id} ({run.name}): finished; {len(progress.outputs)} output files"
    text = f"template run {run.id} ({run.name}): {progress.answered} of {progress.records} rows answered"
    if progress.in_batch:
        text += f", {progress.in_batch} in batch jobs"
    if progress.waiting:
        text += f", {progress.waiting} waiting to be planned"
    return text
