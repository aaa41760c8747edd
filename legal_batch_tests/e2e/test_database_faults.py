"""The database connection drops in the middle of a shard's ingest: the transaction rolls back,
nothing is half-written (no vector, items still `submitted`), the error names the shard and says
to run the ingest again, and a retry — by hand, or Dagster's RetryPolicy by itself — completes.

The fault is real and deterministic: a trigger stalls the ingest's statement once (`pg_sleep`),
and another connection kills that backend with `pg_terminate_backend` while it waits. (The shared
embedded server is never restarted: other test runs use it.)"""

from __future__ import annotations

import threading
import time

import dagster as dg
import psycopg
import pytest

from legal_batch.core import batch, ledger
from legal_batch.core.seed import seed_demo_cases
from legal_batch.core.verify import verify
from legal_batch.db import connect
from legal_batch.definitions import FLOWS_BY_NAME, defs
from legal_batch.driver import FlowDriver, FlowRun
from legal_batch.flows.embeddings.flow import DONE_WITHOUT_RESULT_SQL, EmbeddingsFlow
from legal_batch.resources.providers import make_provider
from legal_batch.settings import get_settings

EMB = FLOWS_BY_NAME["embeddings"]

STALL_POINTS = {
    # where the ingest transaction is when its connection dies
    "writing vectors": "AFTER INSERT ON case_embeddings",
    "closing items after the vectors were written": "AFTER UPDATE ON batch_items",
}


def stall_once(conn: psycopg.Connection, when: str) -> None:
    """The next statement matching `when` sleeps 30 s (once: a sequence survives the rollback)."""
    conn.execute("CREATE SEQUENCE fault_hits")
    conn.execute(
        "CREATE FUNCTION stall_once() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN"
        " IF nextval('fault_hits') = 1 THEN PERFORM pg_sleep(30); END IF; RETURN NULL; END $$"
    )
    conn.execute(f"CREATE TRIGGER stall {when} FOR EACH STATEMENT EXECUTE FUNCTION stall_once()")


class BackendKiller(threading.Thread):
    """From its own connection: wait for a backend of this database stalled in `pg_sleep`, terminate it."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.killed: int | None = None
        self.query: str | None = None

    def run(self) -> None:
        deadline = time.monotonic() + 60
        with connect(self.url) as conn:
            while self.killed is None and time.monotonic() < deadline:
                row = conn.execute(
                    "SELECT pid, query FROM pg_stat_activity WHERE datname = current_database()"
                    " AND wait_event = 'PgSleep' AND pid <> pg_backend_pid()").fetchone()
                if row is None:
                    time.sleep(0.02)
                    continue
                conn.execute("SELECT pg_terminate_backend(%s)", (row[0],))
                self.killed, self.query = row


def finished_shard(conn: psycopg.Connection, instance: dg.DagsterInstance) -> ledger.Shard:
    """One shard planned, submitted and finished on the local provider, through the real code."""
    runner = FlowDriver(EMB, defs, flow="embeddings", echo=lambda _: None, dagster_instance=instance)
    run = FlowRun("embeddings")
    runner.plan(run, limit=None)
    runner.submit_pending(run)
    settings = get_settings()
    for _ in range(2):
        batch.poll_open_jobs(conn, lambda name: make_provider(name, settings), flow="embeddings")
    (job,) = ledger.list_jobs(conn, flow="embeddings")
    assert job.state == "completed"
    return job


def assert_nothing_written(conn: psycopg.Connection, job: ledger.Shard) -> None:
    assert conn.execute("SELECT count(*) FROM case_embeddings").fetchone()[0] == 0
    states = dict(conn.execute("SELECT state, count(*) FROM batch_items GROUP BY state").fetchall())
    assert states == {"submitted": job.request_count}
    assert ledger.get_job(conn, job.shard_key).state == "completed"


def assert_all_embedded(conn: psycopg.Connection, job: ledger.Shard) -> None:
    assert conn.execute("SELECT count(*) FROM case_embeddings").fetchone()[0] == job.request_count
    assert ledger.get_job(conn, job.shard_key).state == "ingested"
    assert verify(conn, {"embeddings": DONE_WITHOUT_RESULT_SQL}).ok


@pytest.mark.parametrize("stall", list(STALL_POINTS), ids=lambda s: s.split()[0] + "_" + s.split()[1])
def test_connection_killed_during_ingest_rolls_back_and_a_retry_completes(stall, lb_env, conn, dagster_instance):
    seed_demo_cases(conn, cases=2)
    job = finished_shard(conn, dagster_instance)
    settings = get_settings()
    provider = make_provider("local", settings)
    files = batch.download_outputs(conn, provider, job.shard_key, files_root=settings.home_dir / "files")
    flow = EmbeddingsFlow(model=job.model)
    stall_once(conn, STALL_POINTS[stall])
    killer = BackendKiller(lb_env.database_url or "")
    killer.start()

    with connect(lb_env.database_url or "") as doomed:
        with pytest.raises(batch.IngestInterrupted) as raised:
            batch.ingest_shard(doomed, flow, provider, job.shard_key, files=files)
        assert doomed.broken
    killer.join()
    assert killer.killed is not None
    message = str(raised.value)
    assert job.shard_key in message and "rolled back" in message and "run the ingest again" in message
    assert "legal-batch embeddings ingest" in message
    assert_nothing_written(conn, job)

    report = batch.ingest_shard(conn, flow, provider, job.shard_key, files=files)
    assert report.done == job.request_count and not report.problems
    assert_all_embedded(conn, job)


def test_dagster_retry_policy_recovers_an_ingest_whose_connection_was_killed(lb_env, conn, dagster_instance):
    seed_demo_cases(conn, cases=2)
    job = finished_shard(conn, dagster_instance)
    stall_once(conn, STALL_POINTS["writing vectors"])
    killer = BackendKiller(lb_env.database_url or "")
    killer.start()

    result = defs.resolve_job_def(EMB.ingest_job.name).execute_in_process(
        instance=dagster_instance, partition_key=job.shard_key, raise_on_error=False)
    killer.join()

    assert killer.killed is not None, "the fault was never injected"
    assert result.success, "the retry policy should have re-run the ingest step"
    retries = [e for e in result.all_events if e.event_type == dg.DagsterEventType.STEP_UP_FOR_RETRY]
    assert len(retries) == 1
    records = dagster_instance.all_logs(result.run_id)
    retry_text = " ".join(str(r.dagster_event.event_specific_data) for r in records
                          if r.dagster_event and r.dagster_event.event_type == dg.DagsterEventType.STEP_UP_FOR_RETRY)
    assert job.shard_key in retry_text and "rolled back" in retry_text
    assert_all_embedded(conn, job)
