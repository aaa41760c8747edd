"""Secrets and hostile names: the API key never appears in anything a run writes (files, Dagster
event logs, the ledger, logs, exceptions — also when the service echoes a wrong key back); `.env`
is ignored by git; SQL takes values only as parameters; S3 keys, job names and job ids are
validated; ids from provider output never become file paths or SQL."""

from __future__ import annotations

import ast
import logging
import re
import subprocess
import traceback
from pathlib import Path

import dagster as dg
import orjson
import psycopg
import pytest

from legal_batch.core import batch, ledger
from legal_batch.core.seed import seed_demo_cases
from legal_batch.definitions import FLOWS_BY_NAME, defs
from legal_batch.driver import FlowDriver, FlowRun
from legal_batch.flows.embeddings.flow import EmbeddingsFlow, sync_chunks
from legal_batch.providers.base import ProviderError
from legal_batch.providers.bedrock import JOB_NAME_RE, BedrockProvider, job_name_for
from legal_batch.providers.local import LocalProvider
from legal_batch.resources.providers import make_provider
from legal_batch.settings import get_settings
from legal_batch_tests.conftest import ROOT
from legal_batch_tests.emulators.openai_batch import OpenAIBatchEmulator

KEY = "sk-test-SECRET-1234567890"
WRONG = "sk-test-WRONGKEY-0987654321"
SECRETS = (KEY, WRONG, "SECRET-1234567890", "WRONGKEY-0987654321")


def leaks(text: str | bytes) -> list[str]:
    data = text.encode() if isinstance(text, str) else text
    return [secret for secret in SECRETS if secret.encode() in data]


def files_under(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file()]


def ledger_text(conn: psycopg.Connection) -> str:
    rows = conn.execute("SELECT row_to_json(j)::text FROM batch_jobs j UNION ALL"
                        " SELECT row_to_json(i)::text FROM batch_items i").fetchall()
    return "\n".join(row[0] for row in rows)


def dagster_text(instance: dg.DagsterInstance) -> str:
    """Every event of every run (messages, metadata, errors with their causes), run configs and tags."""
    parts = []
    for run in instance.get_runs():
        parts.append(dg.serialize_value(run))
        parts += [dg.serialize_value(record) for record in instance.all_logs(run.run_id)]
    return "\n".join(parts)


@pytest.fixture
def emulator():
    with OpenAIBatchEmulator(api_key=KEY, auto_advance=True) as emulator:
        yield emulator


ECHO = {"error": {"message": f"Incorrect API key provided: {WRONG}. You can find your API key at ...",
                  "type": "invalid_request_error", "param": None, "code": "invalid_api_key"}}
"""A 401 that echoes the key it was given (services sometimes echo a masked or the whole key)."""


@pytest.fixture
def openai_runner(lb_env, conn, dagster_instance, emulator, monkeypatch, caplog) -> FlowDriver:
    """The embeddings flow on the OpenAI emulator with the right key, run once to the end."""
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.setenv("OPENAI_BASE_URL", emulator.base_url)
    monkeypatch.setenv("LEGAL_BATCH_EMBEDDINGS_PROVIDER", "openai")
    get_settings(fresh=True)
    seed_demo_cases(conn, cases=2)
    runner = FlowDriver(FLOWS_BY_NAME["embeddings"], defs, flow="embeddings", echo=print,
                        dagster_instance=dagster_instance)
    first = runner.run(wait=True, poll_interval=0)
    assert first.failed_runs == [] and conn.execute("SELECT count(*) FROM case_embeddings").fetchone()[0] > 0
    return runner


def wrong_key(monkeypatch, emulator: OpenAIBatchEmulator) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", WRONG)
    get_settings(fresh=True)
    emulator.add_fault(method="*", path_regex=".", status=401, times=1000, body=ECHO)


def requeue_chunks(conn: psycopg.Connection, chunk_index: int) -> None:
    """Vectors deleted behind the pipeline's back, and gone from the vector cache too: those chunks are
    candidates again and are requested from the provider (not served from the cache)."""
    conn.execute("DELETE FROM case_embeddings WHERE chunk_index = %s", (chunk_index,))
    conn.execute("DELETE FROM vector_cache")
    conn.execute("UPDATE batch_items SET state = 'retryable', last_error = 'deleted' WHERE subject_key LIKE %s",
                 (f"%:{chunk_index}",))


def scan(places: dict[str, str | bytes]) -> dict[str, list[str]]:
    return {place: leaks(text) for place, text in places.items() if leaks(text)}


def everything_written(home: Path, instance: dg.DagsterInstance, conn: psycopg.Connection, caplog, capfd,
                       emulator: OpenAIBatchEmulator) -> dict[str, str | bytes]:
    written = {path: path.read_bytes() for path in files_under(home)}
    written.update({path: path.read_bytes() for path in files_under(Path(instance.root_directory))})
    assert any(p.suffix == ".jsonl" for p in written), "request and output files are among those scanned"
    uploads = [r.body for r in emulator.requests if r.method == "POST" and r.path.endswith("/files")]
    out, err = capfd.readouterr()
    return {
        "files under LEGAL_BATCH_HOME and the Dagster instance": b"".join(written.values()),
        "Dagster runs and event logs": dagster_text(instance),
        "the ledger (batch_jobs, batch_items)": ledger_text(conn),
        "log records": caplog.text + "".join(str(r.__dict__) for r in caplog.records),
        "stdout/stderr": out + err,
        "the uploaded request files": b"".join(uploads),
    }


def test_the_api_key_appears_nowhere_a_run_writes(openai_runner, lb_env, conn, dagster_instance, emulator,
                                                   monkeypatch, caplog, capfd) -> None:
    wrong_key(monkeypatch, emulator)
    requeue_chunks(conn, 0)
    openai_runner.run(wait=False)  # the submit is refused, and the refusal recorded
    refused = ledger.list_jobs(conn, flow="embeddings", states=("failed",))
    assert refused and "OPENAI_API_KEY" in (refused[0].last_error or ""), "the wrong key was refused"
    with pytest.raises(ProviderError) as raised:
        make_provider("openai", get_settings()).poll("batch_abc")
    assert "OPENAI_API_KEY" in str(raised.value)

    places = everything_written(Path(lb_env.home_dir), dagster_instance, conn, caplog, capfd, emulator)
    places["the exception's message"] = str(raised.value) + repr(raised.value)
    assert not scan(places), f"secrets leaked into: {scan(places)}"


def test_a_key_the_service_echoes_stays_out_of_causes_event_logs_and_output(
        openai_runner, lb_env, conn, dagster_instance, emulator, monkeypatch, caplog, capfd) -> None:
    requeue_chunks(conn, 0)
    state = FlowRun("embeddings")
    openai_runner.plan(state, limit=None)
    openai_runner.submit_pending(state)
    for _ in range(3):
        batch.poll_open_jobs(conn, lambda name: make_provider(name, get_settings()), flow="embeddings")
    assert [j.state for j in ledger.list_jobs(conn, flow="embeddings")] == ["ingested", "completed"]
    wrong_key(monkeypatch, emulator)
    state = FlowRun("embeddings")
    openai_runner.tick_status(state)  # the ingest run fails at the download, with the service's error
    assert len(state.failed_runs) == 1
    with pytest.raises(ProviderError) as raised:
        make_provider("openai", get_settings()).poll("batch_abc")

    places = everything_written(Path(lb_env.home_dir), dagster_instance, conn, caplog, capfd, emulator)
    places["the exception, with its causes"] = "".join(traceback.format_exception(raised.value))
    assert not scan(places), f"secrets leaked into: {scan(places)}"


def test_env_file_is_ignored_by_git_and_the_example_holds_no_secret() -> None:
    checked = subprocess.run(["git", "check-ignore", "-q", ".env"], cwd=ROOT, capture_output=True)
    assert checked.returncode == 0, ".env is not git-ignored"
    example = (ROOT / ".env.example").read_text()
    for name in ("OPENAI_API_KEY", "AZURE_OPENAI_API_KEY", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        values = re.findall(rf"^{name}=(.*)$", example, flags=re.M)
        assert all(not value.strip() for value in values), f"{name} has a value in .env.example"


SQL_WORDS = re.compile(r"\b(SELECT|INSERT|UPDATE|DELETE|COPY|CREATE|ALTER|DROP|TRUNCATE)\b")
SQL_FRAGMENTS = {
    # lower-case names that hold SQL built by the code itself, never a value
    "sql": "a flow's candidate / request SQL (code), run with its own parameters",
    "assignments": "ledger.update_job: `column = %(column)s` for column names checked against Shard",
    "table": "EmbeddingSink / vector_cache: its own staging table, or the vector table (a relation, below)",
    "columns": "EmbeddingSink: its own column list",
    "dimensions": "an int from settings, in a column type (vector(N))",
    "storage": "vector or halfvec: LEGAL_BATCH_EMBEDDINGS_STORAGE (a Literal setting), or the table's own column type",
    "column_type": "VectorTable.column_type: vector(N) or halfvec(N), from the two settings above",
    "relation": "a table of ours, or the one the settings name (LEGAL_BATCH_SOURCE_TABLE, "
                "LEGAL_BATCH_EMBEDDINGS_TABLE), each part quoted as an identifier (core/user_tables.py)",
    "cases": "CaseSource.select(): a subquery of the source's columns, quoted as identifiers",
    "column": "a column the settings name, quoted as an identifier",
    "id_column": "the source's id column, quoted as an identifier",
    "text_column": "the source's text column, quoted as an identifier",
    "view": "our embedding_sink view, qualified with our schema (quoted)",
    "text_hash": "the sha256 expression of a text column (CaseSource.text_sha256_sql)",
    "headnote_hash": "the sha256 expression of the headnote column",
    "clause": "a condition or assignment list built by the code from the fragments above, no values",
    "condition": "headnotes: whether a case's headnote may be written (_wanted_sql, from quoted columns)",
    "distance": "search: the cosine distance of the vector column and the query parameter (halfvec(N) above "
                "2,000 dimensions)",
    "subjects_sql": "ledger.record_served_subjects: a SELECT of subjects built by the code (vector_cache.serve)",
    "chunks": "vector_cache.serve: case_chunks, or its rows for ids or hashes passed as parameters",
    "scope": "flows/embeddings/replicas: case_chunks, or its rows of one shard's texts (the job id a parameter)",
}
SQL_STATE_LISTS = re.compile(r"(ledger\.)?sql_in\(.*\)")
"""ledger.sql_in: a group of the ledger's own states as an SQL list (it refuses anything but members of
JobState / ItemState), for SQL kept as a constant where no parameter can go."""


def _sql_fstrings() -> list[tuple[str, int, list[str]]]:
    """(file, line, interpolated expressions) of every f-string that is SQL: passed to execute /
    executemany / copy, or assigned to a name ending in `sql`."""
    found = []
    for path in sorted((ROOT / "legal_batch").rglob("*.py")):
        tree = ast.parse(path.read_text())
        candidates: list[ast.AST] = []
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.args \
                    and node.func.attr in ("execute", "executemany", "copy"):
                candidates.append(node.args[0])
            if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id.lower().endswith("sql")
                                                    for t in node.targets):
                candidates.append(node.value)
        for candidate in candidates:
            for part in ast.walk(candidate):
                if not isinstance(part, ast.JoinedStr):
                    continue
                text = "".join(v.value for v in part.values if isinstance(v, ast.Constant))
                if SQL_WORDS.search(str(text)):
                    exprs = [ast.unparse(v.value) for v in part.values if isinstance(v, ast.FormattedValue)]
                    found.append((str(path.relative_to(ROOT)), part.lineno, exprs))
    return found


def test_sql_takes_values_only_as_parameters() -> None:
    """An f-string in SQL may only splice constants (UPPER_CASE names), the code-built fragments
    listed in SQL_FRAGMENTS or the ledger's state lists; values go in as %s / %(name)s parameters."""
    statements = _sql_fstrings()
    assert statements, "the scan found no SQL at all"
    spliced = [(where, line, expr) for where, line, exprs in statements for expr in exprs
               if not re.fullmatch(r"_?[A-Z][A-Z0-9_]*", expr) and expr not in SQL_FRAGMENTS
               and not SQL_STATE_LISTS.fullmatch(expr)]
    assert not spliced, ("values spliced into SQL (pass them as parameters, or add a code-built fragment to "
                         f"SQL_FRAGMENTS with the reason): {spliced}")


def test_shard_keys_job_names_s3_keys_and_job_ids_are_validated(lb_env, conn) -> None:
    seed_demo_cases(conn, cases=2)
    sync_chunks(conn, max_tokens=512, overlap_tokens=64)
    provider = LocalProvider(Path(lb_env.home_dir) / "local_provider", max_records_per_job=8)
    plan = batch.plan(conn, EmbeddingsFlow(model="m"), provider, model="m")
    assert plan.shard_keys and all(re.fullmatch(r"embeddings-\d{5}-[0-9a-f]{8}", key) for key in plan.shard_keys)
    assert all(re.fullmatch(r"lb-[0-9a-f]{24}", job.client_token) for job in ledger.list_jobs(conn))

    for hostile in ("../../etc/passwd", "local-../../x", "local-a/b", "/tmp/x"):
        with pytest.raises(ProviderError, match="not a local provider job id"):
            provider.poll(hostile)
    bedrock = BedrockProvider(s3=None, bedrock=None, runtime=None, bucket="lb-security",
                              role_arn="arn:aws:iam::123456789012:role/legal-batch")
    for hostile in ("../secrets", "a/../../b", "x/y", "..", "shard key", "k\n/evil"):
        with pytest.raises(ProviderError):
            bedrock.request_key(hostile)
        with pytest.raises(ProviderError):
            bedrock.output_key_prefix(hostile)
        name = job_name_for(client_token="lb-0123456789abcdef01234567", shard_key=hostile)
        assert JOB_NAME_RE.fullmatch(name) and "/" not in name and ".." not in name
    with pytest.raises(ProviderError):
        bedrock.poll("arn:aws:bedrock:us-east-1:123456789012:model-invocation-job/../../x")
    for bad_bucket in ("../bucket", "a..b", "UPPER", "b/c"):
        with pytest.raises(ProviderError):
            BedrockProvider(s3=None, bedrock=None, runtime=None, bucket=bad_bucket,
                            role_arn="arn:aws:iam::123456789012:role/legal-batch")


HOSTILE_IDS = ["../../etc/passwd", "../../../../tmp/lb-owned.jsonl", "/tmp/lb-owned-abs",
               "x'); DROP TABLE batch_items; --", "chunk-\u0000nul", "chunk-%s-%(x)s"]


def test_ids_from_provider_output_never_become_paths_or_sql(lb_env, conn, tmp_path: Path) -> None:
    home = Path(lb_env.home_dir)
    seed_demo_cases(conn, cases=1)
    sync_chunks(conn, max_tokens=512, overlap_tokens=64)
    provider = LocalProvider(home / "local_provider", max_records_per_job=5)
    flow = EmbeddingsFlow(model=provider.default_model("embeddings"))
    (key, *_) = batch.plan(conn, flow, provider, model=flow.model, max_shards=1).shard_keys
    batch.write_request_file(conn, flow, provider, key, files_root=home / "files")
    batch.submit_shard(conn, flow, provider, key)
    for _ in range(2):
        batch.poll_open_jobs(conn, lambda _: provider, flow="embeddings")
    job = ledger.get_job(conn, key)
    served = provider.root / (job.provider_job_id or "") / "output.jsonl"
    lines = served.read_bytes().splitlines()
    hostile = []
    for n, custom_id in enumerate(HOSTILE_IDS):
        line = orjson.loads(lines[n % len(lines)])
        line["custom_id"] = custom_id
        hostile.append(orjson.dumps(line))
    served.write_bytes(b"\n".join(lines + hostile) + b"\n")  # the provider's own file, as downloaded

    escapes = [Path("/tmp/lb-owned.jsonl"), Path("/tmp/lb-owned-abs"), Path("/etc/passwd")]
    stamps = {p: p.stat().st_mtime_ns if p.exists() else None for p in escapes}
    before = set(tmp_path.parent.rglob("*"))
    files = batch.download_outputs(conn, provider, key, files_root=home / "files")
    report = batch.ingest_shard(conn, flow, provider, key, files=files)
    new = set(tmp_path.parent.rglob("*")) - before

    outputs = batch.output_dir(home / "files", "embeddings", key)
    outside = sorted(str(p) for p in new if not (p.is_relative_to(outputs) or outputs.is_relative_to(p)))
    assert not outside, f"files created outside {outputs}: {outside}"
    assert {p: p.stat().st_mtime_ns if p.exists() else None for p in escapes} == stamps
    assert {p.name for p in files} <= {"output.jsonl", "errors.jsonl"}
    assert report.done == job.request_count, "the real answers were ingested"
    for custom_id in HOSTILE_IDS:
        assert any(repr(custom_id) in problem for problem in report.problems), custom_id
    assert conn.execute("SELECT to_regclass('batch_items') IS NOT NULL").fetchone()[0]
    assert conn.execute("SELECT count(*) FROM batch_items").fetchone()[0] == job.request_count
