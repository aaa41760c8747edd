"""Kill the embeddings run for real (SIGKILL of a subprocess) at every named crash point, resume
with a fresh process, and prove: `legal-batch verify` passes, every chunk is embedded exactly once,
and the provider received exactly one job per shard.

The scenarios (each with its own database, LEGAL_BATCH_HOME and Dagster home) run side by side in
a module fixture; one test per scenario checks its outcome."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from legal_batch.core.crash import POINTS
from legal_batch.core.seed import seed_demo_cases
from legal_batch.db import connect
from legal_batch_tests.e2e.support import (
    RUN,
    assert_each_item_in_one_local_job,
    assert_every_chunk_embedded_once,
    assert_one_provider_job_per_shard,
    isolated_env,
    local_jobs,
    run,
    scalar,
    verify_cli,
)
from legal_batch_tests.emulators.openai_batch import OpenAIBatchEmulator

CASES = 3  # 43 chunks
SHARD_RECORDS = "25"  # two shards: the crash hits the first, the second is untouched
PARALLEL = 4


OPENAI_POINTS = ("after_job_row", "after_provider_accepted")
SINK_POINTS = ("after_sink_write",)
"""Points reached only with a further vector sink: played with Chroma (embedded) besides pgvector."""
SCENARIOS = ([("local", p) for p in POINTS if p not in SINK_POINTS] + [("openai", p) for p in OPENAI_POINTS]
             + [("local+chroma", p) for p in SINK_POINTS])


@dataclass
class Scenario:
    provider: str
    point: str
    database_url: str
    env: dict[str, str]
    emulator: OpenAIBatchEmulator | None = None
    crash: tuple[int, str] = (0, "")
    resume: tuple[int, str] = (0, "")
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def home(self) -> Path:
        return Path(self.env["LEGAL_BATCH_HOME"])


def _play(scenario: Scenario) -> None:
    started = time.monotonic()
    scenario.crash = run(RUN, {**scenario.env, "LEGAL_BATCH_CRASH_AT": scenario.point})
    if scenario.crash[0] == -signal.SIGKILL:
        scenario.resume = run(RUN, scenario.env)
    scenario.seconds = time.monotonic() - started


@pytest.fixture(scope="module")
def played(make_database, scratch_dir) -> Iterator[dict[tuple[str, str], Scenario]]:
    scenarios: dict[tuple[str, str], Scenario] = {}
    for provider, point in SCENARIOS:
        url = make_database()
        with connect(url) as conn:
            seed_demo_cases(conn, cases=CASES)
        extra = {"LEGAL_BATCH_SHARD_MAX_RECORDS": SHARD_RECORDS}
        emulator = None
        if provider == "openai":
            emulator = OpenAIBatchEmulator(api_key="sk-test-crash-0123456789", auto_advance=True).start()
            extra.update(LEGAL_BATCH_EMBEDDINGS_PROVIDER="openai", OPENAI_BASE_URL=emulator.base_url,
                         OPENAI_API_KEY=emulator.api_key)
        if provider == "local+chroma":
            extra["LEGAL_BATCH_EMBEDDINGS_SINKS"] = "pgvector,chroma"
        root = scratch_dir / f"crash-{provider}-{point}"
        scenarios[(provider, point)] = Scenario(provider, point, url, isolated_env(database_url=url, root=root,
                                                                                   **extra), emulator)
    try:
        with ThreadPoolExecutor(PARALLEL) as pool:
            list(pool.map(_play, scenarios.values()))
        for s in scenarios.values():
            print(f"crash scenario {s.provider}/{s.point}: {s.seconds:.1f} s")
        yield scenarios
    finally:
        for scenario in scenarios.values():
            if scenario.emulator is not None:
                scenario.emulator.stop()


@pytest.fixture
def scenario_conn(request, played, monkeypatch):
    scenario = played[request.param]
    monkeypatch.setenv("LEGAL_BATCH_DATABASE_URL", scenario.database_url)
    monkeypatch.setenv("LEGAL_BATCH_HOME", scenario.env["LEGAL_BATCH_HOME"])
    with connect(scenario.database_url) as conn:
        yield scenario, conn


def _assert_killed_then_recovered(scenario: Scenario, conn) -> int:
    code, output = scenario.crash
    assert code == -signal.SIGKILL, f"expected SIGKILL at {scenario.point}, got exit {code}:\n{output[-3000:]}"
    code, output = scenario.resume
    assert code == 0, f"resume after {scenario.point} failed:\n{output[-3000:]}"
    code, report = verify_cli()
    assert code == 0 and "ledger consistent" in report, report
    return assert_every_chunk_embedded_once(conn)


@pytest.mark.parametrize("scenario_conn", [s for s in SCENARIOS if s[0] == "local"], indirect=True,
                         ids=lambda s: s[1])
def test_local_provider_resumes_after_a_kill_at(scenario_conn) -> None:
    scenario, conn = scenario_conn
    chunks = _assert_killed_then_recovered(scenario, conn)
    tokens = [job["metadata"]["client_token"] for job in local_jobs(scenario.home)]
    assert assert_one_provider_job_per_shard(conn, tokens) == 2
    assert assert_each_item_in_one_local_job(scenario.home, conn) == chunks


@pytest.mark.parametrize("scenario_conn", [s for s in SCENARIOS if s[0] == "openai"], indirect=True,
                         ids=lambda s: s[1])
def test_openai_provider_resumes_after_a_kill_at(scenario_conn) -> None:
    scenario, conn = scenario_conn
    _assert_killed_then_recovered(scenario, conn)
    assert scenario.emulator is not None
    tokens = [(batch.get("metadata") or {}).get("client_token") for batch in scenario.emulator.batches.values()]
    assert assert_one_provider_job_per_shard(conn, tokens) == 2
    assert scalar(conn, "SELECT count(*) FROM batch_jobs WHERE provider <> 'openai'") == 0
    uploads = [r for r in scenario.emulator.requests if r.method == "POST" and r.path.endswith("/files")]
    assert len(uploads) == 2, "each shard's request file was uploaded once"


@pytest.mark.parametrize("scenario_conn", [s for s in SCENARIOS if s[0] == "local+chroma"], indirect=True,
                         ids=lambda s: s[1])
def test_a_kill_between_a_sink_write_and_the_commit_is_healed_by_the_next_run(scenario_conn) -> None:
    """Chroma was written, the ledger (and `sink_vectors`) rolled back: the next run writes the same ids
    again — every chunk once in Chroma, once in pgvector, one provider job per shard."""
    import chromadb
    from chromadb.config import Settings as ChromaSettings

    scenario, conn = scenario_conn
    chunks = _assert_killed_then_recovered(scenario, conn)
    tokens = [job["metadata"]["client_token"] for job in local_jobs(scenario.home)]
    assert assert_one_provider_job_per_shard(conn, tokens) == 2
    client = chromadb.PersistentClient(path=str(scenario.home / "chroma"),
                                       settings=ChromaSettings(anonymized_telemetry=False))
    [collection] = client.list_collections()
    assert collection.count() == chunks
    assert scalar(conn, "SELECT count(*) FROM sink_vectors") == chunks
    assert scalar(conn, "SELECT count(*) FROM batch_items WHERE state <> 'done'") == 0
