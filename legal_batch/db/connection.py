"""Connections to the configured Postgres, or to the embedded server when none is configured."""

from __future__ import annotations

import psycopg
from pgvector.psycopg import register_vector

from legal_batch.db import embedded
from legal_batch.settings import Settings


class DatabaseError(RuntimeError):
    """The database cannot be used as it is; the message says what to do."""


def database_url(settings: Settings) -> str:
    """`LEGAL_BATCH_DATABASE_URL` when set (nothing is started); else the embedded server's URL."""
    if settings.database_url:
        return settings.database_url
    return embedded.start(settings.home_dir)


def connect(url: str, *, autocommit: bool = True) -> psycopg.Connection:
    """A psycopg 3 connection with pgvector's types registered; autocommit, so every `with
    conn.transaction()` block is a real transaction (not a savepoint in an implicit one)."""
    try:
        conn = psycopg.connect(url, autocommit=autocommit)
    except psycopg.OperationalError as exc:
        raise DatabaseError(
            f"cannot connect to Postgres ({_redact(url)}): {exc}. Check LEGAL_BATCH_DATABASE_URL, "
            "or unset it to use the embedded server."
        ) from exc
    try:
        register_vector(conn)
    except psycopg.ProgrammingError as exc:
        conn.close()
        raise DatabaseError(
            f"the pgvector extension is not installed in {_redact(url)}: run `legal-batch db upgrade` "
            "as a user allowed to CREATE EXTENSION vector, or install pgvector on that server."
        ) from exc
    return conn


def _redact(url: str) -> str:
    """The URL without its password."""
    scheme, sep, rest = url.partition("://")
    creds, at, host = rest.rpartition("@")
    if not at:
        return url
    user = creds.split(":", 1)[0]
    return f"{scheme}{sep}{user}:***@{host}" if ":" in creds else url
