"""A flow is a folder plus one registry line: a toy flow registered next to the real ones gets its
assets, jobs and sensors, runs end to end through the shared machinery, and is checked by verify;
and importing a part of the package stays cheap."""

from __future__ import annotations

import subprocess
import sys

import pytest

from legal_batch.core.verify import verify
from legal_batch.definitions import build_definitions
from legal_batch.driver import FlowDriver
from legal_batch.flows import registry
from legal_batch.flows.registry import FLOWS, FlowEntry

TOY = FlowEntry("toy", "legal_batch_tests.flows.toy", "embeddings_provider", standard_cli=True)


def test_a_registered_toy_flow_runs_end_to_end(lb_env, conn, dagster_instance, monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(registry, "FLOWS", [*FLOWS, TOY])
    conn.execute("CREATE TABLE toy_words (word text PRIMARY KEY); CREATE TABLE toy_vectors (word text PRIMARY KEY,"
                 " dims int)")
    conn.execute("INSERT INTO toy_words SELECT 'w' || g FROM generate_series(1, 30) g")
    defs = build_definitions(registry.FLOWS)
    assert {"toy_candidates", "toy_request_files", "toy_batch_jobs", "toy_batch_outputs", "toy_vectors"} <= {
        key.to_user_string() for key in defs.resolve_asset_graph().get_all_asset_keys()}
    assert {"toy_candidates_job", "toy_submit_job", "toy_ingest_job"} <= {job.name for job in defs.jobs}

    run = FlowDriver(TOY.definitions(), defs, flow="toy", echo=lambda _: None,
                     dagster_instance=dagster_instance).run(wait=True, poll_interval=0)

    assert run.failed_runs == []
    assert conn.execute("SELECT count(*), min(dims) FROM toy_vectors").fetchone() == (30, lb_env.embedding_dimensions)
    assert verify(conn, {"toy": TOY.done_without_result_sql()}).ok
    assert registry.entry("toy") is TOY


def test_importing_the_chunker_loads_neither_dagster_nor_pandas():
    code = ("import sys, legal_batch.core.chunking, legal_batch.core.ledger, legal_batch.flows.registry; "
            "print(sorted(m for m in ('dagster', 'pandas', 'pyarrow', 'openai', 'boto3') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
