"""Versioned SQL migrations (`db/migrations/NNNN_name.sql`), applied once each, in order.

A released migration is never edited; a change is a new file. Applying is idempotent and safe to
race: an advisory lock serialises concurrent upgrades.
"""

from __future__ import annotations

from importlib import resources

import psycopg

from legal_batch.db.connection import DatabaseError, _redact

_LOCK_ID = 0x4C42_0001  # advisory lock key for migrations


def migration_files() -> list[tuple[str, str]]:
    """(version, sql) for every migration shipped with the package, in order."""
    folder = resources.files("legal_batch.db") / "migrations"
    names = sorted(p.name for p in folder.iterdir() if p.name.endswith(".sql"))
    return [(name.removesuffix(".sql"), (folder / name).read_text(encoding="utf-8")) for name in names]


def upgrade(url: str) -> list[str]:
    """Apply pending migrations; returns the versions applied now."""
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
