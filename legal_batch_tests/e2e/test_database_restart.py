"""A long `embeddings run --wait` survives a restart of its Postgres server: it says so in one line,
reconnects with bounded back-off, and finishes with every chunk embedded once and no job submitted
twice. The server restarted is one this test started for itself (never the shared test server)."""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from pathlib import Path

from legal_batch.db import connect, embedded
from legal_batch_tests.e2e.support import (
    CLI,
    assert_every_chunk_embedded_once,
    isolated_env,
    local_jobs,
    run,
    scalar,
    start,
)


def test_a_waiting_run_rides_out_a_database_restart(tmp_path: Path) -> None:
    # the server runs as an unprivileged user when tests run as root: its folder must be reachable
    # for that user, which pytest's private tmp_path is not
    server_home = Path(tempfile.mkdtemp(prefix="lb_restart_"))
    server_home.chmod(0o755)
    url = embedded.start(server_home)
    try:
        env = isolated_env(database_url=url, root=tmp_path, LEGAL_BATCH_SHARD_MAX_RECORDS="60")
        code, output = run([*CLI, "demo", "seed", "--cases", "12"], env)
        assert code == 0, output
        process = start([*CLI, "embeddings", "run", "--wait", "--poll-interval", "2", "--timeout", "240"], env)
        lines: list[str] = []
        reader = threading.Thread(target=lambda: lines.extend(
            raw.decode("utf-8", "replace") for raw in iter(process.stdout.readline, b"")), daemon=True)
        reader.start()
        deadline = time.monotonic() + 120
        while not any("open" in line and "next poll" in line for line in lines):
            assert time.monotonic() < deadline and process.poll() is None, "".join(lines)
            time.sleep(0.2)

        assert embedded.stop(server_home)
        time.sleep(8)  # long enough for the waiting run to find the database gone
        embedded.start(server_home)

        assert process.wait(timeout=300) == 0, "".join(lines)
        reader.join(timeout=10)
        output = "".join(lines)
        assert "database unavailable since" in output and "reconnecting in" in output, output
        assert "database reachable again" in output, output
        assert "Traceback" not in output and "AdminShutdown" not in output, output
        with connect(url, schema="legal_batch") as conn:
            chunks = assert_every_chunk_embedded_once(conn)
            shards = scalar(conn, "SELECT count(*) FROM batch_jobs WHERE state = 'ingested'")
            tokens = [t for (t,) in conn.execute("SELECT client_token FROM batch_jobs WHERE mode = 'batch'")]
        assert chunks > 60 and shards >= 2
        jobs = local_jobs(Path(env["LEGAL_BATCH_HOME"]))
        assert sorted(j["metadata"]["client_token"] for j in jobs) == sorted(tokens), "one provider job per shard"
    finally:
        embedded.stop(server_home)
        shutil.rmtree(server_home, ignore_errors=True)
