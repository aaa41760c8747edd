"""The `ledger_consistent` asset check (the invariant of `legal-batch verify`, evaluated each time a
flow's candidates are planned) passes on a healthy ledger and fails, saying what and where, on a
corrupted one; `legal-batch verify` exits 1 with the same finding."""

from __future__ import annotations

import dagster as dg

from legal_batch.core.seed import seed_demo_cases
from legal_batch.definitions import FLOWS_BY_NAME, defs
from legal_batch.driver import FlowDriver
from legal_batch_tests.e2e.support import verify_cli

EMB = FLOWS_BY_NAME["embeddings"]


def candidates_check(instance: dg.DagsterInstance) -> dg.AssetCheckEvaluation:
    result = defs.resolve_job_def(EMB.candidates_job.name).execute_in_process(instance=instance)
    (evaluation,) = [e for e in result.get_asset_check_evaluations() if e.check_name == "ledger_consistent"]
    return evaluation


def test_ledger_consistent_check_passes_then_names_what_is_wrong(lb_env, conn, dagster_instance) -> None:
    seed_demo_cases(conn, cases=2)
    FlowDriver(EMB, defs, flow="embeddings", echo=lambda _: None, dagster_instance=dagster_instance).run(
        wait=True, poll_interval=0)
    healthy = candidates_check(dagster_instance)
    assert healthy.passed
    assert healthy.metadata["items_checked"].value == conn.execute("SELECT count(*) FROM case_chunks").fetchone()[0]
    assert healthy.asset_key == dg.AssetKey("embedding_candidates")

    subject = conn.execute("UPDATE batch_items SET state = 'failed', last_error = NULL"
                           " WHERE id = (SELECT min(id) FROM batch_items) RETURNING subject_key").fetchone()[0]
    broken = candidates_check(dagster_instance)
    assert not broken.passed
    assert broken.metadata["violations"].value == 1
    details = broken.metadata["details"].value
    assert "failed or retryable item without a reason" in details and subject in details

    code, report = verify_cli()
    assert code == 1 and "failed or retryable item without a reason" in report and subject in report
