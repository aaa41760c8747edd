"""The embeddings flow writing several vector sinks at once (pgvector, an embedded Chroma, Weaviate
through its client against the emulator), and reading the receipt-line records from DynamoDB (moto's
server, unpatched boto3): done means stored in every sink; a sink's failure costs no second request."""

from __future__ import annotations

import uuid

import chromadb
import dagster as dg
import numpy as np
import psycopg
import pytest
from chromadb.config import Settings as ChromaSettings
from typer.testing import CliRunner

from legal_batch.cli import app
from legal_batch.core import ledger
from legal_batch.core.seed import seed_demo_cases
from legal_batch.core.user_tables import VectorTable
from legal_batch.definitions import FLOWS_BY_NAME, defs
from legal_batch.driver import FlowDriver
from legal_batch.flows.embeddings.replicas import verify_sinks
from legal_batch.settings import get_settings
from legal_batch.sinks.chroma import collection_name as chroma_collection
from legal_batch.sinks.weaviate import collection_name as weaviate_collection
from legal_batch.sources.dynamodb import dynamodb_client
from legal_batch_tests.emulators.dynamodb import DynamoDBServer
from legal_batch_tests.emulators.weaviate import WeaviateEmulator
from legal_batch_tests.test_cli_errors import assert_one_line, run_main

EMB = FLOWS_BY_NAME["embeddings"]
MODEL = "local-lexical-v1"


def driver(instance: dg.DagsterInstance, **plan_config: str) -> FlowDriver:
    return FlowDriver(EMB, defs, flow="embeddings", echo=lambda _: None, dagster_instance=instance,
                      plan_config=plan_config or None)


def scalar(conn: psycopg.Connection, sql: str, *params: object) -> object:
    return conn.execute(sql, params).fetchone()[0]


def chroma(settings) -> chromadb.Collection:
    client = chromadb.PersistentClient(path=str(settings.home_dir / "chroma"),
                                       settings=ChromaSettings(anonymized_telemetry=False))
    return client.get_collection(chroma_collection(MODEL, 1024))


@pytest.fixture
def weaviate(monkeypatch):
    with WeaviateEmulator() as emulator:
        for key, value in emulator.env().items():
            monkeypatch.setenv(key, value)
        yield emulator


def test_every_sink_holds_every_chunk_and_verify_and_the_checks_say_so(lb_env, conn, dagster_instance, weaviate,
                                                                       monkeypatch):
    monkeypatch.setenv("LEGAL_BATCH_EMBEDDINGS_SINKS", "pgvector,chroma,weaviate")
    settings = get_settings(fresh=True)
    seed_demo_cases(conn, cases=3)
    run = driver(dagster_instance).finish(driver(dagster_instance).run(wait=True, poll_interval=0))

    chunks = scalar(conn, "SELECT count(*) FROM case_chunks")
    assert run.ok, run.report()
    assert ledger.summary(conn, "embeddings").items_by_state == {"done": chunks}
    collection = chroma(settings)
    assert collection.count() == chunks
    assert len(weaviate.stored(weaviate_collection(MODEL, 1024))) == chunks
    assert scalar(conn, "SELECT count(*) FROM sink_vectors") == 2 * chunks

    # what Chroma holds is the chunk's text, its metadata and the vector pgvector holds
    case_id, index, text, sha, citation = conn.execute(
        "SELECT c.case_id::text, c.chunk_index, c.chunk_text, c.text_sha256, k.neutral_citation FROM case_chunks c"
        " JOIN court_cases k ON k.id = c.case_id ORDER BY 1, 2 LIMIT 1").fetchone()
    stored = collection.get(ids=[f"{case_id}:{index}"], include=["documents", "metadatas", "embeddings"])
    assert stored["documents"] == [text]
    expected = {"case_id": case_id, "chunk_index": index, "model": MODEL, "text_sha256": sha, "citation": citation}
    assert {key: stored["metadatas"][0].get(key) for key in expected} == expected
    ours = conn.execute("SELECT embedding FROM case_embeddings WHERE case_id = %s AND chunk_index = %s",
                        (case_id, index)).fetchone()[0]
    assert np.allclose(stored["embeddings"][0], ours.to_numpy(), atol=1e-6)

    verdicts = verify_sinks(conn, names=["pgvector", "chroma", "weaviate"], table=VectorTable(), settings=settings)
    assert [(v.stored, v.expected, v.ok) for v in verdicts] == [(chunks, chunks, True)] * 2
    check = dagster_instance.event_log_storage.get_latest_asset_check_execution_by_key(
        [dg.AssetCheckKey(dg.AssetKey("case_embeddings"), "vectors_in_every_sink")])
    assert list(check.values())[0].status.value == "SUCCEEDED"

    # a vector lost from a sink behind our back: verify says so (and exits 1), the next run writes it again
    collection.delete(ids=[f"{case_id}:{index}"])
    result = CliRunner().invoke(app, ["verify", "--flow", "embeddings"])
    assert result.exit_code == 1 and f"{chunks - 1:,} vectors, {chunks:,} chunks done" in result.output


def test_a_sink_down_during_ingest_leaves_its_chunks_retryable_and_the_retry_requests_nothing(
        lb_env, conn, dagster_instance, weaviate, monkeypatch):
    monkeypatch.setenv("LEGAL_BATCH_EMBEDDINGS_SINKS", "pgvector,weaviate")
    get_settings(fresh=True)
    seed_demo_cases(conn, cases=2)
    first = driver(dagster_instance)
    first.run(wait=False)  # planned and submitted while Weaviate is up
    weaviate.stop()  # ... and unreachable when the results come back
    state = first.new_run()
    while first.tick_status(state):  # poll until the shard is ingested
        pass

    chunks = scalar(conn, "SELECT count(*) FROM case_chunks")
    assert ledger.summary(conn, "embeddings").items_by_state == {"retryable": chunks}
    reasons = {row[0] for row in conn.execute("SELECT DISTINCT last_error FROM batch_items")}
    assert len(reasons) == 1 and reasons.pop().startswith("not stored in the weaviate sink: Weaviate at http://")
    assert scalar(conn, "SELECT count(*) FROM case_embeddings") == chunks, "kept: never requested again"
    requests = scalar(conn, "SELECT sum(request_count) FROM batch_jobs")

    # a planning pass while Weaviate is still down undoes nothing and asks for nothing
    still_down = driver(dagster_instance)
    still_down.plan(still_down.new_run(), limit=None)
    assert ledger.summary(conn, "embeddings").items_by_state == {"retryable": chunks}
    assert scalar(conn, "SELECT count(*) FROM case_embeddings") == chunks
    assert scalar(conn, "SELECT sum(request_count) FROM batch_jobs") == requests

    weaviate.start()  # back (on new ports: the settings follow)
    for key, value in weaviate.env().items():
        monkeypatch.setenv(key, value)
    get_settings(fresh=True)
    again = driver(dagster_instance)
    run = again.finish(again.run(wait=True, poll_interval=0))

    assert run.ok, run.report()
    assert ledger.summary(conn, "embeddings").items_by_state == {"done": chunks}
    assert scalar(conn, "SELECT sum(request_count) FROM batch_jobs") == requests, "no new request"
    assert len(weaviate.stored(weaviate_collection(MODEL, 1024))) == chunks
    assert scalar(conn, "SELECT count(*) FROM case_embeddings") == chunks


def test_objects_a_sink_refuses_are_named_and_stay_retryable_after_the_run(lb_env, conn, dagster_instance,
                                                                          weaviate, monkeypatch):
    monkeypatch.setenv("LEGAL_BATCH_EMBEDDINGS_SINKS", "pgvector,weaviate")
    get_settings(fresh=True)
    seed_demo_cases(conn, cases=2)
    weaviate.reject(lambda key, props: "shard is read-only" if props.get("chunk_index") == 1 else None)
    run = driver(dagster_instance).finish(driver(dagster_instance).run(wait=True, poll_interval=0))

    refused = scalar(conn, "SELECT count(*) FROM case_chunks WHERE chunk_index = 1")
    chunks = scalar(conn, "SELECT count(*) FROM case_chunks")
    assert not run.ok
    # each pass writes them again; after LEGAL_BATCH_MAX_ATTEMPTS (3) they fail, saying why — never paid again
    assert [g.count for g in run.failed_items] == [refused]
    assert "shard is read-only" in run.report()[0] and "gave up after 3 attempts" in run.report()[0]
    assert ledger.summary(conn, "embeddings").items_by_state == {"done": chunks - refused, "failed": refused}
    assert scalar(conn, "SELECT sum(request_count) FROM batch_jobs") == chunks


def test_a_collection_of_another_dimension_is_one_line_before_any_request(lb_env, conn, capsys, monkeypatch):
    client = chromadb.PersistentClient(path=str(lb_env.home_dir / "chroma"),
                                       settings=ChromaSettings(anonymized_telemetry=False))
    client.create_collection(chroma_collection(MODEL, 1024), metadata={"dimensions": 512},
                             configuration={"hnsw": {"space": "cosine"}})
    seed_demo_cases(conn, cases=1)
    code, _, err = run_main(capsys, monkeypatch, "embeddings", "run", "--sink", "pgvector,chroma")

    assert_one_line(code, err, "holds 512-dimensional vectors, not 1024", "LEGAL_BATCH_CHROMA_COLLECTION")
    assert scalar(conn, "SELECT count(*) FROM batch_jobs") == 0


@pytest.mark.parametrize(("args", "expected"), [
    (["embeddings", "run", "--sink", "pgvector,pinecone"], "unknown sink 'pinecone'"),
    (["embeddings", "run", "--source", "mongodb"], "--source='mongodb' is not a record source"),
    (["embeddings", "run", "--source", "dynamodb"], "LEGAL_BATCH_DYNAMODB_TABLE"),
    (["embeddings", "run", "--sink", "weaviate"], "LEGAL_BATCH_WEAVIATE_URL"),
])
def test_a_sink_or_source_mistake_is_one_line(lb_env, conn, capsys, monkeypatch, args, expected):
    code, _, err = run_main(capsys, monkeypatch, *args)
    assert_one_line(code, err, expected)
    assert scalar(conn, "SELECT count(*) FROM batch_jobs") == 0


def test_only_the_flow_that_stores_vectors_offers_sink_and_source(lb_env, capsys, monkeypatch):
    code, _, err = run_main(capsys, monkeypatch, "headnotes", "run", "--sink", "chroma")
    assert code == 2 and "No such option: --sink" in err


# -- the receipt-line pattern: DynamoDB in, Chroma out, statuses written back ----------------------------

@pytest.fixture
def receipts(monkeypatch):
    with DynamoDBServer() as server:
        for key, value in server.env().items():
            monkeypatch.setenv(key, value)
        table = f"receipt_lines_{uuid.uuid4().hex[:8]}"
        client = dynamodb_client()
        client.create_table(TableName=table, BillingMode="PAY_PER_REQUEST",
                            KeySchema=[{"AttributeName": "image_id", "KeyType": "HASH"},
                                       {"AttributeName": "line_id", "KeyType": "RANGE"}],
                            AttributeDefinitions=[{"AttributeName": "image_id", "AttributeType": "S"},
                                                  {"AttributeName": "line_id", "AttributeType": "N"}])
        for n in range(40):
            client.put_item(TableName=table, Item={"image_id": {"S": f"IMG-{n // 8}"}, "line_id": {"N": str(n % 8)},
                                                   "text": {"S": f"ITEM {n} WHOLE MILK 2L  $3.{n:02d}"},
                                                   "store": {"S": "Corner Mart"}})
        client.put_item(TableName=table, Item={"image_id": {"S": "IMG-X"}, "line_id": {"N": "1"}})
        client.put_item(TableName=table, Item={"image_id": {"S": "IMG-X"}, "line_id": {"N": "2"},
                                               "text": {"N": "42"}})
        monkeypatch.setenv("LEGAL_BATCH_DYNAMODB_TABLE", table)
        monkeypatch.setenv("LEGAL_BATCH_DYNAMODB_PAGE_SIZE", "7")
        yield client, table, server


def _status(client, table: str, image: str, line: int) -> dict:
    item = client.get_item(TableName=table, Key={"image_id": {"S": image}, "line_id": {"N": str(line)}})["Item"]
    return {key: next(iter(value.values())) for key, value in item.items() if key.startswith("embedding_status")}


def test_receipt_lines_from_dynamodb_into_chroma_with_statuses_written_back(lb_env, conn, dagster_instance,
                                                                            receipts):
    client, table, server = receipts
    server.throttle("Scan", 2)  # backed off by botocore's retries, never a failure
    settings = get_settings(fresh=True)
    run = driver(dagster_instance, source="dynamodb", sinks="chroma").run(wait=True, poll_interval=0)

    assert scalar(conn, "SELECT count(*) FROM source_records WHERE status = 'SUCCESS'") == 40
    assert chroma(settings).count() == 40
    hit = chroma(settings).get(where={"case_id": scalar(
        conn, "SELECT case_id::text FROM source_records WHERE record_id = 'IMG-2|3'")}, include=["documents"])
    assert hit["documents"] == ["ITEM 19 WHOLE MILK 2L  $3.19"]
    done = _status(client, table, "IMG-2", 3)
    assert done["embedding_status"] == "SUCCESS" and done["embedding_status_model"] == MODEL
    assert done["embedding_status_at"].startswith("20")
    assert _status(client, table, "IMG-X", 1) == {
        "embedding_status": "FAILED", "embedding_status_at": _status(client, table, "IMG-X", 1)["embedding_status_at"],
        "embedding_status_error": f"table {table}, key IMG-X|1: no 'text' attribute"}
    assert "'text' is of type N, not a string" in _status(client, table, "IMG-X", 2)["embedding_status_error"]
    assert not run.failed_runs

    # a line edited and marked for another read: read again, embedded again, SUCCESS again; nothing else
    client.update_item(TableName=table, Key={"image_id": {"S": "IMG-0"}, "line_id": {"N": "0"}},
                       UpdateExpression="SET #t = :t REMOVE embedding_status",
                       ExpressionAttributeNames={"#t": "text"}, ExpressionAttributeValues={":t": {"S": "OAT MILK 1L"}})
    conn.execute("UPDATE source_cursors SET updated_at = now() - interval '1 day'")
    requests = scalar(conn, "SELECT sum(request_count) FROM batch_jobs")
    driver(dagster_instance, source="dynamodb", sinks="chroma").run(wait=True, poll_interval=0)
    assert scalar(conn, "SELECT sum(request_count) FROM batch_jobs") == requests + 1
    assert _status(client, table, "IMG-0", 0)["embedding_status"] == "SUCCESS"
    assert chroma(settings).count() == 40


def test_the_planner_sensor_reads_a_record_source_pass_by_pass(lb_env, conn, dagster_instance, receipts,
                                                               monkeypatch):
    """With a DynamoDB source set, each tick that finds more to read asks for a new planning run (a new
    run key per pass), and none once the scan reached the end and nothing is left to plan."""
    from legal_batch.flows.embeddings.record_sources import pull

    monkeypatch.setenv("LEGAL_BATCH_EMBEDDINGS_SOURCE", "dynamodb")
    monkeypatch.setenv("LEGAL_BATCH_DYNAMODB_PAGES_PER_PASS", "1")
    settings = get_settings(fresh=True)

    def planning_keys() -> list[str]:
        result = EMB.planner_sensor(dg.build_sensor_context(instance=dagster_instance, resources=defs.resources))
        return [r.run_key for r in result.run_requests if r.job_name == "embedding_candidates_job"]

    first = planning_keys()
    assert len(first) == 1, "never read: plan"
    pull(conn, "dynamodb", settings)
    second = planning_keys()
    assert len(second) == 1 and second != first, "a pass read one page: another run for the next"
    while not pull(conn, "dynamodb", settings).complete:
        pass
    assert scalar(conn, "SELECT count(*) FROM source_records") == 40
    assert len(planning_keys()) == 1, "cases read but not chunked yet: plan them"


def test_success_is_written_back_only_for_records_every_sink_holds(lb_env, conn, dagster_instance, receipts):
    from legal_batch.flows.embeddings.record_sources import write_back
    from legal_batch.sinks.registry import sink_target

    settings = get_settings(fresh=True)
    driver(dagster_instance, source="dynamodb", sinks="chroma").run(wait=True, poll_interval=0)
    conn.execute("UPDATE source_records SET status = NULL")  # as if not written back yet
    chroma_target = sink_target("chroma", model=MODEL, dimensions=1024, settings=settings)

    missing = write_back(conn, "dynamodb", settings, model=MODEL, targets=[chroma_target, "weaviate collection X"])
    assert missing.succeeded == 0, "a sink that does not hold them: no SUCCESS"
    held = write_back(conn, "dynamodb", settings, model=MODEL, targets=[chroma_target])
    assert held.succeeded == 40
