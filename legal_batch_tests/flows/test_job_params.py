"""Per-run options travel with the shard: stored on its job row when it is planned and read back by
whichever process writes, submits or ingests it — never through the environment of the process
that planned it. And `verify` catches a done item whose result its job did not write."""

import os
from datetime import UTC, datetime
from pathlib import Path

import dagster as dg
import orjson
import psycopg
from typer.testing import CliRunner

from legal_batch.core import batch, ledger
from legal_batch.core.seed import seed_demo_cases
from legal_batch.core.verify import verify
from legal_batch.definitions import FLOWS_BY_NAME, defs
from legal_batch.driver import FlowDriver, FlowRun
from legal_batch.flows.embeddings.flow import EmbeddingsFlow, sync_chunks
from legal_batch.flows.headnotes.flow import DONE_WITHOUT_RESULT_SQL, HeadnotesFlow
from legal_batch.providers.local import LocalProvider
from legal_batch.settings import get_settings

CHAT_MODEL = "local-extractive-v1"


def headnotes(conn: psycopg.Connection) -> dict[str, tuple[str, str, datetime]]:
    """citation → (headnote, model, generated_at)."""
    return {c: (h, m, t) for c, h, m, t in conn.execute(
        "SELECT neutral_citation, headnote, headnote_model, headnote_generated_at FROM court_cases")}


def as_a_later_process(monkeypatch) -> None:
    """What another process (a later CLI call, the daemon) sees: none of this one's overwrite settings."""
    for key in list(os.environ):
        if key.startswith("LEGAL_BATCH_HEADNOTE_OVERWRITE"):
            monkeypatch.delenv(key)
    get_settings(fresh=True)
    assert not get_settings().headnote_overwrite


def test_overwrite_without_wait_is_honoured_by_a_later_ingest(lb_env, conn, monkeypatch, tmp_path):
    from legal_batch.cli import app

    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dh"))
    (tmp_path / "dh").mkdir()
    seed_demo_cases(conn, cases=3)
    cli = CliRunner()
    assert cli.invoke(app, ["headnotes", "run", "--wait", "--poll-interval", "0"]).exit_code == 0
    before = headnotes(conn)

    started = cli.invoke(app, ["headnotes", "run", "--overwrite"])  # submit and return
    assert started.exit_code == 0, started.output
    as_a_later_process(monkeypatch)
    for _ in range(5):
        ingested = cli.invoke(app, ["headnotes", "ingest"])
        assert ingested.exit_code == 0, ingested.output
        if all(job.state == "ingested" for job in ledger.list_jobs(conn, flow="headnotes")):
            break

    first, second = ledger.list_jobs(conn, flow="headnotes")
    assert first.params["overwrite"] is False and first.params["overwrite_before"] is None
    assert second.params["overwrite"] is True
    cut_off = datetime.fromisoformat(second.params["overwrite_before"])
    assert cut_off > max(generated for _, _, generated in before.values())
    assert (second.state, second.items_done, second.request_count) == ("ingested", 3, 3)
    after = headnotes(conn)
    for citation, (_, model, generated) in after.items():
        assert model == CHAT_MODEL and generated > before[citation][2], f"{citation} was paid for and not written"
    assert verify(conn, {"headnotes": DONE_WITHOUT_RESULT_SQL}).ok


def test_a_shard_is_written_with_the_options_it_was_planned_with(lb_env, conn, dagster_instance, monkeypatch):
    monkeypatch.setenv("LEGAL_BATCH_HEADNOTE_MAX_TOKENS", "333")
    monkeypatch.setenv("LEGAL_BATCH_HEADNOTE_FEW_SHOT", "0")
    get_settings(fresh=True)
    seed_demo_cases(conn, cases=2)
    conn.execute("INSERT INTO headnote_corpus (headnote_text) VALUES ('An example headnote in the house style.')")
    runner = FlowDriver(FLOWS_BY_NAME["headnotes"], defs, flow="headnotes", echo=lambda _: None,
                        dagster_instance=dagster_instance)
    runner.plan(FlowRun("headnotes"), limit=None)

    monkeypatch.setenv("LEGAL_BATCH_HEADNOTE_MAX_TOKENS", "444")  # changed before the submit
    monkeypatch.setenv("LEGAL_BATCH_HEADNOTE_FEW_SHOT", "3")
    get_settings(fresh=True)
    runner.submit_pending(FlowRun("headnotes"))

    (job,) = ledger.list_jobs(conn, flow="headnotes")
    assert (job.params["max_tokens"], job.params["few_shot"]) == (333, 0)
    lines = [orjson.loads(line) for line in Path(job.input_location).read_bytes().splitlines()]
    assert len(lines) == 2
    for line in lines:
        assert line["body"]["max_tokens"] == 333
        assert "house style" not in line["body"]["messages"][0]["content"]


def test_verify_finds_done_headnotes_their_job_did_not_write(lb_env, conn):
    seed_demo_cases(conn, cases=3)
    conn.execute("UPDATE court_cases SET headnote = 'Written by the editor.', headnote_model = 'editor',"
                 " headnote_generated_at = now() - interval '1 day'")
    provider = LocalProvider(Path(lb_env.home_dir) / "lp")
    files_root = Path(lb_env.home_dir) / "files"
    planned_with = HeadnotesFlow(model=CHAT_MODEL, overwrite=True, overwrite_before=datetime.now(UTC))
    batch.plan(conn, planned_with, provider, model=CHAT_MODEL)
    (job,) = ledger.list_jobs(conn, flow="headnotes")
    batch.write_request_file(conn, planned_with, provider, job.shard_key, files_root=files_root)
    batch.submit_shard(conn, planned_with, provider, job.shard_key)
    for _ in range(2):
        batch.poll_open_jobs(conn, lambda _: provider, flow="headnotes")
    files = batch.download_outputs(conn, provider, job.shard_key, files_root=files_root)

    # ingested by a flow that does not know the shard's overwrite: paid for, items done, nothing written
    batch.ingest_shard(conn, HeadnotesFlow(model=CHAT_MODEL), provider, job.shard_key, files=files)

    assert ledger.summary(conn, "headnotes").items_by_state == {"done": 3}
    assert {h for h, _, _ in headnotes(conn).values()} == {"Written by the editor."}
    report = verify(conn, {"headnotes": DONE_WITHOUT_RESULT_SQL})
    assert [(v.rule, v.count) for v in report.violations] == [("done item without its result row", 3)]


def test_split_shards_keep_the_options_of_the_shard_they_came_from(lb_env, conn):
    seed_demo_cases(conn, cases=2)
    sync_chunks(conn, max_tokens=256, overlap_tokens=0)
    provider = LocalProvider(Path(lb_env.home_dir) / "lp")
    batch.plan(conn, EmbeddingsFlow(model="m", dimensions=1024), provider, model="m")
    (job,) = ledger.list_jobs(conn, flow="embeddings")
    assert job.params == {"dimensions": 1024}

    with conn.transaction():
        keys = ledger.split_shard(conn, job, max_tokens=(job.est_input_tokens or 0) // 2 + 1)

    assert len(keys) > 1
    assert [ledger.get_job(conn, key).params for key in keys] == [{"dimensions": 1024}] * len(keys)


def test_a_config_overwrite_for_a_flow_without_one_fails_before_planning(lb_env, conn, dagster_instance):
    seed_demo_cases(conn, cases=1)
    result = defs.resolve_job_def("embedding_candidates_job").execute_in_process(
        instance=dagster_instance, raise_on_error=False,
        run_config={"ops": {"embedding_candidates": {"config": {"overwrite": True}}}})
    assert not result.success
    failure = next(e for e in result.all_events if e.is_step_failure)
    assert "has nothing to overwrite" in failure.step_failure_data.error.message
    assert ledger.list_jobs(conn) == []
    assert dg.AssetKey("embedding_candidates") not in {
        e.asset_key for e in result.get_asset_materialization_events()}
