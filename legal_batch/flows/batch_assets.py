"""The Dagster shape every batch flow shares, built once: candidates → request files (one dynamic
partition per shard) → batch jobs → batch outputs → results, the two sensors and the three jobs.

A flow folder supplies its names, how to build its `Flow`, an optional preparation step (e.g.
chunking) and its result checks; the asset bodies only orchestrate `core.batch` functions.
`build_flow_definitions` composes one small builder per definition (`_candidates_asset`, ...,
`_status_sensor`), each reading the flow's `_FlowSpec`.
"""



import hashlib
import json
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

import dagster as dg
import psycopg

from legal_batch.core import batch, ledger, quota
from legal_batch.core.errors import QuotaTooSmall
from legal_batch.core.flow import Flow
from legal_batch.core.ledger import ItemState, JobState
from legal_batch.core.progress import JobChange, flow_progress, jobs_changed_since
from legal_batch.core.verify import VerifyReport, verify
from legal_batch.flows.catalog import OWNERS, file_kinds, provider_kinds
from legal_batch.flows.registry import provider_name_for
from legal_batch.providers.base import BatchProvider, ProviderError, UnsupportedRequest
from legal_batch.resources import DatabaseResource, FileStoreResource, ProvidersResource, get_settings

Prepare = Callable[[dg.AssetExecutionContext, psycopg.Connection, "CandidatesConfig"], dict]
ResultChecks = Callable[[psycopg.Connection, ledger.Shard], list[dg.AssetCheckResult]]
AfterIngest = Callable[[dg.AssetExecutionContext, psycopg.Connection, DatabaseResource], dict]


class CandidatesConfig(dg.Config):
    """`limit`: at most this many source records (cases, rows) this run; unset = all.
    `overwrite` (flows with results to overwrite: headnotes): also regenerate results made before
    `overwrite_before` (ISO 8601; unset = when the planning process started). Both are stored with
    each shard planned (`batch_jobs.params`), so its submit and ingest use them too.
    `provider`: plan with this provider instead of the flow's `LEGAL_BATCH_<FLOW>_PROVIDER` (each
    shard's job row names its provider).
    `prompt` (flows with a prompt template: headnotes): the template file for this run instead of the
    flow's setting; its text is stored with each shard planned.
    `sinks`, `source` (flows that store vectors: embeddings): the vector sinks (comma list) and the
    record source for this run instead of `LEGAL_BATCH_EMBEDDINGS_SINKS`/`_SOURCE`; stored with each
    shard planned."""

    limit: int | None = None
    max_shards: int = 100
    overwrite: bool = False
    overwrite_before: str | None = None
    provider: str | None = None
    prompt: str | None = None
    sinks: str | None = None
    source: str | None = None


class MakeFlow(Protocol):
    def __call__(self, provider: BatchProvider, config: CandidatesConfig | None, *,
                 job: ledger.Shard | None = None) -> Flow:
        """The flow for planning (with the run's `config`), or for one shard (`job`): then built
        from the job row's model and stored `params`, not from this process's settings."""
        ...


@dataclass(frozen=True)
class FlowNames:
    flow: str               # ledger flow name, e.g. "embeddings"
    prefix: str             # asset prefix, e.g. "embedding"
    results: str            # result asset, e.g. "case_embeddings"

    @property
    def group(self) -> str:
        return self.flow


@dataclass(frozen=True)
class FlowDefinitions:
    partitions: dg.DynamicPartitionsDefinition
    assets: list[dg.AssetsDefinition]
    """candidates, request files, batch jobs, batch outputs, results — in that order."""
    jobs: list[Any]
    sensors: list[dg.SensorDefinition]
    candidates_job: Any
    submit_job: Any
    ingest_job: Any
    status_sensor: dg.SensorDefinition
    planner_sensor: dg.SensorDefinition
    sources: list[dg.AssetSpec]
    """The inputs the candidates read (external assets, shared between flows: kept once by key)."""
    progress: dg.AssetSpec
    """`<prefix>_progress`: the flow's running totals, observed by the job-status sensor and every ingest."""


def build_flow_definitions(
    names: FlowNames,
    *,
    make_flow: MakeFlow,
    prepare: Prepare | None = None,
    has_unprepared: Callable[[psycopg.Connection], bool | str] | None = None,
    result_check_specs: Sequence[dg.AssetCheckSpec] = (),
    result_checks: ResultChecks | None = None,
    after_ingest: AfterIngest | None = None,
    descriptions: dict[str, str],
    candidates_name: str | None = None,
    done_without_result_sql: str | None = None,
    overwritable: bool = False,
    prompted: bool = False,
    sources: Sequence[dg.AssetSpec] = (),
    configured_provider: str | None = None,
    results_kinds: Sequence[str] = ("postgres",),
    results_table: str | None = None,
    results_schema: dg.TableSchema | None = None,
    table_rows: Callable[[psycopg.Connection], int] | None = None,
) -> FlowDefinitions:
    """Assets, jobs and sensors of one batch flow (see the module docstring).

    `candidates_name` names the first asset when `<prefix>_candidates` does not fit (e.g. `template_inputs`).
    `overwritable`: the flow accepts `CandidatesConfig.overwrite` (it has results to regenerate).
    `prompted`: the flow accepts `CandidatesConfig.prompt` (it has a prompt template).
    `done_without_result_sql` (the flow's `DONE_WITHOUT_RESULT_SQL`) lets the `ledger_consistent` check
    also find done items whose result row is missing.

    What the UI shows: `sources` (external assets the candidates depend on), `configured_provider`
    (the flow's provider setting: the kinds of the jobs and files assets), `results_kinds`, `results_table` and `results_schema`
    (`dagster/table_name`, `dagster/column_schema`), and `table_rows`, the whole results table's row
    count reported as `dagster/row_count` at each ingest (the shard's own rows are `shard_row_count`)."""
    spec = _FlowSpec(
        names=names, make_flow=make_flow, descriptions=descriptions,
        partitions=dg.DynamicPartitionsDefinition(name=f"{names.prefix}_shards"),
        candidates_key=candidates_name or f"{names.prefix}_candidates", prepare=prepare,
        has_unprepared=has_unprepared, result_check_specs=result_check_specs, result_checks=result_checks,
        after_ingest=after_ingest, done_without_result_sql=done_without_result_sql, overwritable=overwritable,
        prompted=prompted, sources=sources, configured_provider=configured_provider, results_kinds=results_kinds,
        results_table=results_table, results_schema=results_schema, table_rows=table_rows,
    )
    candidates = _candidates_asset(spec)
    request_files = _request_files_asset(spec, candidates)
    batch_jobs = _batch_jobs_asset(spec, request_files)
    batch_outputs = _batch_outputs_asset(spec, batch_jobs)
    results = _results_asset(spec, batch_outputs)
    candidates_job = _candidates_job(spec, candidates)
    submit_job = _submit_job(spec, request_files, batch_jobs)
    ingest_job = _ingest_job(spec, batch_outputs, results)
    planner_sensor = _planner_sensor(spec, candidates_job, submit_job)
    status_sensor = _status_sensor(spec, ingest_job)
    return FlowDefinitions(
        sources=list(sources),
        progress=_progress_spec(spec),
        partitions=spec.partitions,
        assets=[candidates, request_files, batch_jobs, batch_outputs, results],
        jobs=[candidates_job, submit_job, ingest_job],
        sensors=[planner_sensor, status_sensor],
        candidates_job=candidates_job,
        submit_job=submit_job,
        ingest_job=ingest_job,
        status_sensor=status_sensor,
        planner_sensor=planner_sensor,
    )


@dataclass(frozen=True)
class _FlowSpec:
    """One flow's names, hooks and what the UI shows: what the builders below share (see
    `build_flow_definitions` for the meaning of each)."""

    names: FlowNames
    make_flow: MakeFlow
    descriptions: dict[str, str]
    partitions: dg.DynamicPartitionsDefinition
    """`<prefix>_shards`: one partition per shard."""
    candidates_key: str
    prepare: Prepare | None
    has_unprepared: Callable[[psycopg.Connection], bool | str] | None
    """Preparation has work (e.g. chunking); a string marks which, so a new marker is a new planning run."""
    result_check_specs: Sequence[dg.AssetCheckSpec]
    result_checks: ResultChecks | None
    after_ingest: AfterIngest | None
    done_without_result_sql: str | None
    overwritable: bool
    prompted: bool
    sources: Sequence[dg.AssetSpec]
    configured_provider: str | None
    results_kinds: Sequence[str]
    results_table: str | None
    results_schema: dg.TableSchema | None
    table_rows: Callable[[psycopg.Connection], int] | None

    @property
    def files_key(self) -> str:
        return f"{self.names.prefix}_request_files"

    @property
    def jobs_key(self) -> str:
        return f"{self.names.prefix}_batch_jobs"

    @property
    def outputs_key(self) -> str:
        return f"{self.names.prefix}_batch_outputs"

    @property
    def progress_key(self) -> str:
        return f"{self.names.prefix}_progress"

    @property
    def pool(self) -> str:
        """The concurrency pool of provider calls (submits)."""
        return f"{self.names.flow}_provider"

    @property
    def service(self) -> list[str]:
        """The configured provider's kinds (its service, e.g. openai), shown on the jobs asset."""
        return sorted(provider_kinds(self.configured_provider) if self.configured_provider else set())

    @property
    def tags(self) -> dict[str, str]:
        return {"flow": self.names.flow}

    @property
    def job_tags(self) -> dict[str, str]:
        return {RUN_TAG_FLOW: self.names.flow}


def _candidates_asset(spec: _FlowSpec) -> dg.AssetsDefinition:
    """`<prefix>_candidates` (or the flow's own name): prepares the flow, cuts new shards and checks the ledger."""
    ledger_check = dg.AssetCheckSpec(
        "ledger_consistent", asset=spec.candidates_key,
        description=f"`legal-batch verify --flow {spec.names.flow}` after planning: every item in exactly one state, "
                    "open items only in open jobs, done items with their result row, counts that add up.")

    @dg.asset(name=spec.candidates_key, group_name=spec.names.group, description=spec.descriptions["candidates"],
              check_specs=[ledger_check], deps=list(spec.sources), kinds={"postgres", "python"}, owners=OWNERS,
              tags=spec.tags)
    def candidates(context: dg.AssetExecutionContext, config: CandidatesConfig, database: DatabaseResource,
                   providers: ProvidersResource) -> dg.MaterializeResult:
        if config.overwrite and not spec.overwritable:
            raise dg.Failure(description=f"the {spec.names.flow} flow has nothing to overwrite: run it without "
                                         "`overwrite` in the config", allow_retries=False)
        if config.prompt and not spec.prompted:
            raise dg.Failure(description=f"the {spec.names.flow} flow has no prompt template: run it without "
                                         "`prompt` in the config", allow_retries=False)
        provider = providers.named(config.provider or provider_name_for(spec.names.flow, get_settings()))
        flow = spec.make_flow(provider, config)
        with _clear_failures(), database.connect() as conn:
            prepared = spec.prepare(context, conn, config) if spec.prepare else {}
            model = getattr(flow, "model", None) or provider.default_model(flow.endpoint)
            _tag_run(context, run_tags(flow=spec.names.flow, provider=provider.name, model=model))
            policy = get_settings().quota_policy()
            result = batch.plan(conn, flow, provider, model=model, cap_records=get_settings().shard_max_records,
                                max_shards=config.max_shards, policy=policy)
            queues = quota.queue_views(conn, kinds={provider.name: provider.limits.quota_kind}, policy=policy)
            totals = ledger.summary(conn, spec.names.flow)
            consistent = _ledger_check(verify(conn, {spec.names.flow: spec.done_without_result_sql}), spec.names.flow)
        if result.shard_keys:
            context.instance.add_dynamic_partitions(spec.partitions.name, result.shard_keys)
        message = (f"{result.planned_items} new requests in {len(result.shard_keys)} shards"
                   if result.shard_keys else "no new candidates: nothing to submit")
        if prepared.get("summary_note"):  # e.g. what the vector cache saved
            message += f"; {prepared['summary_note']}"
        context.log.info(message)
        return dg.MaterializeResult(metadata={
            **prepared,
            "dagster/row_count": result.planned_items,
            "new_shards": dg.MetadataValue.json(result.shard_keys),
            "rejected_items": result.rejected_items,
            "items_by_state": dg.MetadataValue.json(totals.items_by_state),
            "provider": provider.name,
            "queue_quota": dg.MetadataValue.md("\n".join(f"- {view.line()}" for view in queues) or "no queued work"),
            "summary": message,
        }, check_results=[consistent])
    return candidates


def _request_files_asset(spec: _FlowSpec, candidates: dg.AssetsDefinition) -> dg.AssetsDefinition:
    """`<prefix>_request_files`: one shard's request file."""

    @dg.asset(name=spec.files_key, group_name=spec.names.group, partitions_def=spec.partitions, deps=[candidates],
              kinds=file_kinds(spec.configured_provider or "local"), owners=OWNERS, tags=spec.tags,
              description=spec.descriptions["request_files"])
    def request_files(context: dg.AssetExecutionContext, database: DatabaseResource, files: FileStoreResource,
                      providers: ProvidersResource) -> dg.MaterializeResult:
        shard_key = context.partition_key
        with _clear_failures(), database.connect() as conn:
            job = ledger.get_job(conn, shard_key)
            _tag_run(context, job_run_tags(job))
            provider = providers.named(job.provider)
            written = batch.write_request_file(conn, spec.make_flow(provider, None, job=job), provider, shard_key,
                                               files_root=files.path())
        return dg.MaterializeResult(metadata={
            "dagster/row_count": written.lines,
            "path": dg.MetadataValue.path(str(written.path)),
            "bytes": written.bytes,
            "est_input_tokens": written.est_input_tokens,
            "est_cost_usd": written.est_cost_usd,
            "realtime_equivalent_usd": written.realtime_cost_usd,
            "preview": dg.MetadataValue.md(f"```json\n{written.preview}\n```"),
        })
    return request_files


def _batch_jobs_asset(spec: _FlowSpec, request_files: dg.AssetsDefinition) -> dg.AssetsDefinition:
    """`<prefix>_batch_jobs`: one shard submitted as a provider job (or split, or waiting for the quota)."""

    @dg.asset(name=spec.jobs_key, group_name=spec.names.group, partitions_def=spec.partitions, deps=[request_files],
              pool=spec.pool,
              kinds={"postgres", *spec.service}, owners=OWNERS, tags=spec.tags,
              description=spec.descriptions["batch_jobs"],
              retry_policy=dg.RetryPolicy(max_retries=3, delay=30, backoff=dg.Backoff.EXPONENTIAL))
    def batch_jobs(context: dg.AssetExecutionContext, database: DatabaseResource, files: FileStoreResource,
                   providers: ProvidersResource) -> dg.MaterializeResult:
        with _clear_failures(), database.connect() as conn:
            job = ledger.get_job(conn, context.partition_key)
            _tag_run(context, job_run_tags(job))
            provider = providers.named(job.provider)
            policy = get_settings().quota_policy()
            outcome = batch.submit_shard(conn, spec.make_flow(provider, None, job=job), provider, context.partition_key,
                                         max_attempts=get_settings().max_attempts, policy=policy,
                                         files_root=files.path())
            job = ledger.get_job(conn, context.partition_key)
            found = quota.quota_for(conn, provider=job.provider, model=job.model, kind=provider.limits.quota_kind,
                                    policy=policy)
            in_queue = quota.queued(conn, provider=job.provider, model=job.model)
        if outcome.state == JobState.SPLIT and job.split_into:
            context.instance.add_dynamic_partitions(spec.partitions.name, list(job.split_into))
        context.log.info(outcome.message)
        return dg.MaterializeResult(metadata={
            "dagster/row_count": job.request_count,
            "provider": job.provider,
            "provider_job_id": outcome.provider_job_id or "",
            "client_token": job.client_token,
            "state": outcome.state,
            "est_cost_usd": float(job.est_cost_usd or 0),
            "est_input_tokens": job.est_input_tokens or 0,
            "queue_quota": found.describe() if found else "no queue quota",
            "enqueued_tokens": in_queue.tokens,
            "jobs_in_progress": in_queue.jobs,
            "waiting_reason": job.waiting_reason or "",
            "summary": outcome.message,
        })
    return batch_jobs


def _batch_outputs_asset(spec: _FlowSpec, batch_jobs: dg.AssetsDefinition) -> dg.AssetsDefinition:
    """`<prefix>_batch_outputs`: one finished shard's output and error files, downloaded."""

    @dg.asset(name=spec.outputs_key, group_name=spec.names.group, partitions_def=spec.partitions, deps=[batch_jobs],
              kinds=file_kinds(spec.configured_provider or "local"), owners=OWNERS, tags=spec.tags,
              description=spec.descriptions["batch_outputs"],
              retry_policy=dg.RetryPolicy(max_retries=3, delay=30, backoff=dg.Backoff.EXPONENTIAL))
    def batch_outputs(context: dg.AssetExecutionContext, database: DatabaseResource, files: FileStoreResource,
                      providers: ProvidersResource) -> dg.MaterializeResult:
        with _clear_failures(), database.connect() as conn:
            job = ledger.get_job(conn, context.partition_key)
            _tag_run(context, job_run_tags(job))
            provider = providers.named(job.provider)
            paths = batch.download_outputs(conn, provider, context.partition_key, files_root=files.path())
        return dg.MaterializeResult(metadata={
            "dagster/row_count": job.request_count,
            "provider_job_id": job.provider_job_id or "",
            "provider_status": job.provider_status or job.state,
            "files": dg.MetadataValue.json([str(p) for p in paths]),
            "bytes": sum(p.stat().st_size for p in paths),
        })
    return batch_outputs


def _results_asset(spec: _FlowSpec, batch_outputs: dg.AssetsDefinition) -> dg.AssetsDefinition:
    """The flow's results asset: one shard ingested, with its checks."""
    accounted = dg.AssetCheckSpec("shard_items_accounted", asset=spec.names.results,
                                  description="Every request of the shard ended done, retryable or failed.")
    not_failed = dg.AssetCheckSpec(
        "no_items_failed", asset=spec.names.results, blocking=True,
        description="No request of the shard ended `failed` for good (ERROR, blocking: the ingest run — and "
                    "`dagster job execute` — fails, after the results are written, so a failure is never quiet).")

    results_metadata: dict[str, Any] = {}
    if spec.results_table:
        results_metadata["dagster/table_name"] = spec.results_table
    if spec.results_schema is not None:
        results_metadata["dagster/column_schema"] = spec.results_schema

    @dg.asset(name=spec.names.results, group_name=spec.names.group, partitions_def=spec.partitions,
              deps=[batch_outputs], kinds=set(spec.results_kinds), owners=OWNERS, tags=spec.tags, metadata=results_metadata,
              description=spec.descriptions["results"],
              check_specs=[accounted, not_failed, *spec.result_check_specs],
              retry_policy=dg.RetryPolicy(max_retries=2, delay=10, backoff=dg.Backoff.EXPONENTIAL))
    def results(context: dg.AssetExecutionContext, database: DatabaseResource, files: FileStoreResource,
                providers: ProvidersResource) -> dg.MaterializeResult:
        shard_key = context.partition_key
        with _clear_failures(), database.connect() as conn:
            job = ledger.get_job(conn, shard_key)
            _tag_run(context, job_run_tags(job))
            provider = providers.named(job.provider)
            paths = sorted(p for p in batch.output_dir(files.path(), spec.names.flow, shard_key).glob("*")
                           if p.is_file()) if job.state != JobState.INGESTED else []
            report = batch.ingest_shard(conn, spec.make_flow(provider, None, job=job), provider, shard_key, files=paths,
                                        max_attempts=get_settings().max_attempts,
                                        on_progress=lambda n: context.log.info(f"{shard_key}: {n} result lines read"))
            job = ledger.get_job(conn, shard_key)
            after = spec.after_ingest(context, conn, database) if spec.after_ingest is not None else {}
            rows = spec.table_rows(conn) if spec.table_rows is not None else report.rows_written
            totals = flow_progress(conn, spec.names.flow)
            checks = [_accounted_check(conn, job), _not_failed_check(conn, job)]
            if spec.result_checks is not None:
                checks += spec.result_checks(conn, job)
        context.log.info(report.summary())
        # the shard's job is `ingested` now, and the flow's totals moved: say so where the UI shows them
        context.log_event(_job_observation(spec.jobs_key, job))
        context.log_event(dg.AssetObservation(asset_key=spec.progress_key, metadata={**totals.metadata(),
                                                                               "summary": totals.line()}))
        for problem in report.problems[:20]:
            context.log.warning(problem)
        return dg.MaterializeResult(
            metadata={
                "dagster/row_count": rows,
                "shard_row_count": report.rows_written,
                "provider_job_id": job.provider_job_id or "",
                "items_done": job.items_done or 0,
                "items_retryable": job.items_retryable or 0,
                "items_failed": job.items_failed or 0,
                "input_tokens": job.input_tokens or 0,
                "output_tokens": job.output_tokens or 0,
                "actual_cost_usd": float(job.actual_cost_usd or 0),
                "unusable_output_lines": len(report.problems),
                "ingest_attempt": job.ingest_failures + 1,
                "summary": report.summary(),
                **after,
            },
            check_results=checks,
        )
    return results


def _candidates_job(spec: _FlowSpec, candidates: dg.AssetsDefinition) -> Any:
    return dg.define_asset_job(f"{spec.names.prefix}_candidates_job", selection=[candidates], tags=spec.job_tags,
                               description=f"Prepare {spec.names.flow} candidates and cut new shards.")


def _submit_job(spec: _FlowSpec, request_files: dg.AssetsDefinition, batch_jobs: dg.AssetsDefinition) -> Any:
    return dg.define_asset_job(f"{spec.names.prefix}_submit_job", selection=[request_files, batch_jobs],
                               partitions_def=spec.partitions, tags=spec.job_tags,
                               description="Write one shard's request file and submit it as a provider job.")


def _ingest_job(spec: _FlowSpec, batch_outputs: dg.AssetsDefinition, results: dg.AssetsDefinition) -> Any:
    return dg.define_asset_job(f"{spec.names.prefix}_ingest_job", selection=[batch_outputs, results],
                               partitions_def=spec.partitions, tags=spec.job_tags,
                               description="Download one finished shard's outputs and ingest them.")


def _planner_sensor(spec: _FlowSpec, candidates_job: Any, submit_job: Any) -> dg.SensorDefinition:
    """`<prefix>_planner_sensor`: a candidates run when there is new work, a submit run per admissible shard."""

    @dg.sensor(name=f"{spec.names.prefix}_planner_sensor", jobs=[candidates_job, submit_job],
               minimum_interval_seconds=60, default_status=dg.DefaultSensorStatus.RUNNING,
               description=f"Requests {spec.candidates_key} when there is new work and a submit run per planned shard.")
    def planner_sensor(context: dg.SensorEvaluationContext, database: DatabaseResource,
                       providers: ProvidersResource) -> dg.SensorResult:
        provider = providers.named(provider_name_for(spec.names.flow, get_settings()))
        requests: list[dg.RunRequest] = []
        policy = get_settings().quota_policy()
        with database.connect() as conn:
            flow = spec.make_flow(provider, None)
            sql, params = flow.candidate_sql()
            unplanned = conn.execute(f"SELECT count(*) FROM ({sql}) AS c", params).fetchone()[0]
            unprepared = spec.has_unprepared(conn) if spec.has_unprepared else False
            if unplanned or unprepared:
                state = f"{unplanned}:{unprepared}:{ledger.summary(conn, spec.names.flow).items_by_state}"
                model = getattr(flow, "model", None) or provider.default_model(flow.endpoint)
                requests.append(dg.RunRequest(job_name=candidates_job.name,
                                              run_key=f"plan:{hashlib.sha256(state.encode()).hexdigest()[:16]}",
                                              tags=run_tags(flow=spec.names.flow, provider=provider.name, model=model)))
            # `submitting` too: a submit that died before the provider answered (reconciled by token first).
            # Only shards the queue quota and the budget have room for: the others wait, visibly, in the
            # ledger (`legal-batch jobs`), and go in on the tick after room frees up.
            waiting = ledger.list_jobs(conn, flow=spec.names.flow, states=ledger.UNSUBMITTED_JOB_STATES)
            ready = set(batch.admissible_shards(conn, spec.names.flow, providers.named, policy=policy))
        for job in waiting:
            if job.shard_key in ready:
                requests.append(dg.RunRequest(job_name=submit_job.name, partition_key=job.shard_key,
                                              run_key=f"submit:{job.shard_key}:{job.updated_at.isoformat()}",
                                              tags=job_run_tags(job)))
        known = set(context.instance.get_dynamic_partitions(spec.partitions.name))
        missing = [job.shard_key for job in waiting if job.shard_key not in known]  # e.g. split shards
        return dg.SensorResult(run_requests=requests,
                               dynamic_partitions_requests=[spec.partitions.build_add_request(missing)] if missing else [])
    return planner_sensor


def _status_sensor(spec: _FlowSpec, ingest_job: Any) -> dg.SensorDefinition:
    """`<prefix>_job_status_sensor`: polls open jobs and requests an ingest run per finished one."""

    @dg.sensor(name=f"{spec.names.prefix}_job_status_sensor", job=ingest_job, minimum_interval_seconds=60,
               default_status=dg.DefaultSensorStatus.RUNNING,
               description="Polls open provider jobs (bounded per tick) and requests an ingest run per finished job; "
                           f"observes each job's new state on its {spec.jobs_key} partition and the flow's totals "
                           f"on {spec.progress_key}.")
    def status_sensor(context: dg.SensorEvaluationContext, database: DatabaseResource,
                      providers: ProvidersResource) -> dg.SensorResult:
        """An ingest run per finished job; one that failed is requested again under a new run key
        (`ingest_run_key`), up to `LEGAL_BATCH_INGEST_MAX_ATTEMPTS` runs, then the job's
        `last_error` and an observation of its results partition say that it stopped and why.

        Each tick also observes, from the ledger, every job whose row changed since the last tick
        (its state on its `<prefix>_batch_jobs` partition: the materialization says what it was at
        submit) and, when they moved, the flow's totals on `<prefix>_progress` (plotted over time)."""
        cursor = StatusCursor.parse(context.cursor)
        max_attempts = get_settings().ingest_max_attempts
        requests: list[dg.RunRequest] = []
        events: list[dg.AssetObservation] = []
        with database.connect() as conn:
            polled = batch.poll_open_jobs(conn, providers.named, flow=spec.names.flow, time_budget_s=40,
                                          policy=get_settings().quota_policy())
            finished = ledger.list_jobs(conn, flow=spec.names.flow, states=ledger.TERMINAL_JOB_STATES)
            for job in finished:
                if job.ingest_failures >= max_attempts:
                    continue  # stopped; said so when it happened
                ended = _ended_run(context.instance, ingest_run_key(job))
                if ended is not None:  # that run failed (or ended without ingesting): count it
                    job, event = _count_failed_ingest(conn, context.instance, job, ended, max_attempts=max_attempts,
                                                      names=spec.names)
                    if event is not None:
                        context.log.warning(str(event.metadata["reason"].value))
                        events.append(event)
                    if job is None or job.ingest_failures >= max_attempts:
                        continue
                requests.append(dg.RunRequest(job_name=ingest_job.name, partition_key=job.shard_key,
                                              run_key=ingest_run_key(job),
                                              tags={**job_run_tags(job),
                                                    "legal_batch/ingest_attempt": str(job.ingest_failures + 1)}))
            changes = jobs_changed_since(conn, spec.names.flow, cursor.jobs_after, limit=200)
            totals = flow_progress(conn, spec.names.flow)
        known = set(context.instance.get_dynamic_partitions(spec.partitions.name)) if changes else set()
        events += [_job_observation(spec.jobs_key, change) for change in changes if change.shard_key in known]
        figures = totals.metadata()
        digest = hashlib.sha256(json.dumps(figures, sort_keys=True).encode()).hexdigest()[:16]
        if digest != cursor.progress:
            events.append(dg.AssetObservation(asset_key=spec.progress_key,
                                              metadata={**figures, "summary": totals.line()}))
        for entry in polled:
            context.log.info(f"{entry.job.shard_key}: {entry.job.provider_job_id} is {entry.status.raw_status}")
        after = changes[-1].position if changes else cursor.jobs_after
        return dg.SensorResult(run_requests=requests, asset_events=events,
                               cursor=StatusCursor(after, digest).dump())
    return status_sensor


def _progress_spec(spec: _FlowSpec) -> dg.AssetSpec:
    """`<prefix>_progress`: the flow's running totals, observed (never materialized)."""
    return dg.AssetSpec(
        spec.progress_key, group_name=spec.names.group, deps=[spec.names.results], kinds={"postgres"},
        owners=OWNERS, tags=spec.tags,
        description=f"The {spec.names.flow} flow's running totals from the ledger: items done, open, retryable and "
                    "failed, jobs open and ingested, tokens, estimated and actual spend and its real-time "
                    f"equivalent. Observed by {spec.names.prefix}_job_status_sensor whenever they move and by every "
                    "ingest; the asset's Metadata → Plots shows them over time.")


RUN_TAG_FLOW = "legal_batch/flow"
RUN_TAG_PROVIDER = "legal_batch/provider"
RUN_TAG_MODEL = "legal_batch/model"
RUN_TAG_SHARD = "legal_batch/shard"


def run_tags(*, flow: str, provider: str | None = None, model: str | None = None,
             shard: str | None = None) -> dict[str, str]:
    """The tags every run of a flow carries, however it was launched (sensor, CLI, `dagster job
    execute`, the UI): flow, and provider, model and shard where the run has them."""
    tags = {RUN_TAG_FLOW: flow, RUN_TAG_PROVIDER: provider, RUN_TAG_MODEL: model, RUN_TAG_SHARD: shard}
    return {key: value for key, value in tags.items() if value}


def job_run_tags(job: ledger.Shard) -> dict[str, str]:
    """`run_tags` of a run working on one shard: from its job row."""
    return run_tags(flow=job.flow, provider=job.provider, model=job.model, shard=job.shard_key)


def _tag_run(context: dg.AssetExecutionContext, tags: dict[str, str]) -> None:
    """Add the tags the run was launched without (e.g. by `dagster job execute` or the UI's
    Materialize button), so the runs list and timeline can be filtered by flow, provider, model, shard."""
    missing = {key: value for key, value in tags.items() if context.run.tags.get(key) != value}
    if missing:
        context.instance.add_run_tags(context.run_id, missing)


@dataclass(frozen=True)
class StatusCursor:
    """The job-status sensor's cursor: the last job change observed, and the totals last reported."""

    jobs_after: tuple[str, int] | None = None
    progress: str = ""

    @classmethod
    def parse(cls, text: str | None) -> "StatusCursor":
        try:
            data = json.loads(text or "")
        except ValueError:
            return cls()
        if not isinstance(data, dict):
            return cls()  # a cursor from before observations (a count of polled jobs)
        after = data.get("jobs_after")
        return cls(tuple(after) if after else None, str(data.get("progress", "")))  # type: ignore[arg-type]

    @classmethod
    def starting_at(cls, moment: datetime) -> "StatusCursor":
        """Observe only the changes after `moment` (a CLI run: what happened before it was observed then)."""
        return cls((moment.isoformat(), 0))

    def dump(self) -> str:
        return json.dumps({"jobs_after": list(self.jobs_after) if self.jobs_after else None,
                           "progress": self.progress})


def _job_observation(jobs_key: str, change: JobChange | ledger.Shard) -> dg.AssetObservation:
    """A job's current state on its `<prefix>_batch_jobs` partition."""
    return dg.AssetObservation(asset_key=jobs_key, partition=change.shard_key, metadata={
        "state": change.state,
        "provider_status": change.provider_status or "",
        "provider_job_id": change.provider_job_id or "",
        "requests": change.request_count,
        "items_done": change.items_done or 0,
        "items_retryable": change.items_retryable or 0,
        "items_failed": change.items_failed or 0,
        "actual_cost_usd": float(change.actual_cost_usd or 0),
        "changed_at": change.updated_at.isoformat(),
    })


def ingest_run_key(job: ledger.Shard) -> str:
    """The run key of the job's next ingest run: provider job id (or client token) + terminal state,
    and the attempt number once an ingest run of it has failed (Dagster never launches a used key)."""
    key = f"{job.provider_job_id or job.client_token}:{job.state}"
    return key if job.ingest_failures == 0 else f"{key}:attempt{job.ingest_failures + 1}"


_ENDED = (dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.CANCELED, dg.DagsterRunStatus.SUCCESS)


def _ended_run(instance: dg.DagsterInstance, run_key: str) -> dg.DagsterRun | None:
    """The run launched under `run_key` if it has ended (the caller knows its shard is not ingested)."""
    runs = instance.get_runs(filters=dg.RunsFilter(tags={"dagster/run_key": run_key}), limit=1)
    return runs[0] if runs and runs[0].status in _ENDED else None


def _run_error(instance: dg.DagsterInstance, run: dg.DagsterRun) -> str:
    """The failed step and its error's first line, or how the run ended."""
    for entry in instance.all_logs(run.run_id, of_type=dg.DagsterEventType.STEP_FAILURE):
        data = entry.dagster_event.step_failure_data if entry.dagster_event else None
        error = data.error if data else None
        while error is not None and error.cause is not None and error.cls_name == "DagsterExecutionStepExecutionError":
            error = error.cause
        if error is not None:
            text = (error.message or "").strip().removeprefix(f"{error.cls_name}: ")
            return f"{entry.step_key}: {text.splitlines()[0] if text else error.cls_name}"
    return f"the run ended {run.status.value} without ingesting the shard"


def _count_failed_ingest(conn: psycopg.Connection, instance: dg.DagsterInstance, job: ledger.Shard,
                         run: dg.DagsterRun, *, max_attempts: int, names: FlowNames
                         ) -> tuple[ledger.Shard | None, dg.AssetObservation | None]:
    """Record the ended ingest run `run` of `job` as a failed attempt (job row and an observation of
    its results partition); (None, None) when another tick recorded it first."""
    failures = job.ingest_failures + 1
    what = f"ingest run {run.run_id} of shard {job.shard_key} failed ({_run_error(instance, run)})"
    if failures < max_attempts:
        reason = f"{what}; retrying: attempt {failures + 1} of {max_attempts}"
    else:
        reason = (f"{what}; that was attempt {failures} of {max_attempts} (LEGAL_BATCH_INGEST_MAX_ATTEMPTS): the "
                  "job-status sensor stops retrying it. Fix the cause, then ingest it: `dagster asset materialize "
                  f"-m legal_batch.definitions --select {names.prefix}_batch_outputs,{names.results} --partition "
                  f"{job.shard_key}`, or its ingest job in the UI")
    updated = ledger.record_ingest_failure(conn, job, reason=reason)
    if updated is None:
        return None, None
    return updated, dg.AssetObservation(
        asset_key=names.results, partition=job.shard_key,
        metadata={"ingest": "retrying" if failures < max_attempts else "stopped", "ingest_failures": failures,
                  "ingest_max_attempts": max_attempts, "failed_run": run.run_id, "reason": reason})


@contextmanager
def _clear_failures() -> Iterator[None]:
    """Errors that a retry cannot fix fail the step at once, with their message, and no retries."""
    try:
        yield
    except (batch.ShardNotReady, LookupError, UnsupportedRequest, QuotaTooSmall) as exc:
        raise dg.Failure(description=str(exc), allow_retries=False) from exc
    except ProviderError as exc:
        if exc.retryable:
            raise
        raise dg.Failure(description=str(exc), allow_retries=False) from exc


def _ledger_check(report: VerifyReport, flow: str) -> dg.AssetCheckResult:
    details = "\n".join(f"- **{v.rule}**: {v.count} (e.g. {', '.join(v.examples)}); what to do: {v.repair}"
                        for v in report.violations)
    return dg.AssetCheckResult(
        check_name="ledger_consistent", passed=report.ok,
        metadata={"items_checked": report.checked_items.get(flow, 0), "jobs_checked": report.checked_jobs.get(flow, 0),
                  "violations": sum(v.count for v in report.violations),
                  "details": dg.MetadataValue.md(details or "every item is in exactly one state")},
    )


def _not_failed_check(conn: psycopg.Connection, job: ledger.Shard) -> dg.AssetCheckResult:
    failed = conn.execute("SELECT count(*), min(last_error) FROM batch_items WHERE job_id = %s AND state = %s",
                          (job.id, ItemState.FAILED)).fetchone()
    return dg.AssetCheckResult(
        check_name="no_items_failed", passed=failed[0] == 0, severity=dg.AssetCheckSeverity.ERROR,
        metadata={"failed": failed[0], "example": failed[1] or "", "requests": job.request_count,
                  "what_to_do": f"SELECT subject_key, last_error FROM batch_items WHERE state = '{ItemState.FAILED}'"
                                f" AND job_id = {job.id}; fix the cause, then mark them retryable and run again"})


def _accounted_check(conn: psycopg.Connection, job: ledger.Shard) -> dg.AssetCheckResult:
    still_open = conn.execute(
        "SELECT count(*) FROM batch_items WHERE job_id = %s AND state = ANY(%s)",
        (job.id, list(ledger.ITEM_OPEN_STATES)),
    ).fetchone()[0]
    closed = (job.items_done or 0) + (job.items_retryable or 0) + (job.items_failed or 0)
    passed = still_open == 0 and closed == job.request_count
    return dg.AssetCheckResult(
        check_name="shard_items_accounted", passed=passed,
        metadata={"requests": job.request_count, "done": job.items_done or 0,
                  "retryable": job.items_retryable or 0, "failed": job.items_failed or 0, "still_open": still_open},
    )
