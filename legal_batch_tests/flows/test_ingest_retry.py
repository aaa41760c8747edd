"""The job-status sensor retries a failed ingest run under a new run key (Dagster never launches a
used one again), up to `LEGAL_BATCH_INGEST_MAX_ATTEMPTS` runs, then stops and says why."""

from pathlib import Path

import dagster as dg
import pytest

from legal_batch.core import ledger
from legal_batch.core.seed import seed_demo_cases
from legal_batch.definitions import FLOWS_BY_NAME, defs
from legal_batch.driver import FlowDriver, FlowRun
from legal_batch.providers.base import JobStatus, ProviderError
from legal_batch.providers.local import LocalProvider
from legal_batch.settings import get_settings

EMB = FLOWS_BY_NAME["embeddings"]


def tick(instance: dg.DagsterInstance) -> dg.SensorResult:
    return EMB.status_sensor(dg.build_sensor_context(instance=instance, resources=defs.resources))


def ingest_events(result: dg.SensorResult) -> list[dg.AssetObservation]:
    """The tick's observations of results partitions (it also observes job states and the totals)."""
    return [e for e in result.asset_events or [] if e.asset_key == dg.AssetKey("case_embeddings")]


def launch(instance: dg.DagsterInstance, request: dg.RunRequest) -> dg.ExecuteInProcessResult:
    """What the daemon does with a run request."""
    return defs.resolve_job_def(request.job_name).execute_in_process(
        instance=instance, partition_key=request.partition_key, raise_on_error=False,
        tags={**request.tags, "dagster/run_key": request.run_key})


class Disk:
    full = True


@pytest.fixture
def disk(monkeypatch: pytest.MonkeyPatch) -> Disk:
    """While `disk.full`, downloads of the local provider's outputs fail (a failure no step retry fixes)."""
    state = Disk()
    download = LocalProvider.download

    def refuse_when_full(self, provider_job_id: str, status: JobStatus, dest: Path) -> list[Path]:
        if state.full:
            raise ProviderError(f"cannot write the outputs of {provider_job_id} to {dest}: no space left on device")
        return download(self, provider_job_id, status, dest)

    monkeypatch.setattr(LocalProvider, "download", refuse_when_full)
    return state


def finished_shard(conn, instance: dg.DagsterInstance) -> tuple[ledger.Shard, dg.RunRequest]:
    """A submitted shard whose provider job has completed, and the sensor's first ingest request for it."""
    seed_demo_cases(conn, cases=2)
    runner = FlowDriver(EMB, defs, flow="embeddings", echo=lambda _: None, dagster_instance=instance)
    runner.plan(FlowRun("embeddings"), limit=None)
    runner.submit_pending(FlowRun("embeddings"))
    assert tick(instance).run_requests == []  # validating → in_progress
    (request,) = tick(instance).run_requests  # → completed
    (job,) = ledger.list_jobs(conn, flow="embeddings")
    assert (job.state, request.partition_key, request.run_key) == (
        "completed", job.shard_key, f"{job.provider_job_id}:completed")
    return job, request


def test_a_failed_ingest_is_requested_again_under_a_new_run_key_and_then_succeeds(
        lb_env, conn, dagster_instance, disk):
    job, request = finished_shard(conn, dagster_instance)
    assert not launch(dagster_instance, request).success

    retried = tick(dagster_instance)
    (again,) = retried.run_requests
    assert (again.partition_key, again.run_key) == (job.shard_key, f"{job.provider_job_id}:completed:attempt2")
    job = ledger.get_job(conn, job.shard_key)
    assert job.ingest_failures == 1 and "no space left on device" in job.last_error
    assert "retrying: attempt 2 of 3" in job.last_error
    (observation,) = ingest_events(retried)
    assert observation.asset_key == dg.AssetKey("case_embeddings") and observation.partition == job.shard_key
    assert observation.metadata["ingest"].value == "retrying"
    assert tick(dagster_instance).run_requests == retried.run_requests, "same key until that run has ended"
    assert ledger.get_job(conn, job.shard_key).ingest_failures == 1

    disk.full = False
    assert launch(dagster_instance, again).success
    job = ledger.get_job(conn, job.shard_key)
    assert job.state == "ingested" and job.items_done == job.request_count
    latest = dagster_instance.get_latest_materialization_event(dg.AssetKey("case_embeddings"))
    assert latest.asset_materialization.metadata["ingest_attempt"].value == 2
    assert tick(dagster_instance).run_requests == []


def test_after_the_bound_the_sensor_stops_and_says_why(lb_env, conn, dagster_instance, disk, monkeypatch):
    monkeypatch.setenv("LEGAL_BATCH_INGEST_MAX_ATTEMPTS", "2")
    get_settings(fresh=True)
    job, request = finished_shard(conn, dagster_instance)
    assert not launch(dagster_instance, request).success
    (request,) = tick(dagster_instance).run_requests
    failed = launch(dagster_instance, request)
    assert not failed.success

    stopped = tick(dagster_instance)

    assert stopped.run_requests == []
    job = ledger.get_job(conn, job.shard_key)
    assert (job.state, job.ingest_failures) == ("completed", 2)
    assert failed.run_id in job.last_error and "no space left on device" in job.last_error
    assert "stops retrying" in job.last_error and f"--partition {job.shard_key}" in job.last_error
    (observation,) = ingest_events(stopped)
    assert observation.metadata["ingest"].value == "stopped"
    assert observation.metadata["reason"].value == job.last_error
    later = tick(dagster_instance)
    assert later.run_requests == [] and not ingest_events(later)
    assert ledger.get_job(conn, job.shard_key).ingest_failures == 2


def test_the_cli_ingest_retries_a_failed_ingest_and_records_why(lb_env, conn, dagster_instance, disk):
    job, _ = finished_shard(conn, dagster_instance)
    runner = FlowDriver(EMB, defs, flow="embeddings", echo=lambda _: None, dagster_instance=dagster_instance)
    failed = FlowRun("embeddings")
    runner.tick_status(failed)
    assert len(failed.failed_runs) == 1

    disk.full = False
    state = FlowRun("embeddings")
    runner.tick_status(state)

    assert state.ingested == [job.shard_key] and state.failed_runs == []
    assert ledger.get_job(conn, job.shard_key).state == "ingested"
    observed = dagster_instance.fetch_observations(dg.AssetKey("case_embeddings"), limit=1).records
    assert observed[0].asset_observation.metadata["failed_run"].value == failed.failed_runs[0]
