"""Fixtures of the fault-injection suite: extra databases for scenarios that run side by side."""

from __future__ import annotations

import shutil
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import psycopg
import pytest

from legal_batch_tests.conftest import TEMPLATE_DB, _with_database


@pytest.fixture(scope="module")
def make_database(pg_admin_url: str, template_url: str) -> Iterator[Callable[[], str]]:
    """A factory of fresh, migrated databases (cloned from the template); all dropped at the end."""
    names: list[str] = []

    def make() -> str:
        name = f"lb_test_{uuid.uuid4().hex[:12]}"
        with psycopg.connect(pg_admin_url, autocommit=True) as admin:
            admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{TEMPLATE_DB}"')
        names.append(name)
        return _with_database(pg_admin_url, name)

    yield make
    with psycopg.connect(pg_admin_url, autocommit=True) as admin:
        for name in names:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="module")
def scratch_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A folder for subprocess state (Dagster's SQLite storage fsyncs a lot): in memory (/dev/shm)
    where the machine has it, else a pytest temp folder; removed at the end of the module."""
    shm = Path("/dev/shm")
    if shm.is_dir():
        path = Path(tempfile.mkdtemp(prefix="lb-e2e-", dir=shm))
        yield path
        shutil.rmtree(path, ignore_errors=True)
    else:
        yield tmp_path_factory.mktemp("scratch")
