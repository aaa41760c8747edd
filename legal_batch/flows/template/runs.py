"""Template runs: identifiers, configuration, and staging a run's rows into ``template_rows``.

A *run* is one input (a file, a folder, or ``train/``/``val/``/``test/`` splits) with its
``prompts.json``, JSON Schema and output folder. :func:`stage_inputs` renders one prompt per row
(the row values stay in the files) and decides how the run is answered (batch or real time).
Identifiers: subject key ``<run_id>:<file_key>:<row_no>``, custom id ``r<run_id>-f<file_no>-<row_no>``.
"""

from __future__ import annotations

import hashlib
import json
import re
import zlib
from dataclasses import dataclass, fields
from datetime import datetime
from pathlib import Path
from typing import Literal

import psycopg
from psycopg.rows import class_row
from psycopg.types.json import Json, Jsonb

from legal_batch.core.tokens import count_tokens
from legal_batch.flows.template.errors import TemplateError
from legal_batch.flows.template.prompts import (
    PromptTemplate,
    TruncationStats,
    check_columns,
    format_prompt,
    load_prompts,
)
from legal_batch.flows.template.schema import load_schema, schema_to_model
from legal_batch.flows.template.tabular import (
    InputFile,
    discover_inputs,
    read_rows,
)
from legal_batch.providers.base import BatchProvider

FLOW = "template"
Mode = Literal["auto", "batch", "realtime"]
Execution = Literal["batch", "realtime"]
MODES: tuple[str, ...] = ("auto", "batch", "realtime")
DEFAULT_PREFILL = "{"
DEFAULT_MAX_TOKENS = 1024
REQUEST_OVERHEAD_BYTES = 400
COPY_ROWS = 5_000
_SUBJECT = re.compile(r"^(\d+):(.*):(\d+)$", re.DOTALL)
SUBJECT_SQL = r"'^(\d+):(.*):(\d+)$'"
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


SUBJECT_EXPR = "r.run_id::text || ':' || r.file_key || ':' || r.row_no::text"
SUBJECT_KEY_OF_RESULT = "x.run_id::text || ':' || x.file_key || ':' || x.row_no::text"
CUSTOM_ID_EXPR = "'r' || r.run_id::text || '-f' || f.file_no::text || '-' || r.row_no::text"

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
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (lock_key("stage"),))
        existing = None if fresh else _find(conn, loaded.fingerprint)
        if existing is not None:
            return StagedRun(existing, True, len(loaded.files), truncation_stats(conn, existing.id))
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


def lock_key(name: str) -> int:
    return zlib.crc32(f"legal_batch:template:{name}".encode()) & 0x7FFFFFFF


def truncation_stats(conn: psycopg.Connection, run_id: int) -> TruncationStats:
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
