"""The template flow on the shared batch machinery: stage rows, answer them, write the outputs.

A *run* is one input (a file, a folder, or ``train/``/``val/``/``test/`` splits) with its
``prompts.json``, JSON Schema and output folder. :func:`stage_inputs` renders one prompt per row
into ``template_rows`` (the row values stay in the files) and decides how the run is answered:

- ``batch``: the rows are candidates of :class:`TemplateFlow`, so the shared ledger shards,
  submits, polls and ingests them (``core.batch``); responses land in ``template_results``.
- ``realtime``: :func:`answer_realtime` calls the provider's real-time path directly.

Rows whose batch request failed (refused at submit, job failed/stopped/expired, a per-record
error, an unusable output line) are never re-batched: :func:`finish_run` answers them in real time
(the *fallback*) and, once every row has a response or an error, :func:`write_outputs` reads the
input files again, joins the responses on (file, row number), validates them and writes one output
file per input plus the processing summary.

Identifiers: subject key ``<run_id>:<file_key>:<row_no>`` (``file_key`` is the path relative to the
input, ``row_no`` the 1-based data row), custom id ``r<run_id>-f<file_no>-<row_no>``.
"""

from __future__ import annotations

import hashlib
import json
import re
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import psycopg
from psycopg.rows import class_row
from psycopg.types.json import Json, Jsonb

from legal_batch.core.flow import Item
from legal_batch.core.tokens import count_tokens
from legal_batch.flows.template.errors import TemplateError
from legal_batch.flows.template.prompts import (
    PromptTemplate,
    TruncationStats,
    check_columns,
    format_prompt,
    load_prompts,
)
from legal_batch.flows.template.results import (
    ProcessingSummary,
    append_results,
    result_columns_for,
    write_summary,
)
from legal_batch.flows.template.schema import load_schema, result_columns, schema_to_model
from legal_batch.flows.template.tabular import (
    InputFile,
    TabularWriter,
    discover_inputs,
    output_path,
    read_rows,
)
from legal_batch.providers.base import BatchProvider, ChatRequest, Endpoint, ProviderError, Request, Result

__all__ = [
    "DONE_WITHOUT_RESULT_SQL",
    "FLOW",
    "RealtimeReport",
    "RunProgress",
    "StagedRun",
    "TemplateFlow",
    "TemplateRun",
    "TemplateRunConfig",
    "TemplateRunSummary",
    "TemplateSink",
    "WrittenOutputs",
    "answer_realtime",
    "choose_execution",
    "custom_id",
    "find_run",
    "finish_open_runs",
    "finish_run",
    "get_run",
    "has_pending_work",
    "open_run_ids",
    "parse_subject",
    "progress_line",
    "stage_inputs",
    "subject_key",
    "write_outputs",
]

FLOW = "template"
Mode = Literal["auto", "batch", "realtime"]
Execution = Literal["batch", "realtime"]
MODES: tuple[str, ...] = ("auto", "batch", "realtime")
DEFAULT_PREFILL = "{"
DEFAULT_MAX_TOKENS = 1024
_REQUEST_OVERHEAD_BYTES = 400
_COPY_ROWS = 5_000
_SUBJECT = re.compile(r"^(\d+):(.*):(\d+)$", re.DOTALL)
_SUBJECT_SQL = r"'^(\d+):(.*):(\d+)$'"
# Providers that do not pass `ChatRequest.json_schema` on to the model: the schema goes into the prompt.
_SCHEMA_IN_PROMPT = frozenset({"bedrock"})


# -- identifiers ----------------------------------------------------------------------------------

def subject_key(run_id: int, file_key: str, row_no: int) -> str:
    """The ledger subject of one row: ``<run_id>:<file_key>:<row_no>``."""
    return f"{run_id}:{file_key}:{row_no}"


def parse_subject(key: str) -> tuple[int, str, int]:
    """(run_id, file_key, row_no) of a subject key; ``file_key`` may itself contain ``:``."""
    match = _SUBJECT.match(key)
    if match is None:
        raise ValueError(f"not a template subject key: {key!r} (expected <run_id>:<file_key>:<row_no>)")
    return int(match.group(1)), match.group(2), int(match.group(3))


def custom_id(run_id: int, file_no: int, row_no: int) -> str:
    """The request id sent to providers: ``r<run_id>-f<file_no>-<row_no>`` (safe for every provider)."""
    return f"r{run_id}-f{file_no}-{row_no}"


_SUBJECT_EXPR = "r.run_id::text || ':' || r.file_key || ':' || r.row_no::text"
_SUBJECT_KEY_OF_RESULT = "x.run_id::text || ':' || x.file_key || ':' || x.row_no::text"
_CUSTOM_ID_EXPR = "'r' || r.run_id::text || '-f' || f.file_no::text || '-' || r.row_no::text"

DONE_WITHOUT_RESULT_SQL = (
    "SELECT i.subject_key FROM batch_items i"
    f" CROSS JOIN LATERAL regexp_match(i.subject_key, {_SUBJECT_SQL}) AS k(m)"
    " WHERE i.flow = 'template' AND i.state = 'done' AND NOT EXISTS (SELECT 1 FROM template_results x"
    "  WHERE x.run_id = k.m[1]::bigint AND x.file_key = k.m[2] AND x.row_no = k.m[3]::int)"
)
"""`done` ledger items of the template flow without their `template_results` row (for `legal-batch verify`)."""


# -- configuration and runs -----------------------------------------------------------------------

@dataclass(frozen=True)
class TemplateRunConfig:
    """What a user asks for: input, prompts, schema, output folder and how to answer.

    ``batch_threshold``: in ``auto`` mode, batch from this many records on. ``max_field_chars``:
    longer placeholder values are cut (with a marker) and counted in the summary.
    """

    input_path: Path
    templates: Path
    schema_path: Path
    output_path: Path
    mode: Mode = "auto"
    prefix: str = "llm_"
    batch_threshold: int = 1_000
    max_field_chars: int = 20_000
    max_tokens: int = DEFAULT_MAX_TOKENS
    name: str | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise TemplateError(f"mode {self.mode!r} is not one of {', '.join(MODES)}")
        if self.batch_threshold < 1:
            raise TemplateError(f"batch threshold must be at least 1, got {self.batch_threshold}")
        if not self.prefix or not re.fullmatch(r"[A-Za-z0-9_.-]+", self.prefix):
            raise TemplateError(f"result prefix {self.prefix!r} must be letters, digits, '_', '.' or '-'")

    @property
    def run_name(self) -> str:
        if self.name:
            return self.name
        base = Path(self.input_path).name
        for suffix in (".gz", ".csv", ".tsv", ".parquet"):
            base = base.removesuffix(suffix)
        return base or "template"


@dataclass(frozen=True)
class TemplateRun:
    """One row of ``template_runs``."""

    id: int
    name: str
    fingerprint: str
    input_path: str
    templates_path: str
    schema_path: str
    output_path: str
    prompt_template: dict
    system_prompt: str
    schema_json: dict
    prefix: str
    mode: str
    execution: str | None
    mode_note: str | None
    provider: str
    model: str
    prefill: str
    max_tokens: int
    max_field_chars: int
    record_count: int
    outputs: list | None
    summary_path: str | None
    finished_at: datetime | None
    created_at: datetime


_RUN_COLUMNS = ", ".join(f.name for f in fields(TemplateRun))


@dataclass(frozen=True)
class StagedRun:
    """The run staged (or found again: ``resumed``) by :func:`stage_inputs`."""

    run: TemplateRun
    resumed: bool
    files: int
    truncation: TruncationStats


def get_run(conn: psycopg.Connection, run_id: int) -> TemplateRun:
    with conn.cursor(row_factory=class_row(TemplateRun)) as cur:
        run = cur.execute(f"SELECT {_RUN_COLUMNS} FROM template_runs WHERE id = %s", (run_id,)).fetchone()
    if run is None:
        raise LookupError(f"no template run {run_id} in template_runs")
    return run


def choose_execution(*, mode: str, records: int, threshold: int, provider: str,
                     min_records: int) -> tuple[Execution, str]:
    """Batch or real time for a run of ``records`` rows, and why.

    ``auto``: batch from ``threshold`` records on. ``batch`` and ``auto`` both need at least the
    provider's minimum records per job (Bedrock: 100); below it the run is answered in real time.
    """
    if mode == "realtime":
        return "realtime", "real-time mode requested"
    if records < min_records:
        return "realtime", (f"{mode} mode: {records} records are below {provider}'s minimum of {min_records} "
                            "records per batch job; processed in real time")
    if mode == "batch":
        return "batch", f"batch mode requested: {records} records"
    if records < threshold:
        return "realtime", (f"auto mode: {records} records are below the batch threshold of {threshold}; "
                            "processed in real time")
    return "batch", f"auto mode: {records} records reach the batch threshold of {threshold}"


@dataclass(frozen=True)
class _Loaded:
    """The user's files, read and checked; the basis of a run's fingerprint."""

    config: TemplateRunConfig
    prompts: PromptTemplate
    schema: dict
    files: list[InputFile]
    keys: list[str]
    stats: list[tuple[int, int]]  # (size, mtime_ns) per file
    provider: str
    model: str
    fingerprint: str


def _load(config: TemplateRunConfig, *, provider: str, model: str) -> _Loaded:
    prompts = load_prompts(config.templates)
    schema = load_schema(config.schema_path)
    schema_to_model(schema)
    files = discover_inputs(config.input_path)
    root = Path(config.input_path)
    keys = [f.path.name if root.is_file() else f.path.relative_to(root).as_posix() for f in files]
    stats = []
    for f in files:
        info = f.path.stat()
        stats.append((info.st_size, info.st_mtime_ns))
    identity = {
        "input": str(root.resolve()), "output": str(Path(config.output_path).resolve()),
        "prompts": [prompts.system_prompt, prompts.user_prompt_template, list(prompts.input_placeholders)],
        "schema": json.dumps(schema), "mode": config.mode, "prefix": config.prefix, "threshold": config.batch_threshold,
        "max_field_chars": config.max_field_chars, "max_tokens": config.max_tokens, "name": config.run_name,
        "provider": provider, "model": model, "files": [[k, *s] for k, s in zip(keys, stats, strict=True)],
    }
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()
    return _Loaded(config, prompts, schema, files, keys, stats, provider, model, digest)


def find_run(conn: psycopg.Connection, config: TemplateRunConfig, *, provider: BatchProvider,
             model: str | None = None) -> TemplateRun | None:
    """The latest run staged from exactly these inputs and options (files unchanged), if any."""
    loaded = _load(config, provider=provider.name, model=model or provider.default_model("chat"))
    return _find(conn, loaded.fingerprint)


def _find(conn: psycopg.Connection, fingerprint: str) -> TemplateRun | None:
    with conn.cursor(row_factory=class_row(TemplateRun)) as cur:
        return cur.execute(
            f"SELECT {_RUN_COLUMNS} FROM template_runs WHERE fingerprint = %s ORDER BY id DESC LIMIT 1",
            (fingerprint,),
        ).fetchone()


def _system_prompt(prompts: PromptTemplate, schema: dict, provider: str) -> str:
    if provider not in _SCHEMA_IN_PROMPT:
        return prompts.system_prompt
    return (f"{prompts.system_prompt.rstrip()}\n\nAnswer with one JSON object, and nothing else, that matches "
            f"this JSON Schema:\n{json.dumps(schema, ensure_ascii=False)}").lstrip()


def stage_inputs(conn: psycopg.Connection, config: TemplateRunConfig, *, provider: BatchProvider,
                 model: str | None = None, fresh: bool = False) -> StagedRun:
    """Stage one run: check the prompts, schema and files, render every row's prompt into
    ``template_rows`` (COPY, one transaction) and decide batch or real time.

    Idempotent: the same inputs and options (files unchanged) give the run staged before
    (``resumed``), never a second copy, unless ``fresh``. Raises ``TemplateError`` naming the
    file and column for a placeholder that is not a column, and for unreadable or empty files;
    nothing is staged then.
    """
    loaded = _load(config, provider=provider.name, model=model or provider.default_model("chat"))
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_lock_key("stage"),))
        existing = None if fresh else _find(conn, loaded.fingerprint)
        if existing is not None:
            return StagedRun(existing, True, len(loaded.files), _truncation(conn, existing.id))
        run_id = _insert_run(conn, loaded)
        truncation = TruncationStats()
        records = 0
        for file_no, (input_file, key, stat) in enumerate(zip(loaded.files, loaded.keys, loaded.stats,
                                                              strict=True)):
            rows = _stage_file(conn, loaded, run_id, input_file, key, truncation)
            conn.execute(
                "INSERT INTO template_files (run_id, file_no, file_key, split, format, compressed, row_count,"
                " size_bytes, mtime_ns) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)",
                (run_id, file_no, key, input_file.split, input_file.format, input_file.compressed, rows, *stat),
            )
            records += rows
        execution, note = choose_execution(mode=config.mode, records=records, threshold=config.batch_threshold,
                                           provider=provider.name, min_records=provider.limits.min_records_per_job)
        conn.execute("UPDATE template_runs SET execution = %s, mode_note = %s, record_count = %s WHERE id = %s",
                     (execution, note, records, run_id))
    return StagedRun(get_run(conn, run_id), False, len(loaded.files), truncation)


def _insert_run(conn: psycopg.Connection, loaded: _Loaded) -> int:
    config, prompts = loaded.config, loaded.prompts
    template = {"system_prompt": prompts.system_prompt, "user_prompt_template": prompts.user_prompt_template,
                "input_placeholders": list(prompts.input_placeholders)}
    return conn.execute(
        "INSERT INTO template_runs (name, fingerprint, input_path, templates_path, schema_path, output_path,"
        " prompt_template, system_prompt, schema_json, prefix, mode, provider, model, prefill, max_tokens,"
        " max_field_chars) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING id",
        (config.run_name, loaded.fingerprint, str(Path(config.input_path).resolve()),
         str(Path(config.templates).resolve()), str(Path(config.schema_path).resolve()),
         str(Path(config.output_path).resolve()), Jsonb(template),
         _system_prompt(prompts, loaded.schema, loaded.provider), Json(loaded.schema), config.prefix,
         config.mode, loaded.provider, loaded.model, DEFAULT_PREFILL, config.max_tokens, config.max_field_chars),
    ).fetchone()[0]


def _stage_file(conn: psycopg.Connection, loaded: _Loaded, run_id: int, input_file: InputFile, key: str,
                truncation: TruncationStats) -> int:
    """COPY one file's rendered prompts; returns its row count."""
    placeholders = list(loaded.prompts.input_placeholders)
    row_no = 0
    with conn.cursor().copy(
        "COPY template_rows (run_id, file_key, split, row_no, user_prompt, truncated_fields, est_tokens)"
        " FROM STDIN"
    ) as copy:
        for frame in read_rows(input_file):
            if row_no == 0:
                check_columns(loaded.prompts, list(frame.columns), file=str(input_file.path))
            values = frame[placeholders].to_dict("records") if placeholders else [{}] * len(frame)
            for row in values:
                row_no += 1
                prompt = format_prompt(loaded.prompts, row, max_field_chars=loaded.config.max_field_chars)
                truncation.add(prompt)
                user = prompt.user.replace("\x00", "")  # Postgres text cannot hold NUL
                copy.write_row((run_id, key, input_file.split, row_no, user, list(prompt.truncated_fields),
                                count_tokens(user)))
    return row_no


def _lock_key(name: str) -> int:
    return zlib.crc32(f"legal_batch:template:{name}".encode()) & 0x7FFFFFFF


# -- the flow the shared machinery runs --------------------------------------------------------------

class TemplateFlow:
    """Subjects are staged rows of batch runs (``<run_id>:<file_key>:<row_no>``); results are rows of
    ``template_results``. Only rows never sent before are candidates: a row whose batch request
    failed is answered in real time by :func:`finish_run`, not re-batched."""

    name = FLOW
    endpoint: Endpoint = "chat"

    def __init__(self, *, provider: str, model: str, limit: int | None = None) -> None:
        self.provider = provider
        self.model = model
        self.limit = limit

    def job_params(self) -> dict:
        """Nothing beyond the job row's provider and model: a run's templates, schema, mode and
        prefix are kept with the run (``template_runs``) when it is staged."""
        return {}

    def candidate_sql(self) -> tuple[str, dict]:
        sql = (
            f"SELECT {_SUBJECT_EXPR}, {_CUSTOM_ID_EXPR}, r.est_tokens,"
            "       (octet_length(r.user_prompt) * 11 / 10 + octet_length(t.system_prompt)"
            f"        + octet_length(t.schema_json::text) + {_REQUEST_OVERHEAD_BYTES})::int"
            " FROM template_runs t"
            " JOIN template_files f ON f.run_id = t.id"
            " JOIN template_rows r ON r.run_id = f.run_id AND r.file_key = f.file_key"
            " WHERE t.finished_at IS NULL AND t.execution = 'batch' AND t.provider = %(provider)s"
            "   AND t.model = %(model)s"
            "   AND NOT EXISTS (SELECT 1 FROM template_results x WHERE x.run_id = r.run_id"
            "                   AND x.file_key = r.file_key AND x.row_no = r.row_no)"
            f"  AND NOT EXISTS (SELECT 1 FROM batch_items i WHERE i.flow = %(flow)s AND i.subject_key = {_SUBJECT_EXPR})"
            " ORDER BY t.id, f.file_no, r.row_no"
            " LIMIT %(limit)s"
        )
        return sql, {"provider": self.provider, "model": self.model, "flow": FLOW, "limit": self.limit}

    def requests(self, conn: psycopg.Connection, job_id: int) -> Iterator[Request]:
        runs = {
            run_id: (system, schema, max_tokens, prefill)
            for run_id, system, schema, max_tokens, prefill in conn.execute(
                "SELECT t.id, t.system_prompt, t.schema_json, t.max_tokens, t.prefill FROM template_runs t"
                " WHERE t.id IN (SELECT DISTINCT split_part(subject_key, ':', 1)::bigint FROM batch_items"
                "                WHERE job_id = %s)",
                (job_id,),
            )
        }
        with conn.cursor(name=f"template_requests_{job_id}") as cur:
            cur.itersize = 2_000
            cur.execute(
                "SELECT i.custom_id, r.run_id, r.user_prompt FROM batch_items i"
                f" CROSS JOIN LATERAL regexp_match(i.subject_key, {_SUBJECT_SQL}) AS k(m)"
                " JOIN template_rows r ON r.run_id = k.m[1]::bigint AND r.file_key = k.m[2]"
                "  AND r.row_no = k.m[3]::int"
                " WHERE i.job_id = %s AND i.state IN ('exported', 'submitted') ORDER BY i.id",
                (job_id,),
            )
            for request_id, run_id, user in cur:
                system, schema, max_tokens, prefill = runs[run_id]
                yield _chat_request(request_id, system, user, schema, max_tokens, prefill)

    def sink(self, conn: psycopg.Connection, *, model: str) -> TemplateSink:
        return TemplateSink(conn, model=model, via="batch")


def _chat_request(request_id: str, system: str, user: str, schema: dict, max_tokens: int,
                  prefill: str) -> ChatRequest:
    return ChatRequest(request_id, system, user, max_tokens=max_tokens, temperature=0.0, prefill=prefill,
                       json_schema=schema)


class TemplateSink:
    """Upserts raw responses into ``template_results`` (COPY into a staging table, then one upsert).

    Parsing and validation happen when the outputs are written, so a response that is not JSON is
    kept (and reported per row) rather than asked for again."""

    def __init__(self, conn: psycopg.Connection, *, model: str, via: Literal["batch", "realtime"]) -> None:
        self.conn = conn
        self.model = model
        self.via = via
        self._rows: list[tuple[int, str, int, str | None, str | None]] = []
        self.written = 0

    def accept(self, item: Item, result: Result) -> str | None:
        if result.text is None:
            return "response has no text"
        self.add(parse_subject(item.subject_key), result.text.replace("\x00", ""), None)
        return None

    def add(self, key: tuple[int, str, int], text: str | None, error: str | None) -> None:
        """One row's response or provider error (real-time path)."""
        self._rows.append((*key, text, error))
        if len(self._rows) >= _COPY_ROWS:
            self._flush()

    def _flush(self) -> None:
        if not self._rows:
            return
        self.conn.execute(
            "CREATE TEMP TABLE IF NOT EXISTS stage_template_results (run_id bigint, file_key text, row_no int,"
            " response_text text, provider_error text)"
        )
        self.conn.execute("TRUNCATE stage_template_results")
        with self.conn.cursor().copy("COPY stage_template_results FROM STDIN") as copy:
            for row in self._rows:
                copy.write_row(row)
        self.written += self.conn.execute(
            "INSERT INTO template_results (run_id, file_key, row_no, response_text, provider_error, model, via)"
            " SELECT run_id, file_key, row_no, response_text, provider_error, %s, %s FROM stage_template_results"
            " ON CONFLICT (run_id, file_key, row_no) DO UPDATE SET response_text = excluded.response_text,"
            "  provider_error = excluded.provider_error, model = excluded.model, via = excluded.via,"
            "  created_at = now()",
            (self.model, self.via),
        ).rowcount
        self._rows = []

    def finish(self) -> int:
        self._flush()
        return self.written


# -- real time ------------------------------------------------------------------------------------

@dataclass
class RealtimeReport:
    """Rows answered in real time by one :func:`answer_realtime` call."""

    requested: int = 0
    answered: int = 0
    errors: int = 0
    fallback: int = 0
    """Of ``requested``: rows whose batch request had failed."""


def answer_realtime(conn: psycopg.Connection, run: TemplateRun, provider: BatchProvider, *,
                    page_size: int = 100, on_progress: Callable[[int], None] | None = None) -> RealtimeReport:
    """Answer every row of ``run`` that needs the real-time path, ``page_size`` requests at a time.

    That is every unanswered row of a real-time run, and every unanswered row of a batch run whose
    ledger item ended ``retryable`` or ``failed`` (the fallback; such items become ``done`` when a
    response arrives). Each page is written in its own transaction, so an interruption loses at
    most one page; running it again continues where it stopped. Provider errors are recorded
    per row (``provider_error``), never raised.
    """
    report = RealtimeReport()
    last = (-1, 0)
    while True:
        page = conn.execute(
            f"SELECT f.file_no, r.file_key, r.row_no, r.user_prompt, i.id, i.last_error"
            " FROM template_rows r JOIN template_files f ON f.run_id = r.run_id AND f.file_key = r.file_key"
            f" LEFT JOIN batch_items i ON i.flow = %(flow)s AND i.subject_key = {_SUBJECT_EXPR}"
            " WHERE r.run_id = %(run)s AND (f.file_no, r.row_no) > (%(file_no)s, %(row_no)s)"
            "   AND NOT EXISTS (SELECT 1 FROM template_results x WHERE x.run_id = r.run_id"
            "                   AND x.file_key = r.file_key AND x.row_no = r.row_no)"
            "   AND (%(realtime)s OR i.state IN ('retryable', 'failed'))"
            " ORDER BY f.file_no, r.row_no LIMIT %(limit)s",
            {"flow": FLOW, "run": run.id, "file_no": last[0], "row_no": last[1],
             "realtime": run.execution == "realtime", "limit": page_size},
        ).fetchall()
        if not page:
            return report
        last = (page[-1][0], page[-1][2])
        _answer_page(conn, run, provider, page, report)
        if on_progress is not None:
            on_progress(len(page))


def _answer_page(conn: psycopg.Connection, run: TemplateRun, provider: BatchProvider, page: list[tuple],
                 report: RealtimeReport) -> None:
    by_id = {custom_id(run.id, file_no, row_no): (file_key, row_no, item_id, item_error)
             for file_no, file_key, row_no, _, item_id, item_error in page}
    requests = [_chat_request(custom_id(run.id, file_no, row_no), run.system_prompt, user, run.schema_json,
                              run.max_tokens, run.prefill) for file_no, _, row_no, user, _, _ in page]
    answers: dict[str, Result] = {}
    for result in provider.realtime(requests, endpoint="chat", model=run.model):
        if result.custom_id in by_id:
            answers[result.custom_id] = result
    sink = TemplateSink(conn, model=run.model, via="realtime")
    done: list[tuple[int, str]] = []
    failed: list[tuple[int, str]] = []
    for request_id, (file_key, row_no, item_id, item_error) in by_id.items():
        text, error = _text_or_error(answers.get(request_id))
        sink.add((run.id, file_key, row_no), text, error)
        report.requested += 1
        report.answered += error is None
        report.errors += error is not None
        if item_id is not None:
            report.fallback += 1
            batch_error = item_error or "batch request failed"
            if error is None:
                done.append((item_id, f"answered in real time after the batch request failed: {batch_error}"))
            else:
                failed.append((item_id, f"batch: {batch_error}; real time: {error}"))
    with conn.transaction():
        sink.finish()
        for state, updates in (("done", done), ("failed", failed)):
            if updates:
                with conn.cursor() as cur:
                    cur.executemany("UPDATE batch_items SET state = %s, last_error = %s, updated_at = now()"
                                    " WHERE id = %s", [(state, error, item_id) for item_id, error in updates])


def _text_or_error(result: Result | None) -> tuple[str | None, str | None]:
    if result is None:
        return None, "the provider returned no real-time response for this request"
    if result.error is not None:
        return None, result.error
    if result.text is None:
        return None, "response has no text"
    return result.text.replace("\x00", ""), None


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
        fallback_note="; ".join(notes) or None, truncation=_truncation(conn, run.id),
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
        f" CROSS JOIN LATERAL regexp_match(i.subject_key, {_SUBJECT_SQL}) AS k(m)"
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


def _truncation(conn: psycopg.Connection, run_id: int) -> TruncationStats:
    stats = TruncationStats()
    seen, affected = conn.execute(
        "SELECT count(*), count(*) FILTER (WHERE cardinality(truncated_fields) > 0) FROM template_rows"
        " WHERE run_id = %s", (run_id,),
    ).fetchone()
    stats.rows_seen, stats.rows_affected = seen, affected
    for name, count in conn.execute(
        "SELECT f, count(*) FROM template_rows, unnest(truncated_fields) AS f WHERE run_id = %s GROUP BY f",
        (run_id,),
    ):
        stats.fields_truncated[name] = count
    return stats


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
    lock = _lock_key(f"run:{run_id}")
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
        "   AND i.state IN ('exported', 'submitted'))"
        " FROM template_rows r"
        " LEFT JOIN template_results x ON x.run_id = r.run_id AND x.file_key = r.file_key AND x.row_no = r.row_no"
        f" LEFT JOIN batch_items i ON i.flow = %s AND i.subject_key = {_SUBJECT_EXPR}"
        " WHERE r.run_id = %s",
        (FLOW, progress.run.id),
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
        "   OR EXISTS (SELECT 1 FROM batch_items i WHERE i.flow = %s AND i.state IN ('retryable', 'failed')"
        "       AND split_part(i.subject_key, ':', 1) = t.id::text AND NOT EXISTS"
        "       (SELECT 1 FROM template_results x WHERE x.run_id = t.id"
        f"        AND {_SUBJECT_KEY_OF_RESULT} = i.subject_key))))",
        (FLOW,),
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
