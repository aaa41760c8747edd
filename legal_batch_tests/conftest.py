"""Fixtures: a real Postgres + pgvector (the embedded server, or LEGAL_BATCH_TEST_DATABASE_URL), one
fresh database per test cloned from a migrated template, and an isolated LEGAL_BATCH_HOME."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import dagster as dg
import psycopg
import pytest

from legal_batch.core.user_tables import check_tables
from legal_batch.db import connect, embedded, upgrade
from legal_batch.settings import Settings, get_settings

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE_DB = f"lb_test_template_{uuid.uuid4().hex[:8]}"  # per test session: sessions may run at once


def _with_database(url: str, name: str) -> str:
    base, _, query = url.partition("?")
    base = base.rsplit("/", 1)[0]
    return f"{base}/{name}" + (f"?{query}" if query else "")


@pytest.fixture(scope="session")
def pg_admin_url() -> str:
    """A server to create test databases on: LEGAL_BATCH_TEST_DATABASE_URL, else the embedded one
    under `.legal_batch/test` (started on demand, kept running between test sessions)."""
    configured = os.environ.get("LEGAL_BATCH_TEST_DATABASE_URL")
    if configured:
        return configured
    home = ROOT / ".legal_batch" / "test"
    home.mkdir(parents=True, exist_ok=True)
    return embedded.start(home)


@pytest.fixture(scope="session")
def template_url(pg_admin_url: str) -> Iterator[str]:
    """A database with every migration applied, cloned for each test (fast, and always current)."""
    with psycopg.connect(pg_admin_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{TEMPLATE_DB}"')
    url = _with_database(pg_admin_url, TEMPLATE_DB)
    upgrade(url, schema="legal_batch")
    with connect(url, schema="legal_batch") as conn:  # the built-in source and case_embeddings
        check_tables(conn, Settings(_env_file=None, schema_name="legal_batch", source_table=None,
                                    embeddings_table=None, embedding_dimensions=1024))
    yield url
    with psycopg.connect(pg_admin_url, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{TEMPLATE_DB}" WITH (FORCE)')


@pytest.fixture
def database_url(pg_admin_url: str, template_url: str) -> Iterator[str]:
    name = f"lb_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(pg_admin_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{TEMPLATE_DB}"')
    yield _with_database(pg_admin_url, name)
    with psycopg.connect(pg_admin_url, autocommit=True) as admin:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def lb_env(tmp_path: Path, database_url: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[Settings]:
    """LEGAL_BATCH_* pointing at a fresh database and a temporary home; local providers by default."""
    for key in list(os.environ):
        if key.startswith("LEGAL_BATCH_") and key != "LEGAL_BATCH_TEST_DATABASE_URL":
            monkeypatch.delenv(key)
    monkeypatch.setenv("LEGAL_BATCH_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("LEGAL_BATCH_DATABASE_URL", database_url)
    monkeypatch.chdir(tmp_path)  # no stray .env from the project root
    settings = get_settings(fresh=True)
    yield settings
    get_settings(fresh=True)


@pytest.fixture
def conn(lb_env: Settings) -> Iterator[psycopg.Connection]:
    connection = connect(lb_env.database_url or "")
    yield connection
    connection.close()


@pytest.fixture
def dagster_instance() -> Iterator[dg.DagsterInstance]:
    with dg.instance_for_test() as instance:
        yield instance
