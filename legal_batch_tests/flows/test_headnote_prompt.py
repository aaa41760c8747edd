"""The LLM headnote prompt comes from a template file: the built-in one is the product's text, a run
selects another (`LEGAL_BATCH_HEADNOTE_PROMPT`, `headnotes run --prompt`), the template travels with
the shard, a file that cannot be used is one clear line, and an empty `headnote_corpus` is said out loud."""

from __future__ import annotations

from datetime import date
from pathlib import Path

import dagster as dg
import orjson
import pytest

from legal_batch.core import ledger
from legal_batch.core.errors import UserError
from legal_batch.core.seed import seed_demo_cases
from legal_batch.definitions import FLOWS_BY_NAME, defs
from legal_batch.driver import FlowDriver, FlowRun
from legal_batch.flows.headnotes.flow import (
    BUILT_IN_EXAMPLES,
    CaseText,
    HeadnotesFlow,
    case_header,
    system_prompt,
)
from legal_batch.flows.headnotes.prompt_template import BUILT_IN, PromptTemplate, default_prompt, load_prompt
from legal_batch.settings import get_settings
from legal_batch_tests.test_cli_errors import assert_one_line, run_main

THE_INSTRUCTIONS = (
    "You are a senior law reporter preparing headnotes for a series of law reports. Write the headnote of the "
    "judgment the user gives you, in this form and order:\n\n"
    "1. First line: the case's citation (its neutral citation, law report citation or case number, as the judgment "
    "gives it) — the court — the parties (the case name), separated by \" — \".\n"
    "2. \"Catchwords:\" the area of law and the points decided, as short phrases separated by \" – \".\n"
    "3. \"Held:\" what the court decided and why, in one to three sentences, ending with the order made.\n"
    "4. \"Summary:\" a short summary (two to four sentences) of the material facts and the reasoning.\n\n"
    "Use only what the judgment says: do not invent facts, parties, authorities or citations. Write plain text (no "
    "Markdown), in the language of the judgment, with the spelling and legal terms of its jurisdiction, keeping the "
    "labels \"Catchwords:\", \"Held:\" and \"Summary:\" as they are, in at most 350 words. If the judgment is marked "
    "as truncated, write the headnote from the part you have and do not speculate about the rest.")
ZH_CASE = CaseText("case-1", "（2019）最高法民终123号", "某某公司诉某某银行", "最高人民法院", date(2019, 6, 1),
                   "本院认为，双方签订的借款合同合法有效。" * 20)
HK_CASE = CaseText("case-2", "[2022] HKCA 12", "HKSAR v Chan", "Court of Appeal", None, "JUDGMENT\n\n1. Dismissed.")

CUSTOM = '''
system = """Vous êtes arrétiste. Rédigez le sommaire de la décision en français, {sans} Markdown."""
language = "La décision est en {language} : rédigez le sommaire en français."
label_citation = "Référence"
label_neutral_citation = "Référence neutre"
'''


def _template(tmp_path: Path, text: str = CUSTOM, name: str = "prompt.toml") -> Path:
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    return path


# -- the template -----------------------------------------------------------------------------------------

def test_the_built_in_template_is_the_prompt_as_it_was():
    prompt = default_prompt()
    assert prompt.source == BUILT_IN and prompt.system == THE_INSTRUCTIONS
    assert system_prompt([]) == THE_INSTRUCTIONS
    assert system_prompt(list(BUILT_IN_EXAMPLES[:1])) == (
        f"{THE_INSTRUCTIONS}\n\nExamples of the form, from judgments of other courts and languages (write in the "
        f"language of the judgment you are given):\n\nExample 1:\n{BUILT_IN_EXAMPLES[0]}")
    assert system_prompt(["A house headnote."]) == (
        f"{THE_INSTRUCTIONS}\n\nExamples of headnotes in the house style:\n\nExample 1:\nA house headnote.")
    assert case_header(HK_CASE) == ("Write the headnote of this judgment.\n\nNeutral citation: [2022] HKCA 12\n"
                                    "Court: Court of Appeal\nCase name: HKSAR v Chan\n\nJudgment:\n\n")
    assert case_header(ZH_CASE).splitlines()[1] == "The judgment is in Chinese: write the headnote in Chinese."


def test_a_template_file_replaces_what_it_gives_and_keeps_the_rest(tmp_path: Path):
    prompt = load_prompt(_template(tmp_path))
    assert prompt.source == str((tmp_path / "prompt.toml").resolve())
    assert system_prompt([], prompt) == "Vous êtes arrétiste. Rédigez le sommaire de la décision en français, {sans} Markdown."
    zh = case_header(ZH_CASE, prompt).splitlines()
    assert zh[:3] == ["Write the headnote of this judgment.",
                      "La décision est en Chinese : rédigez le sommaire en français.", ""]
    assert "Référence: （2019）最高法民终123号" in zh and "Court: 最高人民法院" in zh
    assert "Référence neutre: [2022] HKCA 12" in case_header(HK_CASE, prompt)
    assert PromptTemplate.from_params(prompt.as_params()) == prompt
    assert PromptTemplate.from_params(None) == default_prompt(), "a shard planned before templates: built-in"


def test_an_empty_language_line_leaves_it_out(tmp_path: Path):
    prompt = load_prompt(_template(tmp_path, 'language = ""\n'))
    assert "Chinese" not in case_header(ZH_CASE, prompt)


@pytest.mark.parametrize(("text", "words"), [
    (None, ["LEGAL_BATCH_HEADNOTE_PROMPT=", "no such file", "headnote_prompt.toml"]),
    ('system = "unclosed\n', ["is not valid TOML", "line 1"]),
    ('sytem = "typo"\n', ["unknown key 'sytem'", "the keys are", "system"]),
    ("label_court = 3\n", ["label_court is a int, not text"]),
    ('language = "In {lang}"\n', ["language uses a placeholder other than {language}"]),
    ('example_label = "Example {0}:"\n', ["example_label uses a placeholder other than {n}"]),
    ('system = "  "\n', ["system is empty"]),
])
def test_a_template_that_cannot_be_used_is_a_user_error(tmp_path: Path, text: str | None, words: list[str]):
    path = tmp_path / "missing.toml" if text is None else _template(tmp_path, text)
    with pytest.raises(UserError) as raised:
        load_prompt(path)
    for word in words:
        assert word in str(raised.value)
    assert "\n" not in str(raised.value)


# -- it travels with the shard ------------------------------------------------------------------------

def _driver(dagster_instance: dg.DagsterInstance, echoed: list[str] | None = None) -> FlowDriver:
    return FlowDriver(FLOWS_BY_NAME["headnotes"], defs, flow="headnotes", dagster_instance=dagster_instance,
                      echo=(echoed.append if echoed is not None else lambda _: None))


def test_the_template_is_kept_with_the_shard_and_used_after_its_file_is_gone(lb_env, conn, dagster_instance,
                                                                             monkeypatch, tmp_path):
    path = _template(tmp_path)
    monkeypatch.setenv("LEGAL_BATCH_HEADNOTE_PROMPT", str(path))
    get_settings(fresh=True)
    seed_demo_cases(conn, cases=2)
    _driver(dagster_instance).plan(FlowRun("headnotes"), limit=None)

    path.unlink()  # a later process: another environment, the file gone
    monkeypatch.delenv("LEGAL_BATCH_HEADNOTE_PROMPT")
    get_settings(fresh=True)
    _driver(dagster_instance).submit_pending(FlowRun("headnotes"))

    (job,) = ledger.list_jobs(conn, flow="headnotes")
    assert job.params["prompt"]["source"] == str(path.resolve())
    assert HeadnotesFlow.for_job(model=job.model, params=job.params).prompt == load_prompt_text(CUSTOM, path)
    lines = [orjson.loads(line) for line in Path(job.input_location).read_bytes().splitlines()]
    assert len(lines) == 2
    for line in lines:
        system, user = (message["content"] for message in line["body"]["messages"])
        assert system.startswith("Vous êtes arrétiste.") and "senior law reporter" not in system
        header = user.split("\nJudgment:\n")[0]  # the judgment's own text may say "Neutral citation"
        assert "Neutral citation" not in header and "Référence neutre: [" in header


def load_prompt_text(text: str, path: Path) -> PromptTemplate:
    """What `load_prompt` gives for `text` at `path` (the file itself may be gone)."""
    copy = path.with_name("copy.toml")
    copy.write_text(text, encoding="utf-8")
    loaded = load_prompt(copy)
    return PromptTemplate(**{**loaded.as_params(), "source": str(path.resolve())})


def test_a_config_prompt_for_a_flow_without_one_fails_before_planning(lb_env, conn, dagster_instance, tmp_path):
    seed_demo_cases(conn, cases=1)
    result = defs.resolve_job_def("embedding_candidates_job").execute_in_process(
        instance=dagster_instance, raise_on_error=False,
        run_config={"ops": {"embedding_candidates": {"config": {"prompt": str(_template(tmp_path))}}}})
    assert not result.success
    failure = next(e for e in result.all_events if e.is_step_failure)
    assert "has no prompt template" in failure.step_failure_data.error.message
    assert ledger.list_jobs(conn) == []


# -- the command ------------------------------------------------------------------------------------------

@pytest.fixture
def cli_env(lb_env, monkeypatch, tmp_path):
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dh"))
    (tmp_path / "dh").mkdir()
    return lb_env


def test_headnotes_run_prompt_plans_with_the_file(cli_env, conn, capsys, monkeypatch, tmp_path):
    seed_demo_cases(conn, cases=2)
    path = _template(tmp_path)
    code, out, err = run_main(capsys, monkeypatch, "headnotes", "export", "--prompt", str(path))
    assert code == 0, err
    (job,) = ledger.list_jobs(conn, flow="headnotes")
    assert job.params["prompt"]["source"] == str(path.resolve())
    assert job.params["prompt"]["label_citation"] == "Référence"


@pytest.mark.parametrize(("args", "variables", "words"), [
    (["headnotes", "run", "--prompt", "nowhere.toml"], {}, ["--prompt='nowhere.toml'", "no such file"]),
    (["headnotes", "export"], {"LEGAL_BATCH_HEADNOTE_PROMPT": "nowhere.toml"},
     ["LEGAL_BATCH_HEADNOTE_PROMPT='nowhere.toml'", "no such file"]),
    (["embeddings", "run", "--prompt", "p.toml"], {}, ["No such option: --prompt"]),
])
def test_a_prompt_that_cannot_be_used_is_one_line_before_any_run(cli_env, conn, capsys, monkeypatch, args,
                                                                 variables, words):
    seed_demo_cases(conn, cases=1)
    code, _, err = run_main(capsys, monkeypatch, *args, **variables)
    assert_one_line(code, err, *words)
    assert ledger.list_jobs(conn) == []


# -- an empty headnote_corpus is said out loud ---------------------------------------------------------------

def test_built_in_examples_are_announced_in_the_log_echo_and_metadata(lb_env, conn, dagster_instance):
    seed_demo_cases(conn, cases=1)
    conn.execute("DELETE FROM headnote_corpus")
    echoed: list[str] = []
    _driver(dagster_instance, echoed).plan(FlowRun("headnotes"), limit=None)
    notes = [line for line in echoed if line.strip().startswith("note:")]
    assert notes == ["  note: headnote_corpus is empty: the prompt's few-shot examples are the 3 built-in ones (the "
                     "form, not a house style); add headnotes to headnote_corpus to set yours"]
    event = dagster_instance.get_latest_materialization_event(dg.AssetKey("headnote_candidates"))
    metadata = event.asset_materialization.metadata
    assert metadata["few_shot_examples"].value == "built-in"
    assert metadata["notice"].value == notes[0].removeprefix("  note: ")
    assert metadata["prompt_template"].value == BUILT_IN

    conn.execute("INSERT INTO headnote_corpus (headnote_text) VALUES ('[2020] HKCA 1 — Court of Appeal — A v B')")
    conn.execute("INSERT INTO court_cases (id, full_text) VALUES (gen_random_uuid(), 'Another judgment. Dismissed.')")
    echoed.clear()
    _driver(dagster_instance, echoed).plan(FlowRun("headnotes"), limit=None)
    assert not [line for line in echoed if "note:" in line]
    metadata = dagster_instance.get_latest_materialization_event(
        dg.AssetKey("headnote_candidates")).asset_materialization.metadata
    assert metadata["few_shot_examples"].value == "headnote_corpus" and "notice" not in metadata
