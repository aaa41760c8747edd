"""Result columns per row and the processing summary file."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pytest

from legal_batch.flows.template.errors import TemplateError
from legal_batch.flows.template.prompts import PromptTemplate, TruncationStats, format_prompt
from legal_batch.flows.template.results import (
    ProcessingSummary,
    append_results,
    result_column_names,
    result_columns_for,
    write_summary,
)
from legal_batch.flows.template.schema import result_columns, schema_to_model

SCHEMA = {
    "type": "object",
    "properties": {
        "verdict": {"enum": ["upheld", "reversed"]},
        "judges": {"type": "integer"},
        "parties": {"type": "array", "items": {"type": "object", "properties": {"name": {"type": "string"}}}},
        "court": {"type": "object", "properties": {"name": {"type": "string"}}},
        "costs": {"type": "boolean"},
    },
    "required": ["verdict"],
}
MODEL = schema_to_model(SCHEMA)
COLUMNS = result_columns(SCHEMA)


def results_for(text: str | None, provider_error: str | None = None, **kwargs: str) -> dict[str, object]:
    return result_columns_for(text, provider_error, MODEL, COLUMNS, **kwargs)


def test_column_names() -> None:
    assert result_column_names(COLUMNS) == [
        "llm_verdict",
        "llm_judges",
        "llm_parties",
        "llm_court",
        "llm_costs",
        "llm_status",
        "llm_error",
        "llm_validation_passed",
        "llm_parse_status",
    ]


def test_success_serialises_nested_values_as_compact_json() -> None:
    text = (
        'Result:\n```json\n{"verdict": "upheld", "judges": 3, "parties": [{"name": "Müller"}], '
        '"court": {"name": "UKSC"}, "costs": false}\n```'
    )
    assert results_for(text) == {
        "llm_verdict": "upheld",
        "llm_judges": "3",
        "llm_parties": '[{"name":"Müller"}]',
        "llm_court": '{"name":"UKSC"}',
        "llm_costs": "false",
        "llm_status": "success",
        "llm_error": None,
        "llm_validation_passed": True,
        "llm_parse_status": "success",
    }


def test_prefill_and_custom_prefix() -> None:
    row = results_for('"verdict": "reversed"}', prefix="out_", prefill="{")
    assert row["out_verdict"] == "reversed"
    assert row["out_judges"] is None
    assert row["out_parse_status"] == "success"


def test_validation_failure_keeps_what_the_model_said() -> None:
    row = results_for('{"verdict": "dismissed", "judges": "three"}')
    assert row["llm_verdict"] == "dismissed"
    assert row["llm_judges"] == "three"
    assert row["llm_status"] == "success"
    assert row["llm_validation_passed"] is False
    assert row["llm_parse_status"] == "validation_failed"
    assert row["llm_error"] == (
        "verdict: Input should be 'upheld' or 'reversed' (got 'dismissed'); "
        "judges: Input should be a valid integer, unable to parse string as an integer (got 'three')"
    )


def test_json_failure() -> None:
    row = results_for("I am unable to answer.")
    assert row["llm_verdict"] is None
    assert (row["llm_status"], row["llm_validation_passed"], row["llm_parse_status"]) == (
        "error",
        False,
        "json_failed",
    )
    assert row["llm_error"] == "no JSON object in response: 'I am unable to answer.'"


def test_provider_error_wins() -> None:
    row = results_for(None, provider_error="ThrottlingException: rate exceeded")
    assert (row["llm_status"], row["llm_parse_status"], row["llm_error"]) == (
        "error",
        "error",
        "ThrottlingException: rate exceeded",
    )


def test_append_results_types_and_keeps_input_columns() -> None:
    chunk = pd.DataFrame({"id": ["007", "008"], "text": ["a", ""]}, index=[10, 11])
    rows = [results_for('{"verdict": "upheld"}'), results_for("nothing")]
    out = append_results(chunk, rows, columns=COLUMNS, file="cases.csv")
    assert out.index.tolist() == [10, 11]
    assert out[["id", "text"]].equals(chunk)
    table = pa.Table.from_pandas(out, preserve_index=False)
    assert table.schema.field("llm_verdict").type == pa.string()
    assert table.schema.field("llm_validation_passed").type == pa.bool_()
    assert table.column("llm_validation_passed").to_pylist() == [True, False]


def test_append_results_refuses_to_overwrite_an_input_column() -> None:
    chunk = pd.DataFrame({"verdict": ["x"]})
    with pytest.raises(
        TemplateError, match=r"cases\.csv already has column\(s\) verdict; choose another result prefix"
    ):
        append_results(chunk, [results_for("{}", prefix="")], columns=COLUMNS, prefix="", file="cases.csv")


def test_summary_counts_and_file(tmp_path: Path) -> None:
    summary = ProcessingSummary(name="judgments v2", batch_used=True, job_ids=["job-1", "job-2"])
    for text, split in [
        ('{"verdict": "upheld"}', "train"),
        ('{"verdict": "upheld"}', "train"),
        ('{"verdict": "maybe"}', "train"),
        ("no json", "val"),
        ('{"verdict": "reversed"}', None),
    ]:
        summary.add(results_for(text), split=split)
    summary.add(results_for(None, provider_error="timeout"), split="val")
    template = PromptTemplate("s", "{t}", ("t",))
    summary.truncation.add(format_prompt(template, {"t": "x" * 5}, max_field_chars=2))

    path = write_summary(summary, tmp_path / "out", now=datetime(2025, 3, 1, 12, 0, 5, tzinfo=UTC))

    assert path == tmp_path / "out" / "processing_summary_judgments_v2_20250301T120005Z.json"
    written = json.loads(path.read_text(encoding="utf-8"))
    assert written == {
        "name": "judgments v2",
        "records": 6,
        "successes": 4,
        "failures": 2,
        "validation_passed": 3,
        "validation_rate": 0.5,
        "parse_status": {"error": 1, "json_failed": 1, "success": 3, "validation_failed": 1},
        "batch_used": True,
        "job_ids": ["job-1", "job-2"],
        "fallback_note": None,
        "truncation": {"rows_seen": 1, "rows_affected": 1, "fields_truncated": {"t": 1}},
        "splits": {
            "train": {
                "records": 3,
                "successes": 3,
                "failures": 0,
                "validation_passed": 2,
                "validation_rate": 0.6667,
                "parse_status": {"success": 2, "validation_failed": 1},
            },
            "val": {
                "records": 2,
                "successes": 0,
                "failures": 2,
                "validation_passed": 0,
                "validation_rate": 0.0,
                "parse_status": {"error": 1, "json_failed": 1},
            },
            "unsplit": {
                "records": 1,
                "successes": 1,
                "failures": 0,
                "validation_passed": 1,
                "validation_rate": 1.0,
                "parse_status": {"success": 1},
            },
        },
        "written_at": "2025-03-01T12:00:05+00:00",
    }


def test_summary_never_overwrites(tmp_path: Path) -> None:
    summary = ProcessingSummary(name="run", fallback_note="batch job failed; finished in real time")
    moment = datetime(2025, 1, 1, tzinfo=UTC)
    first = write_summary(summary, tmp_path, now=moment)
    second = write_summary(summary, tmp_path, now=moment)
    assert (first.name, second.name) == (
        "processing_summary_run_20250101T000000Z.json",
        "processing_summary_run_20250101T000000Z_2.json",
    )
    assert json.loads(second.read_text())["fallback_note"] == "batch job failed; finished in real time"
    assert json.loads(second.read_text())["validation_rate"] == 0.0


def test_truncation_stats_merge_into_summary() -> None:
    summary = ProcessingSummary(name="x")
    stats = TruncationStats()
    stats.add(format_prompt(PromptTemplate("s", "{t}", ("t",)), {"t": "long"}, max_field_chars=1))
    summary.truncation.merge(stats)
    assert summary.as_dict()["truncation"] == {
        "rows_seen": 1,
        "rows_affected": 1,
        "fields_truncated": {"t": 1},
    }
