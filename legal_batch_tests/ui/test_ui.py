"""The UI the way a user sees it: `make dev` (`python -m legal_batch.ui`, i.e. `dg dev`) started on a
demo instance (a small local-provider run of the embeddings and headnotes flows first), asked
through the webserver's GraphQL API — what its pages render — and stopped cleanly."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from legal_batch.settings import get_settings
from legal_batch_tests.ui.support import DEMO_ENV, UiServer, run_demo, ui_server

pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory, pg_admin_url: str, template_url: str
         ) -> Iterator[tuple[UiServer, dict[str, list[str]]]]:
    import uuid

    import psycopg

    from legal_batch_tests.conftest import TEMPLATE_DB, _with_database

    name = f"lb_test_ui_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg_admin_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}" TEMPLATE "{TEMPLATE_DB}"')
    work = tmp_path_factory.mktemp("ui")
    env = {key: value for key, value in os.environ.items() if not key.startswith(("LEGAL_BATCH_", "DAGSTER_"))}
    env.update(DEMO_ENV, LEGAL_BATCH_DATABASE_URL=_with_database(pg_admin_url, name),
               LEGAL_BATCH_HOME=str(work / "home"), DAGSTER_HOME=str(work / "dagster"))
    saved = dict(os.environ)
    try:
        os.environ.clear()
        os.environ.update(env)
        get_settings(fresh=True)
        shards = run_demo(work / "dagster")
        with ui_server(env, work / "ui.log") as server:
            yield server, shards
        assert server.process.returncode is not None, "the UI stopped"
    finally:
        os.environ.clear()
        os.environ.update(saved)
        get_settings(fresh=True)
        with psycopg.connect(pg_admin_url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


ASSETS = """{ assetNodes { assetKey { path } groupName kinds isMaterializable isPartitioned
  owners { ... on TeamAssetOwner { team } } dependencyKeys { path } } }"""


def test_the_asset_graph_shows_three_flows_joined_through_their_sources(demo):
    server, _ = demo
    nodes = {"/".join(n["assetKey"]["path"]): n for n in server.graphql(ASSETS)["assetNodes"]}
    assert {nodes[k]["groupName"] for k in ("court_cases", "headnote_corpus", "template_input_files")} == {"sources"}
    assert not any(nodes[k]["isMaterializable"] for k in ("court_cases", "headnote_corpus", "template_input_files"))
    parents = {key: {"/".join(d["path"]) for d in nodes[key]["dependencyKeys"]}
               for key in ("embedding_candidates", "headnote_candidates", "template_inputs")}
    assert parents == {"embedding_candidates": {"court_cases"}, "headnote_candidates": {"court_cases", "headnote_corpus"},
                       "template_inputs": {"template_input_files"}}
    assert {nodes[k]["groupName"] for k in nodes} == {"sources", "embeddings", "headnotes", "template"}
    assert set(nodes["case_embeddings"]["kinds"]) == {"postgres", "pgvector"}
    assert "python" in nodes["headnote_batch_jobs"]["kinds"], "the local provider's kind"
    assert all(n["kinds"] and n["owners"] == [{"team": "legal-batch"}] for n in nodes.values())
    assert all(nodes[f"{p}_progress"]["groupName"] == g for p, g in
               (("embedding", "embeddings"), ("headnote", "headnotes"), ("template", "template")))


SHARDS = """query ($key: AssetKeyInput!, $shard: String!) { assetNodeOrError(assetKey: $key) { ... on AssetNode {
  partitionKeys
  assetPartitionStatuses { ... on DefaultPartitionStatuses { materializedPartitions failedPartitions } }
  latestMaterializationByPartition(partitions: [$shard]) { metadataEntries { label
    ... on TextMetadataEntry { text } ... on IntMetadataEntry { intValue } } }
  assetObservations(partitions: [$shard], limit: 1) { metadataEntries { label ... on TextMetadataEntry { text } } }
  metadataEntries { label ... on TableSchemaMetadataEntry { schema { columns { name } } } }
  assetChecksOrError { ... on AssetChecks { checks { name executionForLatestMaterialization { status } } } }
} } }"""


def entries(event: dict) -> dict:
    return {e["label"]: e.get("text", e.get("intValue")) for e in event["metadataEntries"]}


def test_shard_partitions_show_their_status_current_state_and_checks(demo):
    server, shards = demo
    assert len(shards["embeddings"]) >= 2
    shard_rows, table_rows = [], []
    for shard in shards["embeddings"]:
        jobs = server.graphql(SHARDS, {"key": {"path": ["embedding_batch_jobs"]}, "shard": shard})["assetNodeOrError"]
        assert sorted(jobs["partitionKeys"]) == sorted(shards["embeddings"])
        assert sorted(jobs["assetPartitionStatuses"]["materializedPartitions"]) == sorted(shards["embeddings"])
        assert jobs["assetPartitionStatuses"]["failedPartitions"] == []
        (observed,) = jobs["assetObservations"]
        assert entries(observed)["state"] == "ingested", "the job's state now, not the one at submit"

        results = server.graphql(SHARDS, {"key": {"path": ["case_embeddings"]}, "shard": shard})["assetNodeOrError"]
        (latest,) = results["latestMaterializationByPartition"]
        shard_rows.append(entries(latest)["shard_row_count"])
        table_rows.append(entries(latest)["dagster/row_count"])
        checks = {c["name"]: c["executionForLatestMaterialization"]["status"]
                  for c in results["assetChecksOrError"]["checks"]}
        assert checks == {"shard_items_accounted": "SUCCEEDED", "no_items_failed": "SUCCEEDED",
                          "vectors_finite_unit_norm": "SUCCEEDED", "vectors_in_every_sink": "SUCCEEDED"}
    assert max(table_rows) == sum(shard_rows), "Row count: the whole table once the last shard is in"
    schema = {e["label"]: e for e in results["metadataEntries"]}["dagster/column_schema"]["schema"]
    assert [c["name"] for c in schema["columns"]][:4] == ["case_id", "chunk_index", "model", "embedding"]


RUNS = "{ runsOrError { ... on Runs { results { jobName status tags { key value } } } } }"


def test_every_run_carries_flow_provider_model_and_shard_tags(demo):
    server, shards = demo
    runs = server.graphql(RUNS)["runsOrError"]["results"]
    assert len(runs) >= 2 * len(shards["embeddings"]) + 2
    for run in runs:
        tags = {t["key"]: t["value"] for t in run["tags"]}
        assert run["status"] == "SUCCESS", run
        flow = tags["legal_batch/flow"]
        assert tags["legal_batch/provider"] == "local" and tags["legal_batch/model"].startswith("local-")
        if "candidates" not in run["jobName"]:
            assert tags["legal_batch/shard"] in shards[flow]


PROGRESS = """{ assetNodeOrError(assetKey: {path: ["embedding_progress"]}) { ... on AssetNode {
  assetObservations(limit: 100) { metadataEntries { label ... on IntMetadataEntry { intValue } } } } } }"""


def test_the_progress_totals_are_observed_over_time(demo):
    server, _ = demo
    observations = server.graphql(PROGRESS)["assetNodeOrError"]["assetObservations"]
    assert len(observations) >= 2
    done = [entries(o)["items_done"] for o in reversed(observations)]  # oldest first
    assert done == sorted(done) and done[-1] > done[0], "items done grow from one observation to the next"


def test_the_sensors_are_listed_and_running(demo):
    server, _ = demo
    repositories = server.graphql("{ repositoriesOrError { ... on RepositoryConnection { nodes { name "
                                  "location { name } sensors { name sensorState { status } } } } } }")
    (repository,) = repositories["repositoriesOrError"]["nodes"]
    assert repository["location"]["name"] == "legal_batch"
    sensors = {s["name"]: s["sensorState"]["status"] for s in repository["sensors"]}
    assert sensors == {f"{p}_{kind}_sensor": "RUNNING" for p in ("embedding", "headnote", "template")
                       for kind in ("planner", "job_status")}


def test_make_dev_prints_no_avoidable_warning(demo):
    server, _ = demo
    log = server.log()
    for warning in ("SupersessionWarning", "DeprecationWarning", "BetaWarning", "PreviewWarning",
                    "will not be used to configure Dagster"):
        assert warning not in log, f"{warning} in the UI's output:\n{log[-3000:]}"
    assert "Serving dagster-webserver" in log

