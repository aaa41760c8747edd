"""Drive a flow end to end through its Dagster definitions, in this process, against the persistent
Dagster instance under `$LEGAL_BATCH_HOME/dagster`: the runs, materializations and partitions are
there afterwards in `dagster dev`.

`run_flow(..., wait=True)` is the `legal-batch <flow> run --wait` and `make demo` path: plan and
submit, then tick the job-status sensor (with back-off) and execute the ingest runs it requests
until nothing is open; retryable items flow into new shards until their attempts run out. The
waiting happens here, never inside an asset.
"""

import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import dagster as dg

from legal_batch.core import ledger
from legal_batch.flows.batch_assets import FlowDefinitions
from legal_batch.resources import DatabaseResource, get_settings

QUIET = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}


def dagster_home() -> Path:
    """`$DAGSTER_HOME`, or `$LEGAL_BATCH_HOME/dagster` with the project's `dagster.yaml`."""
    if os.environ.get("DAGSTER_HOME"):
        return Path(os.environ["DAGSTER_HOME"])
    home = get_settings().home_dir / "dagster"
    home.mkdir(parents=True, exist_ok=True)
    template = resources.files("legal_batch") / "dagster_instance.yaml"
    with resources.as_file(template) as source:
        shutil.copyfile(source, home / "dagster.yaml")
    os.environ["DAGSTER_HOME"] = str(home)
    return home


def instance() -> dg.DagsterInstance:
    dagster_home()
    return dg.DagsterInstance.get()


@dataclass
class FlowRun:
    flow: str
    planned_shards: list[str] = field(default_factory=list)
    submitted: list[str] = field(default_factory=list)
    ingested: list[str] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)
    failed_runs: list[str] = field(default_factory=list)


class FlowRunner:
    """Executes a flow's jobs and sensors in process (see module docstring)."""

    def __init__(self, flow_defs: FlowDefinitions, defs: dg.Definitions, *, flow: str,
                 echo: Callable[[str], None] = print, dagster_instance: dg.DagsterInstance | None = None) -> None:
        self.flow_defs = flow_defs
        self.defs = defs
        self.flow = flow
        self.echo = echo
        self.instance = dagster_instance or instance()

    def _execute(self, job_name: str, *, partition_key: str | None = None, run_config: dict | None = None,
                 tags: dict | None = None) -> dg.ExecuteInProcessResult:
        job = self.defs.resolve_job_def(job_name)
        config = {**QUIET, **(run_config or {})}
        if partition_key is not None:
            self._register(partition_key)
        return job.execute_in_process(instance=self.instance, partition_key=partition_key, run_config=config,
                                      raise_on_error=False, tags=tags)

    def _register(self, partition_key: str) -> None:
        """A shard planned by another process (a second run, another Dagster home) may not be a
        partition of this instance yet: add it before running it."""
        name = self.flow_defs.partitions.name
        if not self.instance.has_dynamic_partition(name, partition_key):
            self.instance.add_dynamic_partitions(name, [partition_key])

    def _database(self) -> DatabaseResource:
        return self.defs.resources["database"]  # type: ignore[return-value]

    def plan(self, run: FlowRun, *, limit: int | None) -> None:
        key = self.flow_defs.assets[0].key.to_user_string()
        result = self._execute(self.flow_defs.candidates_job.name,
                               run_config={"ops": {key: {"config": {"limit": limit}}}})
        if not result.success:
            run.failed_runs.append(result.run_id)
            raise RuntimeError(f"{key} failed (run {result.run_id}); see `dagster dev` → Runs for the error")
        for event in result.get_asset_materialization_events():
            meta = event.materialization.metadata
            run.planned_shards += list(meta["new_shards"].value) if "new_shards" in meta else []
            if "summary" in meta:
                run.messages.append(str(meta["summary"].value))
                self.echo(f"  {meta['summary'].value}")

    def submit_pending(self, run: FlowRun) -> None:
        with self._database().connect() as conn:
            # `submitting`: a submit that died before the provider answered; submitting again reconciles
            # by client token first, and a live submitter holds the shard's lock (the run then skips it)
            shards = [j.shard_key for j in ledger.list_jobs(conn, flow=self.flow,
                                                            states=("planned", "exported", "submitting"))]
        for shard in shards:
            result = self._execute(self.flow_defs.submit_job.name, partition_key=shard)
            if result.success:
                run.submitted.append(shard)
                self.echo(f"  submitted {shard}")
            else:
                run.failed_runs.append(result.run_id)
                self.echo(f"  submit of {shard} failed (run {result.run_id}); it stays in the ledger for a retry")

    def tick_status(self, run: FlowRun) -> int:
        """One job-status sensor tick; executes the ingest runs it requests. Returns open jobs left."""
        context = dg.build_sensor_context(instance=self.instance, resources=self.defs.resources)
        result = self.flow_defs.status_sensor(context)
        requests = result.run_requests if isinstance(result, dg.SensorResult) else []
        for request in requests or []:
            shard = request.partition_key
            result_run = self._execute(self.flow_defs.ingest_job.name, partition_key=shard,
                                       tags={"dagster/run_key": request.run_key or ""})
            if result_run.success:
                run.ingested.append(shard or "")
                for event in result_run.get_asset_materialization_events():
                    summary = event.materialization.metadata.get("summary")
                    if summary is not None and event.asset_key.to_user_string() == self.flow_defs.assets[-1].key.to_user_string():
                        self.echo(f"  {summary.value}")
            else:
                run.failed_runs.append(result_run.run_id)
                self.echo(f"  ingest of {shard} failed (run {result_run.run_id}); the next tick retries it")
        with self._database().connect() as conn:
            return len(ledger.list_jobs(conn, flow=self.flow, states=("submitting", "pending", "running")))

    def run(self, *, limit: int | None = None, wait: bool = False, poll_interval: float = 60.0,
            timeout: float | None = None) -> FlowRun:
        run = FlowRun(self.flow)
        started = time.monotonic()
        max_rounds = get_settings().max_attempts + 1
        for round_no in range(1, max_rounds + 1):
            self.echo(f"[{self.flow}] round {round_no}: planning")
            before = len(run.planned_shards)
            self.plan(run, limit=limit)
            self.submit_pending(run)
            if not wait:
                return run
            delay = poll_interval
            while True:
                open_jobs = self.tick_status(run)
                if open_jobs == 0:
                    break
                if timeout is not None and time.monotonic() - started > timeout:
                    self.echo(f"  {open_jobs} jobs still open after {timeout:.0f} s; run `legal-batch "
                              f"{self.flow} run --wait` again to continue")
                    return run
                self.echo(f"  {open_jobs} jobs open; next poll in {delay:.0f} s")
                time.sleep(delay)
                delay = min(delay * 1.5, max(poll_interval, 600.0))
            if len(run.planned_shards) == before and round_no > 1:
                break
            with self._database().connect() as conn:
                retryable = ledger.summary(conn, self.flow).items_by_state.get("retryable", 0)
            if retryable == 0:
                break
            self.echo(f"  {retryable} retryable items: planning them into new shards")
        return run
