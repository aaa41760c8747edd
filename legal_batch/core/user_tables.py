"""Your own tables: where cases come from (the source) and the pgvector table vectors go to.

Settings point the source at an existing table or view and name its columns
(`LEGAL_BATCH_SOURCE_TABLE`, `LEGAL_BATCH_SOURCE_*_COLUMN`), and name the table vectors are written to
(`LEGAL_BATCH_EMBEDDINGS_TABLE`, with `LEGAL_BATCH_EMBEDDING_DIMENSIONS` and `LEGAL_BATCH_EMBEDDINGS_STORAGE`).
Unset, the source is the
built-in `court_cases` and vectors go to `case_embeddings`, both in our schema.

`check_tables` runs at start (every CLI command, each Dagster process's first connection): it names,
in one line, a missing table or column, a text column that is not text, an id column that is not a
unique uuid, or a vector column of another dimension or storage type — before anything is written. A user's table
is never altered: the source is only read (and its headnote column written by the headnotes flow),
and a vector table that exists is only written to; one that does not exist is created (and is then
ours). Queries read the source through `CaseSource.select`, which gives every column its canonical
name (`id`, `full_text`, `neutral_citation`, `case_name`, `court`, `decision_date`, `headnote`);
other code reads vectors through the `embedding_sink` view, which we keep pointing at the table in use.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

import psycopg
from psycopg import sql

from legal_batch.core.errors import UserError

SOURCE_COLUMNS: dict[str, tuple[str, str]] = {
    "id": ("LEGAL_BATCH_SOURCE_ID_COLUMN", "uuid"),
    "full_text": ("LEGAL_BATCH_SOURCE_TEXT_COLUMN", "text"),
    "neutral_citation": ("LEGAL_BATCH_SOURCE_CITATION_COLUMN", "text"),
    "case_name": ("LEGAL_BATCH_SOURCE_NAME_COLUMN", "text"),
    "court": ("LEGAL_BATCH_SOURCE_COURT_COLUMN", "text"),
    "decision_date": ("LEGAL_BATCH_SOURCE_DATE_COLUMN", "date"),
    "headnote": ("LEGAL_BATCH_SOURCE_HEADNOTE_COLUMN", "text"),
}
"""Canonical column → (the setting naming it, the kind of type it must have)."""

BUILTIN_TABLE = "court_cases"
BUILTIN_EXTRA = ("headnote_model", "headnote_generated_at", "updated_at")
"""Columns only the built-in table has (the headnotes flow keeps them up to date there)."""
_NULLS = {"uuid": "NULL::uuid", "text": "NULL::text", "date": "NULL::date"}
_TEXT_TYPES = ("text", "character varying", "character", "citext", "name")
_DATE_TYPES = ("date", "timestamp without time zone", "timestamp with time zone")

DEFAULT_VECTOR_TABLE = "case_embeddings"
SINK_VIEW = "embedding_sink"
OWNED_COMMENT = "legal_batch: vectors of the embeddings flow"
"""The comment of a vector table we created (for a name the user gave): ours to index and to resize."""
_LOCK = 0x4C42_7AB1  # advisory lock key: "changing the embedding_sink view"


def _quote(name: str) -> str:
    return sql.Identifier(name).as_string(None)


def _qualified(name: str, *, setting: str) -> tuple[str, str]:
    """(schema, table) of `schema.table`, or of a plain name in `public`."""
    parts = [part.strip() for part in name.strip().split(".")]
    if len(parts) == 1 and parts[0]:
        return "public", parts[0]
    if len(parts) == 2 and all(parts):
        return parts[0], parts[1]
    raise UserError(f"{setting}={name!r} is not a table name: give schema.table, or a table in public")


@dataclass(frozen=True)
class CaseSource:
    """Where cases are read from: a table (or view) and which of its columns are which.

    `table` None is the built-in `court_cases` (found on the search path: ours). `columns` maps each
    canonical column to the source's column; a canonical column that is absent is read as NULL."""

    table: str | None = None
    columns: Mapping[str, str] = field(default_factory=lambda: {name: name for name in SOURCE_COLUMNS})

    @classmethod
    def from_settings(cls, settings) -> CaseSource:
        """The source the settings name. For your table, `id` and `full_text` default to those names and
        the other columns are used only when named (`LEGAL_BATCH_SOURCE_CITATION_COLUMN`, ...)."""
        if not settings.source_table:
            return cls()
        columns = {"id": settings.source_id_column, "full_text": settings.source_text_column}
        for canonical, value in (("neutral_citation", settings.source_citation_column),
                                 ("case_name", settings.source_name_column),
                                 ("court", settings.source_court_column),
                                 ("decision_date", settings.source_date_column),
                                 ("headnote", settings.source_headnote_column)):
            if value:
                columns[canonical] = value
        _qualified(settings.source_table, setting="LEGAL_BATCH_SOURCE_TABLE")
        return cls(settings.source_table, columns)

    @property
    def builtin(self) -> bool:
        return self.table is None

    @property
    def name(self) -> str:
        """For messages: `court_cases`, or `schema.table`."""
        return BUILTIN_TABLE if self.table is None else ".".join(_qualified(self.table, setting=""))

    @property
    def relation(self) -> str:
        """The table as SQL: `court_cases` (search path), or `"schema"."table"`."""
        if self.table is None:
            return BUILTIN_TABLE
        schema, table = _qualified(self.table, setting="LEGAL_BATCH_SOURCE_TABLE")
        return f"{_quote(schema)}.{_quote(table)}"

    def column(self, canonical: str) -> str | None:
        """The source's column for a canonical one, quoted; None when the source has none."""
        name = self.columns.get(canonical)
        return None if name is None else _quote(name)

    def has(self, canonical: str) -> bool:
        return canonical in self.columns

    def select(self, *canonical: str) -> str:
        """A subquery of the source with the canonical column names (absent ones NULL, dates as
        `date`), rows without an id left out; use it as `FROM {source.select(...)} k`. The built-in
        source also offers `headnote_model`, `headnote_generated_at` and `updated_at`."""
        names = canonical or (*SOURCE_COLUMNS, *(BUILTIN_EXTRA if self.builtin else ()))
        items = []
        for name in names:
            if name in BUILTIN_EXTRA:
                items.append(name if self.builtin else
                             f"{'NULL::text' if name == 'headnote_model' else 'NULL::timestamptz'} AS {name}")
                continue
            column = self.column(name)
            kind = SOURCE_COLUMNS[name][1]
            if column is None:
                items.append(f"{_NULLS[kind]} AS {name}")
            elif kind == "date" and not self.builtin:
                items.append(f"{column}::date AS {name}")
            else:
                items.append(f"{column} AS {name}" if column != _quote(name) else name)
        where = "" if self.builtin else f" WHERE {self.column('id')} IS NOT NULL"
        return f"(SELECT {', '.join(items)} FROM {self.relation}{where})"

    def text_sha256_sql(self, alias: str = "k", column: str = "full_text") -> str:
        """SQL for the sha256 (hex) of a canonical text column of `alias`, '' for NULL — as
        `text_sha256` computes it in Python."""
        return f"encode(sha256(convert_to(coalesce({alias}.{column}, ''), 'UTF8')), 'hex')"


def text_sha256(text: str | None) -> str:
    """The sha256 (hex) of a text as stored (UTF-8), '' for None: `CaseSource.text_sha256_sql` in Python."""
    import hashlib

    return hashlib.sha256((text or "").encode("utf-8")).hexdigest()


Storage = Literal["vector", "halfvec"]
"""How a vector table stores each component: `vector` (float32, 4 bytes) or `halfvec` (float16, 2
bytes: half the table and index, searched with the same precision loss on both sides)."""


@dataclass(frozen=True)
class VectorTable:
    """The pgvector table vectors are written to: `case_embeddings` (ours) unless named, its
    `embedding` column `vector(dimensions)` or `halfvec(dimensions)` (`storage`)."""

    table: str | None = None
    dimensions: int = 1024
    storage: Storage = "vector"

    @classmethod
    def from_settings(cls, settings) -> VectorTable:
        if settings.embeddings_table:
            _qualified(settings.embeddings_table, setting="LEGAL_BATCH_EMBEDDINGS_TABLE")
        return cls(settings.embeddings_table or None, settings.embedding_dimensions,
                   getattr(settings, "embeddings_storage", "vector"))

    @property
    def column_type(self) -> str:
        """The embedding column's type: `vector(1024)`, `halfvec(1024)`."""
        return f"{self.storage}({self.dimensions})"

    @property
    def bytes_per_component(self) -> int:
        return 2 if self.storage == "halfvec" else 4

    @property
    def name(self) -> str:
        return DEFAULT_VECTOR_TABLE if self.table is None else ".".join(_qualified(self.table, setting=""))

    @property
    def relation(self) -> str:
        if self.table is None:
            return DEFAULT_VECTOR_TABLE
        schema, table = _qualified(self.table, setting="LEGAL_BATCH_EMBEDDINGS_TABLE")
        return f"{_quote(schema)}.{_quote(table)}"

    @property
    def index_name(self) -> str:
        """The HNSW index we build on a table of ours: `case_embeddings_hnsw`, `<table>_hnsw`."""
        base = DEFAULT_VECTOR_TABLE if self.table is None else _qualified(self.table, setting="")[1]
        return f"{base[:57]}_hnsw"

    def owned(self, conn: psycopg.Connection) -> bool:
        """Ours to index and resize: the default table, or one we created under the name given."""
        if self.table is None:
            return True
        comment = conn.execute("SELECT obj_description(to_regclass(%s), 'pg_class')", (self.relation,)).fetchone()
        return bool(comment and comment[0] == OWNED_COMMENT)


# -- checks -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Column:
    name: str
    type: str
    """`format_type`, e.g. `text`, `character varying(200)`, `vector(1024)`."""


def _columns(conn: psycopg.Connection, relation: str) -> dict[str, _Column] | None:
    oid = conn.execute("SELECT to_regclass(%s)::oid", (relation,)).fetchone()[0]
    if oid is None:
        return None
    rows = conn.execute("SELECT attname, format_type(atttypid, atttypmod) FROM pg_attribute"
                        " WHERE attrelid = %s AND attnum > 0 AND NOT attisdropped ORDER BY attnum", (oid,)).fetchall()
    return {name: _Column(name, kind) for name, kind in rows}


def stored_type(conn: psycopg.Connection, relation: str) -> str | None:
    """The type name of a table's `embedding` column (`vector`, `halfvec`); None without one."""
    row = conn.execute("SELECT t.typname::text FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid"
                       " WHERE a.attrelid = to_regclass(%s) AND a.attname = 'embedding' AND NOT a.attisdropped",
                       (relation,)).fetchone()
    return None if row is None else row[0]


def _base_type(kind: str) -> str:
    return kind.split("(")[0].strip()


def _unique_on(conn: psycopg.Connection, relation: str, columns: list[str]) -> bool:
    """Whether a primary key or unique index (without a predicate) covers exactly these columns."""
    return bool(conn.execute(
        "SELECT EXISTS (SELECT 1 FROM pg_index i WHERE i.indrelid = to_regclass(%s) AND i.indisunique"
        " AND i.indpred IS NULL AND (SELECT array_agg(a.attname::text ORDER BY a.attname) FROM pg_attribute a"
        "   WHERE a.attrelid = i.indrelid AND a.attnum = ANY(i.indkey)) = %s::text[]"
        " AND array_length(i.indkey::int2[], 1) = %s)",
        (relation, sorted(columns), len(columns))).fetchone()[0])


def check_source(conn: psycopg.Connection, source: CaseSource) -> None:
    """A `UserError` (one line: table, column, what to set) unless the source can be read: it
    exists, every mapped column exists with the right kind of type, and its ids are unique."""
    table_setting = "LEGAL_BATCH_SOURCE_TABLE"
    columns = _columns(conn, source.relation)
    if columns is None:
        if source.builtin:
            raise UserError("the built-in court_cases table is missing from our schema: run `legal-batch db "
                            "upgrade`, or set LEGAL_BATCH_SOURCE_TABLE to your table of cases")
        raise UserError(f"{table_setting}={source.table}: there is no table or view {source.name} in this "
                        "database; name an existing one (schema.table, or a table in public)")
    for canonical, column in source.columns.items():
        setting, kind = SOURCE_COLUMNS[canonical]
        found = columns.get(column)
        if found is None:
            if source.builtin:
                raise UserError(f"the built-in court_cases table has no column {column}: run `legal-batch db "
                                "upgrade`")
            listed = ", ".join(list(columns)[:20])
            raise UserError(f"{setting}={column}: {source.name} has no column {column} (it has: {listed}); set "
                            f"{setting} to one of its columns" + ("" if canonical in ("id", "full_text") else
                                                                  ", or unset it"))
        base = _base_type(found.type)
        wrong = ((kind == "uuid" and base != "uuid") or (kind == "text" and base not in _TEXT_TYPES)
                 or (kind == "date" and base not in _DATE_TYPES))
        if wrong and kind == "uuid":
            raise UserError(f"{setting}={column}: {source.name}.{column} is {found.type}, not uuid; case ids must "
                            f"be a unique uuid column — name one, or point {table_setting} at a view that selects "
                            f"md5({column}::text)::uuid AS id")
        if wrong:
            expected = "text (text, varchar or char)" if kind == "text" else "a date or timestamp"
            raise UserError(f"{setting}={column}: {source.name}.{column} is {found.type}, not {expected}; set "
                            f"{setting} to a column of that type")
    id_column = source.columns["id"]
    if not _unique_on(conn, source.relation, [id_column]):
        column, relation = _quote(id_column), source.relation
        duplicate = conn.execute(f"SELECT {column}::text, count(*) FROM {relation} WHERE {column} IS NOT NULL"
                                 " GROUP BY 1 HAVING count(*) > 1 LIMIT 1").fetchone()
        if duplicate is not None:
            raise UserError(f"LEGAL_BATCH_SOURCE_ID_COLUMN={id_column}: {source.name}.{id_column} is not unique "
                            f"({duplicate[1]} rows have id {duplicate[0]}); name a column whose values are unique")


_VECTOR_COLUMNS = (("case_id", ("uuid",), "uuid"), ("chunk_index", ("integer",), "integer"),
                   ("model", _TEXT_TYPES, "text"), ("embedding", ("vector", "halfvec"), "vector(N) or halfvec(N)"),
                   ("text_sha256", _TEXT_TYPES, "text"))


def create_statement(table: VectorTable) -> str:
    return (f"CREATE TABLE {table.relation} (case_id uuid NOT NULL, chunk_index integer NOT NULL, model text NOT NULL,"
            f" embedding {table.column_type} NOT NULL, text_sha256 text,"
            " created_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (case_id, chunk_index, model),"
            " FOREIGN KEY (case_id, chunk_index) REFERENCES case_chunks (case_id, chunk_index) ON DELETE CASCADE)")


def check_vector_table(conn: psycopg.Connection, table: VectorTable) -> None:
    """Make sure vectors of `table.dimensions` can be written to the table as `table.storage` (inside
    the caller's transaction): create it when a name was given for a table that does not exist;
    resize ours, or change its storage type, while it is empty; otherwise a `UserError` naming the
    column and what to set."""
    setting = "LEGAL_BATCH_EMBEDDINGS_TABLE"
    dims_setting = f"LEGAL_BATCH_EMBEDDING_DIMENSIONS={table.dimensions}"
    columns = _columns(conn, table.relation)
    if columns is None:
        if table.table is None:
            raise UserError("the case_embeddings table is missing from our schema: run `legal-batch db upgrade`")
        schema, _ = _qualified(table.table, setting=setting)
        if conn.execute("SELECT to_regnamespace(%s) IS NULL", (_quote(schema),)).fetchone()[0]:
            raise UserError(f"{setting}={table.table}: there is no schema {schema} to create the table in; create "
                            "it, or name a table in an existing schema")
        conn.execute(create_statement(table))
        conn.execute(f"COMMENT ON TABLE {table.relation} IS '{OWNED_COMMENT}'")
        return
    where = table.name
    for name, types, shown in _VECTOR_COLUMNS:
        found = columns.get(name)
        if found is None or _base_type(found.type) not in types:
            problem = "has no column" if found is None else f"has {name} of type {found.type}, not {shown}, in column"
            raise UserError(f"{setting}={table.table or DEFAULT_VECTOR_TABLE}: {where} {problem} {name}; vectors need "
                            f"(case_id uuid, chunk_index integer, model text, embedding {table.column_type}, "
                            "text_sha256 text) with a primary key on (case_id, chunk_index, model) — "
                            f"set {setting} to a table that does not exist yet and it is created so")
    if not _unique_on(conn, table.relation, ["case_id", "chunk_index", "model"]):
        raise UserError(f"{setting}={table.table}: {where} has no primary key or unique index on (case_id, "
                        "chunk_index, model), which writing vectors again (upsert) needs; add one, or set "
                        f"{setting} to a table that does not exist yet and it is created so")
    relation = table.relation
    kind = columns["embedding"].type
    ours = table.owned(conn)
    stored_as = _base_type(kind)
    if stored_as != table.storage:
        if ours and conn.execute(f"SELECT NOT EXISTS (SELECT 1 FROM {relation})").fetchone()[0]:
            _retype_empty(conn, table)
            return
        fix = (f"set LEGAL_BATCH_EMBEDDINGS_STORAGE={stored_as} (what it holds), or {setting} to a table that does "
               f"not exist yet (it is created with {table.column_type})")
        if ours:
            fix += ", or empty it with `legal-batch reset --flow embeddings`"
        raise UserError(f"LEGAL_BATCH_EMBEDDINGS_STORAGE={table.storage}: {where}.embedding is {kind}, not "
                        f"{table.storage}; {fix}")
    declared = int(kind[kind.index("(") + 1:-1]) if "(" in kind else None
    if declared == table.dimensions:
        return
    if declared is None:  # a vector column of any size: look at what it holds
        held = conn.execute(f"SELECT DISTINCT vector_dims(embedding) FROM (SELECT embedding FROM {relation}"
                            " LIMIT 1000) AS sample").fetchall()
        if all(dims == table.dimensions for (dims,) in held):
            return
        declared = next(dims for (dims,) in held if dims != table.dimensions)
    if ours and kind != table.storage and conn.execute(f"SELECT NOT EXISTS (SELECT 1 FROM {relation})").fetchone()[0]:
        _retype_empty(conn, table)
        return
    fix = (f"set LEGAL_BATCH_EMBEDDING_DIMENSIONS={declared} (the size it holds), or {setting} to a table that "
           f"does not exist yet (it is created with {table.column_type})")
    if ours:
        fix += ", or empty it with `legal-batch reset --flow embeddings`"
    raise UserError(f"{dims_setting}: {where}.embedding holds vectors of {declared} dimensions; {fix}")


def _retype_empty(conn: psycopg.Connection, table: VectorTable) -> None:
    """Give an empty table of ours the configured embedding type. Its HNSW index goes with the old
    type (an operator class is per type) and is built again after the next load."""
    view, relation, column_type = _sink_view(conn), table.relation, table.column_type
    conn.execute(f"DROP VIEW IF EXISTS {view}")
    for schema, index in conn.execute(
            "SELECT n.nspname::text, x.relname::text FROM pg_index i JOIN pg_class x ON x.oid = i.indexrelid"
            " JOIN pg_namespace n ON n.oid = x.relnamespace JOIN pg_am a ON a.oid = x.relam"
            " WHERE i.indrelid = to_regclass(%s) AND a.amname = 'hnsw'", (relation,)).fetchall():
        conn.execute(sql.SQL("DROP INDEX {}").format(sql.Identifier(schema, index)))
    conn.execute(f"ALTER TABLE {relation} ALTER COLUMN embedding TYPE {column_type} USING embedding::{column_type}")


def _sink_view(conn: psycopg.Connection) -> str:
    """`embedding_sink` qualified with our schema (first on the search path)."""
    return f"{_quote(conn.execute('SELECT current_schema()').fetchone()[0])}.{SINK_VIEW}"


def install_sink_view(conn: psycopg.Connection, table: VectorTable) -> None:
    """`embedding_sink` in our schema: the vector table in use, under one name for the queries that
    only read it (search, checks, `legal-batch verify`). Replaced only when the table changes."""
    view = _sink_view(conn)
    shape = {"table": table.name, "dimensions": table.dimensions}
    if table.storage != "vector":  # (the fingerprint of a `vector` table is the one it always had)
        shape["storage"] = table.storage
    fingerprint = f"legal_batch: {json.dumps(shape)}"
    current = conn.execute("SELECT obj_description(to_regclass(%s), 'pg_class')", (view,)).fetchone()[0]
    if current == fingerprint:
        return
    relation = table.relation
    conn.execute(f"DROP VIEW IF EXISTS {view}")
    conn.execute(f"CREATE VIEW {view} AS SELECT case_id, chunk_index, model, embedding, text_sha256 FROM {relation}")
    conn.execute(sql.SQL("COMMENT ON VIEW {} IS {}").format(sql.SQL(view), sql.Literal(fingerprint)))


MODEL_DIMENSIONS: dict[str, tuple[int, ...]] = {
    "amazon.titan-embed-text-v2:0": (256, 512, 1024),
    "text-embedding-3-small": (512, 1024, 1536),
    "text-embedding-3-large": (256, 512, 1024, 1536, 3072),
}
"""Vector sizes the embedding models make (text-embedding-3 shortens to any size up to its own:
1,536 or 3,072; these are the usual ones)."""
_MODEL_MAX = {"text-embedding-3-small": 1536, "text-embedding-3-large": 3072}


def _embedding_model(settings) -> str | None:
    """The configured embedding model, else the configured provider's default (known without a client)."""
    if settings.embedding_model:
        return settings.embedding_model
    if settings.embeddings_provider == "bedrock":
        from legal_batch.providers.bedrock import DEFAULT_EMBEDDING_MODEL

        return DEFAULT_EMBEDDING_MODEL
    if settings.embeddings_provider == "openai":
        from legal_batch.providers.openai import OpenAIProvider

        return OpenAIProvider.DEFAULT_MODELS["embeddings"]
    return None


def check_dimensions(settings) -> None:
    """A `UserError` when the embedding model cannot make vectors of `LEGAL_BATCH_EMBEDDING_DIMENSIONS`."""
    model = _embedding_model(settings)
    name = (model or "").split("/")[-1]
    sizes, dims = MODEL_DIMENSIONS.get(name), settings.embedding_dimensions
    if sizes is None:
        return
    largest = _MODEL_MAX.get(name)
    if dims in sizes or (largest is not None and dims <= largest):
        return
    shown = ", ".join(str(size) for size in sizes)
    limit = f"at most {largest:,} dimensions" if largest else f"vectors of {shown} dimensions only"
    raise UserError(f"LEGAL_BATCH_EMBEDDING_DIMENSIONS={dims}: {model} makes {limit}; set "
                    f"LEGAL_BATCH_EMBEDDING_DIMENSIONS to one of {shown}")


def tables_key(settings) -> tuple:
    """What `check_tables` depends on: a process checks again when any of it changes."""
    source = CaseSource.from_settings(settings)
    return (settings.schema_name, source.table, tuple(sorted(source.columns.items())),
            VectorTable.from_settings(settings))


def check_tables(conn: psycopg.Connection, settings) -> tuple[CaseSource, VectorTable]:
    """The start-up check of the source and the vector table the settings name (see the module
    docstring); creates or resizes the vector table where it may and points `embedding_sink` at it.
    Raises `UserError`; nothing is written when it does."""
    check_dimensions(settings)
    source = CaseSource.from_settings(settings)
    vectors = VectorTable.from_settings(settings)
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK,))
        check_source(conn, source)
        check_vector_table(conn, vectors)
        install_sink_view(conn, vectors)
    return source, vectors
