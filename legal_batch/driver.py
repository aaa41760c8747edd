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
from datetime import datetime
from importlib import resources
from pathlib import Path

import dagster as dg
import psycopg

from legal_batch.core import batch, ledger, quota
from legal_batch.core.errors import RunFailed
from legal_batch.db.connection import DatabaseError
from legal_batch.flows.batch_assets import FlowDefinitions, StatusCursor, job_run_tags, run_tags
from legal_batch.flows.registry import provider_name_for
from legal_batch.providers.base import BatchProvider
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


def failure_message(result: dg.ExecuteInProcessResult) -> str:
    """The first failed step's error message (one line), or where to look."""
    for event in result.all_events:
        if event.is_step_failure and event.step_failure_data and event.step_failure_data.error:
            error = event.step_failure_data.error
            while error.cause is not None and error.cls_name in ("DagsterExecutionStepExecutionError",):
                error = error.cause
            text = (error.message or "").strip()
            if text.startswith(f"{error.cls_name}: "):
                text = text[len(error.cls_name) + 2:]
            return text.splitlines()[0] if text else error.cls_name or "failed"
    return "see `dagster dev` → Runs for the error"


@dataclass(frozen=True)
class FailedCheck:
    name: str
    asset: str
    severity: str
    detail: str


def failed_checks(result: dg.ExecuteInProcessResult) -> list[FailedCheck]:
    """The asset checks of a run that did not pass, with their key figures."""
    found = []
    for evaluation in result.get_asset_check_evaluations():
        if evaluation.passed:
            continue
        figures = ", ".join(f"{k}={getattr(v, 'value', v)}" for k, v in list(evaluation.metadata.items())[:6]
                            if not isinstance(getattr(v, "value", None), dict | list))
        found.append(FailedCheck(evaluation.check_name, evaluation.asset_key.to_user_string(),
                                 str(getattr(evaluation.severity, "value", evaluation.severity)), figures))
    return found


@dataclass
class FlowRun:
    flow: str
    planned_shards: list[str] = field(default_factory=list)
    submitted: list[str] = field(default_factory=list)
    ingested: list[str] = field(default_factory=list)
    messages: list[str] = field(default_factory=list)
    failed_runs: list[str] = field(default_factory=list)
    """Dagster runs that failed and were not made good by a later run of the same shard."""
    budget_blocked: int = 0
    """Shards left waiting because a spend cap was reached."""
    failed_by_shard: dict[str, str] = field(default_factory=dict)
    started_at: datetime | None = None
    """The database's clock when the run began: items failed since then are this run's."""
    failed_checks: dict[str, FailedCheck] = field(default_factory=dict)
    """Asset checks that failed in this run's ingests, by check and asset (the latest evaluation)."""
    failed_items: list[ledger.FailureGroup] = field(default_factory=list)
    drained: bool = False
    """`run --wait` ended because nothing was left to do (not a timeout, not the budget)."""
    left_retryable: list[ledger.FailureGroup] = field(default_factory=list)
    """Of a drained run: items still retryable (e.g. a vector sink that did not take them), by reason."""

    @property
    def ok(self) -> bool:
        """No Dagster run left failed, no item of this run failed or left retryable at the end, no check
        of severity ERROR failed."""
        return not (self.failed_runs or self.failed_items or self.left_retryable
                    or any(c.severity == "ERROR" for c in self.failed_checks.values()))

    def report(self) -> list[str]:
        """The grouped summary of what went wrong: reason → count → an example (file:line, job)."""
        lines = []
        for group in self.failed_items:
            lines.append(f"{group.count} failed: {group.reason} — e.g. {group.subject_key}: {group.example}")
        for group in self.left_retryable:
            lines.append(f"{group.count} not done, retryable by the next run: {group.reason} — e.g. "
                         f"{group.subject_key}: {group.example}")
        for check in self.failed_checks.values():
            if check.name == "no_items_failed" and self.failed_items:
                continue  # the failed items are listed above, by reason
            lines.append(f"check {check.name} on {check.asset} ({check.severity}) failed: {check.detail}")
        if self.failed_runs:
            lines.append(f"{_count(len(self.failed_runs), 'Dagster run')} failed: {', '.join(self.failed_runs)}")
        return lines

    def run_failed(self, shard: str, run_id: str) -> None:
        self.failed_runs.append(run_id)
        self.failed_by_shard[shard] = run_id

    def run_succeeded(self, shard: str) -> None:
        """A later run of the shard succeeded: its earlier failure (e.g. during a database restart)
        no longer counts against the whole run."""
        earlier = self.failed_by_shard.pop(shard, None)
        if earlier in self.failed_runs:
            self.failed_runs.remove(earlier)


class FlowDriver:
    """Executes a flow's jobs and sensors in process (see module docstring)."""

    def __init__(self, flow_defs: FlowDefinitions, defs: dg.Definitions, *, flow: str,
                 echo: Callable[[str], None] = print, dagster_instance: dg.DagsterInstance | None = None,
                 plan_config: dict | None = None) -> None:
        """`plan_config`: more `CandidatesConfig` for every planning run (e.g. `overwrite` and its
        cut-off); the shards planned keep it on their job rows for their submit and ingest."""
        self.flow_defs = flow_defs
        self.defs = defs
        self.flow = flow
        self.echo = echo
        self.instance = dagster_instance or instance()
        self.plan_config = dict(plan_config or {})
        self.outage_limit_s = 3600.0
        """How long `run(wait=True)` waits for an unreachable database (a restart, a failover)."""
        self._status_cursor: str | None = None
        """The job-status sensor's cursor between this driver's ticks (what it has observed)."""

    def _execute(self, job_name: str, *, partition_key: str | None = None, run_config: dict | None = None,
                 tags: dict | None = None) -> dg.ExecuteInProcessResult:
        job = self.defs.resolve_job_def(job_name)
        config = {**QUIET, **(run_config or {})}
        if partition_key is not None:
            self._register(partition_key)
        return job.execute_in_process(instance=self.instance, partition_key=partition_key, run_config=config,
                                      raise_on_error=False, tags={**self._run_tags(partition_key), **(tags or {})})

    def _run_tags(self, partition_key: str | None) -> dict[str, str]:
        """The flow's run tags (`batch_assets.run_tags`): a shard's from its job row; a planning run's
        flow and provider (its model is added by the run itself)."""
        if partition_key is not None:
            with self._database().connect() as conn:
                try:
                    return job_run_tags(ledger.get_job(conn, partition_key))
                except LookupError:
                    return run_tags(flow=self.flow, shard=partition_key)
        try:
            provider = self.plan_config.get("provider") or provider_name_for(self.flow, get_settings())
        except KeyError:  # a flow that is not in the registry (e.g. a test's)
            provider = None
        return run_tags(flow=self.flow, provider=provider)

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
                               run_config={"ops": {key: {"config": {**self.plan_config, "limit": limit}}}})
        if not result.success:
            run.failed_runs.append(result.run_id)
            raise RunFailed(f"{key} failed (run {result.run_id}): {failure_message(result)}")
        for event in result.get_asset_materialization_events():
            meta = event.materialization.metadata
            run.planned_shards += list(meta["new_shards"].value) if "new_shards" in meta else []
            if "summary" in meta:
                run.messages.append(str(meta["summary"].value))
                self.echo(f"  {meta['summary'].value}")
            if "notice" in meta:  # something the planning run wants the user to know (e.g. built-in examples)
                run.messages.append(str(meta["notice"].value))
                self.echo(f"  note: {meta['notice'].value}")

    def _providers(self) -> Callable[[str], BatchProvider]:
        return self.defs.resources["providers"].named  # type: ignore[attr-defined]

    def submit_pending(self, run: FlowRun) -> int:
        """Submit every waiting shard the queue quota and the budget have room for now (a shard split
        to fit the quota is followed by its pieces); the rest wait in the ledger with the reason.
        Returns how many shards were submitted (or served in real time) this call."""
        policy = get_settings().quota_policy()
        submitted = 0
        tried: set[str] = set()
        while True:
            with self._database().connect() as conn:
                # `submitting`: a submit that died before the provider answered; submitting again reconciles
                # by client token first, and a live submitter holds the shard's lock (the run then skips it)
                shards = [s for s in batch.admissible_shards(conn, self.flow, self._providers(), policy=policy)
                          if s not in tried]
            if not shards:
                return submitted
            for shard in shards:
                tried.add(shard)
                result = self._execute(self.flow_defs.submit_job.name, partition_key=shard)
                if not result.success:
                    run.run_failed(shard, result.run_id)
                    self.echo(f"  submit of {shard} failed (run {result.run_id}): {failure_message(result)}; it "
                              "stays in the ledger for a retry")
                    continue
                run.run_succeeded(shard)
                with self._database().connect() as conn:
                    job = ledger.get_job(conn, shard)
                if job.state in ledger.WAITING_JOB_STATES:
                    self.echo(f"  {shard} waits: {job.waiting_reason or job.last_error}")
                elif job.state == ledger.JobState.SPLIT:
                    self.echo(f"  {shard} split to fit the queue quota: {', '.join(job.split_into or [])}")
                else:
                    run.submitted.append(shard)
                    submitted += 1
                    self.echo(f"  submitted {shard}" + (f" as {job.provider_job_id}" if job.provider_job_id else
                                                        f" ({job.state})"))

    def waiting(self) -> list[ledger.Shard]:
        """Shards planned and not yet accepted by the provider."""
        with self._database().connect() as conn:
            return ledger.list_jobs(conn, flow=self.flow, states=ledger.UNSUBMITTED_JOB_STATES)

    def check_budget(self) -> None:
        """Refuse (`BudgetExceeded`) before any request when the waiting shards' estimate passes a cap."""
        with self._database().connect() as conn:
            quota.check_run_budget(conn, flow=self.flow, policy=get_settings().quota_policy())

    def tick_status(self, run: FlowRun) -> int:
        """One job-status sensor tick; executes the ingest runs it requests. Returns open jobs left."""
        if self._status_cursor is None and run.started_at is not None:
            self._status_cursor = StatusCursor.starting_at(run.started_at).dump()  # earlier changes: observed then
        context = dg.build_sensor_context(instance=self.instance, resources=self.defs.resources,
                                          cursor=self._status_cursor)
        result = self.flow_defs.status_sensor(context)
        if isinstance(result, dg.SensorResult) and result.cursor is not None:
            self._status_cursor = result.cursor
        requests = result.run_requests if isinstance(result, dg.SensorResult) else []
        for observation in (result.asset_events if isinstance(result, dg.SensorResult) else None) or []:
            self.instance.report_runless_asset_event(observation)  # e.g. a failed ingest counted
            if "reason" in observation.metadata:
                self.echo(f"  {observation.metadata['reason'].value}")
        for request in requests or []:
            shard = request.partition_key
            result_run = self._execute(self.flow_defs.ingest_job.name, partition_key=shard,
                                       tags={**request.tags, "dagster/run_key": request.run_key or ""})
            checks = failed_checks(result_run)
            for check in checks:
                run.failed_checks[f"{check.name}:{check.asset}"] = check
            # the blocking `no_items_failed` check fails a run whose shard was ingested: its failed items
            # are reported by reason (FlowRun.report), the ingest itself did its work
            ingested_with_failures = not result_run.success and any(c.name == "no_items_failed" for c in checks)
            if result_run.success or ingested_with_failures:
                run.run_succeeded(shard or "")
                run.ingested.append(shard or "")
                for event in result_run.get_asset_materialization_events():
                    summary = event.materialization.metadata.get("summary")
                    if summary is not None and event.asset_key.to_user_string() == self.flow_defs.assets[-1].key.to_user_string():
                        self.echo(f"  {summary.value}")
            else:
                run.run_failed(shard or "", result_run.run_id)
                self.echo(f"  ingest of {shard} failed (run {result_run.run_id}): {failure_message(result_run)}; "
                          "the next tick retries it")
        with self._database().connect() as conn:
            return len(ledger.list_jobs(conn, flow=self.flow, states=ledger.QUEUED_JOB_STATES))

    def run(self, *, limit: int | None = None, wait: bool = False, poll_interval: float = 60.0,
            timeout: float | None = None) -> FlowRun:
        """Plan and submit what the quota allows; with `wait`, keep the provider's queue full — every
        round ingests finished jobs and submits waiting shards into the room they freed — and re-plan
        retryable items, until nothing is open or waiting."""
        run = self.new_run()
        started = time.monotonic()
        self.echo(f"[{self.flow}] planning")
        self.plan(run, limit=limit)
        self.check_budget()
        self.submit_pending(run)
        if not wait:
            return run
        replans = 0
        delay = poll_interval
        outage = _Outage(self.echo, limit_s=self.outage_limit_s)
        while True:
            try:
                open_jobs = self.tick_status(run)
                if self.submit_pending(run):
                    open_jobs = self._open_jobs()
                waiting = self.waiting()
            except (DatabaseError, psycopg.OperationalError) as exc:
                time.sleep(outage.failed(exc))  # raises DatabaseError once the outage passes its limit
                continue
            outage.recovered()
            if open_jobs == 0 and not waiting:
                with self._database().connect() as conn:
                    retryable = ledger.summary(conn, self.flow).items_by_state.get(ledger.ItemState.RETRYABLE, 0)
                if retryable == 0 or replans >= get_settings().max_attempts:
                    run.drained = True
                    return run
                replans += 1
                self.echo(f"  {retryable} retryable items: planning them into new shards")
                self.plan(run, limit=limit)
                self.submit_pending(run)
                delay = poll_interval
                continue
            if open_jobs == 0 and waiting and all((j.waiting_reason or "").startswith("waiting for budget")
                                                  for j in waiting):
                run.budget_blocked = len(waiting)
                self.echo(f"  {len(waiting)} shards wait for budget: {waiting[0].waiting_reason}")
                return run
            if timeout is not None and time.monotonic() - started > timeout:
                self.echo(f"  {open_jobs} jobs still open, {len(waiting)} shards waiting"
                          + (f" ({_why(waiting)})" if waiting else "") + f" after {timeout:.0f} s; "
                          f"run `legal-batch {self.flow} run --wait` again to continue")
                return run
            self.echo(f"  {_count(open_jobs, 'job')} open, {_count(len(waiting), 'shard')} waiting"
                      + (f" ({_why(waiting)})" if waiting else "") + f"; next poll in {delay:.0f} s")
            time.sleep(delay)
            # keep polling at the set pace while shards wait for room in the queue; back off otherwise
            delay = poll_interval if waiting else min(delay * 1.5, max(poll_interval, 600.0))

    def new_run(self) -> FlowRun:
        """A run record starting now (by the database's clock)."""
        with self._database().connect() as conn:
            return FlowRun(self.flow, started_at=conn.execute("SELECT now()").fetchone()[0])

    def finish(self, run: FlowRun) -> FlowRun:
        """Collect the items of this run that ended `failed`, grouped by reason."""
        if run.started_at is not None:
            with self._database().connect() as conn:
                run.failed_items = ledger.failed_items(conn, self.flow, since=run.started_at)
                if run.drained:
                    run.left_retryable = ledger.failed_items(conn, self.flow, since=run.started_at,
                                                             state=ledger.ItemState.RETRYABLE)
        return run

    def _open_jobs(self) -> int:
        with self._database().connect() as conn:
            return len(ledger.list_jobs(conn, flow=self.flow, states=ledger.QUEUED_JOB_STATES))


class _Outage:
    """The database went away during a long wait (restart, failover): say so in one line, retry with
    bounded back-off, carry on when it is back; give up (one line) after `limit_s`."""

    def __init__(self, echo: Callable[[str], None], *, limit_s: float) -> None:
        self.echo = echo
        self.limit_s = limit_s
        self.since: float | None = None
        self.since_wall = ""
        self.tries = 0

    def failed(self, exc: BaseException) -> float:
        """Record a failed round; return the seconds to wait before the next one."""
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        if self.since is None:
            self.since, self.since_wall = time.monotonic(), time.strftime("%H:%M:%S")
        elapsed = time.monotonic() - self.since
        if elapsed > self.limit_s:
            raise DatabaseError(f"the database has been unreachable since {self.since_wall} ({elapsed:.0f} s): "
                                f"{reason}. Nothing in the ledger was lost; run the same command again once it is "
                                "back") from exc
        delay = min(2.0 ** self.tries, 30.0)
        self.tries += 1
        self.echo(f"  database unavailable since {self.since_wall} ({reason}); reconnecting in {delay:.0f} s")
        return delay

    def recovered(self) -> None:
        if self.since is not None:
            self.echo(f"  database reachable again after {time.monotonic() - self.since:.0f} s; carrying on")
        self.since, self.tries = None, 0


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _why(waiting: list[ledger.Shard]) -> str:
    held = [j for j in waiting if j.waiting_reason]
    if not held:
        return "to be submitted"
    oldest = min((j.waiting_since for j in held if j.waiting_since), default=None)
    since = f" since {oldest:%H:%M:%S} UTC" if oldest else ""
    return f"{held[-1].waiting_reason}{since}"
