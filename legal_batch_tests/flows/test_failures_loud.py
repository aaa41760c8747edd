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
