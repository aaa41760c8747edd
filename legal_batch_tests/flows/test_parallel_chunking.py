"""Chunking on a pool of worker processes writes exactly what chunking in one process writes — also
when a worker is killed mid-batch (the batch is redone) and when the whole process is killed
mid-way (the next pass finishes without duplicates) — and says how far it has got."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import uuid

import psycopg
import pytest

from legal_batch.core.seed import seed_demo_cases
from legal_batch.flows.embeddings.flow import ChunkingFailed, sync_chunks

CASES = 24
BATCH = 5  # 5 batches: the pool has the next batch while this process writes one
CHUNKS = "SELECT case_id, chunk_index, chunk_type, chunk_text, char_start, char_end, token_count, text_sha256" \
         " FROM case_chunks ORDER BY case_id, chunk_index"
RECORDED = "SELECT case_id, text_sha256, headnote_sha256, chunks FROM chunked_cases ORDER BY case_id"


def _corpus(conn: psycopg.Connection) -> None:
    """Demo cases, a few with headnotes, one that cannot be embedded."""
    seed_demo_cases(conn, cases=CASES)
    conn.execute("UPDATE court_cases SET headnote = 'Held: the appeal is allowed. ' || repeat('Costs follow. ', 5)"
                 " WHERE id IN (SELECT id FROM court_cases ORDER BY id LIMIT 4)")
    conn.execute("INSERT INTO court_cases (id, full_text) VALUES (%s, '  * * *  ')", (uuid.uuid4(),))


def _tables(conn: psycopg.Connection) -> tuple[list, list, list]:
    failed = conn.execute("SELECT subject_key, state, last_error FROM batch_items ORDER BY subject_key").fetchall()
    return conn.execute(CHUNKS).fetchall(), conn.execute(RECORDED).fetchall(), failed


def _single_process(conn: psycopg.Connection) -> tuple[list, list, list]:
    """What one process writes from scratch for the same corpus (the tables emptied first)."""
    conn.execute("DELETE FROM batch_items")
    conn.execute("DELETE FROM case_chunks")
    conn.execute("DELETE FROM chunked_cases")
    synced = sync_chunks(conn, max_tokens=512, overlap_tokens=64, batch_cases=200, workers=1)
    assert synced.cases == CASES + 1 and synced.worker_restarts == 0
    return _tables(conn)


def _assert_no_duplicates(conn: psycopg.Connection) -> None:
    assert conn.execute("SELECT count(*) - count(DISTINCT (case_id, chunk_index)) FROM case_chunks").fetchone()[0] == 0
    assert conn.execute("SELECT count(*) FROM chunked_cases s WHERE s.chunks <> (SELECT count(*) FROM case_chunks c"
                        " WHERE c.case_id = s.case_id)").fetchone()[0] == 0


def test_a_pool_chunks_exactly_what_one_process_does(lb_env, conn):
    _corpus(conn)
    synced = sync_chunks(conn, max_tokens=512, overlap_tokens=64, batch_cases=BATCH, workers=2)
    assert synced.cases == CASES + 1 and synced.rejected == 1 and synced.worker_restarts == 0
    pooled = _tables(conn)
    assert sum(1 for row in pooled[0] if row[2] == "headnote") >= 4
    assert pooled == _single_process(conn)
    again = sync_chunks(conn, max_tokens=512, overlap_tokens=64, batch_cases=BATCH, workers=2)
    assert (again.cases, again.chunks) == (0, 0), "nothing changed: nothing chunked"


def test_a_changed_case_is_chunked_again_on_the_pool(lb_env, conn):
    _corpus(conn)
    sync_chunks(conn, max_tokens=512, overlap_tokens=64, batch_cases=BATCH, workers=2)
    edited, noted = conn.execute("SELECT id FROM court_cases ORDER BY id DESC LIMIT 2").fetchall()
    conn.execute("UPDATE court_cases SET full_text = full_text || E'\\n\\nA paragraph added on appeal.' WHERE id = %s",
                 edited)
    conn.execute("UPDATE court_cases SET headnote = 'Held: a new headnote.' WHERE id = %s", noted)
    synced = sync_chunks(conn, max_tokens=512, overlap_tokens=64, batch_cases=BATCH, workers=2)
    assert (synced.cases, synced.changed) == (2, 2)
    pooled = _tables(conn)
    assert pooled == _single_process(conn)


def test_a_killed_worker_is_replaced_and_its_batch_redone(lb_env, conn, tmp_path, monkeypatch):
    _corpus(conn)
    marker = tmp_path / "worker-killed"
    monkeypatch.setenv("LEGAL_BATCH_CRASH_AT", "chunk_worker")
    monkeypatch.setenv("LEGAL_BATCH_CRASH_ONCE", str(marker))  # the first worker to start a sub-batch dies
    synced = sync_chunks(conn, max_tokens=512, overlap_tokens=64, batch_cases=BATCH, workers=2)
    assert marker.exists(), "a worker process was killed"
    assert synced.worker_restarts >= 1
    assert synced.cases == CASES + 1
    _assert_no_duplicates(conn)
    pooled = _tables(conn)
    monkeypatch.delenv("LEGAL_BATCH_CRASH_AT")
    assert pooled == _single_process(conn)


def test_workers_dying_on_every_attempt_stop_the_pass_naming_the_batch(lb_env, conn, monkeypatch):
    _corpus(conn)
    monkeypatch.setenv("LEGAL_BATCH_CRASH_AT", "chunk_worker")  # every worker dies
    first = [str(row[0]) for row in conn.execute("SELECT id FROM court_cases ORDER BY id LIMIT %s", (BATCH,))]
    with pytest.raises(ChunkingFailed) as failed:
        sync_chunks(conn, max_tokens=512, overlap_tokens=64, batch_cases=BATCH, workers=2)
    message = str(failed.value)
    assert "died 3 times" in message and "LEGAL_BATCH_CHUNK_WORKERS=1" in message
    assert all(case_id in message for case_id in first)
    assert conn.execute("SELECT count(*) FROM case_chunks").fetchone()[0] == 0
    assert conn.execute("SELECT count(*) FROM chunked_cases").fetchone()[0] == 0


_CHILD = textwrap.dedent("""
    import sys
    from legal_batch.db import connect
    from legal_batch.flows.embeddings.flow import sync_chunks

    with connect(sys.argv[1]) as conn:
        sync_chunks(conn, max_tokens=512, overlap_tokens=64, batch_cases=int(sys.argv[2]), workers=2)
""")


def test_a_pass_killed_mid_way_is_finished_by_the_next_without_duplicates(lb_env, conn):
    _corpus(conn)
    env = {**os.environ, "LEGAL_BATCH_CRASH_AT": "mid_chunking"}
    env.pop("LEGAL_BATCH_CRASH_ONCE", None)
    # the workers share the child's stderr pipe: `run` returning means they left with it, no orphans
    child = subprocess.run([sys.executable, "-c", _CHILD, lb_env.database_url or "", str(BATCH)], env=env,
                           capture_output=True, timeout=120)
    assert child.returncode == -signal.SIGKILL, child.stderr.decode()[-2000:]
    committed = conn.execute("SELECT count(*) FROM chunked_cases").fetchone()[0]
    assert committed == BATCH, "the first batch was committed, the second was not"
    _assert_no_duplicates(conn)
    resumed = sync_chunks(conn, max_tokens=512, overlap_tokens=64, batch_cases=BATCH, workers=2)
    assert resumed.cases == CASES + 1 - BATCH
    _assert_no_duplicates(conn)
    pooled = _tables(conn)
    assert pooled == _single_process(conn)


def test_progress_comes_with_the_total_and_every_batch(lb_env, conn):
    _corpus(conn)
    totals: list[int] = []
    done: list[int] = []
    sync_chunks(conn, max_tokens=512, overlap_tokens=64, batch_cases=BATCH, workers=2, on_total=totals.append,
                on_progress=done.append)
    assert totals == [CASES + 1]
    assert done == [BATCH] * 5
