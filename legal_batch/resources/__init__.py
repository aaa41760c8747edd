"""Dagster resources: the database, the file store and the providers, configured from the environment."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import dagster as dg
import psycopg

from legal_batch.core.user_tables import check_tables, tables_key
from legal_batch.db import connect, database_url, upgrade
from legal_batch.providers.base import BatchProvider
from legal_batch.resources.providers import make_provider
from legal_batch.settings import Settings, get_settings

_UPGRADED: set[tuple] = set()


class DatabaseResource(dg.ConfigurableResource):
    """Postgres with pgvector: `LEGAL_BATCH_DATABASE_URL`, or the embedded server when unset."""

    url: str | None = None

    def resolved_url(self) -> str:
        return self.url or database_url(get_settings())

    @contextmanager
    def connect(self) -> Iterator[psycopg.Connection]:
        """A connection to an up-to-date schema (migrations are applied, and the source and vector
        tables the settings name are checked, once per process: `user_tables.check_tables`)."""
        url = self.resolved_url()
        settings = get_settings()
        key = (url, tables_key(settings))
        if key not in _UPGRADED:
            upgrade(url, schema=settings.schema_name)
        conn = connect(url, schema=settings.schema_name)
        try:
            if key not in _UPGRADED:
                check_tables(conn, settings)
                _UPGRADED.add(key)
            yield conn
        finally:
            conn.close()


class FileStoreResource(dg.ConfigurableResource):
    """Where request and output files live locally (`$LEGAL_BATCH_HOME/files` by default)."""

    root: str | None = None

    def path(self) -> Path:
        path = Path(self.root) if self.root else get_settings().home_dir / "files"
        path.mkdir(parents=True, exist_ok=True)
        return path


class ProvidersResource(dg.ConfigurableResource):
    """The provider each flow uses (`LEGAL_BATCH_<FLOW>_PROVIDER`), and any provider by name for
    jobs that were submitted under another setting."""

    def named(self, name: str) -> BatchProvider:
        return make_provider(name, get_settings())


__all__ = ["ProvidersResource", "DatabaseResource", "FileStoreResource", "Settings", "get_settings"]
