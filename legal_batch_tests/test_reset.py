"""`legal-batch reset --flow NAME`: shows what goes, asks, cancels the flow's open provider jobs, then
removes its ledger rows and results in one transaction; the vector cache stays unless --cache."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import dagster as dg
import psycopg
import pytest

from legal_batch.core import ledger
from legal_batch.core.batch import request_file_path
from legal_batch.core.seed import seed_demo_cases
from legal_batch.definitions import FLOWS_BY_NAME, defs
from legal_batch.driver import FlowDriver
from legal_batch.providers.local import LocalProvider
from legal_batch_tests.test_cli_errors import run_main


def driver(flow: str, instance: dg.DagsterInstance) -> FlowDriver:
    return FlowDriver(FLOWS_BY_NAME[flow], defs, flow=flow, echo=lambda _: None, dagster_instance=instance)


def scalar(conn: psycopg.Connection, sql: str, *params: object):
    return conn.execute(sql, params).fetchone()[0]


@pytest.fixture
def cli(lb_env, monkeypatch):
    home = Path(lb_env.home_dir) / "dagster-cli"
    home.mkdir()
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    return lb_env


def answer(monkeypatch: pytest.MonkeyPatch, text: str) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO(text))


def test_reset_embeddings_cancels_open_jobs_removes_the_flows_work_and_keeps_the_cache(
        cli, conn, dagster_instance, capsys, monkeypatch):
    seed_demo_cases(conn, cases=2)
    driver("embeddings", dagster_instance).run(wait=True, poll_interval=0)
    seed_demo_cases(conn, cases=4)
    driver("embeddings", dagster_instance).run(wait=False)  # submitted, still open at the provider
    (open_job,) = ledger.list_jobs(conn, flow="embeddings", states=("pending", "running"))
    request_file = request_file_path(Path(cli.home_dir) / "files", "embeddings", open_job.shard_key)
    assert request_file.exists()
    assert scalar(conn, "SELECT count(*) FROM vector_cache") == 0, "a vector is stored once: in the vector table"
    cached = scalar(conn, "SELECT count(DISTINCT text_sha256) FROM case_embeddings")
    chunks = scalar(conn, "SELECT count(*) FROM case_chunks")
    assert cached > 0 and chunks > cached

    answer(monkeypatch, "n\n")
    code, out, err = run_main(capsys, monkeypatch, "reset", "--flow", "embeddings")
    assert code == 1 and "aborted" in err
    assert f"cancel 1 open provider job: {open_job.shard_key}" in out
    assert f"chunks: {chunks} chunks in case_chunks" in out and f"vector cache: {cached} vectors kept" in out
    assert scalar(conn, "SELECT count(*) FROM batch_jobs") == 2, "nothing removed without a yes"

    code, out, err = run_main(capsys, monkeypatch, "reset", "--flow", "embeddings", "--yes")
    assert code == 0, err
    provider = LocalProvider(Path(cli.home_dir) / "local_provider")
    assert provider.poll(open_job.provider_job_id or "").state == "cancelled"
    for table in ("batch_jobs", "batch_items", "case_chunks", "chunked_cases", "case_embeddings", "cache_savings"):
        assert scalar(conn, f"SELECT count(*) FROM {table}") == 0, table
    assert scalar(conn, "SELECT count(*) FROM vector_cache") == cached, "the vectors went to the cache first"
    assert scalar(conn, "SELECT count(*) FROM court_cases") == 4, "the cases themselves stay"
    assert not request_file.exists()

    # the kept cache: the first two cases' chunks come back without a request
    driver("embeddings", dagster_instance).run(wait=True, poll_interval=0)
    assert scalar(conn, "SELECT sum(request_count) FROM batch_jobs") == \
        scalar(conn, "SELECT count(*) FROM case_chunks") - cached

    code, out, err = run_main(capsys, monkeypatch, "reset", "--flow", "embeddings", "--yes", "--cache")
    assert code == 0, err
    assert scalar(conn, "SELECT count(*) FROM vector_cache") == 0
    assert "removed (--cache)" in out


def test_reset_headnotes_clears_only_the_headnotes_the_flow_wrote(cli, conn, dagster_instance, capsys, monkeypatch):
    seed_demo_cases(conn, cases=3)
    imported = scalar(conn, "SELECT id FROM court_cases ORDER BY id LIMIT 1")
    conn.execute("UPDATE court_cases SET headnote = 'Loaded with the case.' WHERE id = %s", (imported,))
    driver("headnotes", dagster_instance).run(wait=True, poll_interval=0)
    assert scalar(conn, "SELECT count(*) FROM court_cases WHERE headnote_model IS NOT NULL") == 2

    code, out, err = run_main(capsys, monkeypatch, "reset", "--flow", "headnotes", "--yes")

    assert code == 0, err
    assert "headnotes: 2 headnotes written by the headnotes flow, cleared in court_cases" in out
    assert conn.execute("SELECT id, headnote FROM court_cases WHERE headnote IS NOT NULL").fetchall() == [
        (imported, "Loaded with the case.")]
    assert scalar(conn, "SELECT count(*) FROM batch_items WHERE flow = 'headnotes'") == 0
    assert scalar(conn, "SELECT count(*) FROM case_headnotes") == 0


def test_reset_template_removes_its_runs_and_nothing_else(cli, conn, capsys, monkeypatch):
    conn.execute("INSERT INTO template_runs (name, fingerprint, input_path, templates_path, schema_path, output_path,"
                 " prompt_template, system_prompt, schema_json, mode, provider, model, max_field_chars)"
                 " VALUES ('r', 'f', 'i', 't', 's', 'o', '{}', '', '{}', 'auto', 'local', 'm', 100)")
    conn.execute("INSERT INTO batch_items (flow, subject_key, custom_id, state) VALUES ('template', 'r1', 'r1', 'done'),"
                 " ('embeddings', 'x:0', 'x', 'done')")

    code, out, err = run_main(capsys, monkeypatch, "reset", "--flow", "template", "--yes")

    assert code == 0, err
    assert "template runs: 1 run" in out
    assert scalar(conn, "SELECT count(*) FROM template_runs") == 0
    assert dict(conn.execute("SELECT flow, count(*) FROM batch_items GROUP BY flow").fetchall()) == {"embeddings": 1}
    code, out, err = run_main(capsys, monkeypatch, "reset", "--flow", "template", "--yes")
    assert code == 0 and "nothing to remove for template" in out
