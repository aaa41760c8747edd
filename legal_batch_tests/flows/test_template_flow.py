"""The template flow end to end: files in, prompts staged in Postgres, answered in batch (through the
Dagster jobs and the shared ledger) or in real time, output files and summaries out.

Local provider first; Bedrock through the batch emulator (moto S3 + the bedrock control plane and
runtime over HTTP) for multi-job ordering and the real-time fallback after failed batches.
"""

from __future__ import annotations

import csv
import gzip
import io
import json
import re
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import dagster as dg
import pandas as pd
import psycopg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner, Result

from legal_batch.cli import app
from legal_batch.core import ledger
from legal_batch.core.verify import verify
from legal_batch.definitions import DONE_WITHOUT_RESULT, FLOWS_BY_NAME, defs
from legal_batch.driver import FlowDriver
from legal_batch.flows.template.outputs import finish_open_runs, finish_run
from legal_batch.flows.template.runs import TemplateRunConfig, choose_execution, stage_inputs
from legal_batch.resources.providers import make_provider
from legal_batch.settings import get_settings
from legal_batch_tests.emulators.bedrock_batch import (
    BedrockBatchEmulator,
    RecordError,
    point_at_emulator,
    running_bedrock_emulator,
)

COLUMNS = ["id", "case_name", "court", "text"]
PROMPTS = {
    "system_prompt": "Extract the fields of one court judgment as JSON.",
    "user_prompt_template": 'Row {id}: {case_name} ({court})\n{text}\nAnswer like {"court": "..."}.',
    "input_placeholders": ["id", "case_name", "court", "text"],
}
SCHEMA = {
    "type": "object",
    "properties": {
        "court": {"type": "string"},
        "outcome": {"enum": ["allowed", "dismissed", "remitted"]},
        "judges": {"type": "integer"},
        "issues": {"type": "array", "items": {"type": "string"}},
    },
    "required": ["court", "outcome"],
}
RESULT_COLUMNS = ["llm_court", "llm_outcome", "llm_judges", "llm_issues", "llm_status", "llm_error",
                  "llm_validation_passed", "llm_parse_status"]
TEMPLATE = FLOWS_BY_NAME["template"]


# -- helpers --------------------------------------------------------------------------------------------

def records(n: int, *, start: int = 0) -> list[dict[str, str]]:
    """Rows a careless reader would change: leading zeros, empty cells, quotes, newlines, delimiters."""
    tricky = ['He said "no",\nthen left.', "tab\there; {braces} stay", "Müller v Łódź — ümlauts", "", "NA"]
    return [{"id": f"{i:04d}", "case_name": f"Party {i} v Other {i}" if i % 4 else "",
             "court": ["CFA", "CA", "CFI"][i % 3], "text": f"Judgment {i}. {tricky[i % len(tricky)]}"}
            for i in range(start, start + n)]


def write_table(path: Path, rows: Sequence[dict[str, Any]], columns: Sequence[str] = COLUMNS) -> Path:
    """CSV/TSV/Parquet by suffix, gzipped when the name ends in .gz."""
    path.parent.mkdir(parents=True, exist_ok=True)
    name = path.name.removesuffix(".gz")
    if name.endswith(".parquet"):
        buffer = io.BytesIO()
        pq.write_table(pa.table({c: pa.array([r[c] for r in rows]) for c in columns}), buffer)
        data = buffer.getvalue()
    else:
        text = io.StringIO(newline="")
        writer = csv.writer(text, delimiter="\t" if name.endswith(".tsv") else ",", lineterminator="\n")
        writer.writerow(columns)
        writer.writerows([[r[c] for c in columns] for r in rows])
        data = text.getvalue().encode()
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)
    return path


def read_table(path: Path) -> pd.DataFrame:
    data = path.read_bytes()
    if path.name.endswith(".gz"):
        assert data[:2] == b"\x1f\x8b", f"{path} is not gzipped"
        data = gzip.decompress(data)
    name = path.name.removesuffix(".gz")
    if name.endswith(".parquet"):
        return pq.read_table(io.BytesIO(data)).to_pandas()
    sep = "\t" if name.endswith(".tsv") else ","
    return pd.read_csv(io.BytesIO(data), sep=sep, dtype=str, keep_default_na=False)


def project(tmp_path: Path, *, prompts: dict = PROMPTS, schema: dict = SCHEMA) -> tuple[Path, Path]:
    templates = tmp_path / "templates"
    templates.mkdir(exist_ok=True)
    (templates / "prompts.json").write_text(json.dumps(prompts))
    schema_file = tmp_path / "schema.json"
    schema_file.write_text(json.dumps(schema))
    return templates, schema_file


def cli(*args: object) -> Result:
    return CliRunner().invoke(app, ["template", *map(str, args)])


def run_cli(input_path: Path, templates: Path, schema: Path, output: Path, *extra: object) -> Result:
    return cli("run", "--input", input_path, "--templates", templates, "--schema", schema, "--output", output,
               "--poll-interval", "0", *extra)


def summary_of(output: Path) -> dict:
    found = sorted(output.glob("processing_summary_*.json"))
    assert len(found) == 1, found
    return json.loads(found[0].read_text())


def count(conn: psycopg.Connection, sql: str, *params: object) -> int:
    return conn.execute(sql, params).fetchone()[0]


def text(result: Result) -> str:
    return " ".join(result.output.split())


def assert_originals_kept(output_file: Path, rows: Sequence[dict[str, Any]]) -> pd.DataFrame:
    out = read_table(output_file)
    assert list(out.columns) == COLUMNS + RESULT_COLUMNS
    assert out[COLUMNS].astype(object).to_dict("records") == list(rows)
    return out


def expected_echo(row: dict[str, str]) -> str:
    """What the local model writes into a string field: the first 12 words of the row's prompt."""
    prompt = f"Row {row['id']}: {row['case_name']} ({row['court']})\n{row['text']}\nAnswer like {{\"court\": \"...\"}}."
    return " ".join(prompt.split()[:12])


@pytest.fixture(autouse=True)
def dagster_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "dagster_home"
    home.mkdir()
    (home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    return home


# -- round trips on the local provider -----------------------------------------------------------------

@pytest.mark.parametrize("name", ["cases.csv", "cases.tsv", "cases.parquet", "cases.csv.gz", "cases.tsv.gz",
                                  "cases.parquet.gz"])
def test_round_trip_of_one_file_keeps_every_original_value(lb_env, conn, tmp_path, name):
    rows = records(7)
    source = write_table(tmp_path / "data" / name, rows)
    templates, schema = project(tmp_path)

    result = run_cli(tmp_path / "data", templates, schema, tmp_path / "out")

    assert result.exit_code == 0, result.output
    output_file = tmp_path / "out" / name
    out = assert_originals_kept(output_file, rows)
    assert output_file.read_bytes()[:2] == b"\x1f\x8b" if name.endswith(".gz") else True
    assert (out["llm_status"] == "success").all() and (out["llm_parse_status"] == "success").all()
    assert out["llm_validation_passed"].astype(str).str.lower().eq("true").all()
    assert list(out["llm_court"]) == [expected_echo(r) for r in rows]  # each row got its own answer
    assert set(out["llm_outcome"]) <= {"allowed", "dismissed", "remitted"}
    assert all(json.loads(v) == [expected_echo(r)] for v, r in zip(out["llm_issues"], rows, strict=True))
    summary = summary_of(tmp_path / "out")
    assert summary["records"] == 7 and summary["successes"] == 7 and summary["validation_rate"] == 1.0
    assert summary["batch_used"] is False and summary["job_ids"] == []
    assert "below the batch threshold of 1000" in summary["fallback_note"]
    assert summary["splits"] == {"unsplit": {"records": 7, "successes": 7, "failures": 0, "validation_passed": 7,
                                             "validation_rate": 1.0, "parse_status": {"success": 7}}}
    assert summary["outputs"] == [str(output_file)]
    assert source.exists() and count(conn, "SELECT count(*) FROM template_results WHERE via = 'realtime'") == 7
    assert count(conn, "SELECT count(*) FROM batch_jobs") == 0


def test_single_file_input_and_rerunning_the_same_command_reuses_the_run(lb_env, conn, tmp_path):
    rows = records(3)
    source = write_table(tmp_path / "judgments.tsv", rows)
    templates, schema = project(tmp_path)

    first = run_cli(source, templates, schema, tmp_path / "out")
    assert first.exit_code == 0, first.output
    assert_originals_kept(tmp_path / "out" / "judgments.tsv", rows)
    assert summary_of(tmp_path / "out")["name"] == "judgments"

    again = run_cli(source, templates, schema, tmp_path / "out")
    assert again.exit_code == 0, again.output
    assert "continued" in again.output and "outputs written" in again.output
    assert count(conn, "SELECT count(*) FROM template_runs") == 1
    assert count(conn, "SELECT count(*) FROM template_results") == 3  # nothing asked twice
    assert len(list((tmp_path / "out").glob("processing_summary_*.json"))) == 1


def test_train_val_test_splits_in_batch_keep_layout_formats_and_per_split_counts(lb_env, conn, tmp_path):
    splits = {"train/cases.parquet": records(8), "val/cases.csv.gz": records(3, start=8),
              "test/cases.tsv": records(4, start=11)}
    for relative, rows in splits.items():
        write_table(tmp_path / "data" / relative, rows)
    templates, schema = project(tmp_path)

    result = run_cli(tmp_path / "data", templates, schema, tmp_path / "out", "--mode", "batch", "--wait")

    assert result.exit_code == 0, result.output
    for relative, rows in splits.items():
        out = assert_originals_kept(tmp_path / "out" / relative, rows)
        assert list(out["llm_court"]) == [expected_echo(r) for r in rows]
    summary = summary_of(tmp_path / "out")
    assert summary["records"] == 15 and summary["batch_used"] is True and summary["fallback_note"] is None
    assert {split: c["records"] for split, c in summary["splits"].items()} == {"train": 8, "val": 3, "test": 4}
    assert all(c["validation_rate"] == 1.0 for c in summary["splits"].values())
    jobs = ledger.list_jobs(conn, flow="template")
    assert summary["job_ids"] == [j.provider_job_id for j in jobs] and all(j.state == "ingested" for j in jobs)
    assert ledger.summary(conn, "template").items_by_state == {"done": 15}
    assert count(conn, "SELECT count(*) FROM template_results WHERE via = 'batch'") == 15
    assert verify(conn, {"template": DONE_WITHOUT_RESULT["template"]}).ok


def test_nested_schema_types_validate_and_serialise(lb_env, conn, tmp_path):
    schema = {
        "type": "object",
        "properties": {
            "outcome": {"type": "string", "enum": ["allowed", "dismissed"]},
            "parties": {"type": "object", "properties": {
                "appellant": {"type": "string"},
                "counsel": {"type": "array", "items": {"type": "object", "properties": {
                    "name": {"type": "string"}, "silk": {"type": "boolean"}}, "required": ["name"]}}},
                "required": ["appellant", "counsel"]},
            "judges": {"type": "integer", "minimum": 0},
            "damages": {"type": ["number", "null"]},
            "unanimous": {"type": "boolean"},
            "citations": {"type": "array", "items": {"type": "string"}},
        },
        "required": ["outcome", "parties", "judges"],
    }
    rows = records(4)
    write_table(tmp_path / "data" / "cases.csv", rows)
    templates, schema_file = project(tmp_path, schema=schema)

    result = run_cli(tmp_path / "data", templates, schema_file, tmp_path / "out", "--prefix", "x_")

    assert result.exit_code == 0, result.output
    out = read_table(tmp_path / "out" / "cases.csv")
    assert list(out.columns) == COLUMNS + ["x_outcome", "x_parties", "x_judges", "x_damages", "x_unanimous",
                                           "x_citations", "x_status", "x_error", "x_validation_passed",
                                           "x_parse_status"]
    assert (out["x_parse_status"] == "success").all()
    for value, row in zip(out["x_parties"], rows, strict=True):
        parties = json.loads(value)
        assert parties["appellant"] == expected_echo(row)
        assert isinstance(parties["counsel"], list) and isinstance(parties["counsel"][0]["silk"], bool)
    assert all(re.fullmatch(r"\d+", v) for v in out["x_judges"])
    assert set(out["x_unanimous"]) <= {"true", "false"}
    assert summary_of(tmp_path / "out")["validation_rate"] == 1.0


def test_a_placeholder_that_is_not_a_column_names_the_column_and_file(lb_env, conn, tmp_path):
    write_table(tmp_path / "data" / "train" / "cases.csv", records(3))
    write_table(tmp_path / "data" / "val" / "cases.csv", [{"id": "1", "case_name": "A", "court": "CA"}],
                columns=["id", "case_name", "court"])
    templates, schema = project(tmp_path)

    result = run_cli(tmp_path / "data", templates, schema, tmp_path / "out")

    assert result.exit_code == 2
    message = text(result)
    assert "has no column 'text'" in message and str(tmp_path / "data" / "val" / "cases.csv") in message
    assert "Available columns: id, case_name, court" in message
    assert count(conn, "SELECT count(*) FROM template_runs") == 0  # nothing half-staged
    assert count(conn, "SELECT count(*) FROM template_rows") == 0
    assert not (tmp_path / "out").exists()


def test_bad_schema_and_empty_file_are_refused_clearly(lb_env, conn, tmp_path):
    write_table(tmp_path / "data" / "cases.csv", records(2))
    templates, _ = project(tmp_path)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"type": "object", "properties": {"a": {"type": "strng"}}}))
    refused = run_cli(tmp_path / "data", templates, bad, tmp_path / "out")
    assert refused.exit_code == 2 and "not a valid JSON Schema" in text(refused)

    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "cases.csv").write_text("id,case_name,court,text\n")
    _, schema = project(tmp_path)
    empty = run_cli(tmp_path / "empty", templates, schema, tmp_path / "out")
    assert empty.exit_code == 2 and "has no rows" in text(empty)
    assert count(conn, "SELECT count(*) FROM template_runs") == 0


def test_rows_with_nulls_and_very_long_fields_are_truncated_and_counted(lb_env, conn, tmp_path):
    long_text = "word " * 6_000  # 30,000 characters
    rows = [{"id": "0001", "case_name": None, "court": "CA", "text": long_text},
            {"id": "0002", "case_name": "B v C", "court": None, "text": None},
            {"id": "0003", "case_name": "D v E", "court": "CFI", "text": long_text}]
    write_table(tmp_path / "data" / "train" / "cases.parquet", rows)
    write_table(tmp_path / "data" / "test" / "cases.csv", [{"id": "0004", "case_name": "", "court": "",
                                                           "text": long_text[:500]}])
    templates, schema = project(tmp_path)

    result = run_cli(tmp_path / "data", templates, schema, tmp_path / "out", "--max-field-chars", "1000")

    assert result.exit_code == 0, result.output
    assert "2 rows had fields truncated at 1000 characters" in text(result)
    train = pq.read_table(tmp_path / "out" / "train" / "cases.parquet").to_pydict()
    assert train["text"] == [long_text, None, long_text]  # the file keeps the full value, nulls stay null
    assert train["case_name"] == [None, "B v C", "D v E"] and train["court"] == ["CA", None, "CFI"]
    assert train["llm_status"] == ["success"] * 3
    prompts = [p for (p,) in conn.execute("SELECT user_prompt FROM template_rows ORDER BY file_key, row_no")]
    assert sum(p.count(" …[truncated]") for p in prompts) == 2
    assert max(len(p) for p in prompts) < 1_200
    summary = summary_of(tmp_path / "out")
    assert summary["truncation"] == {"rows_seen": 4, "rows_affected": 2, "fields_truncated": {"text": 2}}
    assert summary["truncation_by_split"]["train"] == {"rows_seen": 3, "rows_affected": 2}
    assert summary["splits"]["test"]["records"] == 1 and summary["records"] == 4


def test_the_example_runs_offline(lb_env, conn, tmp_path):
    copied = cli("example", "--output", tmp_path / "ex")
    assert copied.exit_code == 0, copied.output
    ex = tmp_path / "ex"
    result = run_cli(ex / "data", ex / "templates", ex / "schema.json", ex / "output")
    assert result.exit_code == 0, result.output
    summary = summary_of(ex / "output")
    assert summary["records"] == 10 and summary["validation_rate"] == 1.0
    assert set(summary["splits"]) == {"train", "val", "test"}
    out = pd.read_csv(ex / "output" / "train" / "cases.csv", dtype=str)
    assert list(out.columns[-10:]) == ["llm_outcome", "llm_court", "llm_key_issues", "llm_damages_awarded",
                                       "llm_parties", "llm_unanimous", "llm_status", "llm_error",
                                       "llm_validation_passed", "llm_parse_status"]


# -- mode selection ------------------------------------------------------------------------------------

def test_choose_execution_rules():
    assert choose_execution(mode="auto", records=999, threshold=1000, provider="local", min_records=1)[0] == "realtime"
    assert choose_execution(mode="auto", records=1000, threshold=1000, provider="local", min_records=1)[0] == "batch"
    assert choose_execution(mode="realtime", records=10**6, threshold=1000, provider="local",
                            min_records=1)[0] == "realtime"
    execution, note = choose_execution(mode="batch", records=99, threshold=1000, provider="bedrock", min_records=100)
    assert execution == "realtime" and "minimum of 100 records per batch job" in note
    execution, note = choose_execution(mode="auto", records=150, threshold=120, provider="bedrock", min_records=100)
    assert execution == "batch" and "reach the batch threshold of 120" in note


@pytest.mark.parametrize(("rows", "batch"), [(9, False), (10, True), (11, True)])
def test_auto_mode_batches_from_the_threshold_on(lb_env, conn, tmp_path, rows, batch):
    write_table(tmp_path / "data" / "cases.csv", records(rows))
    templates, schema = project(tmp_path)

    result = run_cli(tmp_path / "data", templates, schema, tmp_path / "out", "--batch-threshold", "10", "--wait")

    assert result.exit_code == 0, result.output
    summary = summary_of(tmp_path / "out")
    jobs = ledger.list_jobs(conn, flow="template")
    assert summary["batch_used"] is batch and summary["execution"] == ("batch" if batch else "realtime")
    assert len(jobs) == (1 if batch else 0) and summary["job_ids"] == [j.provider_job_id for j in jobs]
    assert count(conn, "SELECT count(*) FROM batch_items") == (rows if batch else 0)
    via = "batch" if batch else "realtime"
    assert count(conn, "SELECT count(*) FROM template_results WHERE via = %s", via) == rows
    assert_originals_kept(tmp_path / "out" / "cases.csv", records(rows))


def test_batch_without_wait_submits_then_the_same_command_with_wait_finishes(lb_env, conn, tmp_path):
    write_table(tmp_path / "data" / "cases.csv", records(5))
    templates, schema = project(tmp_path)

    submitted = run_cli(tmp_path / "data", templates, schema, tmp_path / "out", "--mode", "batch")
    assert submitted.exit_code == 0, submitted.output
    assert "still in provider batch jobs" in submitted.output and not (tmp_path / "out").exists()
    assert [j.state for j in ledger.list_jobs(conn, flow="template")] == ["pending"]

    finished = run_cli(tmp_path / "data", templates, schema, tmp_path / "out", "--mode", "batch", "--wait")
    assert finished.exit_code == 0, finished.output
    assert "continued" in finished.output
    assert [j.state for j in ledger.list_jobs(conn, flow="template")] == ["ingested"]  # not submitted twice
    assert_originals_kept(tmp_path / "out" / "cases.csv", records(5))


def test_order_is_restored_across_several_jobs_by_id(lb_env, conn, tmp_path, monkeypatch):
    monkeypatch.setenv("LEGAL_BATCH_SHARD_MAX_RECORDS", "7")
    get_settings(fresh=True)
    first, second = records(20), records(13, start=20)
    write_table(tmp_path / "data" / "a.csv", first)
    write_table(tmp_path / "data" / "b.parquet", second)
    templates, schema = project(tmp_path)

    result = run_cli(tmp_path / "data", templates, schema, tmp_path / "out", "--mode", "batch", "--wait")

    assert result.exit_code == 0, result.output
    jobs = sorted(ledger.list_jobs(conn, flow="template"), key=lambda j: j.shard_key)
    assert len(jobs) == 5 and [j.request_count for j in jobs] == [7, 7, 7, 7, 5]
    assert all(j.state == "ingested" and j.items_done == j.request_count for j in jobs)
    for name, rows in (("a.csv", first), ("b.parquet", second)):
        out = assert_originals_kept(tmp_path / "out" / name, rows)
        assert list(out["llm_court"]) == [expected_echo(r) for r in rows]
    assert sorted(summary_of(tmp_path / "out")["job_ids"]) == sorted(j.provider_job_id for j in jobs)


# -- the Dagster assets from settings -------------------------------------------------------------------

def test_dagster_assets_stage_once_and_write_outputs(lb_env, conn, tmp_path, monkeypatch):
    write_table(tmp_path / "data" / "cases.csv", records(6))
    templates, schema = project(tmp_path)
    for name, value in {"INPUT": tmp_path / "data", "TEMPLATES": templates, "SCHEMA": schema,
                        "OUTPUT": tmp_path / "out", "MODE": "batch"}.items():
        monkeypatch.setenv(f"LEGAL_BATCH_TEMPLATE_{name}", str(value))
    get_settings(fresh=True)
    with dg.instance_for_test() as instance:
        runner = FlowDriver(TEMPLATE, defs, flow="template", echo=lambda _: None, dagster_instance=instance)
        first = runner.run(wait=True, poll_interval=0)
        assert first.failed_runs == [] and len(first.submitted) == 1
        # the outputs are written by `template_inputs` on its next materialization (the planner sensor's
        # request once every row is answered)
        sensor = dg.build_sensor_context(instance=instance, resources=defs.resources)
        requests = TEMPLATE.planner_sensor(sensor).run_requests
        assert [r.job_name for r in requests] == ["template_candidates_job"]
        second = runner.run(wait=True, poll_interval=0)
        assert second.submitted == [] and second.failed_runs == []
        assert TEMPLATE.planner_sensor(sensor).run_requests == []  # nothing left to do
        keys = [a.key.to_user_string() for a in TEMPLATE.assets]
        assert keys == ["template_inputs", "template_request_files", "template_batch_jobs",
                        "template_batch_outputs", "template_results"]
        event = instance.get_latest_materialization_event(dg.AssetKey("template_inputs"))
        assert event is not None
        check = instance.event_log_storage.get_latest_asset_check_execution_by_key(
            [dg.AssetCheckKey(dg.AssetKey("template_results"), "responses_recorded")])
        assert all(c.status.value == "SUCCEEDED" for c in check.values())
    assert count(conn, "SELECT count(*) FROM template_runs") == 1
    assert count(conn, "SELECT count(*) FROM template_runs WHERE finished_at IS NOT NULL") == 1
    assert_originals_kept(tmp_path / "out" / "cases.csv", records(6))
    assert summary_of(tmp_path / "out")["batch_used"] is True


# -- Bedrock: several jobs, bad answers, fallback after failed batches ----------------------------------

def claude_json(model_id: str, model_input: dict) -> dict:
    """Claude's answer to a template row: the continuation of the `{` prefill, echoing the row id.

    Rows whose id ends in 7 answer with prose and no JSON, ids ending in 8 with an outcome outside
    the enum, ids ending in 9 fail with a provider error; ids ending in 5 use typographic quotes."""
    assert model_input["messages"][-1] == {"role": "assistant", "content": "{"}
    assert "JSON Schema" in model_input["system"]
    user = model_input["messages"][0]["content"]
    row_id = re.search(r"Row (\d+):", user).group(1)
    if row_id.endswith("9"):
        raise RecordError(400, f"Malformed input request: row {row_id} refused")
    if row_id.endswith("7"):
        reply = "I am sorry, I cannot answer that."
    elif row_id.endswith("8"):
        reply = f'"court": "{row_id}", "outcome": "maybe"}}'
    elif row_id.endswith("5"):
        reply = f'“court”: “{row_id}”, “outcome”: “remitted”, “issues”: [“costs”]}}\nHope this helps.'
    else:
        reply = f'"court": "{row_id}", "outcome": "allowed", "judges": 3}}'
    return {"id": f"msg_{uuid.uuid4().hex[:12]}", "type": "message", "role": "assistant", "model": model_id,
            "content": [{"type": "text", "text": reply}], "stop_reason": "end_turn", "stop_sequence": None,
            "usage": {"input_tokens": len(user) // 4, "output_tokens": len(reply) // 4}}


@pytest.fixture
def bedrock(lb_env, monkeypatch: pytest.MonkeyPatch) -> Iterator[BedrockBatchEmulator]:
    with running_bedrock_emulator(auto_advance=True) as emu:
        point_at_emulator(monkeypatch, emu)
        monkeypatch.setenv("LEGAL_BATCH_TEMPLATE_PROVIDER", "bedrock")
        get_settings(fresh=True)
        emu.responder = claude_json
        yield emu


def clean_records(n: int, *, start: int = 0) -> list[dict[str, str]]:
    """Rows whose ids end in 0-4 or 6 only: every answer is valid."""
    ids = [i for i in range(start, start + 10 * n) if i % 10 not in (5, 7, 8, 9)][:n]
    return [{"id": f"{i:04d}", "case_name": f"P{i} v Q{i}", "court": "CA", "text": f"Judgment {i}."} for i in ids]


def assert_answers_are_the_rows_own(out: pd.DataFrame) -> None:
    assert (out["llm_court"] == out["id"]).all()  # joined on the record id, whatever the output order
    assert (out["llm_parse_status"] == "success").all()


def test_bedrock_orders_results_across_several_jobs_with_shuffled_output(bedrock, conn, tmp_path, monkeypatch):
    monkeypatch.setenv("LEGAL_BATCH_SHARD_MAX_RECORDS", "100")
    get_settings(fresh=True)
    rows = clean_records(250)
    write_table(tmp_path / "data" / "cases.csv.gz", rows)
    templates, schema = project(tmp_path)

    result = run_cli(tmp_path / "data", templates, schema, tmp_path / "out", "--mode", "batch", "--wait")

    assert result.exit_code == 0, result.output
    jobs = sorted(ledger.list_jobs(conn, flow="template"), key=lambda j: j.shard_key)
    assert [(j.request_count, j.mode) for j in jobs] == [(100, "batch"), (100, "batch"), (50, "realtime")]
    assert len(bedrock.requests_for("CreateModelInvocationJob")) == 2  # the last 50 are below Bedrock's minimum
    assert len(bedrock.requests_for("InvokeModel")) == 50
    assert all(j.state == "ingested" and j.items_done == j.request_count for j in jobs)
    out = assert_originals_kept(tmp_path / "out" / "cases.csv.gz", rows)
    assert_answers_are_the_rows_own(out)
    summary = summary_of(tmp_path / "out")
    assert summary["batch_records"] == 200 and summary["realtime_records"] == 50 and summary["fallback_records"] == 0
    assert summary["fallback_note"].startswith("50 records in a shard below the provider's minimum")
    assert sorted(summary["job_ids"]) == sorted(j.provider_job_id for j in jobs[:2])
    assert all(i.startswith("arn:aws:bedrock:") for i in summary["job_ids"])


def test_bedrock_bad_answers_get_a_status_per_row_and_nothing_else_is_lost(bedrock, conn, tmp_path):
    rows = records(20)
    write_table(tmp_path / "data" / "cases.csv", rows)
    templates, schema = project(tmp_path)

    result = run_cli(tmp_path / "data", templates, schema, tmp_path / "out", "--mode", "realtime")

    assert result.exit_code == 0, result.output
    out = assert_originals_kept(tmp_path / "out" / "cases.csv", rows)
    by_id = out.set_index("id")
    for row_id, row in by_id.iterrows():
        last = row_id[-1]
        expected = {"7": ("json_failed", "error"), "8": ("validation_failed", "success"),
                    "9": ("error", "error")}.get(last, ("success", "success"))
        assert (row["llm_parse_status"], row["llm_status"]) == expected, row_id
        if last == "5":  # typographic quotes repaired
            assert row["llm_outcome"] == "remitted" and json.loads(row["llm_issues"]) == ["costs"]
        if last == "8":  # the answer is kept so the user can see it
            assert row["llm_outcome"] == "maybe" and "outcome" in row["llm_error"]
        if last == "9":
            assert "refused" in row["llm_error"]
    summary = summary_of(tmp_path / "out")
    assert summary["parse_status"] == {"error": 2, "json_failed": 2, "success": 14, "validation_failed": 2}
    assert summary["validation_rate"] == 0.7 and summary["failures"] == 4


@pytest.mark.parametrize("failure", ["Failed", "Expired"])
def test_bedrock_failed_batch_falls_back_to_real_time(bedrock, conn, tmp_path, failure):
    rows = clean_records(120)
    write_table(tmp_path / "data" / "cases.csv", rows)
    templates, schema = project(tmp_path)

    submitted = run_cli(tmp_path / "data", templates, schema, tmp_path / "out", "--mode", "batch")
    assert submitted.exit_code == 0, submitted.output
    [job] = ledger.list_jobs(conn, flow="template")
    if failure == "Failed":
        bedrock.set_status(job.provider_job_id, "Failed", "Internal error: the job could not be processed.")
    else:
        bedrock.expire(job.provider_job_id, completed_fraction=0.25)

    finished = run_cli(tmp_path / "data", templates, schema, tmp_path / "out", "--mode", "batch", "--wait")

    assert finished.exit_code == 0, finished.output
    out = assert_originals_kept(tmp_path / "out" / "cases.csv", rows)
    assert_answers_are_the_rows_own(out)
    batched = 0 if failure == "Failed" else 30
    summary = summary_of(tmp_path / "out")
    assert summary["batch_records"] == batched and summary["fallback_records"] == 120 - batched
    assert summary["realtime_records"] == 120 - batched and summary["batch_used"] is (batched > 0)
    note = summary["fallback_note"]
    assert f"batch processing failed for {120 - batched} of 120 records, which fell back to real time" in note
    assert job.provider_job_id in note and failure in note
    assert summary["job_ids"] == [job.provider_job_id]
    assert len(bedrock.requests_for("InvokeModel")) == 120 - batched
    assert ledger.summary(conn, "template").items_by_state == {"done": 120}
    assert verify(conn, {"template": DONE_WITHOUT_RESULT["template"]}).ok
    assert "fell back to real time" in text(finished)


def test_bedrock_refused_submit_falls_back_to_real_time_in_one_command(bedrock, conn, tmp_path):
    rows = clean_records(100)
    write_table(tmp_path / "data" / "cases.tsv", rows)
    templates, schema = project(tmp_path)
    bedrock.add_fault(operation="CreateModelInvocationJob", status=400, error_type="ValidationException",
                      message="The provided model identifier is invalid.")

    result = run_cli(tmp_path / "data", templates, schema, tmp_path / "out", "--mode", "batch", "--wait")

    assert result.exit_code == 0, result.output
    assert_answers_are_the_rows_own(assert_originals_kept(tmp_path / "out" / "cases.tsv", rows))
    [job] = ledger.list_jobs(conn, flow="template")
    assert job.provider_job_id is None and job.last_error.startswith("submit refused: ")
    summary = summary_of(tmp_path / "out")
    assert summary["batch_used"] is False and summary["fallback_records"] == 100 and summary["job_ids"] == []
    note = summary["fallback_note"]
    assert f"job {job.shard_key} was not submitted (submit refused: " in note
    assert "The provided model identifier is invalid." in note
    assert ledger.summary(conn, "template").items_by_state == {"done": 100}


def test_bedrock_below_its_minimum_records_runs_in_real_time(bedrock, conn, tmp_path):
    write_table(tmp_path / "data" / "cases.csv", clean_records(40))
    templates, schema = project(tmp_path)

    result = run_cli(tmp_path / "data", templates, schema, tmp_path / "out", "--mode", "batch")

    assert result.exit_code == 0, result.output
    summary = summary_of(tmp_path / "out")
    assert summary["execution"] == "realtime" and "bedrock's minimum of 100 records" in summary["fallback_note"]
    assert bedrock.requests_for("CreateModelInvocationJob") == [] and len(bedrock.requests_for("InvokeModel")) == 40


def test_core_functions_without_the_cli(bedrock, conn, tmp_path):
    """Stage, answer and finish with the core functions the asset and CLI call; a changed input is refused."""
    write_table(tmp_path / "data" / "cases.csv", clean_records(5))
    templates, schema = project(tmp_path)
    config = TemplateRunConfig(input_path=tmp_path / "data", templates=templates, schema_path=schema,
                               output_path=tmp_path / "out", mode="realtime")
    provider = make_provider("bedrock", get_settings())
    staged = stage_inputs(conn, config, provider=provider)
    assert not staged.resumed and staged.run.execution == "realtime" and staged.run.prefill == "{"
    assert stage_inputs(conn, config, provider=provider).resumed
    write_table(tmp_path / "data" / "cases.csv", clean_records(6))  # the file changes under the run
    from legal_batch.flows.template.errors import TemplateError

    with pytest.raises(TemplateError, match="changed after template run"):
        finish_run(conn, staged.run.id, provider_for=lambda name: make_provider(name, get_settings()))
    [blocked] = finish_open_runs(conn, provider_for=lambda name: make_provider(name, get_settings()))
    assert "changed after template run" in blocked.error and not blocked.finished  # other runs would go on
    assert not (tmp_path / "out" / "cases.csv").exists()
    assert bedrock.requests_for("InvokeModel") == []  # nothing was asked for a run that cannot be written
