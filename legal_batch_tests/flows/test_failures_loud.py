"""Failures are loud: a run whose items ended `failed` exits non-zero with a grouped summary (reason →
count → an example naming the file:line and the provider job); a clean run exits 0."""

from __future__ import annotations

from pathlib import Path

from legal_batch_tests.e2e.support import CLI, isolated_env, run


def test_a_run_whose_items_all_failed_exits_non_zero_with_the_reasons_grouped(tmp_path: Path, database_url: str):
    env = isolated_env(database_url=database_url, root=tmp_path, LEGAL_BATCH_LOCAL_FAIL_RATE="1",
                       LEGAL_BATCH_MAX_ATTEMPTS="1")
    code, output = run([*CLI, "demo", "seed", "--cases", "3"], env)
    assert code == 0, output

    code, output = run([*CLI, "embeddings", "run", "--wait", "--poll-interval", "0"], env)

    assert code == 1, output
    summary = [line for line in output.splitlines() if line.startswith("✗ ")]
    assert len(summary) == 1, output  # one reason, however many chunks
    count = int(summary[0].split()[1])
    assert count > 10
    assert "server_error: injected failure — e.g. " in summary[0]
    assert "errors.jsonl:" in summary[0] and "of job local-" in summary[0], "the example names file:line and job"


def test_a_clean_run_exits_zero_and_prints_no_failure_summary(tmp_path: Path, database_url: str):
    env = isolated_env(database_url=database_url, root=tmp_path)
    assert run([*CLI, "demo", "seed", "--cases", "2"], env)[0] == 0
    code, output = run([*CLI, "embeddings", "run", "--wait", "--poll-interval", "0"], env)
    assert code == 0, output
    assert "✗" not in output


def test_verify_warns_about_failed_checks_in_the_instance(tmp_path: Path, lb_env, monkeypatch):
    import dagster as dg
    from typer.testing import CliRunner

    from legal_batch.cli import app
    from legal_batch.driver import instance

    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dagster"))
    (tmp_path / "dagster").mkdir()
    dagster = instance()
    dagster.report_runless_asset_event(dg.AssetCheckEvaluation(
        asset_key=dg.AssetKey("court_case_headnotes"), check_name="headnotes_within_length_band", passed=False,
        severity=dg.AssetCheckSeverity.WARN, metadata={"below_band": 9, "headnotes": 10}))

    result = CliRunner().invoke(app, ["verify", "--flow", "headnotes"])

    assert result.exit_code == 0, result.output  # the ledger itself is consistent
    assert "check headnotes_within_length_band on court_case_headnotes failed (WARN" in result.output
    assert "below_band=9" in result.output


def test_the_ingest_run_fails_on_failed_items_after_writing_what_succeeded(lb_env, conn, dagster_instance,
                                                                          monkeypatch):
    """What `dagster job execute -j embedding_ingest_job` sees: the run fails (blocking ERROR check
    `no_items_failed`), yet the shard's results are written and the partition materialized."""
    from legal_batch.core.seed import seed_demo_cases
    from legal_batch.definitions import FLOWS_BY_NAME, defs
    from legal_batch.driver import FlowDriver, FlowRun
    from legal_batch.settings import get_settings

    monkeypatch.setenv("LEGAL_BATCH_LOCAL_FAIL_RATE", "0.3")
    monkeypatch.setenv("LEGAL_BATCH_MAX_ATTEMPTS", "1")
    get_settings(fresh=True)
    seed_demo_cases(conn, cases=2)
    driver = FlowDriver(FLOWS_BY_NAME["embeddings"], defs, flow="embeddings", echo=lambda _: None,
                        dagster_instance=dagster_instance)
    run = FlowRun("embeddings")
    driver.plan(run, limit=None)
    driver.submit_pending(run)
    while driver.tick_status(run):
        pass

    failed = conn.execute("SELECT count(*) FROM batch_items WHERE state = 'failed'").fetchone()[0]
    done = conn.execute("SELECT count(*) FROM batch_items WHERE state = 'done'").fetchone()[0]
    assert failed > 0 and done > 0
    assert conn.execute("SELECT count(*) FROM case_embeddings").fetchone()[0] == done
    ingest_runs = [r for r in dagster_instance.get_runs() if r.job_name == "embedding_ingest_job"]
    assert [r.status.value for r in ingest_runs] == ["FAILURE"], "the Dagster run fails"
    assert not run.ok and run.failed_runs == [], "reported as failed items, not as a broken ingest"
    check = run.failed_checks["no_items_failed:case_embeddings"]
    assert check.severity == "ERROR" and f"failed={failed}" in check.detail
    shard = conn.execute("SELECT shard_key FROM batch_jobs").fetchone()[0]
    assert dagster_instance.get_materialized_partitions(dg_key("case_embeddings")) == {shard}


def dg_key(name: str):
    import dagster as dg

    return dg.AssetKey(name)
