"""Hostile provider output, table-driven over the providers' output formats: the OpenAI format read
by the `local`, `openai` and `azure_openai` providers, and Bedrock's `.jsonl.out`.

Every case ingests one real shard (planned, written, submitted and finished on the local provider
through `core.batch`) whose output files the case writes. Each case proves: the affected items end
`retryable` or `failed` with a reason naming the job and, where there is one, the file and line;
every other item is ingested; the run reports what happened (`IngestReport.problems`,
`batch_jobs.last_error`); and `verify` passes afterwards."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import openai
import orjson
import psycopg
import pytest

from legal_batch.core import batch, ledger
from legal_batch.core.seed import seed_demo_cases
from legal_batch.core.verify import verify
from legal_batch.db import connect
from legal_batch.flows.embeddings.flow import DONE_WITHOUT_RESULT_SQL, EmbeddingsFlow, sync_chunks
from legal_batch.providers.azure_openai import AzureOpenAIProvider
from legal_batch.providers.base import BatchProvider
from legal_batch.providers.bedrock import BedrockProvider
from legal_batch.providers.local import LocalProvider
from legal_batch.providers.openai import OpenAIProvider
from legal_batch.providers.openai_format import decode_base64_vector

SHARD_ITEMS = 6
BOM = b"\xef\xbb\xbf"
RETRY = {"retryable"}
FAILED = {"failed"}


# -- the formats --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Format:
    """How one provider family writes results, and the provider object that reads them."""

    name: str
    out_name: str
    err_name: str
    make_provider: Callable[[Path], BatchProvider]

    @property
    def bedrock(self) -> bool:
        return self.name == "bedrock"

    def ok(self, custom_id: object, embedding: object, **extra: object) -> dict:
        if self.bedrock:
            return {"recordId": custom_id, "modelInput": {"inputText": "..."},
                    "modelOutput": {"embedding": embedding, "inputTextTokenCount": 7}, **extra}
        return {"id": "batch_req_1", "custom_id": custom_id, "error": None, **extra,
                "response": {"status_code": 200, "request_id": "req_1",
                             "body": {"object": "list", "model": "m", "usage": {"prompt_tokens": 7, "total_tokens": 7},
                                      "data": [{"object": "embedding", "index": 0, "embedding": embedding}]}}}

    def http(self, custom_id: str, status: int, code: str, message: str) -> dict:
        """A request the service answered with `status` and an error body."""
        if self.bedrock:
            if status == 200:
                return {"recordId": custom_id, "modelInput": {}, "modelOutput": {"message": message}}
            return {"recordId": custom_id, "modelInput": {}, "error": {"errorCode": status, "errorMessage": message}}
        return {"id": "batch_req_2", "custom_id": custom_id, "error": None,
                "response": {"status_code": status, "request_id": "req_2",
                             "body": {"error": {"code": code, "type": code, "message": message}}}}

    def batch_error(self, custom_id: str, code: str, message: str) -> dict:
        if self.bedrock:
            return {"recordId": custom_id, "modelInput": {}, "error": {"errorCode": code, "errorMessage": message}}
        return {"id": "batch_req_3", "custom_id": custom_id, "response": None,
                "error": {"code": code, "message": message}}

    def files(self, good: list[bytes], bad: list[bytes]) -> dict[str, bytes]:
        """Output and error lines as the provider lays them out (Bedrock: one file)."""
        if self.bedrock:
            return {self.out_name: _jsonl(good + bad)}
        return {self.out_name: _jsonl(good), **({self.err_name: _jsonl(bad)} if bad else {})}

    def err_line(self, index: int, good: int) -> str:
        """Where the `index`-th (0-based) error line lands, with `good` output lines before it."""
        return f"{self.err_name}:{index + 1 + (good if self.bedrock else 0)}"


def _jsonl(lines: list[bytes]) -> bytes:
    return b"".join(line + b"\n" for line in lines)


def _openai() -> BatchProvider:
    return OpenAIProvider(openai.OpenAI(api_key="sk-unused", base_url="http://127.0.0.1:9/v1", max_retries=0))


def _azure() -> BatchProvider:
    client = openai.AzureOpenAI(api_key="unused", azure_endpoint="http://127.0.0.1:9", api_version="2024-10-21")
    return AzureOpenAIProvider(client, deployment="gpt-4o-mini-batch")


def _bedrock() -> BatchProvider:
    return BedrockProvider(s3=None, bedrock=None, runtime=None, bucket="lb-hostile",
                           role_arn="arn:aws:iam::123456789012:role/legal-batch")


FORMATS = [
    Format("local", "output.jsonl", "errors.jsonl", lambda root: LocalProvider(root)),
    Format("openai", "output.jsonl", "errors.jsonl", lambda root: _openai()),
    Format("azure_openai", "output.jsonl", "errors.jsonl", lambda root: _azure()),
    Format("bedrock", "requests.jsonl.out", "requests.jsonl.out", lambda root: _bedrock()),
]


# -- the shards ---------------------------------------------------------------------------------------

@dataclass
class Shard:
    job: ledger.Shard
    ids: list[str]
    """Custom ids in request order."""
    vectors: dict[str, list[float]]
    """The provider's real answer for each id."""
    foreign: str
    """A custom id of another shard (never ingested in this module)."""

    def vector(self, n: int) -> list[float]:
        return self.vectors[self.ids[n]]


class ShardPool:
    """A database with many finished shards of the local provider; each case takes its own."""

    def __init__(self, url: str, root: Path) -> None:
        self.url = url
        self.root = root
        self.provider = LocalProvider(root / "local_provider", max_records_per_job=SHARD_ITEMS)
        self.flow = EmbeddingsFlow(model=self.provider.default_model("embeddings"))
        self.conn = connect(url)
        self._keys: Iterator[str] = iter(())
        self.foreign = ""

    def fill(self, shards: int) -> None:
        conn = self.conn
        seed_demo_cases(conn, cases=max(2, shards * SHARD_ITEMS // 12 + 2))
        sync_chunks(conn, max_tokens=512, overlap_tokens=64)
        plan = batch.plan(conn, self.flow, self.provider, model=self.flow.model, max_shards=shards)
        assert len(plan.shard_keys) == shards and plan.planned_items == shards * SHARD_ITEMS
        for key in plan.shard_keys:
            batch.write_request_file(conn, self.flow, self.provider, key, files_root=self.root / "files")
            batch.submit_shard(conn, self.flow, self.provider, key)
        for _ in range(2):
            batch.poll_open_jobs(conn, lambda _: self.provider, flow="embeddings", max_jobs=1000)
        *keys, spare = plan.shard_keys
        self.foreign = conn.execute("SELECT min(i.custom_id) FROM batch_items i JOIN batch_jobs j ON j.id = i.job_id"
                                    " WHERE j.shard_key = %s", (spare,)).fetchone()[0]
        self._keys = iter(keys)

    def take(self) -> Shard:
        job = ledger.get_job(self.conn, next(self._keys))
        assert job.state == "completed"
        folder = self.provider.root / (job.provider_job_id or "")
        ids = [orjson.loads(line)["custom_id"] for line in (folder / "input.jsonl").read_bytes().splitlines()]
        vectors = {}
        for line in (folder / "output.jsonl").read_bytes().splitlines():
            obj = orjson.loads(line)
            vectors[obj["custom_id"]] = floats(obj["response"]["body"]["data"][0]["embedding"])
        assert sorted(vectors) == sorted(ids)
        return Shard(job, ids, vectors, self.foreign)


def floats(embedding: str | list[float]) -> list[float]:
    """An answer's vector as a list of floats (the OpenAI format's `base64` decoded)."""
    if isinstance(embedding, str):
        decoded = decode_base64_vector(embedding)
        assert not isinstance(decoded, str), decoded
        return decoded.tolist()
    return embedding


# -- the cases ----------------------------------------------------------------------------------------

@dataclass
class Outcome:
    files: dict[str, bytes] | None
    """The files the provider left (None: it left none at all)."""
    victims: dict[str, tuple[set[str], list[str]]] = field(default_factory=dict)
    """custom id → allowed end states, substrings its reason must contain."""
    problems: list[str] = field(default_factory=list)
    """Substrings one report problem must contain (all of them)."""
    job_state: str | None = None
    check: Callable[[psycopg.Connection, Shard], None] | None = None


def all_ok(f: Format, s: Shard, skip: set[int] = frozenset()) -> list[bytes]:  # type: ignore[assignment]
    return [orjson.dumps(f.ok(cid, s.vectors[cid])) for n, cid in enumerate(s.ids) if n not in skip]


def unanswered(s: Shard, n: int, *more: str) -> tuple[set[str], list[str]]:
    """The reason of an item whose line could not be read: no result in the job's output."""
    return RETRY, ["no result for this request", s.job.provider_job_id or "", *more]


def case_non_json_line(f: Format, s: Shard) -> Outcome:
    lines = all_ok(f, s)
    lines[0] = b'{"custom_id": "' + s.ids[0].encode() + b'", "response": oops this is not JSON'
    return Outcome(f.files(lines, []), {s.ids[0]: unanswered(s, 0, f"{f.out_name}:1", "not valid JSON")},
                   [f"{f.out_name}:1", "not valid JSON", s.job.provider_job_id or ""])


def case_json_not_an_object(f: Format, s: Shard) -> Outcome:
    lines = all_ok(f, s)
    lines[2] = b'["' + s.ids[2].encode() + b'", 0.1, 0.2]'
    return Outcome(f.files(lines, []), {s.ids[2]: unanswered(s, 2, f"{f.out_name}:3", "not a JSON object")},
                   [f"{f.out_name}:3", "not a JSON object"])


def case_truncated_last_line(f: Format, s: Shard) -> Outcome:
    body = f.files(all_ok(f, s), [])[f.out_name].rstrip(b"\n")
    cut = body[: body.rindex(b"\n") + 1 + 4000]  # the last line loses its end (and its newline)
    last = len(s.ids)
    return Outcome({f.out_name: cut}, {s.ids[-1]: unanswered(s, -1, f"{f.out_name}:{last}", "not valid JSON")},
                   [f"{f.out_name}:{last}", "not valid JSON"])


def case_utf8_bom(f: Format, s: Shard) -> Outcome:
    files = f.files(all_ok(f, s), [])
    files[f.out_name] = BOM + files[f.out_name]
    return Outcome(files)


def case_duplicate_custom_ids(f: Format, s: Shard) -> Outcome:
    lines = all_ok(f, s)
    other = [-x for x in s.vector(0)]
    lines.append(orjson.dumps(f.ok(s.ids[0], other)))  # a second, different answer for the first request
    dup = len(lines)

    def first_kept(conn: psycopg.Connection, shard: Shard) -> None:
        case_id, _, chunk = shard.ids[0].removeprefix("chunk-").rpartition("-")
        stored = conn.execute("SELECT embedding FROM case_embeddings WHERE case_id = %s AND chunk_index = %s",
                              (case_id, int(chunk))).fetchone()[0]
        assert np.allclose(stored.to_numpy(), shard.vector(0), atol=1e-6), "the first answer is the one kept"

    return Outcome(f.files(lines, []), problems=[f"{f.out_name}:{dup}", "duplicate result", s.ids[0]],
                   check=first_kept)


def case_success_and_error_for_one_id(f: Format, s: Shard) -> Outcome:
    good = all_ok(f, s)
    error = orjson.dumps(f.http(s.ids[1], 500, "server_error", "transient"))
    # the success (output file, read first) is kept and the item is done; the contradicting line is reported
    return Outcome(f.files(good, [error]), problems=[f.err_line(0, len(good)), "duplicate result", s.ids[1]])


def case_ids_we_never_sent(f: Format, s: Shard) -> Outcome:
    lines = all_ok(f, s) + [orjson.dumps(f.ok("chunk-never-sent", s.vector(0)))]
    return Outcome(f.files(lines, []), problems=[f"{f.out_name}:{len(lines)}", "unknown custom id 'chunk-never-sent'"])


def case_ids_from_another_job(f: Format, s: Shard) -> Outcome:
    lines = all_ok(f, s)
    lines[0] = orjson.dumps(f.ok(s.foreign, s.vector(0)))  # our first answer carries another shard's id

    def foreign_untouched(conn: psycopg.Connection, shard: Shard) -> None:
        state = conn.execute("SELECT state FROM batch_items WHERE custom_id = %s", (shard.foreign,)).fetchone()[0]
        assert state == "submitted", "another job's item is never closed by this shard's output"

    return Outcome(f.files(lines, []), {s.ids[0]: unanswered(s, 0)},
                   [f"{f.out_name}:1", f"unknown custom id {s.foreign!r}", "not a request of this shard"],
                   check=foreign_untouched)


def case_custom_id_missing_or_not_a_string(f: Format, s: Shard) -> Outcome:
    lines = all_ok(f, s)
    lines[0] = orjson.dumps(f.ok(12345, s.vector(0)))
    return Outcome(f.files(lines, []), {s.ids[0]: unanswered(s, 0)},
                   [f"{f.out_name}:1", "no recordId" if f.bedrock else "no custom id"])


def case_vector_of_wrong_size(f: Format, s: Shard) -> Outcome:
    lines = all_ok(f, s)
    lines[1] = orjson.dumps(f.ok(s.ids[1], s.vector(1)[:512]))
    return Outcome(f.files(lines, []), {s.ids[1]: (RETRY, [f"{f.out_name}:2", "512 components, expected 1024"])})


def _bare(f: Format, s: Shard, n: int, token: bytes) -> bytes:
    """Line `n` with a bare token (not JSON) in place of its vector's fourth number."""
    line = orjson.dumps(f.ok(s.ids[n], s.vector(n)[:3] + [12345.5] + s.vector(n)[4:]))
    assert line.count(b"12345.5") == 1
    return line.replace(b"12345.5", token)


def _bare_case(token: bytes) -> Callable[[Format, Shard], Outcome]:
    def case(f: Format, s: Shard) -> Outcome:
        lines = all_ok(f, s)
        lines[3] = _bare(f, s, 3, token)
        return Outcome(f.files(lines, []), {s.ids[3]: unanswered(s, 3, f"{f.out_name}:4")},
                       [f"{f.out_name}:4", "not valid JSON"])
    return case


def _string_case(value: str, *, every: bool = False) -> Callable[[Format, Shard], Outcome]:
    def case(f: Format, s: Shard) -> Outcome:
        lines = all_ok(f, s)
        vector: list = [str(x) for x in s.vector(4)] if every else s.vector(4)[:5] + [value] + s.vector(4)[6:]
        lines[4] = orjson.dumps(f.ok(s.ids[4], vector))
        first = 0 if every else 5
        return Outcome(f.files(lines, []), {s.ids[4]: (RETRY | FAILED, [
            f"{f.out_name}:5", "not a list of numbers", f"element {first} is str"])})
    return case


def case_null_in_vector(f: Format, s: Shard) -> Outcome:
    lines = all_ok(f, s)
    lines[4] = orjson.dumps(f.ok(s.ids[4], s.vector(4)[:7] + [None] + s.vector(4)[8:]))
    return Outcome(f.files(lines, []), {s.ids[4]: (RETRY | FAILED, [f"{f.out_name}:5"])})


def case_huge_lines(f: Format, s: Shard) -> Outcome:
    lines = all_ok(f, s)
    lines[0] = orjson.dumps(f.ok(s.ids[0], [0.012345678] * 500_000))  # ~6 MB
    padded = f.ok(s.ids[1], s.vector(1))
    padded["x_padding"] = "p" * (5 << 20)  # a valid answer inside a 5 MB line
    lines[1] = orjson.dumps(padded)
    assert len(lines[0]) > 5_000_000 and len(lines[1]) > 5_000_000
    return Outcome(f.files(lines, []), {s.ids[0]: (RETRY, [f"{f.out_name}:1", "500000 components, expected 1024"])})


def case_status_200_with_an_error_body(f: Format, s: Shard) -> Outcome:
    lines = all_ok(f, s)
    lines[2] = orjson.dumps(f.http(s.ids[2], 200, "server_error", "The server had an error"))
    return Outcome(f.files(lines, []), {s.ids[2]: (RETRY, [f"{f.out_name}:3", "has no embedding"])})


def case_status_500_and_429(f: Format, s: Shard) -> Outcome:
    good = all_ok(f, s, skip={0, 1})
    bad = [orjson.dumps(f.http(s.ids[0], 500, "server_error", "The server had an error")),
           orjson.dumps(f.http(s.ids[1], 429, "rate_limit_exceeded", "Slow down"))]
    return Outcome(f.files(good, bad), {s.ids[0]: (RETRY, [f.err_line(0, len(good)), "500"]),
                                        s.ids[1]: (RETRY, [f.err_line(1, len(good)), "429"])})


def case_status_400(f: Format, s: Shard) -> Outcome:
    good = all_ok(f, s, skip={3})
    bad = [orjson.dumps(f.http(s.ids[3], 400, "invalid_request_error", "Invalid 'input': too long"))]
    return Outcome(f.files(good, bad), {s.ids[3]: (FAILED, [f.err_line(0, len(good)), "400", "too long"])})


def case_partial_download_left_behind(f: Format, s: Shard) -> Outcome:
    files = f.files(all_ok(f, s), [])
    whole = files[f.out_name]
    files[f.out_name + ".tmp"] = whole[: len(whole) // 3]  # a download that died half-way (jsonl.atomic_writer)
    files[f.out_name + ".part"] = whole + whole  # ... and one still being written (another process)
    return Outcome(files)  # ignored: no duplicates, no truncated line, every item done


def case_empty_output_file(f: Format, s: Shard) -> Outcome:
    return Outcome({f.out_name: b""}, {cid: unanswered(s, n) for n, cid in enumerate(s.ids)})


def case_missing_output_file(f: Format, s: Shard) -> Outcome:
    return Outcome(None, {cid: unanswered(s, n) for n, cid in enumerate(s.ids)})


def case_expired_job(f: Format, s: Shard) -> Outcome:
    half = len(s.ids) // 2
    good = all_ok(f, s, skip=set(range(half, len(s.ids))))
    bad = [] if f.bedrock else [orjson.dumps(f.batch_error(cid, "batch_expired", "This request could not be "
                                                           "executed before the completion window expired."))
                                for cid in s.ids[half:]]
    victims = {}
    for k, cid in enumerate(s.ids[half:]):
        victims[cid] = unanswered(s, half + k, "(expired)") if f.bedrock else (
            RETRY, [f.err_line(k, len(good)), "batch_expired", s.job.provider_job_id or ""])
    return Outcome(f.files(good, bad), victims, job_state="expired")


CASES: dict[str, Callable[[Format, Shard], Outcome]] = {
    "non-JSON line": case_non_json_line,
    "JSON that is not an object": case_json_not_an_object,
    "truncated last line": case_truncated_last_line,
    "UTF-8 BOM": case_utf8_bom,
    "duplicate custom ids": case_duplicate_custom_ids,
    "a success and an error for one id": case_success_and_error_for_one_id,
    "ids we never sent": case_ids_we_never_sent,
    "ids from another job": case_ids_from_another_job,
    "custom id not a string": case_custom_id_missing_or_not_a_string,
    "vector of wrong size": case_vector_of_wrong_size,
    "bare NaN": _bare_case(b"NaN"),
    "bare Infinity": _bare_case(b"Infinity"),
    "number beyond float range (1e999)": _bare_case(b"1e999"),
    "NaN as a JSON string": _string_case("NaN"),
    "Infinity as a JSON string": _string_case("Infinity"),
    "a numeric string among numbers": _string_case("0.5"),
    "strings instead of numbers": _string_case("", every=True),
    "null in a vector": case_null_in_vector,
    "huge lines (5 MB)": case_huge_lines,
    "status 200 with an error body": case_status_200_with_an_error_body,
    "status 500 and 429": case_status_500_and_429,
    "status 400": case_status_400,
    "partial downloads left beside the output": case_partial_download_left_behind,
    "empty output file": case_empty_output_file,
    "missing output file": case_missing_output_file,
    "expired job": case_expired_job,
}

KNOWN_GAPS: dict[tuple[str, str], str] = {}

PARAMS = []
for _fmt, _case in itertools.product(FORMATS, CASES):
    _marks = []
    if (gap := KNOWN_GAPS.get((_fmt.name, _case))) is not None:
        _marks.append(pytest.mark.xfail(reason=gap, strict=True))
    PARAMS.append(pytest.param(_fmt, _case, id=f"{_fmt.name}-{_case}", marks=_marks))


@pytest.fixture(scope="module")
def pool(make_database, scratch_dir) -> Iterator[ShardPool]:
    shards = len(PARAMS) + 1
    pool = ShardPool(make_database(), scratch_dir / "hostile")
    pool.fill(shards)
    yield pool
    pool.conn.close()


@pytest.mark.parametrize(("fmt", "case"), PARAMS)
def test_hostile_output_fails_only_the_affected_items(fmt: Format, case: str, pool: ShardPool) -> None:
    conn = pool.conn
    shard = pool.take()
    outcome = CASES[case](fmt, shard)
    folder = pool.root / "outputs" / fmt.name / shard.job.shard_key
    folder.mkdir(parents=True)
    paths = []
    for name, content in (outcome.files or {}).items():
        (folder / name).write_bytes(content)
        paths.append(folder / name)
    if outcome.job_state is not None:
        conn.execute("UPDATE batch_jobs SET state = %s, provider_status = %s WHERE id = %s",
                     (outcome.job_state, outcome.job_state, shard.job.id))

    report = batch.ingest_shard(conn, pool.flow, fmt.make_provider(pool.root), shard.job.shard_key, files=paths)

    items = {cid: (state, reason) for cid, state, reason in conn.execute(
        "SELECT custom_id, state, last_error FROM batch_items WHERE job_id = %s", (shard.job.id,))}
    for cid, (state, reason) in items.items():
        if cid not in outcome.victims:
            assert state == "done", f"{cid} should be ingested, is {state}: {reason}"
            continue
        allowed, words = outcome.victims[cid]
        assert state in allowed, f"{cid}: {state} ({reason})"
        assert reason and shard.job.provider_job_id in reason, reason
        for word in words:
            assert word in reason, f"{word!r} not in the reason of {cid}: {reason}"
    done = sum(1 for state, _ in items.values() if state == "done")
    assert (report.done, report.retryable + report.failed) == (done, len(items) - done)
    assert conn.execute("SELECT count(*) FROM case_embeddings e JOIN batch_items i ON i.subject_key ="
                        " e.case_id || ':' || e.chunk_index WHERE i.job_id = %s", (shard.job.id,)).fetchone()[0] == done

    job = ledger.get_job(conn, shard.job.shard_key)
    assert job.state == "ingested"
    if outcome.problems:
        assert any(all(word in problem for word in outcome.problems) for problem in report.problems), \
            report.problems
        assert report.problems[0] in (job.last_error or "")
        assert "output lines unusable" in report.summary()
    else:
        assert report.problems == []
    if outcome.check is not None:
        outcome.check(conn, shard)
    assert verify(conn, {"embeddings": DONE_WITHOUT_RESULT_SQL}).ok
