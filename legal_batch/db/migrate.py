"""Versioned SQL migrations (`db/migrations/NNNN_name.sql`), applied once each, in order.

A released migration is never edited; a change is a new file. Applying is idempotent and safe to
race: an advisory lock serialises concurrent upgrades.
"""

from __future__ import annotations

from importlib import resources

import psycopg
from psycopg.sql import SQL, Identifier

from legal_batch.db.connection import DatabaseError, _redact, set_search_path
from legal_batch.settings import get_settings

_LOCK_ID = 0x4C42_0001  # advisory lock key for migrations


def migration_files() -> list[tuple[str, str]]:
    """(version, sql) for every migration shipped with the package, in order."""
    folder = resources.files("legal_batch.db") / "migrations"
    names = sorted(p.name for p in folder.iterdir() if p.name.endswith(".sql"))
    return [(name.removesuffix(".sql"), (folder / name).read_text(encoding="utf-8")) for name in names]


def upgrade(url: str, *, schema: str | None = None) -> list[str]:
    """Apply pending migrations in our schema (`schema`, else `LEGAL_BATCH_SCHEMA`), creating it if
    needed; returns the versions applied now.

    Migrations run with our schema first on the search path, so the tables they create land there.
    A database migrated before our tables had a schema of their own keeps its migrations record in
    `public` until migration 0005 moves it (with the ledger and the chunks) into ours."""
    schema = schema or get_settings().schema_name
    applied_now: list[str] = []
    try:
        conn = psycopg.connect(url, autocommit=True)
    except psycopg.OperationalError as exc:
        raise DatabaseError(
            f"cannot connect to Postgres ({_redact(url)}) to migrate: {' '.join(str(exc).split())} — check "
            "LEGAL_BATCH_DATABASE_URL, or unset it to use the embedded server"
        ) from exc
    with conn:
        conn.execute("SELECT pg_advisory_lock(%s)", (_LOCK_ID,))
        try:
            available = conn.execute(
                "SELECT 1 FROM pg_available_extensions WHERE name = 'vector'"
            ).fetchone()
            if not available:
                raise DatabaseError(
                    "the pgvector extension is not available on this Postgres server; install pgvector "
                    "(https://github.com/pgvector/pgvector) or unset LEGAL_BATCH_DATABASE_URL to use "
                    "the embedded server, which ships it."
                )
            conn.execute("CREATE EXTENSION IF NOT EXISTS vector")  # where extensions go (not our schema)
            _create_schema(conn, schema, url)
            set_search_path(conn, schema)
            ours = conn.execute("SELECT to_regclass(%s) IS NOT NULL",
                                (f"{Identifier(schema).as_string(conn)}.schema_migrations",)).fetchone()[0]
            legacy = conn.execute("SELECT to_regclass('public.schema_migrations') IS NOT NULL").fetchone()[0]
            if not ours and not (legacy and schema != "public"):
                conn.execute(
                    "CREATE TABLE IF NOT EXISTS schema_migrations ("
                    " version text PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
                )
            done = {row[0] for row in conn.execute("SELECT version FROM schema_migrations")}
            for version, sql in migration_files():
                if version in done:
                    continue
                with conn.transaction():
                    conn.execute(sql)
                    conn.execute("INSERT INTO schema_migrations (version) VALUES (%s)", (version,))
                applied_now.append(version)
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (_LOCK_ID,))
    return applied_now


def _create_schema(conn: psycopg.Connection, schema: str, url: str) -> None:
    try:
        conn.execute(SQL("CREATE SCHEMA IF NOT EXISTS {}").format(Identifier(schema)))
    except psycopg.errors.InsufficientPrivilege as exc:
        raise DatabaseError(
            f"cannot create the schema {schema} for our tables in {_redact(url)} ({' '.join(str(exc).split())}): "
            f"create it for this user (CREATE SCHEMA {schema} AUTHORIZATION <user>), or set LEGAL_BATCH_SCHEMA to a "
            "schema this user owns"
        ) from exc
