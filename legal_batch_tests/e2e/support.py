"""Shared helpers of the fault-injection suite: the CLI in a subprocess, and the nothing-lost /
nothing-paid-twice checks read from Postgres and from what the provider received."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import orjson
import psycopg
from typer.testing import CliRunner

CLI = [sys.executable, "-m", "legal_batch.cli"]
RUN = [*CLI, "embeddings", "run", "--wait", "--poll-interval", "0", "--timeout", "90"]


def cli_env(root: Path, **extra: str) -> dict[str, str]:
    """The test's environment (LEGAL_BATCH_* from `lb_env`) with a Dagster home under `root`, no crash point."""
    env = {k: v for k, v in os.environ.items() if k != "LEGAL_BATCH_CRASH_AT"}
    env.update(DAGSTER_HOME=str(dagster_home_dir(root)), PYTHONUNBUFFERED="1", **extra)
    return env


def dagster_home_dir(root: Path) -> Path:
    """A Dagster home for a CLI subprocess: SQLite run and event storage, telemetry off."""
    home = root / "dagster"
    home.mkdir(parents=True, exist_ok=True)
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    return home


def isolated_env(*, database_url: str, root: Path, **extra: str) -> dict[str, str]:
    """An environment of its own (database, LEGAL_BATCH_HOME and DAGSTER_HOME under `root`) for a
    scenario that runs beside others; no LEGAL_BATCH_* variable of this process leaks in."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEGAL_BATCH_") and k != "DAGSTER_HOME"}
    env.update(LEGAL_BATCH_DATABASE_URL=database_url, LEGAL_BATCH_HOME=str(root / "home"),
               DAGSTER_HOME=str(dagster_home_dir(root)), PYTHONUNBUFFERED="1", **extra)
    return env


def start(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    """Start in the scenario's folder (never the project root: its `.env` must not leak in)."""
    cwd = Path(env["DAGSTER_HOME"]).parent
    return subprocess.Popen(args, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def finish(process: subprocess.Popen, timeout: float = 150) -> tuple[int, str]:
    output, _ = process.communicate(timeout=timeout)
    return process.returncode, output.decode("utf-8", "replace")


def run(args: list[str], env: dict[str, str], timeout: float = 150) -> tuple[int, str]:
    return finish(start(args, env), timeout)


def scalar(conn: psycopg.Connection, sql: str, *params: object) -> object:
    return conn.execute(sql, params).fetchone()[0]


def verify_cli() -> tuple[int, str]:
    """`legal-batch verify` (in this process: the same command, without another interpreter start-up)."""
    from legal_batch.cli import app
    from legal_batch.settings import get_settings

    get_settings(fresh=True)
    result = CliRunner().invoke(app, ["verify"])
    if result.exception is not None and not isinstance(result.exception, SystemExit):  # shown in the failure
        import traceback

        return result.exit_code, result.output + "".join(traceback.format_exception(result.exception))
    return result.exit_code, result.output


def assert_every_chunk_embedded_once(conn: psycopg.Connection) -> int:
    """Every chunk has exactly one vector and one `done` item; returns the number of chunks."""
    chunks = scalar(conn, "SELECT count(*) FROM case_chunks")
    assert chunks > 0
    assert scalar(conn, "SELECT count(*) FROM case_embeddings") == chunks
    assert scalar(conn, "SELECT count(DISTINCT (case_id, chunk_index)) FROM case_embeddings") == chunks
    assert scalar(conn, "SELECT count(*) FROM case_chunks c WHERE NOT EXISTS (SELECT 1 FROM case_embeddings e"
                        " WHERE e.case_id = c.case_id AND e.chunk_index = c.chunk_index)") == 0
    states = dict(conn.execute("SELECT state, count(*) FROM batch_items WHERE flow = 'embeddings'"
                               " GROUP BY state").fetchall())
    assert states == {"done": chunks}, states
    return chunks


def local_jobs(home: Path) -> list[dict]:
    """Every job the local provider ever created (its folders under `$LEGAL_BATCH_HOME/local_provider`)."""
    return [orjson.loads(p.read_bytes()) for p in sorted((home / "local_provider").glob("*/job.json"))]


def assert_one_provider_job_per_shard(conn: psycopg.Connection, tokens: list[str]) -> int:
    """`tokens`: the client token of every job the provider holds. Each ledger shard has exactly one,
    and the provider holds none that the ledger does not know. Returns the number of shards."""
    per_token = Counter(tokens)
    duplicated = {token: n for token, n in per_token.items() if n != 1}
    assert not duplicated, f"shards submitted more than once: {duplicated}"
    ledger = dict(conn.execute("SELECT client_token, provider_job_id FROM batch_jobs WHERE flow = 'embeddings'"
                               " AND provider_job_id IS NOT NULL").fetchall())
    assert set(per_token) == set(ledger), "provider jobs and ledger jobs differ"
    assert scalar(conn, "SELECT count(*) FROM batch_jobs WHERE flow = 'embeddings' AND state <> 'ingested'") == 0
    return len(ledger)


def assert_each_item_in_one_local_job(home: Path, conn: psycopg.Connection) -> int:
    """No custom id was sent in two provider jobs (nothing paid twice); returns the ids sent."""
    sent: Counter[str] = Counter()
    for path in (home / "local_provider").glob("*/input.jsonl"):
        for line in path.read_bytes().splitlines():
            if line.strip():
                sent[orjson.loads(line)["custom_id"]] += 1
    twice = {cid: n for cid, n in sent.items() if n > 1}
    assert not twice, f"items sent in more than one job: {list(twice)[:5]}"
    ids = {row[0] for row in conn.execute("SELECT custom_id FROM batch_items WHERE flow = 'embeddings'")}
    assert set(sent) == ids
    return len(sent)
