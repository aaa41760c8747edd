"""The headnotes flow end to end through its Dagster definitions: on the local provider, through the
real `openai` SDK (`AzureOpenAI` and `OpenAI`) against the OpenAI batch emulator, and through boto3
against the Bedrock batch emulator. Assertions are on rows in `court_cases`, ledger states and the
request lines the emulators received."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from datetime import date
from typing import Any

import boto3
import dagster as dg
import orjson
import psycopg
import pytest
from typer.testing import CliRunner

from legal_batch.core import ledger
from legal_batch.core.demo_corpus import generate_case
from legal_batch.core.seed import seed_demo_cases
from legal_batch.definitions import FLOWS_BY_NAME, defs
from legal_batch.driver import FlowDriver, FlowRun
from legal_batch.flows.headnotes.flow import CaseText, build_request, truncate_judgment, unusable_reason
from legal_batch.providers.base import Result
from legal_batch.providers.local_models import extractive_headnote
from legal_batch.settings import get_settings
from legal_batch_tests.emulators.bedrock_batch import (
    BedrockBatchEmulator,
    point_at_emulator,
    running_bedrock_emulator,
)
from legal_batch_tests.emulators.openai_batch import OpenAIBatchEmulator, running_openai_emulator

HEAD = FLOWS_BY_NAME["headnotes"]
KEY = "sk-test-emulator-key-0123456789"
DEPLOYMENT = "gpt-4o-mini-batch"
EXAMPLES = [f"[20{10 + n}] HKCA {n} — Court of Appeal — Example {n} v Sample\nCatchwords: Example – {n}.\n"
            f"Held: example headnote number {n}." for n in range(5)]


# -- helpers --------------------------------------------------------------------------------------------

def runner(instance: dg.DagsterInstance, echo: Callable[[str], None] = lambda _: None) -> FlowDriver:
    return FlowDriver(HEAD, defs, flow="headnotes", echo=echo, dagster_instance=instance)


def count(conn: psycopg.Connection, sql: str, *params: object) -> int:
    return conn.execute(sql, params).fetchone()[0]


def items(conn: psycopg.Connection) -> dict[str, int]:
    return ledger.summary(conn, "headnotes").items_by_state


def headnotes(conn: psycopg.Connection) -> dict[str, tuple[str | None, str | None, Any]]:
    """citation → (headnote, model, generated_at)."""
    return {c: (h, m, t) for c, h, m, t in conn.execute(
        "SELECT neutral_citation, headnote, headnote_model, headnote_generated_at FROM court_cases")}


def reasons(conn: psycopg.Connection) -> dict[str, tuple[str, str]]:
    """citation → (item state, last error) for items that are not done."""
    return {c: (s, e) for c, s, e in conn.execute(
        "SELECT k.neutral_citation, i.state, i.last_error FROM batch_items i"
        " JOIN court_cases k ON k.id = i.subject_key::uuid WHERE i.flow = 'headnotes' AND i.state <> 'done'")}


def add_case(conn: psycopg.Connection, citation: str, text: str, *, court: str = "Court of First Instance",
             name: str = "Chan Tai Man v Wong Siu Ming") -> uuid.UUID:
    case_id = uuid.uuid4()
    conn.execute("INSERT INTO court_cases (id, neutral_citation, case_name, court, decision_date, full_text)"
                 " VALUES (%s, %s, %s, %s, %s, %s)", (case_id, citation, name, court, date(2023, 3, 1), text))
    return case_id


def judgment(citation: str, paragraphs: int = 6, *, court: str = "COURT OF FIRST INSTANCE") -> str:
    body = [f"{n}. The plaintiff fenced the garden and kept the only key to the gate for twelve years, paragraph "
            f"{n}." for n in range(1, paragraphs + 1)]
    return "\n\n".join([f"{court} OF THE HONG KONG SPECIAL ADMINISTRATIVE REGION",
                        "BETWEEN\nChan Tai Man (Plaintiff)\nand\nWong Siu Ming (Defendant)",
                        f"Neutral citation: {citation}", "Catchwords: Land law – adverse possession", "JUDGMENT",
                        *body, "ORDER", f"{paragraphs + 1}. A declaration of possessory title is granted.",
                        f"{paragraphs + 2}. Costs to the plaintiff."])


def add_examples(conn: psycopg.Connection) -> None:
    """Five corpus headnotes, oldest first (example 0 is the oldest)."""
    for n, text in enumerate(EXAMPLES):
        conn.execute("INSERT INTO headnote_corpus (headnote_text, created_at) VALUES (%s,"
                     " now() - make_interval(days => %s))", (text, 10 - n))


def check(instance: dg.DagsterInstance, name: str) -> Any:
    """The latest evaluation of a check on court_case_headnotes (passed, severity, metadata)."""
    key = dg.AssetCheckKey(dg.AssetKey("court_case_headnotes"), name)
    record = instance.event_log_storage.get_latest_asset_check_execution_by_key([key])[key]
    return record.event.dagster_event.event_specific_data


def drive(conn: psycopg.Connection, instance: dg.DagsterInstance, *, after_submit: Callable[[list[ledger.Shard]], None]
          | None = None, ticks: int = 10) -> None:
    """One round without retries: plan, submit, (let the test act on the provider), tick until ingested."""
    run = runner(instance)
    state = FlowRun("headnotes")
    run.plan(state, limit=None)
    run.submit_pending(state)
    assert state.submitted and not state.failed_runs
    if after_submit is not None:
        after_submit(ledger.list_jobs(conn, flow="headnotes"))
    for _ in range(ticks):
        if run.tick_status(state) == 0:
            break
    assert not state.failed_runs
    assert all(job.state == "ingested" for job in ledger.list_jobs(conn, flow="headnotes"))


def chat_answer(body: dict, *, content: str | None = None, finish_reason: str = "stop",
                refusal: str | None = None) -> dict:
    """A chat.completion whose headnote is extracted from the judgment (what a model would say)."""
    user = next(m["content"] for m in body["messages"] if m["role"] == "user")
    text = extractive_headnote(user) if content is None else content
    prompt = sum(len(m["content"]) for m in body["messages"]) // 4
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex[:12]}", "object": "chat.completion", "created": 0, "model": body["model"],
        "choices": [{"index": 0, "finish_reason": finish_reason,
                     "message": {"role": "assistant", "content": text, "refusal": refusal}}],
        "usage": {"prompt_tokens": prompt, "completion_tokens": len(text) // 4,
                  "total_tokens": prompt + len(text) // 4},
    }


def uploaded_lines(emulator: OpenAIBatchEmulator) -> list[dict]:
    """Every request line of every uploaded batch input file, in upload order."""
    lines: list[dict] = []
    for file in emulator.files.values():
        if file["purpose"] == "batch":
            lines += [orjson.loads(raw) for raw in emulator.file_content(file["id"]).splitlines() if raw.strip()]
    return lines


def batch_creates(emulator: OpenAIBatchEmulator) -> int:
    return sum(1 for r in emulator.requests if r.method == "POST" and r.path.endswith("/batches"))


# -- fixtures -------------------------------------------------------------------------------------------

@pytest.fixture
def azure(lb_env, monkeypatch: pytest.MonkeyPatch) -> Iterator[OpenAIBatchEmulator]:
    with running_openai_emulator(api_key=KEY, auto_advance=True) as emu:
        emu.responder = chat_answer
        for name, value in {"AZURE_OPENAI_ENDPOINT": emu.azure_endpoint, "AZURE_OPENAI_API_KEY": KEY,
                            "OPENAI_API_VERSION": "2024-10-21", "AZURE_OPENAI_BATCH_DEPLOYMENT": DEPLOYMENT,
                            "LEGAL_BATCH_HEADNOTES_PROVIDER": "azure_openai",
                            "LEGAL_BATCH_PRICES": orjson.dumps({DEPLOYMENT: [0.15, 0.60]}).decode()}.items():
            monkeypatch.setenv(name, value)
        monkeypatch.delenv("AZURE_OPENAI_AD_TOKEN", raising=False)
        get_settings(fresh=True)
        yield emu


@pytest.fixture
def openai_emu(lb_env, monkeypatch: pytest.MonkeyPatch) -> Iterator[OpenAIBatchEmulator]:
    with running_openai_emulator(api_key=KEY, auto_advance=True) as emu:
        emu.responder = chat_answer
        monkeypatch.setenv("OPENAI_API_KEY", KEY)
        monkeypatch.setenv("OPENAI_BASE_URL", emu.base_url)
        monkeypatch.setenv("LEGAL_BATCH_HEADNOTES_PROVIDER", "openai")
        get_settings(fresh=True)
        yield emu


# -- the prompt, without a provider ---------------------------------------------------------------------

def test_truncation_cuts_at_a_paragraph_boundary_with_a_visible_marker():
    text = "\n\n".join(f"{n}. " + " ".join(["word"] * 40) for n in range(1, 200))
    cut = truncate_judgment(text, max_chars=5_000)
    head, marker = cut.rsplit("\n\n", 1)
    assert len(head) <= 5_000 and text.startswith(head) and text[len(head):].startswith("\n\n")
    assert marker == f"[… judgment truncated at {len(head):,} of {len(text):,} characters …]"
    assert truncate_judgment(text, max_chars=len(text)) == text

    by_tokens = truncate_judgment(text, max_chars=150_000, max_tokens=1_000)
    assert "judgment truncated at" in by_tokens
    from legal_batch.core.tokens import count_tokens
    assert 900 < count_tokens(by_tokens) <= 1_000


def test_the_local_model_writes_citation_court_parties_and_holding_of_demo_cases():
    for index in range(40):
        case = generate_case(42, index)
        headnote = extractive_headnote(case.full_text)
        first = headnote.splitlines()[0]
        assert first == f"{case.neutral_citation} — {case.court} — {case.case_name}", headnote
        held = next(line for line in headnote.splitlines() if line.startswith("Held: "))
        order = case.full_text[case.full_text.rindex("\nORDER"):]
        assert held.removeprefix("Held: ").split(". ")[0].lower().rstrip(".") in order.lower()
        assert 200 <= len(headnote) <= 6_000


def test_unusable_answers_have_reasons():
    ok = Result("case-1", "out.jsonl", 1, text="[2020] HKCA 1 — Court of Appeal — A v B\nHeld: " + "x" * 300)
    assert unusable_reason(ok, max_tokens=600) is None
    cases = {
        "headnote cut off at max_tokens=600 (finish_reason=length)": Result("c", "o", 1, text="Partial", finish_reason="length"),
        "empty headnote": Result("c", "o", 1, text="  ", finish_reason="stop"),
        "the model refused: no": Result("c", "o", 1, text="x", extra={"refusal": "no"}),
        "answer was withheld (finish_reason=content_filter)": Result("c", "o", 1, text="", finish_reason="content_filter"),
        "the model refused: I'm sorry": Result("c", "o", 1, text="I'm sorry, I cannot help with that."),
    }
    for expected, result in cases.items():
        assert expected in (unusable_reason(result, max_tokens=600) or ""), expected


def test_requests_fit_a_given_input_token_limit():
    case = generate_case(42, 7)
    text = "\n\n".join([case.full_text] * 6)
    request = build_request(CaseText("case-x", case.neutral_citation, case.case_name, case.court, None, text),
                            system="Be brief.", max_chars=150_000, max_tokens=600, temperature=0.1,
                            max_input_tokens=8_191)
    from legal_batch.core.tokens import count_tokens
    assert count_tokens(request.system) + count_tokens(request.user) <= 8_191 - 16
    assert f"of {len(text):,} characters …]" in request.user


# -- local provider -------------------------------------------------------------------------------------

def test_local_run_writes_headnotes_and_a_rerun_submits_and_overwrites_nothing(lb_env, conn, dagster_instance):
    seed_demo_cases(conn, cases=5)
    manual = add_case(conn, "[2023] HKCFI 999", judgment("[2023] HKCFI 999"))
    conn.execute("UPDATE court_cases SET headnote = 'Written by the editor.' WHERE id = %s", (manual,))
    no_text = add_case(conn, "[2023] HKCFI 998", "   ")

    first = runner(dagster_instance).run(wait=True, poll_interval=0)

    assert len(first.submitted) == 1 and first.failed_runs == []
    rows = conn.execute("SELECT id, neutral_citation, court, case_name, headnote, headnote_model,"
                        " headnote_generated_at, updated_at FROM court_cases WHERE id NOT IN (%s, %s)",
                        (manual, no_text)).fetchall()
    assert len(rows) == 5
    for _, citation, court, name, headnote, model, generated, updated in rows:
        assert headnote.startswith(f"{citation} — {court} — {name}") and "Held: " in headnote
        assert model == "local-extractive-v1" and generated is not None and updated >= generated
    assert items(conn) == {"done": 5}
    assert count(conn, "SELECT count(*) FROM batch_items WHERE custom_id !~ '^case-[0-9a-f-]{36}$'") == 0
    assert conn.execute("SELECT headnote FROM court_cases WHERE id = %s", (manual,)).fetchone()[0] == (
        "Written by the editor.")
    assert conn.execute("SELECT headnote FROM court_cases WHERE id = %s", (no_text,)).fetchone()[0] is None

    job = ledger.list_jobs(conn, flow="headnotes")[0]
    assert job.state == "ingested" and job.items_done == 5 and job.est_input_tokens > 0 and job.input_tokens > 0
    assert check(dagster_instance, "shard_items_accounted").passed
    length = check(dagster_instance, "headnotes_within_length_band")
    assert length.passed and length.metadata["headnotes_written"].value == 5
    citation = check(dagster_instance, "headnotes_cite_neutral_citation")
    assert citation.passed and citation.metadata["mention_rate"].value == 1.0
    assert check(dagster_instance, "shard_cost_within_estimate").metadata["est_output_tokens_max"].value == 5 * 600
    planned = dagster_instance.get_latest_materialization_event(dg.AssetKey("headnote_candidates"))
    meta = planned.asset_materialization.metadata
    assert meta["run_est_requests"].value == 5 and meta["run_est_output_tokens_max"].value == 3000
    assert meta["cases_without_text"].value == 1

    before = headnotes(conn)
    second = runner(dagster_instance).run(wait=True, poll_interval=0)
    assert second.submitted == [] and second.planned_shards == []
    assert headnotes(conn) == before and len(ledger.list_jobs(conn, flow="headnotes")) == 1


def test_cli_overwrite_regenerates_every_headnote_once(lb_env, conn, monkeypatch, tmp_path):
    from legal_batch.cli import app

    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dh"))
    (tmp_path / "dh").mkdir()
    monkeypatch.delenv("LEGAL_BATCH_HEADNOTE_OVERWRITE", raising=False)
    monkeypatch.delenv("LEGAL_BATCH_HEADNOTE_OVERWRITE_BEFORE", raising=False)
    seed_demo_cases(conn, cases=3)
    manual = add_case(conn, "[2023] HKCFI 999", judgment("[2023] HKCFI 999"))
    conn.execute("UPDATE court_cases SET headnote = 'Written by the editor.' WHERE id = %s", (manual,))
    cli = CliRunner()
    result = cli.invoke(app, ["headnotes", "run", "--wait", "--poll-interval", "0"])
    assert result.exit_code == 0, result.output
    before = headnotes(conn)
    again = cli.invoke(app, ["headnotes", "run", "--wait", "--poll-interval", "0"])
    assert "nothing new to submit for headnotes" in again.output and headnotes(conn) == before

    overwritten = cli.invoke(app, ["headnotes", "run", "--wait", "--poll-interval", "0", "--overwrite"])
    assert overwritten.exit_code == 0, overwritten.output
    after = headnotes(conn)
    jobs = ledger.list_jobs(conn, flow="headnotes")
    assert len(jobs) == 2 and jobs[1].request_count == 4, "each case regenerated exactly once"
    for citation, (headnote, model, generated) in after.items():
        assert model == "local-extractive-v1" and headnote.startswith(citation)
        assert before[citation][2] is None or generated > before[citation][2]
    assert before["[2023] HKCFI 999"][0] == "Written by the editor.", "overwrite replaces hand-written ones too"
    assert items(conn) == {"done": 4}
    refused = cli.invoke(app, ["embeddings", "run", "--overwrite"])
    assert refused.exit_code != 0 and "No such option: --overwrite" in refused.output


# -- Azure OpenAI Global Batch --------------------------------------------------------------------------

def test_azure_request_lines_on_the_wire(azure, conn, dagster_instance, monkeypatch):
    monkeypatch.setenv("LEGAL_BATCH_HEADNOTE_MAX_CHARS", "2000")
    get_settings(fresh=True)
    add_examples(conn)
    short = {f"[2023] HKCFI {n}": add_case(conn, f"[2023] HKCFI {n}", judgment(f"[2023] HKCFI {n}", 3))
             for n in range(1, 4)}
    long_text = judgment("[2023] HKCA 77", 60, court="COURT OF APPEAL")
    long_id = add_case(conn, "[2023] HKCA 77", long_text, court="Court of Appeal")

    run = runner(dagster_instance).run(wait=True, poll_interval=0)

    assert len(run.submitted) == 1 and run.failed_runs == []
    lines = uploaded_lines(azure)
    assert len(lines) == 4
    assert {line["custom_id"] for line in lines} == {f"case-{i}" for i in [*short.values(), long_id]}
    systems = set()
    for line in lines:
        assert line["method"] == "POST" and line["url"] == "/chat/completions"
        body = line["body"]
        assert body["model"] == DEPLOYMENT and body["max_tokens"] == 600 and body["temperature"] == 0.1
        system, user = body["messages"]
        assert (system["role"], user["role"]) == ("system", "user")
        assert "senior law reporter" in system["content"] and "Catchwords" in system["content"]
        systems.add(system["content"])
        for newest in EXAMPLES[2:]:
            assert newest in system["content"]
        assert EXAMPLES[0] not in system["content"] and EXAMPLES[1] not in system["content"]
    assert len(systems) == 1, "every request of a shard carries the same examples"
    by_id = {line["custom_id"]: line["body"]["messages"][1]["content"] for line in lines}
    long_user = by_id[f"case-{long_id}"]
    assert f"of {len(long_text):,} characters …]" in long_user and "judgment truncated at" in long_user
    assert "Neutral citation: [2023] HKCA 77" in long_user and "Court: Court of Appeal" in long_user
    kept = long_user.split("Judgment:\n\n", 1)[1].rsplit("\n\n[…", 1)[0]
    assert len(kept) <= 2000 and long_text.startswith(kept) and long_text[len(kept):].startswith("\n\n")
    for case_id in short.values():
        assert "truncated" not in by_id[f"case-{case_id}"]

    create = next(r for r in azure.requests if r.method == "POST" and r.path.endswith("/batches"))
    create_body = orjson.loads(create.body)
    assert create_body["endpoint"] == "/chat/completions" and create_body["completion_window"] == "24h"
    assert create.headers.get("api-key") == KEY and KEY.encode() not in b"".join(
        azure.file_content(f["id"]) for f in azure.files.values() if f["purpose"] == "batch")

    written = headnotes(conn)
    for citation in [*short, "[2023] HKCA 77"]:
        headnote, model, generated = written[citation]
        assert headnote.startswith(citation) and model == DEPLOYMENT and generated is not None
    assert items(conn) == {"done": 4}
    job = ledger.list_jobs(conn, flow="headnotes")[0]
    assert job.model == DEPLOYMENT and job.output_tokens > 0
    cost = check(dagster_instance, "shard_cost_within_estimate")
    assert cost.passed and cost.metadata["priced"].value is True
    assert cost.metadata["actual_batch_usd"].value > 0
    assert cost.metadata["realtime_equivalent_usd"].value == pytest.approx(
        2 * cost.metadata["actual_batch_usd"].value, abs=2e-6)
    assert float(job.actual_cost_usd) == pytest.approx(cost.metadata["actual_batch_usd"].value, abs=1e-6)

    creates = batch_creates(azure)
    again = runner(dagster_instance).run(wait=True, poll_interval=0)
    assert again.submitted == [] and batch_creates(azure) == creates and headnotes(conn) == written


def test_azure_partial_failure_with_an_error_file(azure, conn, dagster_instance):
    ids = {n: add_case(conn, f"[2023] HKCFI {n}", judgment(f"[2023] HKCFI {n}", 3)) for n in range(1, 6)}
    azure.fail_custom_ids = {f"case-{ids[1]}": (500, "server_error", "The server had an error"),
                             f"case-{ids[2]}": (400, "invalid_request", "Invalid content")}

    drive(conn, dagster_instance)

    written = headnotes(conn)
    assert [c for c, (h, _, _) in sorted(written.items()) if h is not None] == [
        "[2023] HKCFI 3", "[2023] HKCFI 4", "[2023] HKCFI 5"]
    job = ledger.list_jobs(conn, flow="headnotes")[0]
    why = reasons(conn)
    assert why["[2023] HKCFI 1"][0] == "retryable" and why["[2023] HKCFI 2"][0] == "failed"
    for citation, code in (("[2023] HKCFI 1", "server_error"), ("[2023] HKCFI 2", "invalid_request")):
        reason = why[citation][1]
        assert code in reason and "errors.jsonl:" in reason and job.provider_job_id in reason
    assert (job.items_done, job.items_retryable, job.items_failed) == (3, 1, 1)

    azure.fail_custom_ids = {}
    runner(dagster_instance).run(wait=True, poll_interval=0)
    assert headnotes(conn)["[2023] HKCFI 1"][0] is not None and headnotes(conn)["[2023] HKCFI 2"][0] is None
    assert items(conn) == {"done": 4, "failed": 1}


# -- OpenAI Batch API -----------------------------------------------------------------------------------

def test_openai_expired_batch_ingests_partial_output_and_requeues_the_rest(openai_emu, conn, dagster_instance):
    for n in range(1, 7):
        add_case(conn, f"[2022] HKCFI {n}", judgment(f"[2022] HKCFI {n}", 3))
    openai_emu.auto_advance = False

    def expire(jobs: list[ledger.Shard]) -> None:
        openai_emu.expire(jobs[0].provider_job_id, completed_fraction=0.5)

    drive(conn, dagster_instance, after_submit=expire)

    job = ledger.list_jobs(conn, flow="headnotes")[0]
    assert job.provider_status == "expired" and (job.items_done, job.items_retryable) == (3, 3)
    lines = uploaded_lines(openai_emu)
    assert all(line["url"] == "/v1/chat/completions" and line["body"]["model"] == "gpt-4o-mini" for line in lines)
    expired = [c for c, (state, reason) in reasons(conn).items() if "batch_expired" in reason]
    assert len(expired) == 3 and all(reasons(conn)[c][0] == "retryable" for c in expired)
    assert sum(1 for h, _, _ in headnotes(conn).values() if h is not None) == 3
    assert all(headnotes(conn)[c][0] is None for c in expired)

    openai_emu.auto_advance = True
    runner(dagster_instance).run(wait=True, poll_interval=0)
    second = ledger.list_jobs(conn, flow="headnotes")[1]
    assert second.request_count == 3 and items(conn) == {"done": 6}
    assert all(h is not None and m == "gpt-4o-mini" for h, m, _ in headnotes(conn).values())


def test_openai_answers_cut_off_empty_or_refused_are_not_written(openai_emu, conn, dagster_instance):
    for n in range(1, 6):
        add_case(conn, f"[2021] HKDC {n}", judgment(f"[2021] HKDC {n}", 3))

    def respond(body: dict) -> dict:
        user = body["messages"][1]["content"]
        if "[2021] HKDC 1\n" in user:
            return chat_answer(body, content="[2021] HKDC 1 — District Court — Chan v Wong\nHeld: The",
                               finish_reason="length")
        if "[2021] HKDC 2\n" in user:
            return chat_answer(body, content="")
        if "[2021] HKDC 3\n" in user:
            return chat_answer(body, content=None, refusal="I can't help with that request.")
        return chat_answer(body)

    openai_emu.responder = respond
    drive(conn, dagster_instance)

    why = reasons(conn)
    assert set(why) == {"[2021] HKDC 1", "[2021] HKDC 2", "[2021] HKDC 3"}
    assert {c: state for c, (state, _) in why.items()} == {
        "[2021] HKDC 1": "failed", "[2021] HKDC 2": "retryable", "[2021] HKDC 3": "retryable"}
    assert "cut off at max_tokens=600 (finish_reason=length)" in why["[2021] HKDC 1"][1]
    assert "empty headnote" in why["[2021] HKDC 2"][1]
    assert "refused: I can't help" in why["[2021] HKDC 3"][1]
    assert "output.jsonl:" in why["[2021] HKDC 1"][1]
    written = headnotes(conn)
    assert [c for c, (h, _, _) in sorted(written.items()) if h is not None] == ["[2021] HKDC 4", "[2021] HKDC 5"]
    assert written["[2021] HKDC 1"][0] is None


@pytest.mark.parametrize(("min_rate", "passed"), [(None, False), ("0.25", True)], ids=["default 0.5", "0.25"])
def test_headnotes_that_drop_the_citation_fail_the_citation_check(openai_emu, conn, dagster_instance, monkeypatch,
                                                                   min_rate, passed):
    if min_rate is not None:
        monkeypatch.setenv("LEGAL_BATCH_HEADNOTE_MIN_CITATION_RATE", min_rate)
        get_settings(fresh=True)
    for n in range(1, 5):
        add_case(conn, f"[2020] HKCFI {n}", judgment(f"[2020] HKCFI {n}", 3))

    def respond(body: dict) -> dict:
        user = body["messages"][1]["content"]
        text = extractive_headnote(user)
        if "[2020] HKCFI 1\n" in user:
            return chat_answer(body, content=text)
        citation = next(f"[2020] HKCFI {n}" for n in range(2, 5) if f"[2020] HKCFI {n}\n" in user)
        return chat_answer(body, content=text.replace(citation, "the judgment"))

    openai_emu.responder = respond
    drive(conn, dagster_instance)

    assert items(conn) == {"done": 4}
    citation = check(dagster_instance, "headnotes_cite_neutral_citation")
    assert citation.passed is passed and citation.severity == dg.AssetCheckSeverity.WARN
    assert citation.metadata["mention_rate"].value == 0.25
    assert citation.metadata["min_mention_rate"].value == (0.5 if min_rate is None else 0.25)
    assert citation.metadata["mention_citation"].value == 1
    assert sorted(citation.metadata["examples_missing"].value) == ["[2020] HKCFI 2", "[2020] HKCFI 3",
                                                                   "[2020] HKCFI 4"]


# -- Bedrock Claude -------------------------------------------------------------------------------------

def claude_answer(model_id: str, model_input: dict) -> dict:
    user = model_input["messages"][0]["content"]
    text = extractive_headnote(user)
    return {"id": f"msg_{uuid.uuid4().hex[:12]}", "type": "message", "role": "assistant", "model": model_id,
            "content": [{"type": "text", "text": text}], "stop_reason": "end_turn", "stop_sequence": None,
            "usage": {"input_tokens": len(model_input.get("system", "") + user) // 4,
                      "output_tokens": len(text) // 4}}


@pytest.fixture
def bedrock(lb_env, monkeypatch: pytest.MonkeyPatch) -> Iterator[BedrockBatchEmulator]:
    with running_bedrock_emulator(auto_advance=True) as emu:
        point_at_emulator(monkeypatch, emu)
        monkeypatch.setenv("LEGAL_BATCH_HEADNOTES_PROVIDER", "bedrock")
        get_settings(fresh=True)
        emu.responder = claude_answer
        yield emu


def test_bedrock_claude_run_writes_every_headnote(bedrock, conn, dagster_instance):
    for n in range(1, 101):  # Bedrock takes at least 100 records per job
        add_case(conn, f"[2020] HKCFI {n}", judgment(f"[2020] HKCFI {n}", 2))
    add_examples(conn)

    run = runner(dagster_instance).run(wait=True, poll_interval=0)

    assert len(run.submitted) == 1 and run.failed_runs == []
    job = ledger.list_jobs(conn, flow="headnotes")[0]
    assert job.request_count == 100 and job.items_done == 100
    assert job.model == "anthropic.claude-3-haiku-20240307-v1:0" and job.output_tokens > 0
    create = bedrock.requests_for("CreateModelInvocationJob")
    assert len(create) == 1
    key = create[0].json()["inputDataConfig"]["s3InputDataConfig"]["s3Uri"].split("/", 3)[3]
    records = [orjson.loads(line) for line in boto3.client("s3").get_object(
        Bucket=get_settings().s3_bucket, Key=key)["Body"].read().splitlines()]
    assert len(records) == 100
    for record in records:
        body = record["modelInput"]
        assert record["recordId"].startswith("case-") and body["max_tokens"] == 600
        assert body["temperature"] == 0.1 and EXAMPLES[4] in body["system"]
    written = headnotes(conn)
    assert len(written) == 100
    for citation, (headnote, model, generated) in written.items():
        assert headnote.startswith(citation) and model == job.model and generated is not None
    assert items(conn) == {"done": 100}
