"""Removing what a flow has made (`legal-batch reset --flow NAME`): its open provider jobs are
cancelled, then its ledger rows and results go in one transaction.

- embeddings: ledger rows, chunks (and their recorded text hashes), vectors in the vector table
  (all of it when the table is ours; in a table of yours, only the models this flow wrote), the
  record of what the cache saved and of what further sinks (Chroma, Weaviate) hold — their vectors
  stay and the next run writes every chunk to them again (same ids: replaced). The vectors go to
  the vector cache first (`vector_cache.stash_table`: a vector table emptied is the cache's first
  part gone), so the next run pays for none of them; with `cache` the vector cache goes too.
- headnotes: ledger rows, and the headnotes this flow wrote (`case_headnotes`) cleared from the
  source's headnote column; headnotes loaded with the cases stay.
- template: ledger rows and the staged runs (rows, results); output files already written stay.

`plan_reset` says what would go; `cancel_open_jobs` cancels the provider jobs still open (any
failure stops the reset before anything is removed); `apply_reset` removes it all in one
transaction, refusing if another process planned or submitted work for the flow meanwhile.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

from legal_batch.core import ledger, vector_cache
from legal_batch.core.batch import output_dir, request_file_path
from legal_batch.core.errors import UserError
from legal_batch.core.user_tables import CaseSource, VectorTable
from legal_batch.core.wording import plural
from legal_batch.providers.base import BatchProvider, ProviderError

_CHUNK_LOCK = 0x4C42_0C4B  # the embeddings flow's chunking lock: no chunking while its chunks go


@dataclass
class ResetPlan:
    """What a reset of `flow` removes (counts as found when it was planned)."""

    flow: str
    open_jobs: list[ledger.Shard] = field(default_factory=list)
    jobs: int = 0
    finished_not_ingested: int = 0
    items: int = 0
    chunks: int = 0
    vectors: int = 0
    vector_table: str = ""
    vector_models: list[str] = field(default_factory=list)
    whole_table: bool = False
    """The vector table is ours: every row goes. In a table of yours only `vector_models`' rows do."""
    headnotes: int = 0
    source: str = ""
    template_runs: int = 0
    template_rows: int = 0
    template_results: int = 0
    cache_vectors: int = 0
    cache: bool = False
    shard_keys: list[str] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.jobs or self.items or self.chunks or self.vectors or self.headnotes or self.template_runs
                    or (self.cache and self.cache_vectors))

    def lines(self) -> list[str]:
        """What will be removed, one line per kind, for the operator to read before saying yes."""
        out = []
        if self.open_jobs:
            shown = ", ".join(f"{j.shard_key} ({j.provider} {j.provider_job_id or 'being submitted'}, {j.state})"
                              for j in self.open_jobs[:5])
            more = f" and {len(self.open_jobs) - 5} more" if len(self.open_jobs) > 5 else ""
            out.append(f"cancel {plural(len(self.open_jobs), 'open provider job')}: {shown}{more}")
        if self.jobs or self.items:
            out.append(f"ledger: {plural(self.jobs, 'job')} and {plural(self.items, 'item')} of flow {self.flow}"
                       + (f" ({self.finished_not_ingested} finished jobs' results not ingested are discarded)"
                          if self.finished_not_ingested else ""))
        if self.chunks:
            out.append(f"chunks: {plural(self.chunks, 'chunk')} in case_chunks")
        if self.vectors:
            models = "every model" if self.whole_table else ", ".join(self.vector_models)
            out.append(f"vectors: {plural(self.vectors, 'row')} of {models} in {self.vector_table}")
        if self.headnotes:
            out.append(f"headnotes: {plural(self.headnotes, 'headnote')} written by the headnotes flow, cleared in "
                       f"{self.source}")
        if self.template_runs:
            out.append(f"template runs: {plural(self.template_runs, 'run')} with {plural(self.template_rows, 'row')} "
                       f"and {plural(self.template_results, 'result')} (output files stay)")
        if self.flow == "embeddings":
            out.append(f"vector cache: {plural(self.cache_vectors, 'vector')} "
                       + ("removed (--cache)" if self.cache else "kept (--cache removes it)"))
        return out


def plan_reset(conn: psycopg.Connection, flow: str, *, cache: bool = False, source: CaseSource | None = None,
               table: VectorTable | None = None) -> ResetPlan:
    source = source or CaseSource()
    table = table or VectorTable()
    plan = ResetPlan(flow, cache=cache)
    # jobs the provider may still be working on: cancelled before anything is removed
    plan.open_jobs = ledger.list_jobs(conn, flow=flow, states=ledger.QUEUED_JOB_STATES)
    plan.jobs = _count(conn, "SELECT count(*) FROM batch_jobs WHERE flow = %s", flow)
    plan.finished_not_ingested = _count(conn, "SELECT count(*) FROM batch_jobs WHERE flow = %s AND state = ANY(%s)",
                                        flow, list(ledger.TERMINAL_JOB_STATES))
    plan.items = _count(conn, "SELECT count(*) FROM batch_items WHERE flow = %s", flow)
    plan.shard_keys = [key for (key,) in conn.execute("SELECT shard_key FROM batch_jobs WHERE flow = %s", (flow,))]
    if flow == "embeddings":
        plan.chunks = _count(conn, "SELECT count(*) FROM case_chunks")
        plan.vector_table = table.name
        plan.whole_table = table.owned(conn)
        plan.vector_models = _models(conn)
        plan.vectors = _count(conn, f"SELECT count(*) FROM {table.relation} WHERE %s OR model = ANY(%s::text[])",
                              plan.whole_table, plan.vector_models)
        plan.cache_vectors = _count(  # what the cache holds after the reset, unless --cache: its own and the table's
            conn, "SELECT count(*) FROM (SELECT model, text_sha256 FROM vector_cache UNION SELECT model, text_sha256"
            f" FROM {table.relation} WHERE text_sha256 IS NOT NULL AND model = ANY(%s::text[])) AS kept",
            plan.vector_models)
    elif flow == "headnotes":
        plan.source = source.name
        plan.headnotes = _count(conn, "SELECT count(*) FROM case_headnotes")
    elif flow == "template":
        plan.template_runs = _count(conn, "SELECT count(*) FROM template_runs")
        plan.template_rows = _count(conn, "SELECT count(*) FROM template_rows")
        plan.template_results = _count(conn, "SELECT count(*) FROM template_results")
    return plan


def cancel_open_jobs(plan: ResetPlan, providers: Callable[[str], BatchProvider],
                     echo: Callable[[str], None] = print) -> int:
    """Cancel every open provider job of the plan; a job the provider cannot cancel stops the reset
    (`UserError`, nothing removed). A job still `submitting` is looked up by its client token first."""
    cancelled = 0
    for job in plan.open_jobs:
        provider = providers(job.provider)
        job_id = job.provider_job_id
        try:
            if job_id is None:
                found = provider.find_job(client_token=job.client_token)
                job_id = found.provider_job_id if found is not None else None
            if job_id is None:
                echo(f"  {job.shard_key}: no provider job was created (client token {job.client_token}); nothing to "
                     "cancel")
                continue
            provider.cancel(job_id)
        except ProviderError as exc:
            raise UserError(f"could not cancel {job.provider} job {job_id} of shard {job.shard_key} ({exc}); nothing "
                            "was removed: cancel it in the provider's console, or run the reset again",
                            exit_code=1) from exc
        cancelled += 1
        echo(f"  cancelled {job.shard_key}: {job.provider} job {job_id}")
    return cancelled


def apply_reset(conn: psycopg.Connection, plan: ResetPlan, *, source: CaseSource | None = None,
                table: VectorTable | None = None, files_root: Path | None = None) -> dict[str, int]:
    """Remove everything `plan` lists, in one transaction (after `cancel_open_jobs`); then the
    shards' request and output files under `files_root`. Returns the rows removed by kind."""
    source = source or CaseSource()
    table = table or VectorTable()
    flow = plan.flow
    removed: dict[str, int] = {}
    with conn.transaction():
        if flow == "embeddings":
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_CHUNK_LOCK,))
        ledger.lock_planning(conn, flow)
        keys = {key for (key,) in conn.execute("SELECT shard_key FROM batch_jobs WHERE flow = %s", (flow,))}
        opened = {j.shard_key for j in ledger.list_jobs(conn, flow=flow, states=ledger.QUEUED_JOB_STATES)}
        if not keys <= set(plan.shard_keys) or not opened <= {j.shard_key for j in plan.open_jobs}:
            raise UserError(f"another process planned or submitted {flow} work while the reset was being confirmed; "
                            "nothing was removed: stop it (the Dagster daemon, another run) and run the reset again",
                            exit_code=1)
        makers = _providers_of_models(conn) if flow == "embeddings" else []  # read before the jobs go
        removed["items"] = conn.execute("DELETE FROM batch_items WHERE flow = %s", (flow,)).rowcount
        removed["jobs"] = conn.execute("DELETE FROM batch_jobs WHERE flow = %s", (flow,)).rowcount
        if flow == "embeddings":
            relation = table.relation
            if not plan.cache:
                for provider, model in makers:
                    vector_cache.stash_table(conn, vector_cache.CacheKey(provider, model, table.dimensions),
                                             table=relation)
            removed["vectors"] = conn.execute(
                f"DELETE FROM {relation} WHERE %s OR model = ANY(%s::text[])",
                (plan.whole_table, plan.vector_models)).rowcount
            removed["chunks"] = conn.execute("DELETE FROM case_chunks").rowcount
            conn.execute("DELETE FROM chunked_cases")
            conn.execute("DELETE FROM cache_savings WHERE flow = %s", (flow,))
            # the further sinks are rewritten (same ids: replaced) by the next run
            removed["sink_records"] = conn.execute("DELETE FROM sink_vectors").rowcount
            if plan.cache:
                removed["cache_vectors"] = conn.execute("DELETE FROM vector_cache").rowcount
        elif flow == "headnotes":
            removed["headnotes"] = _clear_headnotes(conn, source)
        elif flow == "template":
            removed["template_runs"] = conn.execute("DELETE FROM template_runs").rowcount
    if files_root is not None:
        for key in plan.shard_keys:
            request_file_path(files_root, flow, key).unlink(missing_ok=True)
            shutil.rmtree(output_dir(files_root, flow, key), ignore_errors=True)
    return removed


def _clear_headnotes(conn: psycopg.Connection, source: CaseSource) -> int:
    """Clear the headnotes this flow wrote (recorded in `case_headnotes`) from the source."""
    headnote, id_column, relation = source.column("headnote"), source.column("id"), source.relation
    if headnote is not None:
        own = ", headnote_model = NULL, headnote_generated_at = NULL, updated_at = now()" if source.builtin else ""
        clause = f"{headnote} = NULL{own}"
        conn.execute(f"UPDATE {relation} t SET {clause} FROM case_headnotes h WHERE t.{id_column} = h.case_id")
    return conn.execute("DELETE FROM case_headnotes").rowcount


def _models(conn: psycopg.Connection) -> list[str]:
    """The models the embeddings flow wrote vectors of: its jobs', and the cache's."""
    return [model for (model,) in conn.execute(
        "SELECT model FROM batch_jobs WHERE flow = 'embeddings' UNION SELECT model FROM cache_savings"
        " WHERE flow = 'embeddings' ORDER BY 1")]


def _providers_of_models(conn: psycopg.Connection) -> list[tuple[str, str]]:
    """(provider, model) of every model the embeddings flow wrote vectors of."""
    return conn.execute(
        "SELECT provider, model FROM batch_jobs WHERE flow = 'embeddings' UNION SELECT provider, model"
        " FROM cache_savings WHERE flow = 'embeddings' ORDER BY 1, 2").fetchall()


def _count(conn: psycopg.Connection, sql: str, *params: object) -> int:
    return int(conn.execute(sql, params).fetchone()[0])
