"""A user's mistake — a setting, an argument, a provider without credentials, a database that cannot be
reached — is one line on stderr naming it, its value and what to do, with exit code 2; never a
traceback, and never a Dagster run launched first.

The console script runs as a subprocess for the cases the issue reported from a shell; the rest call
`legal_batch.cli.main` in process (the same entry point, without re-importing Dagster per case)."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import pytest

from legal_batch.core.errors import UserError
from legal_batch.core.wording import plural
from legal_batch.settings import get_settings

CONSOLE_SCRIPT = Path(sys.executable).with_name("legal-batch")
CLOSED_PORT_URL = "postgresql://lb:s3cret@127.0.0.1:1/legal_batch"
TEMPLATE_ARGS = ["--input", "in", "--templates", "t", "--schema", "s.json", "--output", "out"]


def _drop_outside_configuration(monkeypatch: pytest.MonkeyPatch) -> None:
    """No provider credentials and no Dagster home from the developer's shell."""
    for key in list(os.environ):
        if key.startswith(("OPENAI_", "AZURE_OPENAI_")) or key == "DAGSTER_HOME":
            monkeypatch.delenv(key)


@pytest.fixture
def no_database(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A temporary home and a database URL nothing listens on, so a case that reaches the database
    (when it should have stopped before) shows it. Returns the home."""
    for key in list(os.environ):
        if key.startswith("LEGAL_BATCH_"):
            monkeypatch.delenv(key)
    _drop_outside_configuration(monkeypatch)
    home = tmp_path / "home"
    monkeypatch.setenv("LEGAL_BATCH_HOME", str(home))
    monkeypatch.setenv("LEGAL_BATCH_DATABASE_URL", CLOSED_PORT_URL)
    monkeypatch.chdir(tmp_path)  # no stray .env
    return home


@pytest.fixture
def env(lb_env, monkeypatch: pytest.MonkeyPatch):
    """`lb_env` (a fresh database, a temporary home) without outside credentials or Dagster home."""
    _drop_outside_configuration(monkeypatch)
    return lb_env


def console_script(*args: str, timeout: float = 120, **variables: str) -> subprocess.CompletedProcess[str]:
    """`legal-batch ARGS` in a subprocess with this test's environment plus `variables`."""
    environment = {**os.environ, "COLUMNS": "100", **variables}
    return subprocess.run([str(CONSOLE_SCRIPT), *args], env=environment, capture_output=True, text=True,
                          timeout=timeout, check=False)


def run_main(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, *args: str,
             **variables: str) -> tuple[int, str, str]:
    """`legal-batch ARGS` through `main` in this process: (exit code, stdout, stderr)."""
    from legal_batch.cli import main

    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    with contextlib.suppress(UserError):  # re-read the environment (an invalid one is the test)
        get_settings(fresh=True)
    monkeypatch.setattr(sys, "argv", ["legal-batch", *args])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        main()
    out, err = capsys.readouterr()
    code = exited.value.code
    return (code if isinstance(code, int) else 0 if code is None else 1), out, err


def assert_one_line(code: int, err: str, *names: str) -> str:
    """Exit code 2 and a single stderr line, without traceback, containing every one of `names`."""
    lines = err.splitlines()
    assert code == 2, err
    assert len(lines) == 1, err
    assert "Traceback" not in err
    for name in names:
        assert name in lines[0], (name, lines[0])
    return lines[0]


# -- settings -----------------------------------------------------------------------------------------

def test_an_unknown_provider_is_one_line_from_the_console_script(no_database):
    result = console_script("embeddings", "run", LEGAL_BATCH_EMBEDDINGS_PROVIDER="nonsense")
    line = assert_one_line(result.returncode, result.stderr, "LEGAL_BATCH_EMBEDDINGS_PROVIDER", "'nonsense'")
    assert "'local', 'openai' or 'bedrock'" in line
    assert not (no_database / "dagster").exists()


@pytest.mark.parametrize(("variable", "args"), [
    ("LEGAL_BATCH_HEADNOTES_PROVIDER", ["headnotes", "run"]),
    ("LEGAL_BATCH_TEMPLATE_PROVIDER", ["template", "run", *TEMPLATE_ARGS]),
    ("LEGAL_BATCH_EMBEDDINGS_PROVIDER", ["jobs"]),
])
def test_an_unknown_provider_setting_is_one_line(no_database, capsys, monkeypatch, variable, args):
    code, _, err = run_main(capsys, monkeypatch, *args, **{variable: "nonsense"})
    line = assert_one_line(code, err, variable, "'nonsense'")
    assert "'local'" in line and "bedrock" in line


@pytest.mark.parametrize(("variable", "value", "expected"), [
    ("LEGAL_BATCH_LOCAL_EXPIRE_FRACTION", "abc", "valid number"),
    ("LEGAL_BATCH_POLL_INTERVAL", "soon", "valid number"),
    ("LEGAL_BATCH_POLL_INTERVAL", "-5", "greater than or equal to 0"),
    ("LEGAL_BATCH_MAX_ATTEMPTS", "3.5", "valid integer"),
])
def test_an_invalid_setting_is_one_line_naming_it_its_value_and_what_it_should_be(
        no_database, capsys, monkeypatch, variable, value, expected):
    code, _, err = run_main(capsys, monkeypatch, "jobs", **{variable: value})
    assert_one_line(code, err, f"{variable}={value!r}", expected, "unset it")


def test_an_empty_setting_means_unset(env, capsys, monkeypatch):
    code, out, err = run_main(capsys, monkeypatch, "jobs", LEGAL_BATCH_LOCAL_EXPIRE_FRACTION="",
                              LEGAL_BATCH_POLL_INTERVAL="")
    assert code == 0, err
    assert "batch_jobs" in out
    assert get_settings().local_expire_fraction is None and get_settings().poll_interval == 60.0


# -- providers: their settings and credentials, checked before any run ---------------------------------

def test_openai_without_its_key_is_one_line_and_launches_no_run(env, conn):
    result = console_script("embeddings", "run", LEGAL_BATCH_EMBEDDINGS_PROVIDER="openai")
    assert_one_line(result.returncode, result.stderr, "LEGAL_BATCH_EMBEDDINGS_PROVIDER=openai", "OPENAI_API_KEY")
    assert not (env.home_dir / "dagster").exists(), "a Dagster run was launched"
    assert conn.execute("SELECT count(*) FROM batch_jobs").fetchone()[0] == 0


@pytest.mark.parametrize(("args", "variables", "missing"), [
    (["headnotes", "run"], {"LEGAL_BATCH_HEADNOTES_PROVIDER": "azure_openai"},
     ["AZURE_OPENAI_ENDPOINT", "AZURE_OPENAI_API_KEY", "OPENAI_API_VERSION"]),
    (["headnotes", "export"], {"LEGAL_BATCH_HEADNOTES_PROVIDER": "azure_openai", "AZURE_OPENAI_ENDPOINT":
                               "https://example.openai.azure.com", "AZURE_OPENAI_API_KEY": "k"},
     ["OPENAI_API_VERSION", "AZURE_OPENAI_BATCH_DEPLOYMENT"]),
    (["embeddings", "submit"], {"LEGAL_BATCH_EMBEDDINGS_PROVIDER": "bedrock"}, ["LEGAL_BATCH_S3_BUCKET"]),
    (["embeddings", "ingest"], {"LEGAL_BATCH_EMBEDDINGS_PROVIDER": "bedrock", "LEGAL_BATCH_S3_BUCKET": "b"},
     ["LEGAL_BATCH_BEDROCK_ROLE_ARN"]),
    (["search", "adverse possession"], {"LEGAL_BATCH_EMBEDDINGS_PROVIDER": "openai"}, ["OPENAI_API_KEY"]),
])
def test_a_provider_without_its_settings_is_one_line_before_anything_runs(
        no_database, capsys, monkeypatch, args, variables, missing):
    code, _, err = run_main(capsys, monkeypatch, *args, **variables)
    flow = "headnotes" if args[0] == "headnotes" else "embeddings"
    provider = variables[f"LEGAL_BATCH_{flow.upper()}_PROVIDER"]
    assert_one_line(code, err, f"LEGAL_BATCH_{flow.upper()}_PROVIDER={provider}", *missing)
    assert not (no_database / "dagster").exists()


# -- the database -------------------------------------------------------------------------------------

def test_a_database_url_on_a_closed_port_is_one_line_from_the_console_script(no_database):
    result = console_script("jobs")
    assert_one_line(result.returncode, result.stderr, "LEGAL_BATCH_DATABASE_URL", "127.0.0.1:1",
                    "Connection refused")
    assert "s3cret" not in result.stderr


@pytest.mark.parametrize("args", [["verify"], ["embeddings", "run"], ["headnotes", "status"], ["db", "upgrade"],
                                  ["search", "adverse possession"], ["demo", "seed"]])
def test_a_database_url_on_a_closed_port_is_one_line_for_every_verb(no_database, capsys, monkeypatch, args):
    code, _, err = run_main(capsys, monkeypatch, *args)
    assert_one_line(code, err, "LEGAL_BATCH_DATABASE_URL", "127.0.0.1:1")
    assert "s3cret" not in err
    assert not (no_database / "dagster").exists()


# -- arguments ----------------------------------------------------------------------------------------

@pytest.mark.parametrize(("args", "names"), [
    (["search", "--k", "-1", "adverse possession"], ["--k -1", "1 or more"]),
    (["search", "--k", "0", "adverse possession"], ["--k 0", "1 or more"]),
    (["search", ""], ["QUERY", "''", "words to look for"]),
    (["search", "  \t "], ["QUERY", "words to look for"]),
    (["embeddings", "run", "--limit", "0"], ["--limit 0", "1 or more"]),
    (["headnotes", "run", "--wait", "--poll-interval", "-1"], ["--poll-interval -1", "0 or more"]),
])
def test_an_argument_out_of_range_is_one_line(no_database, capsys, monkeypatch, args, names):
    code, _, err = run_main(capsys, monkeypatch, *args)
    assert_one_line(code, err, *names)


@pytest.mark.parametrize("verb", ["jobs", "verify"])
def test_an_unknown_flow_is_refused_naming_the_known_ones(no_database, capsys, monkeypatch, verb):
    code, _, err = run_main(capsys, monkeypatch, verb, "--flow", "nonsense")
    assert_one_line(code, err, "--flow", "'nonsense'", "'embeddings'", "'headnotes'", "'template'")


def test_only_flows_with_results_to_overwrite_offer_overwrite(no_database, capsys, monkeypatch):
    for verb in ("export", "run"):
        code, out, _ = run_main(capsys, monkeypatch, "embeddings", verb, "--help")
        assert code == 0 and "--limit" in out and "--overwrite" not in out
        code, out, _ = run_main(capsys, monkeypatch, "headnotes", verb, "--help")
        assert code == 0 and "--overwrite" in out
    code, _, err = run_main(capsys, monkeypatch, "embeddings", "export", "--overwrite")
    assert_one_line(code, err, "legal-batch embeddings export", "--overwrite", "--help")


@pytest.mark.parametrize("args", [[], ["embeddings", "run"], ["headnotes", "export"], ["template", "run"],
                                  ["search"], ["demo", "run"]])
def test_help_shows_no_type_after_a_flag(no_database, capsys, monkeypatch, args):
    code, out, _ = run_main(capsys, monkeypatch, *args, "--help")
    assert code == 0
    assert "--help" in out
    assert "<bool>" not in out


def test_a_genuine_bug_still_shows_its_traceback(no_database, capsys, monkeypatch):
    import legal_batch.cli as cli

    def broken():
        raise RuntimeError("a bug")

    monkeypatch.setattr(cli, "_connect", broken)
    monkeypatch.setattr(sys, "argv", ["legal-batch", "jobs"])
    with pytest.raises(RuntimeError, match="a bug"):
        cli.main()


# -- output -------------------------------------------------------------------------------------------

def test_counts_are_pluralised():
    assert [plural(n, "job") for n in (0, 1, 2)] == ["0 jobs", "1 job", "2 jobs"]
    assert plural(1, "entry", "entries") == "1 entry" and plural(3, "entry", "entries") == "3 entries"


def test_one_new_case_is_singular(env, capsys, monkeypatch):
    code, out, err = run_main(capsys, monkeypatch, "demo", "seed", "--cases", "1")
    assert code == 0, err
    assert "1 new case (0 already present)" in out


def test_search_names_the_models_stored_when_none_match(env, conn, capsys, monkeypatch):
    case_id = uuid.uuid4()
    conn.execute("INSERT INTO court_cases (id, case_name, full_text) VALUES (%s, 'A v B', 'text')", (case_id,))
    conn.execute("INSERT INTO case_chunks VALUES (%s, 0, 'body', 'text', 0, 4, 1, 'x')", (case_id,))
    vector = np.ones(1024, dtype=np.float32) / np.sqrt(1024)
    conn.execute("INSERT INTO case_embeddings (case_id, chunk_index, model, embedding) VALUES "
                 "(%s, 0, 'text-embedding-3-small', %s)", (case_id, vector))
    code, out, err = run_main(capsys, monkeypatch, "search", "adverse possession", "--k", "1")
    assert code == 0, err
    assert "top 1 chunk for" in out
    assert "1 vector of text-embedding-3-small" in out and "no embeddings yet" not in out


def test_run_wait_polls_at_the_poll_interval_setting(env, conn):
    from legal_batch.core.seed import seed_demo_cases

    seed_demo_cases(conn, cases=1)
    result = console_script("embeddings", "run", "--limit", "1", "--wait", timeout=300,
                            LEGAL_BATCH_POLL_INTERVAL="1")
    assert result.returncode == 0, result.stderr
    assert "next poll in 1 s" in result.stdout
    assert "next poll in 60 s" not in result.stdout
