"""prompts.json loading and per-row prompt rendering."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest

from legal_batch.flows.template.errors import TemplateError
from legal_batch.flows.template.prompts import (
    FormattedPrompt,
    PromptTemplate,
    TruncationStats,
    check_columns,
    format_prompt,
    load_prompts,
)

TEMPLATE = PromptTemplate(
    system_prompt="You are a law reporter. Answer with JSON only.",
    user_prompt_template=(
        'Case: {case_name}\nText: {full_text}\nAnswer like {"verdict": "upheld", "notes": {}} '
        "and keep {0}, {not a placeholder} and {{ }} as written."
    ),
    input_placeholders=("case_name", "full_text"),
)


def write_prompts(folder: Path, **content: object) -> Path:
    base = {
        "system_prompt": "sys",
        "user_prompt_template": "Summarise {full_text}",
        "input_placeholders": ["full_text"],
    }
    path = folder / "prompts.json"
    path.write_text(json.dumps({**base, **content}), encoding="utf-8")
    return path


def test_placeholders_are_filled_and_other_braces_kept() -> None:
    prompt = format_prompt(TEMPLATE, {"case_name": "Smith v Jones", "full_text": "The appeal fails."})
    assert prompt == FormattedPrompt(
        system="You are a law reporter. Answer with JSON only.",
        user=(
            'Case: Smith v Jones\nText: The appeal fails.\nAnswer like {"verdict": "upheld", "notes": {}} '
            "and keep {0}, {not a placeholder} and {{ }} as written."
        ),
        truncated_fields=(),
    )


def test_values_are_inserted_verbatim() -> None:
    prompt = format_prompt(TEMPLATE, {"case_name": "{full_text} {0} {", "full_text": "x"})
    assert prompt.user.startswith("Case: {full_text} {0} {\nText: x\n")


def test_placeholder_names_with_spaces() -> None:
    template = PromptTemplate("s", "Read {case text} then {id}", ("case text", "id"))
    assert format_prompt(template, {"case text": "T", "id": 7}).user == "Read T then 7"


@pytest.mark.parametrize("missing", [None, float("nan"), math.nan, pd.NA, pd.NaT])
def test_nulls_become_empty_strings(missing: object) -> None:
    prompt = format_prompt(TEMPLATE, {"case_name": missing, "full_text": "t"})
    assert prompt.user.startswith("Case: \nText: t\n")


def test_a_pandas_row_works_as_the_mapping() -> None:
    frame = pd.DataFrame({"case_name": ["A v B", None], "full_text": ["t1", "t2"], "other": [1, 2]})
    users = [format_prompt(TEMPLATE, row).user.split("\n")[0] for _, row in frame.iterrows()]
    assert users == ["Case: A v B", "Case: "]


def test_long_fields_are_truncated_with_a_visible_marker() -> None:
    prompt = format_prompt(TEMPLATE, {"case_name": "short", "full_text": "x" * 30}, max_field_chars=10)
    assert "Text: xxxxxxxxxx …[truncated]\n" in prompt.user
    assert prompt.truncated_fields == ("full_text",)


def test_truncation_marker_is_configurable_and_exact_length_is_kept() -> None:
    prompt = format_prompt(
        TEMPLATE, {"case_name": "abcdef", "full_text": "x" * 10}, max_field_chars=10, marker="[cut]"
    )
    assert prompt.user.startswith("Case: abcdef\nText: xxxxxxxxxx\n")
    assert prompt.truncated_fields == ()
    prompt = format_prompt(
        TEMPLATE, {"case_name": "abcdefghijkl", "full_text": ""}, max_field_chars=3, marker="[cut]"
    )
    assert prompt.user.startswith("Case: abc[cut]\n")


def test_truncation_stats_count_fields_and_rows() -> None:
    stats = TruncationStats()
    rows = [
        {"case_name": "n" * 20, "full_text": "t" * 20},
        {"case_name": "short", "full_text": "t" * 20},
        {"case_name": "short", "full_text": "short"},
    ]
    for row in rows:
        stats.add(format_prompt(TEMPLATE, row, max_field_chars=10))
    assert stats.as_dict() == {
        "rows_seen": 3,
        "rows_affected": 2,
        "fields_truncated": {"case_name": 1, "full_text": 2},
    }
    other = TruncationStats()
    other.add(format_prompt(TEMPLATE, rows[0], max_field_chars=10))
    stats.merge(other)
    assert stats.as_dict()["fields_truncated"] == {"case_name": 2, "full_text": 3}
    assert (stats.rows_seen, stats.rows_affected) == (4, 3)


def test_missing_column_error_names_file_column_and_available_columns() -> None:
    with pytest.raises(TemplateError) as caught:
        check_columns(TEMPLATE, ["Case_Name", "text", "id"], file="data/train/cases.csv")
    message = str(caught.value)
    assert "data/train/cases.csv" in message
    assert "'case_name', 'full_text'" in message
    assert "Available columns: Case_Name, text, id." in message
    assert "did you mean 'Case_Name'?" in message


def test_check_columns_passes_when_all_present() -> None:
    check_columns(TEMPLATE, ["full_text", "case_name", "extra"], file="x.csv")


def test_load_prompts_from_folder_or_file(tmp_path: Path) -> None:
    path = write_prompts(tmp_path)
    expected = PromptTemplate("sys", "Summarise {full_text}", ("full_text",))
    assert load_prompts(tmp_path) == expected
    assert load_prompts(path) == expected


def test_load_prompts_keeps_json_examples(tmp_path: Path) -> None:
    template = 'Summarise {full_text} as {"summary": "...", "tags": ["a"]}; keep {0}, {{ }} and { }'
    write_prompts(tmp_path, user_prompt_template=template)
    assert load_prompts(tmp_path).user_prompt_template == template


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ({"system_prompt": None}, "system_prompt must be a string"),
        ({"input_placeholders": "full_text"}, "input_placeholders must be a list of column names"),
        (
            {"user_prompt_template": "Summarise {full_text} for {court}"},
            "user_prompt_template uses {court} but input_placeholders does not declare it",
        ),
        (
            {"input_placeholders": ["full_text", "court"]},
            "input_placeholders declares 'court' but user_prompt_template never uses {court}",
        ),
        ({"input_placeholders": ["full_text", "full_text"]}, "lists 'full_text' more than once"),
    ],
)
def test_load_prompts_explains_mistakes(tmp_path: Path, content: dict, expected: str) -> None:
    write_prompts(tmp_path, **content)
    with pytest.raises(TemplateError) as caught:
        load_prompts(tmp_path)
    assert str(tmp_path / "prompts.json") in str(caught.value)
    assert expected in str(caught.value)


def test_load_prompts_names_missing_keys(tmp_path: Path) -> None:
    (tmp_path / "prompts.json").write_text('{"system_prompt": "s"}', encoding="utf-8")
    with pytest.raises(TemplateError, match="is missing user_prompt_template, input_placeholders"):
        load_prompts(tmp_path)


def test_load_prompts_missing_file_and_bad_json(tmp_path: Path) -> None:
    with pytest.raises(TemplateError, match="cannot read prompts file"):
        load_prompts(tmp_path)
    (tmp_path / "prompts.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(TemplateError, match="is not valid JSON"):
        load_prompts(tmp_path)
