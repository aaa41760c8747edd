"""Two planners, two request-file writers, two submitters, two pollers and two ingesters racing on
the same shards — as threads with their own connections, and as two `legal-batch embeddings run
--wait` processes started together — never duplicate: one provider job per shard, every item in
one job, every chunk embedded once, and `verify` passes. The locking is Postgres's (advisory locks,
row locks, SKIP LOCKED), never an in-process lock."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import orjson
import psycopg

from legal_batch.core import batch, ledger
from legal_batch.core.seed import seed_demo_cases
from legal_batch.core.verify import verify
from legal_batch.db import connect
from legal_batch.flows.embeddings.flow import DONE_WITHOUT_RESULT_SQL, EmbeddingsFlow, sync_chunks
from legal_batch.providers.base import JobStatus, SubmittedJob
from legal_batch.providers.local import LocalProvider
from legal_batch_tests.e2e.support import (
    RUN,
    assert_each_item_in_one_local_job,
    assert_every_chunk_embedded_once,
    assert_one_provider_job_per_shard,
    cli_env,
    finish,
    local_jobs,
    start,
    verify_cli,
)

T = TypeVar("T")


class SlowLocalProvider(LocalProvider):
    """The local provider with a pause inside submit, poll and download, so that racing callers
    really overlap (a slow network, not a mock: the work is the real provider's)."""

    pause = 0.25

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.polls: list[tuple[str, float, float]] = []
        """(job id, start, end) of every poll, to check that no two polls of one job overlapped."""

    def submit(self, **kwargs) -> SubmittedJob:  # type: ignore[override]
        time.sleep(self.pause)
        return super().submit(**kwargs)

    def poll(self, provider_job_id: str) -> JobStatus:
        started = time.monotonic()
        status = super().poll(provider_job_id)
        time.sleep(self.pause)  # the answer gets stale while we wait
        self.polls.append((provider_job_id, started, time.monotonic()))
        return status

    def download(self, provider_job_id: str, status: JobStatus, dest: Path) -> list[Path]:
        time.sleep(self.pause)
        return super().download(provider_job_id, status, dest)


def race(url: str, work: Callable[[psycopg.Connection], T], *, racers: int = 2) -> list[T]:
    """Run `work` in `racers` threads at the same instant, each with its own connection."""
    barrier = threading.Barrier(racers)
    results: list[T] = []
    errors: list[BaseException] = []

    def one() -> None:
        with connect(url) as conn:
            barrier.wait()
            try:
                results.append(work(conn))
            except BaseException as exc:  # surfaced below, in the test's thread
                errors.append(exc)

    threads = [threading.Thread(target=one) for _ in range(racers)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    if errors:
        raise errors[0]
    return results


def test_racing_threads_never_duplicate_a_shard_a_job_or_a_vector(lb_env, conn) -> None:
    url = lb_env.database_url or ""
    home = Path(lb_env.home_dir)
    seed_demo_cases(conn, cases=4)
    sync_chunks(conn, max_tokens=512, overlap_tokens=64)
    chunks = conn.execute("SELECT count(*) FROM case_chunks").fetchone()[0]
    provider = SlowLocalProvider(home / "local_provider", max_records_per_job=20)
    flow = EmbeddingsFlow(model=provider.default_model("embeddings"))
    files_root = home / "files"

    plans = race(url, lambda c: batch.plan(c, flow, provider, model=flow.model))
    shard_keys = [key for plan in plans for key in plan.shard_keys]
    assert sum(plan.planned_items for plan in plans) == chunks
    assert len(shard_keys) == len(set(shard_keys)) >= 3
    assert min(plan.planned_items for plan in plans) == 0, "the second planner found nothing left to plan"

    for key in shard_keys:
        written = race(url, lambda c, key=key: batch.write_request_file(c, flow, provider, key, files_root=files_root))
        job = ledger.get_job(conn, key)
        lines = Path(job.input_location or "").read_bytes().splitlines()
        assert [w.lines for w in written] == [job.request_count] * 2
        assert len(lines) == job.request_count and all(orjson.loads(line)["custom_id"] for line in lines)

        outcomes = race(url, lambda c, key=key: batch.submit_shard(c, flow, provider, key))
        messages = sorted(o.message for o in outcomes)
        assert sum(m.startswith("submitted ") for m in messages) == 1, messages
        assert any("another process is submitting" in m or "already submitted" in m for m in messages), messages

    tokens = [job["metadata"]["client_token"] for job in local_jobs(home)]
    assert len(tokens) == len(shard_keys)

    rounds = 0
    while ledger.list_jobs(conn, flow="embeddings", states=("submitting", "pending", "running")):
        rounds += 1
        assert rounds <= 6, "jobs never finished"
        race(url, lambda c: batch.poll_open_jobs(c, lambda _: provider, flow="embeddings"))
    for job_id in {job_id for job_id, _, _ in provider.polls}:
        spans = sorted((start, end) for polled, start, end in provider.polls if polled == job_id)
        assert all(end <= next_start for (_, end), (next_start, _) in zip(spans, spans[1:], strict=False)), \
            f"two pollers polled {job_id} at the same time"
    assert {job.state for job in ledger.list_jobs(conn, flow="embeddings")} == {"completed"}

    reports = []
    for key in shard_keys:
        def download_and_ingest(c: psycopg.Connection, key: str = key) -> batch.IngestReport:
            files = batch.download_outputs(c, provider, key, files_root=files_root)
            return batch.ingest_shard(c, flow, provider, key, files=files)
        reports += race(url, download_and_ingest)
    assert sorted(r.already_ingested for r in reports) == [False] * len(shard_keys) + [True] * len(shard_keys)
    assert sum(r.rows_written for r in reports) == chunks
    assert all(not r.problems for r in reports), [r.problems for r in reports]

    assert verify(conn, {"embeddings": DONE_WITHOUT_RESULT_SQL}).ok
    assert assert_every_chunk_embedded_once(conn) == chunks
    assert assert_one_provider_job_per_shard(conn, tokens) == len(shard_keys)
    assert assert_each_item_in_one_local_job(home, conn) == chunks


def test_two_cli_runs_started_together_share_the_work_without_duplicates(lb_env, conn, tmp_path: Path) -> None:
    seed_demo_cases(conn, cases=4)
    home = Path(lb_env.home_dir)
    processes = [start(RUN, cli_env(tmp_path / f"run{n}", LEGAL_BATCH_SHARD_MAX_RECORDS="12")) for n in (1, 2)]
    outputs = [finish(p) for p in processes]
    for code, output in outputs:
        assert code == 0, output[-12000:]

    code, report = verify_cli()
    assert code == 0, report
    chunks = assert_every_chunk_embedded_once(conn)
    tokens = [job["metadata"]["client_token"] for job in local_jobs(home)]
    shards = assert_one_provider_job_per_shard(conn, tokens)
    assert shards >= 4
    assert assert_each_item_in_one_local_job(home, conn) == chunks
    assert conn.execute("SELECT count(*) FROM batch_jobs WHERE items_done <> request_count").fetchone()[0] == 0
