"""The throwaway databases and home every benchmark runs in, and the small helpers they share.

`Bench` takes `.legal_batch/bench/bench.lock` (two runs on one server would measure each other),
starts (or joins) the embedded Postgres + pgvector under `.legal_batch/bench`, creates databases
`lb_bench_<random>_<suffix>` on it and a temporary `LEGAL_BATCH_HOME`, runs each measured stage in a
fresh Python process (`SCRIPT --stage NAME --params JSON --out FILE`, so each peak RSS is that stage's
own), and at `close` drops the databases, deletes the home, and stops the server if it started it.
`parser` and `ran_stage` give each benchmark's command line the options that protocol needs.
"""

from __future__ import annotations

import argparse
import fcntl
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH_HOME = ROOT / ".legal_batch" / "bench"
MB = 1024 * 1024

Figures = dict[str, float | int | str]


def parser(doc: str, stages: dict) -> argparse.ArgumentParser:
    """A benchmark's argument parser (described by the first paragraph of `doc`), with `--keep` and the
    hidden `--stage NAME --params JSON --out FILE` that `Bench.stage` starts its child processes with."""
    made = argparse.ArgumentParser(description=doc.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    made.add_argument("--keep", action="store_true", help="keep the database and home (for debugging)")
    made.add_argument("--stage", choices=sorted(stages), help=argparse.SUPPRESS)
    made.add_argument("--params", default="{}", help=argparse.SUPPRESS)
    made.add_argument("--out", help=argparse.SUPPRESS)
    return made


def ran_stage(args: argparse.Namespace, stages: dict) -> bool:
    """In a child process started by `Bench.stage`: run its stage and write the figures to `--out`."""
    if not args.stage:
        return False
    Path(args.out).write_text(json.dumps(stages[args.stage](json.loads(args.params))))
    return True


def write_results(path: Path, figures: Figures) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(figures, indent=2) + "\n")
    log(f"figures written to {path}")


def log(message: str) -> None:
    print(f"[bench {datetime.now():%H:%M:%S}] {message}", file=sys.stderr, flush=True)


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (Linux reports KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def rate(count: float, seconds: float) -> float:
    return round(count / seconds, 1) if seconds > 0 else 0.0


def database_url(admin_url: str, name: str) -> str:
    base, _, query = admin_url.partition("?")
    return f"{base.rsplit('/', 1)[0]}/{name}" + (f"?{query}" if query else "")


class Bench:
    """Creates the throwaway databases and home, runs each stage in a child process, cleans up.
    `SCRIPT` is the benchmark whose `--stage` the child runs (each benchmark's subclass names its own)."""

    SCRIPT: Path

    def __init__(self, *, keep: bool) -> None:
        from legal_batch.db import embedded

        BENCH_HOME.mkdir(parents=True, exist_ok=True)
        self._lock = (BENCH_HOME / "bench.lock").open("w")
        try:
            fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # two runs on one server would measure each other
            log(f"another benchmark run holds {BENCH_HOME / 'bench.lock'}; waiting for it to finish")
            fcntl.flock(self._lock, fcntl.LOCK_EX)
        self.started_server = not embedded.is_running(BENCH_HOME)
        """Stopped again by `close` (a server someone else started is left running)."""
        self.admin_url = embedded.start(BENCH_HOME)
        self.prefix = f"lb_bench_{uuid.uuid4().hex[:10]}"
        self.home = Path(tempfile.mkdtemp(prefix="lb_bench_home_"))
        self.databases: list[str] = []
        self.keep = keep

    def database(self, suffix: str, *, migrate: bool) -> str:
        import psycopg

        from legal_batch.db import upgrade

        name = f"{self.prefix}_{suffix}"
        with psycopg.connect(self.admin_url, autocommit=True) as admin:
            admin.execute(f'CREATE DATABASE "{name}"')
        self.databases.append(name)
        url = database_url(self.admin_url, name)
        if migrate:
            upgrade(url)
        return url

    def stage(self, name: str, url: str, params: dict) -> dict:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("LEGAL_BATCH_", "DAGSTER_"))}
        env.update(LEGAL_BATCH_HOME=str(self.home), LEGAL_BATCH_DATABASE_URL=url)
        out = self.home / f"stage-{name}-{uuid.uuid4().hex[:6]}.json"
        log(f"stage {name} {json.dumps({k: v for k, v in params.items() if k != 'index_def'})} "
            f"(load average {os.getloadavg()[0]:.2f})")
        started = time.perf_counter()
        subprocess.run([sys.executable, str(self.SCRIPT), "--stage", name, "--params",
                        json.dumps(params), "--out", str(out)], check=True, env=env, cwd=self.home,
                       stdout=sys.stderr)
        log(f"stage {name} took {time.perf_counter() - started:.1f} s")
        return json.loads(out.read_text())

    def close(self) -> None:
        import psycopg

        from legal_batch.db import embedded

        if self.keep:
            log(f"kept databases {self.databases} and home {self.home}, and the server under {BENCH_HOME}")
            self._lock.close()
            return
        try:
            with psycopg.connect(self.admin_url, autocommit=True) as admin:
                for name in self.databases:
                    admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            shutil.rmtree(self.home, ignore_errors=True)
            if self.started_server and embedded.stop(BENCH_HOME):
                log(f"stopped the embedded server under {BENCH_HOME}")
            self._lock.close()
