"""Connections to the configured Postgres, or to the embedded server when none is configured."""

from __future__ import annotations

import psycopg
from pgvector.psycopg import register_vector
from psycopg import sql

from legal_batch.db import embedded
from legal_batch.settings import Settings, get_settings


class DatabaseError(RuntimeError):
    """The database cannot be used as it is; the message says what to do."""


def database_url(settings: Settings) -> str:
    """`LEGAL_BATCH_DATABASE_URL` when set (nothing is started); else the embedded server's URL."""
    if settings.database_url:
        return settings.database_url
    return embedded.start(settings.home_dir)


def connect(url: str, *, autocommit: bool = True, schema: str | None = None) -> psycopg.Connection:
    """A psycopg 3 connection with pgvector's types registered and our schema (`schema`, else
    `LEGAL_BATCH_SCHEMA`: `legal_batch`) first on its `search_path`, so our tables are found by their
    plain names and a user's tables of the same names (in `public`) are never touched.
    Autocommit, so every `with conn.transaction()` block is a real transaction (not a savepoint in
    an implicit one)."""
    try:
        conn = psycopg.connect(url, autocommit=autocommit)
    except psycopg.OperationalError as exc:
        raise DatabaseError(
            f"cannot connect to Postgres ({_redact(url)}): {exc}. Check LEGAL_BATCH_DATABASE_URL, "
            "or unset it to use the embedded server."
        ) from exc
    try:
        set_search_path(conn, schema or get_settings().schema_name)
        register_vector(conn)
    except psycopg.ProgrammingError as exc:
        conn.close()
        raise DatabaseError(
            f"the pgvector extension is not installed in {_redact(url)}: run `legal-batch db upgrade` "
            "as a user allowed to CREATE EXTENSION vector, or install pgvector on that server."
        ) from exc
    return conn


def set_search_path(conn: psycopg.Connection, schema: str) -> None:
    """Our schema first, then the server's own search path (`"$user", public` unless configured
    otherwise: where the pgvector extension and users' tables are)."""
    conn.execute("SELECT set_config('search_path', %s || ', ' || current_setting('search_path'), false)",
                 (sql.Identifier(schema).as_string(conn),))
    if not conn.autocommit:
        conn.commit()


def _redact(url: str) -> str:
    """The URL without its password."""
    scheme, sep, rest = url.partition("://")
    creds, at, host = rest.rpartition("@")
    if not at:
        return url
    user = creds.split(":", 1)[0]
    return f"{scheme}{sep}{user}:***@{host}" if ":" in creds else url
