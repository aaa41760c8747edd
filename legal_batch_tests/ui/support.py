"""A demo Dagster instance and the project's UI on it, the way a user starts it (`make dev`):
used by the GraphQL test (what the UI shows) and by `make ui-check` (screenshots in Chromium)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DEMO_ENV = {"LEGAL_BATCH_SHARD_MAX_RECORDS": "25",
            "LEGAL_BATCH_PRICES": '{"local-lexical-v1": [0.02, 0], "local-extractive-v1": [0.15, 0.6]}'}
"""Small shards, so the demo has several partitions per flow; and the local models priced as
text-embedding-3-small and gpt-4o-mini, so the spend figures move as they would with a real provider."""


def write_instance_config(dagster_home: Path) -> None:
    dagster_home.mkdir(parents=True, exist_ok=True)
    (dagster_home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")


def run_demo(dagster_home: Path, *, cases: int = 4) -> dict[str, list[str]]:
    """Seed `cases` judgments and run the embeddings and headnotes flows to the end on the local
    provider, against the database and home in the environment; returns the shards of each flow."""
    import dagster as dg

    from legal_batch.core import ledger
    from legal_batch.core.seed import seed_demo_cases
    from legal_batch.definitions import FLOWS_BY_NAME, defs
    from legal_batch.driver import FlowDriver
    from legal_batch.resources import DatabaseResource

    write_instance_config(dagster_home)
    shards: dict[str, list[str]] = {}
    with DatabaseResource().connect() as conn:
        seed_demo_cases(conn, cases=cases)
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        for flow in ("embeddings", "headnotes"):
            run = FlowDriver(FLOWS_BY_NAME[flow], defs, flow=flow, echo=lambda _: None,
                             dagster_instance=instance).run(wait=True, poll_interval=0)
            if run.failed_runs:
                raise RuntimeError(f"the demo's {flow} run failed: {run.report()}")
            with DatabaseResource().connect() as conn:
                shards[flow] = [job.shard_key for job in ledger.list_jobs(conn, flow=flow)]
    return shards


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@dataclass
class UiServer:
    url: str
    process: subprocess.Popen
    log_path: Path

    def graphql(self, query: str, variables: dict | None = None) -> dict:
        body = json.dumps({"query": query, "variables": variables or {}}).encode()
        request = urllib.request.Request(f"{self.url}/graphql", data=body,
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            answer = json.loads(response.read())
        if answer.get("errors"):
            raise AssertionError(f"GraphQL errors: {answer['errors']}")
        return answer["data"]

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


LOCATION_STATUS = "{ workspaceOrError { ... on Workspace { locationEntries { name loadStatus " \
                  "locationOrLoadError { __typename ... on PythonError { message } } } } } }"


@contextlib.contextmanager
def ui_server(env: dict[str, str], log_path: Path, *, timeout_s: float = 240.0) -> Iterator[UiServer]:
    """`python -m legal_batch.ui` (what `make dev` runs: `dg dev`, webserver and daemon) on a free port
    from the project folder with `env`; yields once the code location has loaded, and stops the
    server and every process it started on exit (SIGINT, as Ctrl-C would; then its process group)."""
    port = free_port()
    log = log_path.open("wb")
    process = subprocess.Popen([sys.executable, "-m", "legal_batch.ui", "--port", str(port)], cwd=ROOT, env=env,
                               stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    server = UiServer(f"http://127.0.0.1:{port}", process, log_path)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"the UI exited with {process.returncode}:\n{server.log()[-3000:]}")
            with contextlib.suppress(urllib.error.URLError, ConnectionError, TimeoutError, AssertionError):
                entries = server.graphql(LOCATION_STATUS)["workspaceOrError"]["locationEntries"]
                if entries and all(e["loadStatus"] == "LOADED" for e in entries):
                    errors = [e for e in entries if e["locationOrLoadError"]["__typename"] == "PythonError"]
                    if errors:
                        raise RuntimeError(f"the code location failed to load: {errors}")
                    break
            if time.monotonic() > deadline:
                raise TimeoutError(f"the UI did not load within {timeout_s:.0f} s:\n{server.log()[-3000:]}")
            time.sleep(1)
        yield server
    finally:
        stop(process)
        log.close()


def stop(process: subprocess.Popen, *, grace_s: float = 60.0) -> None:
    """Ctrl-C for `dg dev` (it stops its webserver, daemon and code servers), then its process group."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signal.SIGINT)
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)  # anything of the group left behind
