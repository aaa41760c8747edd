"""Importing judgments into `court_cases` from files (`core.corpus_files` finds and reads them):
JSONL (or JSON), CSV/TSV, Parquet and the Caselaw Access Project's JSON, one file or a folder of
them, optionally compressed.

Streaming, with memory flat in the file size: records are read by a thread of their own while the
database takes the previous batch; rows go by binary COPY into a temporary table, then into
`court_cases` with one `INSERT ... ON CONFLICT (id)` per batch of at most 500 cases or 8 MB of
text, each batch its own transaction (an interrupted import keeps what it committed; running it
again finishes it).

Ids are stable: a record whose id is a UUID keeps it; any other id (a number, `cap:123`, a
citation) becomes `uuid5(ID_NAMESPACE, id)`, so importing the same file twice writes the same rows.
A case that exists is updated only when a value differs, and only then is its `updated_at` moved;
a value the record does not give (absent, null or empty) keeps what is stored — an import never
blanks a column, and a generated headnote survives a re-import of files without headnotes (an
imported headnote that differs replaces it and clears `headnote_model`).

A record that cannot be loaded — not JSON, no id, no text, a NUL byte, a field the user mapped
that it lacks, an id already seen earlier in this import — is skipped and reported as `file:line`
with the reason; everything else is loaded. See `import_cases`.
"""

from __future__ import annotations

import queue
import re
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import date, datetime

import psycopg

from legal_batch.core import cap
from legal_batch.core.corpus_files import (
    FORMATS,
    UNREADABLE,
    ImportFormat,
    NotUTF8,
    ReadPosition,
    SkipReason,
    SourceFile,
    Sources,
    encoding_hint,
    find_sources,
    read_records,
)
from legal_batch.core.errors import UserError
from legal_batch.core.wording import plural

__all__ = [
    "COLUMNS",
    "DEFAULT_FIELDS",
    "FORMATS",
    "ID_NAMESPACE",
    "CaseRecord",
    "FieldMap",
    "ImportFormat",
    "ImportProgress",
    "ImportReport",
    "Note",
    "Rejection",
    "Skipped",
    "SourceFile",
    "Sources",
    "case_id",
    "field_map",
    "find_sources",
    "import_cases",
    "read_records",
    "to_case",
]

# Fixed for good: every derived id depends on it (changing it would duplicate every imported case).
ID_NAMESPACE = uuid.UUID("3c1f0b52-5d3e-5b8e-9a51-6a0c2e3f7d41")

COLUMNS = ("neutral_citation", "case_name", "court", "decision_date", "full_text", "headnote")
"""The `court_cases` columns an import writes (besides `id`)."""

# Where a column's value is looked for when the user names no field for it: the first field present
# with a value. CAP records are read by `core.cap` first; these fill what it leaves.
DEFAULT_FIELDS: dict[str, tuple[str, ...]] = {
    "id": ("id", "case_id", "uuid"),
    "full_text": ("full_text", "text", "body", "content"),
    "neutral_citation": ("neutral_citation", "citation", "citations", "cite"),
    "case_name": ("case_name", "name_abbreviation", "name", "title"),
    "court": ("court", "court_name"),
    "decision_date": ("decision_date", "date", "date_decided", "decided"),
    "headnote": ("headnote",),
}

_UUID = re.compile(r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$")
_DATE = re.compile(r"^\s*(\d{4})(?:[-/.](\d{1,2})(?:[-/.](\d{1,2}))?)?(?:$|[T ])")
_BATCH_ROWS = 500
_BATCH_CHARS = 8 << 20  # small enough that a batch merges while the next one is read
_READ_AHEAD = 256  # parsed cases waiting for the database (~13 MB of 50 KB judgments)
_PROGRESS_EVERY = 64  # records between progress callbacks
_EXAMPLES = 20  # skipped lines kept in the report per reason (all of them go to `on_skip`)


# -- which field fills which column -------------------------------------------------------------------

@dataclass(frozen=True)
class FieldMap:
    """The record fields the user named for columns (`--id-field`, `--text-field`, `--map col=field`);
    a column without one takes the first of its `DEFAULT_FIELDS` present. A field may be a dotted
    path into nested JSON (`court.name`). A record without a field the user named is skipped."""

    explicit: Mapping[str, str] = field(default_factory=dict)
    options: Mapping[str, str] = field(default_factory=dict)  # column → the option that named its field

    def fields_for(self, column: str) -> tuple[str, ...]:
        named = self.explicit.get(column)
        return (named,) if named else DEFAULT_FIELDS[column]

    def top_level_fields(self) -> set[str]:
        """Every field a record may be read from, cut to its first path segment (Parquet columns)."""
        names = {name for column in DEFAULT_FIELDS for name in self.fields_for(column)}
        names |= set(cap.FIELDS)
        return {name.split(".", 1)[0] for name in names} | set(self.explicit.values())


def field_map(*, id_field: str | None = None, text_field: str | None = None,
              mapping: Sequence[str] = ()) -> FieldMap:
    """A `FieldMap` from the CLI's options; `mapping` holds `column=field` strings. Raises `UserError`
    for a malformed pair, an unknown column, or two fields for one column."""
    explicit: dict[str, str] = {}
    options: dict[str, str] = {}
    columns = ("id", *COLUMNS)

    def name(column: str, value: str, option: str) -> None:
        value = value.strip()
        if not value:
            raise UserError(f"{option} names no field: give the record's field, e.g. --map court=tribunal")
        if column in explicit and explicit[column] != value:
            raise UserError(f"{options[column]} and {option} name two fields for {column}: keep one")
        explicit[column] = value
        options[column] = option

    if id_field is not None:
        name("id", id_field, f"--id-field {id_field}")
    if text_field is not None:
        name("full_text", text_field, f"--text-field {text_field}")
    for pair in mapping:
        column, sep, value = pair.partition("=")
        column = column.strip()
        if not sep or not column:
            raise UserError(f"--map {pair!r} is not column=field: give e.g. --map court=tribunal "
                            f"(columns: {', '.join(columns)})")
        if column not in columns:
            raise UserError(f"--map {pair!r}: {column!r} is not a court_cases column: give one of "
                            f"{', '.join(columns)}")
        name(column, value, f"--map {pair}")
    return FieldMap(explicit, options)


# -- records to rows ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class CaseRecord:
    """One case as it is written to `court_cases`; `source_id` is the id as the file gave it."""

    id: uuid.UUID
    source_id: str
    neutral_citation: str | None
    case_name: str | None
    court: str | None
    decision_date: date | None
    full_text: str
    headnote: str | None


@dataclass(frozen=True)
class Rejection:
    reason: SkipReason
    detail: str


_MISSING = object()


def _lookup(record: Mapping[str, object], name: str) -> object:
    """`record[name]`, or the dotted path `a.b` into nested objects; `_MISSING` when absent."""
    if name in record:
        return record[name]
    if "." not in name:
        return _MISSING
    value: object = record
    for part in name.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return _MISSING
        value = value[part]
    return value


def _as_text(value: object) -> str | None:
    """A column value as text: strings stripped (empty → None), numbers and dates printed, an object
    by its `name`/`cite`/`text`, a list joined with "; "."""
    if value is None:
        return None
    if isinstance(value, str):
        return value.strip() or None
    if isinstance(value, bytes):
        return _as_text(value.decode("utf-8", errors="surrogateescape"))
    if isinstance(value, float) and value != value:  # NaN from a data frame
        return None
    if isinstance(value, (date, datetime)):
        return value.isoformat()
    if isinstance(value, Mapping):
        for key in ("name", "cite", "text", "value"):
            if key in value:
                return _as_text(value[key])
        return None
    if isinstance(value, (list, tuple)):
        parts = [text for text in (_as_text(item) for item in value) if text]
        return "; ".join(parts) or None
    return str(value).strip() or None


def case_id(value: object) -> tuple[uuid.UUID, str] | None:
    """(stable id, source id) of a record's id value: a UUID is kept, anything else (a number, a
    string) becomes uuid5(ID_NAMESPACE, its text); None when there is no usable id."""
    if isinstance(value, uuid.UUID):
        return value, str(value)
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, float):
        if value != value or not value.is_integer():
            return None
        value = int(value)
    if isinstance(value, bytes) and len(value) == 16:  # a Parquet UUID column
        return uuid.UUID(bytes=value), str(uuid.UUID(bytes=value))
    if not isinstance(value, (int, str)):
        return None
    text = str(value).strip()
    if not text:
        return None
    if _UUID.match(text):
        return uuid.UUID(text), text
    return uuid.uuid5(ID_NAMESPACE, text), text


def _as_date(value: object) -> tuple[date | None, str | None]:
    """(date, None), (None, None) for no value, or (None, why) for one that is not a date. A year or a
    year and month (CAP has some) is read as its first day."""
    if value is None or value == "":
        return None, None
    if isinstance(value, datetime):
        return value.date(), None
    if isinstance(value, date):
        return value, None
    if isinstance(value, str) and (match := _DATE.match(value)):
        year, month, day = (int(part) if part else 1 for part in match.groups())
        try:
            return date(year, month, day), None
        except ValueError:
            pass
    return None, f"decision_date {value!r} is not a date (YYYY-MM-DD): stored empty"


def _encodable(text: str) -> bool:
    if text.isascii():
        return True
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _column_value(record: Mapping[str, object], column: str, fields: FieldMap) -> object:
    """The raw value for `column`: from the field the user named (`_MISSING` if the record lacks it),
    else from the first default field that holds a value."""
    named = fields.explicit.get(column)
    if named is not None:
        return _lookup(record, named)
    for name in DEFAULT_FIELDS[column]:
        value = record.get(name)
        if value is not None and value != "":
            return value
    return None


def to_case(record: Mapping[str, object], fields: FieldMap, *, cap_format: bool = False,
            notes: list[str] | None = None) -> CaseRecord | Rejection:
    """The case a record holds, or why it cannot be loaded. CAP records (`cap_format`, or any record
    with a `casebody`) are read by `core.cap` first; fields the user named override. Notes about
    values left empty (a date that is not one) are appended to `notes`."""
    values: dict[str, object] = {}
    why_no_text = None
    if cap_format or "casebody" in record:
        values, why_no_text = cap.case_fields(record)
    for column in ("id", *COLUMNS):
        if column in values and column not in fields.explicit:
            continue
        value = _column_value(record, column, fields)
        if value is _MISSING:
            return Rejection("unknown mapped field",
                             f"the record has no field {fields.explicit[column]!r} ({fields.options[column]})")
        values[column] = value

    identity = case_id(values.get("id"))
    if identity is None:
        given = values.get("id")
        if given is None or given == "":
            where = fields.options.get("id") or f"none of {', '.join(DEFAULT_FIELDS['id'])} is set"
            return Rejection("no id", f"the record has no id ({where}): name its id field with --id-field")
        return Rejection("no id", f"the id {given!r} is not a string, a whole number or a UUID")

    raw_text = values.get("full_text")
    if isinstance(raw_text, bytes):
        raw_text = raw_text.decode("utf-8", errors="surrogateescape")
    if raw_text is not None and not isinstance(raw_text, str):
        return Rejection("no text", f"the text is a {type(raw_text).__name__}, not text")
    text = raw_text.replace("\r\n", "\n").replace("\r", "\n").strip() if raw_text else ""
    if not text:
        where = fields.options.get("full_text") or (
            why_no_text or f"fields tried: {', '.join(DEFAULT_FIELDS['full_text'])}")
        return Rejection("no text", f"the text is empty or missing ({where})")

    texts = {column: _as_text(values.get(column))
             for column in ("neutral_citation", "case_name", "court", "headnote")}
    texts["full_text"] = text
    for column, value in texts.items():
        if value is None:
            continue
        if "\x00" in value:
            return Rejection("NUL byte", f"{column} holds a NUL byte at character {value.index(chr(0))} (Postgres "
                                         "text cannot store one): remove it from the source")
        if not _encodable(value):
            hint = encoding_hint(value.encode("utf-8", errors="surrogateescape"))
            return Rejection("invalid UTF-8", f"{column} is {hint or 'not valid UTF-8'}")
    decided, why = _as_date(values.get("decision_date"))
    if why and notes is not None:
        notes.append(why)
    return CaseRecord(identity[0], identity[1], texts["neutral_citation"], texts["case_name"], texts["court"],
                      decided, text, texts["headnote"])


# -- the report ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Skipped:
    """A record (or the rest of a file) not loaded: where, and why."""

    file: str
    line: int
    reason: SkipReason
    detail: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.reason}: {self.detail}"


@dataclass(frozen=True)
class Note:
    """A record loaded with a value left empty (e.g. a date that is not one)."""

    file: str
    line: int
    detail: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.detail}"


@dataclass(frozen=True)
class ImportProgress:
    file: str
    bytes_done: int
    bytes_total: int
    records_read: int


@dataclass
class ImportReport:
    """What an import did. `skipped` counts records not loaded (and unreadable files); `examples`
    keeps the first few of each reason (every one is passed to `on_skip` as it happens)."""

    files: int = 0
    records_read: int = 0
    inserted: int = 0
    updated: int = 0
    unchanged: int = 0
    skipped: int = 0
    skipped_by_reason: Counter[str] = field(default_factory=Counter)
    examples: list[Skipped] = field(default_factory=list)
    notes: int = 0
    passed_over: tuple[str, ...] = ()
    seconds: float = 0.0
    input_bytes: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    @property
    def loaded(self) -> int:
        return self.inserted + self.updated + self.unchanged

    @property
    def exit_code(self) -> int:
        """1 when anything was skipped, else 0."""
        return 1 if self.skipped else 0

    def skip(self, skipped: Skipped) -> None:
        with self._lock:  # the reading thread and the loading one both skip records
            self.skipped += 1
            self.skipped_by_reason[skipped.reason] += 1
            if self.skipped_by_reason[skipped.reason] <= _EXAMPLES:
                self.examples.append(skipped)

    def summary(self) -> list[str]:
        """The report as lines for a person."""
        lines = [f"{plural(self.files, 'file')}, {self.records_read:,} records read: "
                 f"{self.inserted:,} inserted, {self.updated:,} updated, {self.unchanged:,} unchanged, "
                 f"{self.skipped:,} skipped"]
        if self.skipped:
            reasons = ", ".join(f"{reason} {count:,}" for reason, count in self.skipped_by_reason.most_common())
            lines.append(f"skipped: {reasons}")
        if self.notes:
            lines.append(f"{self.notes:,} loaded with a value left empty (see the notes above)")
        if self.passed_over:
            shown = ", ".join(self.passed_over[:5]) + (", ..." if len(self.passed_over) > 5 else "")
            lines.append(f"passed over {plural(len(self.passed_over), 'other file')}: {shown}")
        if self.seconds > 0:
            megabytes = self.input_bytes / 1e6
            lines.append(f"{megabytes:,.1f} MB in {self.seconds:,.1f} s ({megabytes / self.seconds:,.1f} MB/s, "
                         f"{self.records_read / self.seconds:,.0f} records/s)")
        return lines


# -- loading ------------------------------------------------------------------------------------------

_STAGE_COLUMNS = ("ord", "file_no", "line", "id", "source_id", *COLUMNS)
_STAGE_TYPES = ("int8", "int4", "int4", "uuid", "text", "text", "text", "text", "date", "text", "text")

_CREATE_STAGE = """
CREATE TEMP TABLE cases_import_stage (
    ord bigint, file_no integer, line integer, id uuid, source_id text, neutral_citation text,
    case_name text, court text, decision_date date, full_text text, headnote text
) ON COMMIT DELETE ROWS"""
# Texts wait in the stage uncompressed: they are compressed once, in court_cases, and not at all when
# they are unchanged (compressing them in the stage too made a re-import three times slower).
_STAGE_STORAGE = ("ALTER TABLE cases_import_stage ALTER full_text SET STORAGE EXTERNAL, "
                  "ALTER headnote SET STORAGE EXTERNAL")
# The first place each id was seen in this import: a later record with the same id is a duplicate.
_CREATE_SEEN = """
CREATE TEMP TABLE cases_import_seen (id uuid PRIMARY KEY, ord bigint NOT NULL, file_no integer NOT NULL,
                                     line integer NOT NULL)"""
_MARK_SEEN = """
INSERT INTO cases_import_seen (id, ord, file_no, line)
SELECT DISTINCT ON (id) id, ord, file_no, line FROM cases_import_stage ORDER BY id, ord
ON CONFLICT (id) DO NOTHING"""
_DROP_DUPLICATES = """
DELETE FROM cases_import_stage s USING cases_import_seen f WHERE s.id = f.id AND s.ord <> f.ord
RETURNING s.file_no, s.line, s.source_id, f.file_no, f.line"""
_COUNT_EXISTING = "SELECT count(*) FROM cases_import_stage s JOIN court_cases c ON c.id = s.id"
# An empty value keeps the stored one; the row (and its updated_at) changes only when a value differs.
_MERGE = """
INSERT INTO court_cases AS c (id, neutral_citation, case_name, court, decision_date, full_text, headnote)
SELECT id, neutral_citation, case_name, court, decision_date, full_text, headnote FROM cases_import_stage
ON CONFLICT (id) DO UPDATE SET
    neutral_citation = COALESCE(EXCLUDED.neutral_citation, c.neutral_citation),
    case_name = COALESCE(EXCLUDED.case_name, c.case_name),
    court = COALESCE(EXCLUDED.court, c.court),
    decision_date = COALESCE(EXCLUDED.decision_date, c.decision_date),
    full_text = EXCLUDED.full_text,
    headnote = COALESCE(EXCLUDED.headnote, c.headnote),
    headnote_model = CASE WHEN EXCLUDED.headnote IS DISTINCT FROM c.headnote AND EXCLUDED.headnote IS NOT NULL
                          THEN NULL ELSE c.headnote_model END,
    headnote_generated_at = CASE WHEN EXCLUDED.headnote IS DISTINCT FROM c.headnote
                                      AND EXCLUDED.headnote IS NOT NULL
                                 THEN NULL ELSE c.headnote_generated_at END,
    updated_at = now()
WHERE (c.neutral_citation, c.case_name, c.court, c.decision_date, c.full_text, c.headnote)
      IS DISTINCT FROM
      (COALESCE(EXCLUDED.neutral_citation, c.neutral_citation), COALESCE(EXCLUDED.case_name, c.case_name),
       COALESCE(EXCLUDED.court, c.court), COALESCE(EXCLUDED.decision_date, c.decision_date), EXCLUDED.full_text,
       COALESCE(EXCLUDED.headnote, c.headnote))"""


@dataclass
class _Staged:
    """A case ready for COPY, with where it came from."""

    ord: int
    file_no: int
    line: int
    case: CaseRecord

    def row(self) -> tuple[object, ...]:
        case = self.case
        return (self.ord, self.file_no, self.line, case.id, case.source_id, case.neutral_citation, case.case_name,
                case.court, case.decision_date, case.full_text, case.headnote)


def _missing_columns(header: Sequence[str], fields: FieldMap) -> list[str]:
    """The user-named fields a tabular file's header lacks (as "field (option)")."""
    present = set(header)
    return [f"{name!r} ({fields.options[column]})" for column, name in fields.explicit.items()
            if name not in present and name.split(".", 1)[0] not in present]


def _cases(sources: Sources, fields: FieldMap, report: ImportReport, *,
           on_skip: Callable[[Skipped], None], on_note: Callable[[Note], None],
           on_progress: Callable[[ImportProgress], None]) -> Iterator[_Staged]:
    """Every loadable case of every file, in order; what cannot be loaded goes to the report."""
    ordinal = 0
    done_bytes = 0
    total = sources.total_bytes

    def skip(source: SourceFile, line: int, reason: SkipReason, detail: str) -> None:
        skipped = Skipped(source.name, line, reason, detail)
        report.skip(skipped)
        on_skip(skipped)

    for file_no, source in enumerate(sources.files):
        report.files += 1
        position = ReadPosition(size=source.size)
        header: list[str] = []
        checked = source.family == "json" or not fields.explicit
        line = 0
        try:
            for line, record, problem in read_records(source, columns=fields.top_level_fields(), position=position,
                                                      header_out=header):
                if not checked:  # a tabular file's header is read before its first row
                    checked = True
                    if missing := _missing_columns(header, fields):
                        skip(source, 1, "unknown mapped field",
                             f"the header has no column {', '.join(missing)}; columns: {', '.join(header)} "
                             "(the file is not read)")
                        break
                report.records_read += 1
                if problem is not None:
                    skip(source, line, *problem)
                else:
                    notes: list[str] = []
                    case = to_case(record or {}, fields, cap_format=source.cap, notes=notes)
                    if isinstance(case, Rejection):
                        skip(source, line, case.reason, case.detail)
                    else:
                        for detail in notes:
                            report.notes += 1
                            on_note(Note(source.name, line, detail))
                        ordinal += 1
                        yield _Staged(ordinal, file_no, line, case)
                if report.records_read % _PROGRESS_EVERY == 0:
                    on_progress(ImportProgress(source.name, done_bytes + position.bytes_read(), total,
                                               report.records_read))
        except NotUTF8 as exc:
            skip(source, exc.line, "invalid UTF-8", str(exc))
        except UNREADABLE as exc:
            skip(source, line + 1 if line else 1, "unreadable file",
                 f"cannot read on ({type(exc).__name__}: {exc}); what came before was loaded")
        except Exception as exc:  # pyarrow's errors (ArrowInvalid...) without importing pyarrow here
            if type(exc).__module__.split(".")[0] != "pyarrow":
                raise
            skip(source, line + 1 if line else 1, "unreadable file", f"not a readable Parquet file ({exc})")
        done_bytes += source.size
        on_progress(ImportProgress(source.name, done_bytes, total, report.records_read))


_END = object()


@dataclass(frozen=True)
class _Failed:
    error: BaseException


@contextmanager
def _read_ahead(items: Iterator[_Staged], *, size: int = _READ_AHEAD) -> Iterator[Iterator[_Staged]]:
    """`items`, produced by a thread of its own up to `size` ahead: files are read and parsed while
    the database takes the previous batch (waiting on Postgres releases the GIL). An error in the
    reading thread is raised in the caller's."""
    pending: queue.Queue[object] = queue.Queue(maxsize=size)
    stop = threading.Event()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                pending.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(_END)
        except BaseException as error:  # handed to the consumer, which raises it
            put(_Failed(error))
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()  # the files it has open, when the consumer stopped early

    def consume() -> Iterator[_Staged]:
        while True:
            item = pending.get()
            if item is _END:
                return
            if isinstance(item, _Failed):
                raise item.error
            yield item  # type: ignore[misc]

    thread = threading.Thread(target=produce, name="cases-import-reader", daemon=True)
    thread.start()
    try:
        yield consume()
    finally:
        stop.set()
        thread.join()


def _load_batch(conn: psycopg.Connection, batch: Iterator[_Staged], *, names: Sequence[str],
                report: ImportReport, on_skip: Callable[[Skipped], None]) -> bool:
    """COPY up to one batch of cases into the stage, drop duplicates, merge into court_cases; one
    transaction. False when there was nothing left."""
    copied = 0
    with conn.transaction(), conn.cursor() as cursor:
        columns = ", ".join(_STAGE_COLUMNS)
        with cursor.copy(f"COPY cases_import_stage ({columns}) FROM STDIN (FORMAT BINARY)") as copy:
            copy.set_types(list(_STAGE_TYPES))
            chars = 0
            for staged in batch:
                copy.write_row(staged.row())
                copied += 1
                chars += len(staged.case.full_text)
                if copied >= _BATCH_ROWS or chars >= _BATCH_CHARS:
                    break
        if not copied:
            return False
        cursor.execute(_MARK_SEEN)
        duplicates = cursor.execute(_DROP_DUPLICATES).fetchall()
        for file_no, line, source_id, first_file, first_line in sorted(duplicates):
            skipped = Skipped(names[file_no], line, "duplicate id",
                              f"id {source_id!r} was first seen at {names[first_file]}:{first_line} (this one is "
                              "not loaded)")
            report.skip(skipped)
            on_skip(skipped)
        existing = cursor.execute(_COUNT_EXISTING).fetchone()[0]
        changed = cursor.execute(_MERGE).rowcount
    staged_rows = copied - len(duplicates)
    inserted = staged_rows - existing
    report.inserted += inserted
    report.updated += changed - inserted
    report.unchanged += existing - (changed - inserted)
    return True


def import_cases(conn: psycopg.Connection, sources: Sources, fields: FieldMap | None = None, *,
                 on_skip: Callable[[Skipped], None] | None = None, on_note: Callable[[Note], None] | None = None,
                 on_progress: Callable[[ImportProgress], None] | None = None) -> ImportReport:
    """Load every case of `sources` into `court_cases` (see the module docstring for ids, upserts and
    what is skipped). `conn` must be in autocommit mode (each batch is its own transaction).

    `on_skip` gets each skipped record as it is found (`file:line: reason: detail`), `on_note` each
    value left empty, `on_progress` the bytes read so far every few records. Returns the report;
    its `exit_code` is 1 when anything was skipped."""
    started = time.perf_counter()
    fields = fields or FieldMap()
    report = ImportReport(passed_over=sources.passed_over, input_bytes=sources.total_bytes)
    names = [source.name for source in sources.files]
    for statement in ("DROP TABLE IF EXISTS cases_import_stage", _CREATE_STAGE, _STAGE_STORAGE,
                      "DROP TABLE IF EXISTS cases_import_seen", _CREATE_SEEN):
        conn.execute(statement)
    try:
        cases = _cases(sources, fields, report, on_skip=on_skip or (lambda _: None),
                       on_note=on_note or (lambda _: None), on_progress=on_progress or (lambda _: None))
        with _read_ahead(cases) as ahead:
            while _load_batch(conn, ahead, names=names, report=report, on_skip=on_skip or (lambda _: None)):
                pass
    finally:
        if not conn.closed and not conn.broken:
            conn.execute("DROP TABLE IF EXISTS cases_import_seen, cases_import_stage")
    report.seconds = time.perf_counter() - started
    return report
