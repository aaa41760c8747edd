"""What an operator sees in Dagster: the flows joined through their source assets, kinds, owners and
table schemas; the whole table's row count next to the shard's; each job's current state on its
batch_jobs partition; the flow's running totals observed over time; run tags on every run however
launched; and progress lines at least every 10 s on long steps."""

from __future__ import annotations

import time

import dagster as dg
import pytest

from legal_batch.core import ledger
from legal_batch.core.progress import Heartbeat, watch_index_build
from legal_batch.core.seed import seed_demo_cases
from legal_batch.db import connect
from legal_batch.definitions import FLOWS_BY_NAME, defs
from legal_batch.driver import FlowDriver
from legal_batch.settings import get_settings

EMB = FLOWS_BY_NAME["embeddings"]
TAGS = ("legal_batch/flow", "legal_batch/provider", "legal_batch/model", "legal_batch/shard")


def node(key: str):
    return defs.resolve_asset_graph().get(dg.AssetKey(key))


def test_the_three_flows_hang_off_their_source_assets():
    graph = defs.resolve_asset_graph()
    sources = {"court_cases", "headnote_corpus", "template_input_files"}
    for key in sources:
        assert not graph.get(dg.AssetKey(key)).is_materializable, f"{key} is an external source asset"
        assert graph.get(dg.AssetKey(key)).group_name == "sources"
    parents = {key: {p.to_user_string() for p in graph.get(dg.AssetKey(key)).parent_keys}
               for key in ("embedding_candidates", "headnote_candidates", "template_inputs")}
    assert parents == {"embedding_candidates": {"court_cases"},
                       "headnote_candidates": {"court_cases", "headnote_corpus"},
                       "template_inputs": {"template_input_files"}}
    # embeddings and headnotes are one connected graph through court_cases
    assert {"embedding_candidates", "headnote_candidates"} <= {
        k.to_user_string() for k in graph.get(dg.AssetKey("court_cases")).child_keys}
    for flow, prefix in (("embeddings", "embedding"), ("headnotes", "headnote"), ("template", "template")):
        progress = graph.get(dg.AssetKey(f"{prefix}_progress"))
        assert progress.group_name == flow and not progress.is_materializable


def test_every_asset_has_kinds_and_owners_and_tables_have_their_schema():
    graph = defs.resolve_asset_graph()
    for key in graph.get_all_asset_keys():
        spec = graph.get(key)
        assert spec.kinds, f"{key.to_user_string()} has no kinds"
        assert spec.owners == ["team:legal-batch"], key
    assert {"postgres", "pgvector"} <= node("case_embeddings").kinds
    assert {"postgres", "python"} <= node("embedding_candidates").kinds
    assert "python" in node("embedding_batch_jobs").kinds, "the configured (local) provider"
    assert node("embedding_batch_jobs").tags["flow"] == "embeddings"
    columns = {key: [c.name for c in node(key).metadata["dagster/column_schema"].columns]
               for key in ("case_embeddings", "court_case_headnotes", "template_results", "court_cases")}
    assert columns["case_embeddings"] == ["case_id", "chunk_index", "model", "embedding", "created_at"]
    assert columns["court_case_headnotes"] == ["id", "headnote", "headnote_model", "headnote_generated_at"]
    assert columns["template_results"][:3] == ["run_id", "file_key", "row_no"]
    assert "full_text" in columns["court_cases"]
    assert node("court_case_headnotes").metadata["dagster/table_name"] == "court_cases"


def test_kinds_follow_the_configured_provider():
    from legal_batch.flows.catalog import file_kinds, provider_kinds

    assert provider_kinds("openai") == {"openai"}
    assert provider_kinds("bedrock") == {"bedrock", "s3"}
    assert "s3" in file_kinds("bedrock") and "s3" not in file_kinds("openai")


@pytest.fixture
def two_shards(lb_env, monkeypatch):
    monkeypatch.setenv("LEGAL_BATCH_SHARD_MAX_RECORDS", "25")
    return get_settings(fresh=True)


def test_a_cli_run_leaves_table_counts_current_states_totals_and_tags(two_shards, conn, dagster_instance):
    seed_demo_cases(conn, cases=4)
    run = FlowDriver(EMB, defs, flow="embeddings", echo=lambda _: None,
                     dagster_instance=dagster_instance).run(wait=True, poll_interval=0)
    jobs = ledger.list_jobs(conn, flow="embeddings")
    assert len(jobs) >= 2 and {j.state for j in jobs} == {"ingested"} and run.failed_runs == []
    vectors = conn.execute("SELECT count(*) FROM case_embeddings").fetchone()[0]

    # the whole table's row count on every ingest; the shard's own rows beside it
    events = dagster_instance.fetch_materializations(dg.AssetKey("case_embeddings"), limit=100).records
    latest_by_shard = {}
    for record in sorted(events, key=lambda r: r.storage_id):
        latest_by_shard[record.partition_key] = record.asset_materialization.metadata
    last = max(events, key=lambda r: r.storage_id).asset_materialization.metadata
    assert last["dagster/row_count"].value == vectors
    assert sum(m["shard_row_count"].value for m in latest_by_shard.values()) == vectors
    assert all(m["shard_row_count"].value < vectors for m in latest_by_shard.values())

    # the batch_jobs partition shows the job's current state, not the one it had at submit
    for job in jobs:
        submitted = dagster_instance.fetch_materializations(
            dg.AssetRecordsFilter(asset_key=dg.AssetKey("embedding_batch_jobs"), asset_partitions=[job.shard_key]),
            limit=1).records[0]
        assert submitted.asset_materialization.metadata["state"].value in ("pending", "running", "completed")
        observed = dagster_instance.fetch_observations(
            dg.AssetRecordsFilter(asset_key=dg.AssetKey("embedding_batch_jobs"), asset_partitions=[job.shard_key]),
            limit=1).records
        assert observed, f"no observation of {job.shard_key}"
        assert observed[0].asset_observation.metadata["state"].value == "ingested"

    # the running totals, observed as they moved
    totals = dagster_instance.fetch_observations(dg.AssetKey("embedding_progress"), limit=100).records
    assert len(totals) >= 2, "observed more than once: a line to plot"
    latest = max(totals, key=lambda r: r.storage_id).asset_observation.metadata
    assert latest["items_done"].value == vectors and latest["items_open"].value == 0
    assert latest["items_failed"].value == 0 and latest["jobs_ingested"].value == len(jobs)
    assert latest["input_tokens"].value > 0
    assert {"est_cost_usd", "actual_cost_usd", "realtime_equivalent_usd"} <= set(latest)

    # every run of the flow carries flow/provider/model, and the shard runs their shard
    runs = dagster_instance.get_runs()
    assert runs
    for dagster_run in runs:
        assert dagster_run.tags["legal_batch/flow"] == "embeddings"
        assert dagster_run.tags["legal_batch/provider"] == "local"
        assert dagster_run.tags["legal_batch/model"] == "local-lexical-v1", dagster_run.job_name
        if dagster_run.job_name != "embedding_candidates_job":
            assert dagster_run.tags["legal_batch/shard"] in {j.shard_key for j in jobs}


def test_a_run_launched_without_tags_gets_them_and_sensor_requests_carry_them(lb_env, conn, dagster_instance):
    seed_demo_cases(conn, cases=2)
    driver = FlowDriver(EMB, defs, flow="embeddings", echo=lambda _: None, dagster_instance=dagster_instance)
    driver.run(wait=False)
    (job,) = ledger.list_jobs(conn, flow="embeddings")

    # as `dagster job execute` or the UI would: the job's own tags and none of the driver's
    result = defs.resolve_job_def("embedding_ingest_job").execute_in_process(
        instance=dagster_instance, partition_key=job.shard_key, raise_on_error=False)
    tags = dagster_instance.get_run_by_id(result.run_id).tags
    assert {key: tags.get(key) for key in TAGS} == {
        "legal_batch/flow": "embeddings", "legal_batch/provider": "local", "legal_batch/model": job.model,
        "legal_batch/shard": job.shard_key}
    assert defs.resolve_job_def("embedding_submit_job").tags["legal_batch/flow"] == "embeddings"

    # the sensors' run requests carry them before the run starts
    seed_demo_cases(conn, cases=3)
    context = dg.build_sensor_context(instance=dagster_instance, resources=defs.resources)
    planner = EMB.planner_sensor(context)
    (plan,) = planner.run_requests
    assert plan.tags["legal_batch/flow"] == "embeddings" and plan.tags["legal_batch/model"] == "local-lexical-v1"


def test_heartbeat_logs_a_long_step_every_ten_seconds():
    now = [0.0]
    lines: list[str] = []
    beat = Heartbeat(lines.append, "chunking cases", clock=lambda: now[0])
    for _ in range(60):  # 60 pieces of 200 cases, 2 s each
        now[0] += 2
        beat.beat(200)
    assert len(lines) == 12
    assert lines[0] == "chunking cases: 1,000 so far in 10 s (100/s)"
    assert lines[-1].startswith("chunking cases: 12,000 so far in 120 s")


def test_heartbeat_gives_an_eta_once_it_knows_the_total():
    now = [0.0]
    lines: list[str] = []
    beat = Heartbeat(lines.append, "chunking cases", clock=lambda: now[0])
    beat.expect(12_000)
    for _ in range(10):
        now[0] += 2
        beat.beat(200)
    assert lines == ["chunking cases: 1,000 of 12,000 in 10 s (100.0/s), 11,000 left, ETA 1 min 50 s",
                     "chunking cases: 2,000 of 12,000 in 20 s (100.0/s), 10,000 left, ETA 1 min 40 s"]


def test_heartbeat_logs_on_time_while_a_slow_batch_runs():
    lines: list[str] = []
    beat = Heartbeat(lines.append, "chunking cases", every_s=0.2, total=400)
    with beat.ticking():
        time.sleep(1.1)  # no batch finishes
    assert len(lines) >= 3
    assert lines[0].startswith("chunking cases: 0 of 400 in 0 s (0.0/s), 400 left, ETA unknown yet")


def test_an_index_build_reports_its_progress_while_it_runs(lb_env, conn):
    conn.execute("CREATE TABLE progress_probe (v vector(256))")
    conn.execute("INSERT INTO progress_probe SELECT array_agg(random())::vector(256)"
                 " FROM generate_series(1, 5000) g, generate_series(1, 256) d GROUP BY g")
    lines: list[str] = []
    url = lb_env.database_url or ""

    def second_connection():
        return connect(url)

    with watch_index_build(second_connection, lines.append, table="progress_probe", every_s=0.1):
        conn.execute("CREATE INDEX ON progress_probe USING hnsw (v vector_cosine_ops)")
    assert lines, "no progress line during the build"
    assert all(line.startswith("building the index on progress_probe: ") for line in lines), lines
    assert any("rows" in line or "blocks" in line for line in lines)
