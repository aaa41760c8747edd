"""The embeddings sink and the ingest transaction, on shards bigger than one COPY block (2,000 rows)
and one batch of early-closed items (5,000): rows in pgvector, bit for bit, and ledger states."""

from __future__ import annotations

import base64
import uuid
from pathlib import Path

import numpy as np
import orjson
import psycopg
import pytest

from legal_batch.core import batch, ledger
from legal_batch.core.flow import Item
from legal_batch.flows.embeddings.flow import EmbeddingsFlow, EmbeddingSink
from legal_batch.providers.base import Result
from legal_batch.providers.local import LocalProvider

MODEL = "local-lexical-v1"


def _chunks(conn: psycopg.Connection, count: int) -> list[str]:
    """One court case with `count` tiny chunks; returns their subject keys (`<case_id>:<index>`).

    Drops the HNSW index of this test's database first: thousands of random vectors take ~5 ms each
    to insert into it, and these tests are about rows and ledger states, not search."""
    conn.execute("DROP INDEX IF EXISTS case_embeddings_hnsw")
    case_id = uuid.uuid4()
    with conn.transaction():
        conn.execute("INSERT INTO court_cases (id, neutral_citation, case_name, court, full_text)"
                     " VALUES (%s, '[2024] HKCFI 1', 'A v B', 'CFI', 'text')", (case_id,))
        with conn.cursor().copy("COPY case_chunks (case_id, chunk_index, chunk_type, chunk_text, char_start,"
                                " char_end, token_count, text_sha256) FROM STDIN") as copy:
            for index in range(count):
                copy.write_row((case_id, index, "body", f"paragraph {index} of the judgment", 0, 10, 6,
                                f"sha-{case_id}-{index}"))  # distinct texts: none is served from another
    return [f"{case_id}:{index}" for index in range(count)]


def _unit(rng: np.random.Generator, rows: int) -> np.ndarray:
    vectors = rng.standard_normal((rows, 1024)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def _stored(conn: psycopg.Connection) -> dict[str, np.ndarray]:
    with conn.cursor(binary=True) as cur:
        cur.execute("SELECT case_id::text, chunk_index, embedding FROM case_embeddings WHERE model = %s", (MODEL,))
        return {f"{case_id}:{index}": vector.to_numpy() for case_id, index, vector in cur}


def _sink_run(conn: psycopg.Connection, keys: list[str], vectors: list[np.ndarray]) -> tuple[list, int]:
    with conn.transaction():
        sink = EmbeddingSink(conn, model=MODEL, dimensions=1024)
        reasons = [sink.accept(Item(n, key, f"c{n}"), Result(f"c{n}", "out.jsonl", n, vector=vector))
                   for n, (key, vector) in enumerate(zip(keys, vectors, strict=True))]
        rows = sink.finish()
    return reasons, rows


@pytest.mark.filterwarnings("ignore:overflow encountered in dot")  # the 1e20 vector, accepted
def test_sink_stores_exact_float32_vectors_across_blocks_and_rejects_bad_ones_with_reasons(lb_env, conn):
    keys = _chunks(conn, 4_500)
    rng = np.random.default_rng(1)
    vectors = list(_unit(rng, len(keys)))
    bad = {
        10: (np.full(1024, np.nan, dtype=np.float32), "vector contains NaN or infinite components"),
        2_100: (np.where(np.arange(1024) == 3, np.inf, 0.5).astype(np.float32),
                "vector contains NaN or infinite components"),
        3_000: (np.zeros(1024, dtype=np.float32), "vector is all zeros"),
        3_001: (np.ones(512, dtype=np.float32), "vector has 512 components, expected 1024"),
        3_002: (np.ones((2, 512), dtype=np.float32), "vector has (2, 512) components, expected 1024"),
    }
    for index, (vector, _) in bad.items():
        vectors[index] = vector
    vectors[20] = np.full(1024, 1e-30, dtype=np.float32)  # squares underflow: still a usable vector
    vectors[21] = np.full(1024, 1e20, dtype=np.float32)  # squares overflow: still finite

    reasons, rows = _sink_run(conn, keys, vectors)

    assert {i: r for i, r in enumerate(reasons) if r is not None} == {i: reason for i, (_, reason) in bad.items()}
    stored = _stored(conn)
    assert rows == len(stored) == len(keys) - len(bad)
    for index, key in enumerate(keys):
        if index in bad:
            assert key not in stored
        else:
            assert np.array_equal(stored[key], vectors[index]), key


def test_ingesting_over_existing_rows_upserts_them(lb_env, conn):
    keys = _chunks(conn, 2_500)
    rng = np.random.default_rng(2)
    _sink_run(conn, keys[:10] + keys[2_400:], list(_unit(rng, 110)))
    created = dict(conn.execute("SELECT chunk_index, created_at FROM case_embeddings").fetchall())

    fresh = list(_unit(rng, len(keys)))
    reasons, rows = _sink_run(conn, keys, fresh)

    assert set(reasons) == {None} and rows == len(keys)
    stored = _stored(conn)
    assert len(stored) == len(keys)
    assert all(np.array_equal(stored[key], vector) for key, vector in zip(keys, fresh, strict=True))
    later = dict(conn.execute("SELECT chunk_index, created_at FROM case_embeddings").fetchall())
    assert all(later[index] > created[index] for index in created), "upserted rows carry the new time"


def _completed_shard(conn: psycopg.Connection, home: Path, size: int) -> tuple[ledger.Shard, Path, LocalProvider]:
    provider = LocalProvider(home / "local_provider", max_records_per_job=size)
    flow = EmbeddingsFlow(model=MODEL)
    shard_key = batch.plan(conn, flow, provider, model=MODEL).shard_keys[0]
    batch.write_request_file(conn, flow, provider, shard_key, files_root=home / "files")
    batch.submit_shard(conn, flow, provider, shard_key)
    job = ledger.get_job(conn, shard_key)
    provider.poll(job.provider_job_id)
    assert provider.poll(job.provider_job_id).state == "completed"
    batch.poll_open_jobs(conn, lambda _: provider, flow="embeddings")
    output = home / "local_provider" / job.provider_job_id / "output.jsonl"
    return ledger.get_job(conn, shard_key), output, provider


def test_a_shard_larger_than_the_early_closing_batches_ends_with_every_item_in_its_state(lb_env, conn):
    _chunks(conn, 6_000)
    job, output, provider = _completed_shard(conn, lb_env.home_dir, 6_000)
    lines = output.read_bytes().splitlines()
    custom_ids = [orjson.loads(line)["custom_id"] for line in lines]
    nan = orjson.loads(lines[5_100])
    nan["response"]["body"]["data"][0]["embedding"] = [None] + [0.03] * 1023  # becomes NaN
    failed = orjson.loads(lines[5_500])
    failed["response"] = {"status_code": 400, "request_id": "r", "body": {"error": {"code": "invalid_request",
                                                                                  "message": "too long"}}}
    lines[5_100], lines[5_500] = orjson.dumps(nan), orjson.dumps(failed)
    lines.append(lines[100])  # a duplicate of a line whose item is done: ignored
    del lines[5_200]  # a missing result
    output.write_bytes(b"\n".join(lines) + b"\n")

    report = batch.ingest_shard(conn, EmbeddingsFlow(model=MODEL), provider, job.shard_key, files=[output])

    assert (report.done, report.retryable, report.failed) == (5_997, 2, 1)
    states = dict(conn.execute("SELECT custom_id, state FROM batch_items WHERE job_id = %s", (job.id,)).fetchall())
    assert (states[custom_ids[5_100]], states[custom_ids[5_200]], states[custom_ids[5_500]]) == (
        "retryable", "retryable", "failed")
    assert conn.execute("SELECT count(*) FROM batch_items WHERE job_id = %s AND state = 'done'"
                        " AND last_error IS NULL", (job.id,)).fetchone()[0] == 5_997
    assert conn.execute("SELECT count(*) FROM case_embeddings").fetchone()[0] == 5_997
    assert "duplicate result" in (ledger.get_job(conn, job.shard_key).last_error or "")
    assert batch.ingest_shard(conn, EmbeddingsFlow(model=MODEL), provider, job.shard_key,
                              files=[output]).already_ingested


class _FailingFlow(EmbeddingsFlow):
    """The embeddings flow whose sink fails when it writes its last rows (a full disk, a lost server)."""

    def sink(self, conn: psycopg.Connection, *, model: str) -> EmbeddingSink:
        sink = super().sink(conn, model=model)
        finish = sink.finish

        def failing_finish() -> int:
            finish()
            raise RuntimeError("writing embeddings failed: disk full")

        sink.finish = failing_finish  # type: ignore[method-assign]
        return sink


def test_a_failed_write_leaves_the_whole_shard_untouched_even_items_closed_early(lb_env, conn):
    _chunks(conn, 6_000)
    job, output, provider = _completed_shard(conn, lb_env.home_dir, 6_000)

    with pytest.raises(RuntimeError, match="disk full"):
        batch.ingest_shard(conn, _FailingFlow(model=MODEL), provider, job.shard_key, files=[output])

    assert conn.execute("SELECT state, count(*) FROM batch_items WHERE job_id = %s GROUP BY state",
                        (job.id,)).fetchall() == [("submitted", 6_000)]
    assert conn.execute("SELECT count(*) FROM case_embeddings").fetchone()[0] == 0
    assert ledger.get_job(conn, job.shard_key).state == "completed"
    report = batch.ingest_shard(conn, EmbeddingsFlow(model=MODEL), provider, job.shard_key, files=[output])
    assert report.done == 6_000 and report.rows_written == 6_000


def test_base64_output_is_stored_bit_for_bit_and_a_malformed_vector_fails_only_its_item(lb_env, conn):
    """OpenAI output with `encoding_format: "base64"` (little-endian float32 bytes) through the real
    ingest: vectors land in pgvector exactly; a line whose vector is not base64, not whole float32s
    or of the wrong size leaves its item retryable with the file and line in the reason."""
    _chunks(conn, 40)
    job, output, provider = _completed_shard(conn, lb_env.home_dir, 40)
    lines = [orjson.loads(line) for line in output.read_bytes().splitlines()]
    vectors = {}
    for obj in lines:
        data = obj["response"]["body"]["data"][0]
        assert isinstance(data["embedding"], str), "the local provider answers in the format asked for: base64"
        vector = np.frombuffer(base64.b64decode(data["embedding"]), dtype="<f4")
        vectors[obj["custom_id"]] = vector
    bad = {4: ("not base64 at all!", "embedding is not valid base64"),
           9: (base64.b64encode(b"\0" * 4_090).decode(), "decodes to 4090 bytes, not a whole number of float32"),
           17: (base64.b64encode(np.ones(512, dtype="<f4").tobytes()).decode(),
                "vector has 512 components, expected 1024")}
    for index, (embedding, _) in bad.items():
        lines[index]["response"]["body"]["data"][0]["embedding"] = embedding
    output.write_bytes(b"".join(orjson.dumps(obj) + b"\n" for obj in lines))

    report = batch.ingest_shard(conn, EmbeddingsFlow(model=MODEL), provider, job.shard_key, files=[output])

    assert (report.done, report.retryable, report.failed) == (37, 3, 0)
    reasons = dict(conn.execute("SELECT custom_id, last_error FROM batch_items WHERE job_id = %s"
                                " AND state = 'retryable'", (job.id,)).fetchall())
    for index, (_, message) in bad.items():
        reason = reasons[lines[index]["custom_id"]]
        assert message in reason and f"output.jsonl:{index + 1}" in reason and job.provider_job_id in reason
    subjects = dict(conn.execute("SELECT custom_id, subject_key FROM batch_items WHERE job_id = %s",
                                 (job.id,)).fetchall())
    stored = _stored(conn)
    assert len(stored) == 37
    for custom_id, vector in vectors.items():
        if custom_id not in reasons:
            assert np.array_equal(stored[subjects[custom_id]], vector), custom_id
