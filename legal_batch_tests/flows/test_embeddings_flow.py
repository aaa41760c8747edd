"""The embeddings flow end to end on the local provider, through the Dagster definitions."""

import threading
import uuid
from pathlib import Path

import dagster as dg
import orjson
import psycopg
import pytest
from typer.testing import CliRunner

from legal_batch.core import batch, ledger
from legal_batch.core.seed import seed_demo_cases
from legal_batch.definitions import FLOWS_BY_NAME, defs
from legal_batch.driver import FlowDriver, FlowRun
from legal_batch.settings import get_settings

EMB = FLOWS_BY_NAME["embeddings"]


def runner(instance: dg.DagsterInstance) -> FlowDriver:
    return FlowDriver(EMB, defs, flow="embeddings", echo=lambda _: None, dagster_instance=instance)


def items_by_state(conn: psycopg.Connection) -> dict[str, int]:
    return ledger.summary(conn, "embeddings").items_by_state


def count(conn: psycopg.Connection, sql: str, *params: object) -> int:
    return conn.execute(sql, params).fetchone()[0]


def test_run_embeds_every_chunk_and_a_second_run_submits_nothing(lb_env, conn, dagster_instance):
    seed_demo_cases(conn, cases=4)
    first = runner(dagster_instance).run(wait=True, poll_interval=0)

    chunks = count(conn, "SELECT count(*) FROM case_chunks")
    assert chunks > 4
    assert count(conn, "SELECT count(*) FROM case_embeddings WHERE model = 'local-lexical-v1'") == chunks
    assert count(conn, "SELECT count(*) FROM case_chunks WHERE chunk_text IS NULL OR chunk_text = ''") == 0
    assert items_by_state(conn) == {"done": chunks}
    jobs = ledger.list_jobs(conn, flow="embeddings")
    assert [j.state for j in jobs] == ["ingested"] and jobs[0].provider_job_id.startswith("local-")
    assert first.submitted == [jobs[0].shard_key] and first.ingested == [jobs[0].shard_key]
    assert count(conn, "SELECT count(*) FROM case_embeddings WHERE vector_dims(embedding) <> 1024") == 0
    index = conn.execute("SELECT indexdef FROM pg_indexes WHERE indexname = 'case_embeddings_hnsw'").fetchone()
    assert index and "hnsw" in index[0] and "vector_cosine_ops" in index[0], "built once the load finished"

    second = runner(dagster_instance).run(wait=True, poll_interval=0)
    assert second.submitted == [] and second.planned_shards == []
    assert len(ledger.list_jobs(conn, flow="embeddings")) == 1
    assert count(conn, "SELECT count(*) FROM case_embeddings") == chunks

    # the Dagster instance holds the runs, materializations and the shard partition
    assert dagster_instance.get_dynamic_partitions("embedding_shards") == [jobs[0].shard_key]
    materialized = dagster_instance.get_latest_materialization_event(dg.AssetKey("case_embeddings"))
    assert materialized is not None
    assert materialized.asset_materialization.metadata["dagster/row_count"].value == chunks
    check = dagster_instance.event_log_storage.get_latest_asset_check_execution_by_key(
        [dg.AssetCheckKey(dg.AssetKey("case_embeddings"), "vectors_finite_unit_norm")]
    )
    assert list(check.values())[0].status.value == "SUCCEEDED"


def test_failed_requests_flow_into_later_shards_until_done_or_out_of_attempts(
        lb_env, conn, dagster_instance, monkeypatch):
    monkeypatch.setenv("LEGAL_BATCH_LOCAL_FAIL_RATE", "0.3")
    get_settings(fresh=True)
    seed_demo_cases(conn, cases=5)
    runner(dagster_instance).run(wait=True, poll_interval=0)

    chunks = count(conn, "SELECT count(*) FROM case_chunks")
    states = items_by_state(conn)
    assert set(states) <= {"done", "failed"}, "nothing is left open or retryable"
    assert sum(states.values()) == chunks
    assert states["done"] == count(conn, "SELECT count(*) FROM case_embeddings")
    assert states["done"] > chunks * 0.9
    jobs = ledger.list_jobs(conn, flow="embeddings")
    assert len(jobs) == 3, "one shard per attempt"
    assert jobs[1].request_count == jobs[0].items_retryable
    for (attempts, error) in conn.execute(
            "SELECT attempts, last_error FROM batch_items WHERE state = 'failed'").fetchall():
        assert attempts == 3 and "gave up after 3 attempts" in error and "injected failure" in error


def test_expired_job_ingests_its_partial_output_and_requeues_the_rest(lb_env, conn, dagster_instance, monkeypatch):
    monkeypatch.setenv("LEGAL_BATCH_LOCAL_EXPIRE_FRACTION", "0.5")
    monkeypatch.setenv("LEGAL_BATCH_MAX_ATTEMPTS", "2")
    get_settings(fresh=True)
    seed_demo_cases(conn, cases=3)
    runner(dagster_instance).run(wait=True, poll_interval=0)

    first, second = ledger.list_jobs(conn, flow="embeddings")
    assert first.provider_status == "expired"
    assert first.items_done == first.request_count // 2
    assert first.items_retryable == first.request_count - first.items_done
    assert second.request_count == first.items_retryable
    states = items_by_state(conn)
    assert states["done"] == first.items_done + second.items_done
    assert states["failed"] == second.request_count - second.items_done
    reason = conn.execute("SELECT last_error FROM batch_items WHERE state = 'failed' LIMIT 1").fetchone()[0]
    assert "batch_expired" in reason and "errors.jsonl" in reason


def test_unusable_cases_and_oversize_chunks_fail_with_a_reason_and_the_rest_is_embedded(
        lb_env, conn, dagster_instance, monkeypatch):
    seed_demo_cases(conn, cases=1)
    bad = {uuid.uuid4(): "", uuid.uuid4(): "   \n\n  ", uuid.uuid4(): "1. " + "gavel " * 9000}
    for case_id, text in bad.items():
        conn.execute("INSERT INTO court_cases (id, case_name, full_text) VALUES (%s, 'X v Y', %s)", (case_id, text))
    monkeypatch.setenv("LEGAL_BATCH_CHUNK_MAX_TOKENS", "9500")
    get_settings(fresh=True)
    runner(dagster_instance).run(wait=True, poll_interval=0)

    failed = dict(conn.execute("SELECT subject_key, last_error FROM batch_items WHERE state = 'failed'").fetchall())
    empty_id, blank_id, big_id = list(bad)
    assert "full_text is empty" in failed[f"case:{empty_id}"]
    assert "full_text is empty" in failed[f"case:{blank_id}"] and str(blank_id) in failed[f"case:{blank_id}"]
    big = [reason for key, reason in failed.items() if key.startswith(str(big_id))]
    assert big and "exceed the model's input limit of 8191" in big[0]
    good = count(conn, "SELECT count(*) FROM case_chunks c JOIN court_cases k ON k.id = c.case_id"
                       " WHERE k.case_name <> 'X v Y'")
    assert count(conn, "SELECT count(*) FROM case_embeddings") >= good > 0


def test_nul_characters_in_text_are_refused_before_any_request(lb_env, conn):
    from legal_batch.flows.embeddings.chunk_work import unusable
    from legal_batch.flows.embeddings.flow import sync_chunks

    # Postgres text cannot store NUL (psycopg refuses it), so the check guards text from other loaders
    with pytest.raises(psycopg.DataError):
        conn.execute("INSERT INTO court_cases (id, full_text) VALUES (%s, %s)", (uuid.uuid4(), "a\x00b"))
    conn.execute("INSERT INTO court_cases (id, full_text) VALUES (%s, %s)", (uuid.uuid4(), "1. fine text"))

    assert "NUL character at offset 3" in unusable("1. \x00 bad")
    synced = sync_chunks(conn, max_tokens=512, overlap_tokens=64)
    assert synced.cases == 1 and synced.chunks == 1


def _submit_and_finish(conn: psycopg.Connection, instance: dg.DagsterInstance) -> ledger.Shard:
    run = runner(instance)
    state = FlowRun("embeddings")
    run.plan(state, limit=None)
    run.submit_pending(state)
    job = ledger.list_jobs(conn, flow="embeddings")[0]
    provider = defs.resources["providers"].named("local")
    provider.poll(job.provider_job_id)
    assert provider.poll(job.provider_job_id).state == "completed"
    return job


def test_hostile_output_lines_fail_only_their_items(lb_env, conn, dagster_instance):
    seed_demo_cases(conn, cases=2)
    job = _submit_and_finish(conn, dagster_instance)
    output = Path(lb_env.home_dir) / "local_provider" / job.provider_job_id / "output.jsonl"
    lines = output.read_bytes().splitlines()
    victims = [orjson.loads(line)["custom_id"] for line in lines[:4]]
    short = orjson.loads(lines[1])
    short["response"]["body"]["data"][0]["embedding"] = [0.1] * 512
    strings = orjson.loads(lines[2])
    strings["response"]["body"]["data"][0]["embedding"] = [0.03] * 5 + ["zero point one"] + [0.03] * 1018
    stranger = orjson.loads(lines[3])
    stranger["custom_id"] = "chunk-not-ours"
    hostile = [lines[0][: len(lines[0]) // 2], orjson.dumps(short), orjson.dumps(strings), orjson.dumps(stranger)]
    output.write_bytes(b"\n".join(hostile + lines[4:]) + b"\n")

    runner(dagster_instance).tick_status(FlowRun("e"))
    job = ledger.get_job(conn, job.shard_key)
    assert job.state == "ingested"
    assert job.items_done == job.request_count - 4 and job.items_retryable == 4
    reasons = dict(conn.execute("SELECT custom_id, last_error FROM batch_items WHERE state = 'retryable'").fetchall())
    assert set(reasons) == set(victims)
    assert "512 components, expected 1024" in reasons[victims[1]] and "output.jsonl:2" in reasons[victims[1]]
    assert "not a list of numbers" in reasons[victims[2]]
    assert "output.jsonl:1" in reasons[victims[0]] and "not valid JSON" in reasons[victims[0]]
    assert "unknown custom id 'chunk-not-ours'" in job.last_error and job.provider_job_id in job.last_error
    assert count(conn, "SELECT count(*) FROM case_embeddings") == job.items_done

    # ingesting the same shard again changes nothing
    report = batch.ingest_shard(conn, EMB_FLOW(), defs.resources["providers"].named("local"), job.shard_key,
                                files=[output])
    assert report.already_ingested
    assert count(conn, "SELECT count(*) FROM case_embeddings") == job.items_done


def EMB_FLOW():
    from legal_batch.flows.embeddings.flow import EmbeddingsFlow

    return EmbeddingsFlow(model="local-lexical-v1")


def test_empty_candidate_set_makes_no_job_and_says_so(lb_env, conn, dagster_instance):
    messages: list[str] = []
    run = FlowDriver(EMB, defs, flow="embeddings", echo=messages.append, dagster_instance=dagster_instance)
    result = run.run(wait=True, poll_interval=0)
    assert result.submitted == [] and ledger.list_jobs(conn) == []
    assert any("no new candidates" in m for m in messages)


def test_sensors_plan_submit_and_request_one_ingest_run_per_finished_job(lb_env, conn, dagster_instance):
    seed_demo_cases(conn, cases=2)
    context = dg.build_sensor_context(instance=dagster_instance, resources=defs.resources)
    planned = EMB.planner_sensor(context)
    assert [r.job_name for r in planned.run_requests] == ["embedding_candidates_job"]

    runner(dagster_instance).plan(FlowRun("e"),
                                  limit=None)
    job = ledger.list_jobs(conn, flow="embeddings")[0]
    planned = EMB.planner_sensor(dg.build_sensor_context(instance=dagster_instance, resources=defs.resources))
    assert [(r.job_name, r.partition_key, r.run_key) for r in planned.run_requests] == [
        ("embedding_submit_job", job.shard_key, f"submit:{job.shard_key}:{job.updated_at.isoformat()}")]

    defs.resolve_job_def("embedding_submit_job").execute_in_process(
        instance=dagster_instance, partition_key=job.shard_key)
    job = ledger.get_job(conn, job.shard_key)
    ticks = []
    for _ in range(3):
        result = EMB.status_sensor(dg.build_sensor_context(instance=dagster_instance, resources=defs.resources))
        ticks.append([(r.partition_key, r.run_key) for r in result.run_requests])
    assert ticks[0] == []  # validating → in_progress
    assert ticks[1] == [(job.shard_key, f"{job.provider_job_id}:completed")]
    assert ticks[2] == ticks[1], "same run key while not ingested: Dagster dedupes the run"


def test_concurrent_planners_never_put_an_item_in_two_shards(lb_env, conn):
    from legal_batch.db import connect
    from legal_batch.flows.embeddings.flow import EmbeddingsFlow, sync_chunks
    from legal_batch.providers.local import LocalProvider

    seed_demo_cases(conn, cases=6)
    sync_chunks(conn, max_tokens=256, overlap_tokens=0)
    provider = LocalProvider(Path(lb_env.home_dir) / "lp", max_records_per_job=40)
    results = []

    def plan() -> None:
        with connect(lb_env.database_url) as own:
            results.append(batch.plan(own, EmbeddingsFlow(model="m"), provider, model="m"))

    threads = [threading.Thread(target=plan) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    chunks = count(conn, "SELECT count(*) FROM case_chunks")
    assert sum(r.planned_items for r in results) == chunks
    assert count(conn, "SELECT count(*) FROM batch_items WHERE state = 'exported'") == chunks
    assert count(conn, "SELECT coalesce(sum(request_count), 0) FROM batch_jobs") == chunks
    assert max(j.request_count for j in ledger.list_jobs(conn)) <= 40


def test_cli_run_jobs_and_search(lb_env, conn, monkeypatch, tmp_path):
    from legal_batch.cli import app

    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dh"))
    (tmp_path / "dh").mkdir()
    seed_demo_cases(conn, cases=3)
    cli = CliRunner()
    result = cli.invoke(app, ["embeddings", "run", "--wait", "--poll-interval", "0"])
    assert result.exit_code == 0, result.output
    assert "ingested" in result.output and "done" in result.output
    again = cli.invoke(app, ["embeddings", "run", "--wait", "--poll-interval", "0"])
    assert "nothing new to submit for embeddings" in again.output
    found = cli.invoke(app, ["search", "trafficking in a dangerous drug", "--k", "3"])
    assert found.exit_code == 0 and found.output.count("score") == 3
    url = cli.invoke(app, ["db", "url"])
    assert url.output.strip() == lb_env.database_url


def test_a_database_without_pgvector_gets_a_clear_error(pg_admin_url):
    from legal_batch.db import DatabaseError, connect

    name = f"lb_novector_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg_admin_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    base, _, query = pg_admin_url.partition("?")
    url = f"{base.rsplit('/', 1)[0]}/{name}" + (f"?{query}" if query else "")
    try:
        with pytest.raises(DatabaseError, match="pgvector extension is not installed"):
            connect(url)
    finally:
        with psycopg.connect(pg_admin_url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')


def test_verify_finds_a_vector_deleted_behind_the_pipelines_back_and_a_rerun_repairs_it(
        lb_env, conn, dagster_instance):
    from legal_batch.core.verify import verify
    from legal_batch.flows.embeddings.flow import DONE_WITHOUT_RESULT_SQL

    seed_demo_cases(conn, cases=2)
    runner(dagster_instance).run(wait=True, poll_interval=0)
    assert verify(conn, {"embeddings": DONE_WITHOUT_RESULT_SQL}).ok
    deleted = conn.execute("DELETE FROM case_embeddings WHERE chunk_index = 1").rowcount
    conn.execute("UPDATE batch_items SET last_error = NULL WHERE state = 'done'")

    report = verify(conn, {"embeddings": DONE_WITHOUT_RESULT_SQL})
    assert [(v.rule, v.count) for v in report.violations] == [("done item without its result row", deleted)]

    runner(dagster_instance).run(wait=True, poll_interval=0)
    assert verify(conn, {"embeddings": DONE_WITHOUT_RESULT_SQL}).ok
    assert count(conn, "SELECT count(*) FROM case_embeddings") == count(conn, "SELECT count(*) FROM case_chunks")
    # a vector is stored once (the vector table is the cache's first part): one deleted outside the
    # pipeline is requested again, and only those
    first, again = sorted(ledger.list_jobs(conn), key=lambda job: job.id)
    assert again.request_count == deleted and again.items_done == deleted


def test_a_deleted_case_imported_again_under_a_new_id_takes_its_vectors_back_without_a_request(
        lb_env, conn, dagster_instance):
    """A vector is stored once (the vector table); when its case leaves the source it goes to the
    vector cache before it is deleted, so the same judgment imported again costs nothing."""
    seed_demo_cases(conn, cases=3)
    runner(dagster_instance).run(wait=True, poll_interval=0)
    assert count(conn, "SELECT count(*) FROM vector_cache") == 0, "nothing written twice at ingest"
    gone = conn.execute("SELECT id, neutral_citation, case_name, court, decision_date, full_text FROM court_cases"
                        " ORDER BY id LIMIT 1").fetchone()
    texts = count(conn, "SELECT count(DISTINCT text_sha256) FROM case_chunks WHERE case_id = %s", gone[0])
    conn.execute("DELETE FROM court_cases WHERE id = %s", (gone[0],))
    runner(dagster_instance).run(wait=True, poll_interval=0)
    assert count(conn, "SELECT count(*) FROM case_embeddings WHERE case_id = %s", gone[0]) == 0
    assert count(conn, "SELECT count(*) FROM vector_cache") == texts > 0

    conn.execute("INSERT INTO court_cases (id, neutral_citation, case_name, court, decision_date, full_text)"
                 " VALUES (gen_random_uuid(), %s, %s, %s, %s, %s)", gone[1:])
    jobs = len(ledger.list_jobs(conn))
    runner(dagster_instance).run(wait=True, poll_interval=0)
    assert len(ledger.list_jobs(conn)) == jobs, "no request for a judgment seen before"
    assert count(conn, "SELECT count(*) FROM case_embeddings") == count(conn, "SELECT count(*) FROM case_chunks")
    assert count(conn, "SELECT coalesce(sum(requests), 0) FROM cache_savings") >= texts
