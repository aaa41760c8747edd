"""Change detection and the vector cache, end to end on the local provider through the Dagster
definitions: an edited case is chunked again and only its changed chunks are requested; a deleted
case's chunks and vectors go; a headnote becomes a chunk; identical text is never requested twice."""

from __future__ import annotations

import uuid

import dagster as dg
import psycopg

from legal_batch.core import ledger
from legal_batch.core.seed import seed_demo_cases
from legal_batch.core.user_tables import CaseSource
from legal_batch.core.verify import stale_results, verify
from legal_batch.definitions import FLOWS_BY_NAME, defs
from legal_batch.driver import FlowDriver
from legal_batch.flows.embeddings.flow import DONE_WITHOUT_RESULT_SQL, stale_result_sql
from legal_batch.flows.headnotes.flow import stale_result_sql as headnote_stale_sql
from legal_batch.settings import get_settings

MODEL = "local-lexical-v1"


def run(instance: dg.DagsterInstance, flow: str = "embeddings") -> None:
    result = FlowDriver(FLOWS_BY_NAME[flow], defs, flow=flow, echo=lambda _: None, dagster_instance=instance).run(
        wait=True, poll_interval=0)
    assert result.failed_runs == []


def scalar(conn: psycopg.Connection, sql: str, *params: object):
    return conn.execute(sql, params).fetchone()[0]


def chunk_hashes(conn: psycopg.Connection, case_id: object | None = None) -> dict[tuple[str, int], str]:
    return {(str(c), i): h for c, i, h in conn.execute(
        "SELECT case_id, chunk_index, text_sha256 FROM case_chunks WHERE %s::uuid IS NULL OR case_id = %s::uuid",
        (case_id, case_id))}


def requested(conn: psycopg.Connection) -> int:
    """Requests sent to the provider so far (every planned shard's request count)."""
    return scalar(conn, "SELECT coalesce(sum(request_count), 0) FROM batch_jobs WHERE flow = 'embeddings'"
                        " AND state <> 'split'")


def assert_every_chunk_has_its_vector(conn: psycopg.Connection) -> None:
    assert scalar(conn, "SELECT count(*) FROM case_embeddings") == scalar(conn, "SELECT count(*) FROM case_chunks")
    assert scalar(conn, "SELECT count(*) FROM case_embeddings e JOIN case_chunks c USING (case_id, chunk_index)"
                        " WHERE e.text_sha256 = c.text_sha256") == scalar(conn, "SELECT count(*) FROM case_chunks")
    assert verify(conn, {"embeddings": DONE_WITHOUT_RESULT_SQL}).ok
    assert stale_results(conn, {"embeddings": stale_result_sql()}) == []


def test_an_edited_case_is_chunked_again_and_only_its_changed_chunks_are_requested(lb_env, conn, dagster_instance):
    seed_demo_cases(conn, cases=4)
    run(dagster_instance)
    before = chunk_hashes(conn)
    first = requested(conn)
    assert first == len(before)
    edited, text = conn.execute("SELECT id, full_text FROM court_cases ORDER BY id LIMIT 1").fetchone()
    paragraphs = text.split("\n\n")
    middle = len(paragraphs) // 2
    paragraphs[middle] = paragraphs[middle].replace(".", ", as the court then found.", 1)
    conn.execute("UPDATE court_cases SET full_text = %s WHERE id = %s", ("\n\n".join(paragraphs), edited))
    kept = {key: conn.execute("SELECT embedding::text FROM case_embeddings WHERE case_id = %s AND chunk_index = %s",
                              key).fetchone()[0] for key in before}

    stale = stale_results(conn, {"embeddings": stale_result_sql()})
    assert stale and stale[0].count == sum(1 for case_id, _ in before if case_id == str(edited))
    assert "the judgment text changed since it was chunked" in stale[0].examples[0]

    run(dagster_instance)

    after = chunk_hashes(conn)
    changed = {key for key, sha in after.items() if sha not in set(before.values())}
    assert changed and {case_id for case_id, _ in changed} == {str(edited)}
    assert requested(conn) - first == len(changed), "only the changed chunks were requested"
    for key, sha in after.items():
        if before.get(key) == sha:  # same text at the same place: the very same vector, never re-requested
            assert conn.execute("SELECT embedding::text FROM case_embeddings WHERE case_id = %s AND chunk_index = %s",
                                key).fetchone()[0] == kept[key]
    assert_every_chunk_has_its_vector(conn)
    assert scalar(conn, "SELECT text_sha256 FROM chunked_cases WHERE case_id = %s", edited) == \
        scalar(conn, "SELECT encode(sha256(convert_to(full_text, 'UTF8')), 'hex') FROM court_cases WHERE id = %s",
               edited)


def test_a_paragraph_inserted_at_the_start_shifts_chunks_without_requesting_them_again(
        lb_env, conn, dagster_instance):
    seed_demo_cases(conn, cases=2)
    run(dagster_instance)
    first = requested(conn)
    before = set(chunk_hashes(conn).values())
    edited = scalar(conn, "SELECT id FROM court_cases ORDER BY id LIMIT 1")
    conn.execute("UPDATE court_cases SET full_text = %s || full_text WHERE id = %s",
                 ("EDITORIAL NOTE\n\nThis judgment was corrected on appeal; the corrigendum follows.\n\n", edited))

    run(dagster_instance)

    new_texts = {sha for sha in chunk_hashes(conn).values() if sha not in before}
    assert requested(conn) - first == len(new_texts) < len(chunk_hashes(conn, edited))
    assert_every_chunk_has_its_vector(conn)


def test_a_deleted_case_loses_its_chunks_and_vectors_and_nothing_is_requested(lb_env, conn, dagster_instance):
    seed_demo_cases(conn, cases=3)
    run(dagster_instance)
    first = requested(conn)
    gone = scalar(conn, "SELECT id FROM court_cases ORDER BY id LIMIT 1")
    conn.execute("DELETE FROM court_cases WHERE id = %s", (gone,))

    run(dagster_instance)

    assert requested(conn) == first
    for table in ("case_chunks", "case_embeddings", "chunked_cases"):
        assert scalar(conn, f"SELECT count(*) FROM {table} WHERE case_id = %s", gone) == 0
    assert scalar(conn, "SELECT count(*) FROM batch_items WHERE subject_key LIKE %s", f"{gone}:%") == 0
    assert_every_chunk_has_its_vector(conn)


def test_a_written_headnote_becomes_a_chunk_and_goes_stale_when_its_judgment_changes(
        lb_env, conn, dagster_instance, monkeypatch):
    seed_demo_cases(conn, cases=2)
    run(dagster_instance)
    first = requested(conn)
    run(dagster_instance, "headnotes")
    assert scalar(conn, "SELECT count(*) FROM court_cases WHERE headnote IS NOT NULL") == 2

    run(dagster_instance)  # the headnotes are chunks of their cases now, embedded like any other

    headnote_chunks = scalar(conn, "SELECT count(*) FROM case_chunks WHERE chunk_type = 'headnote'")
    assert headnote_chunks >= 2
    assert requested(conn) - first == headnote_chunks, "only the headnote chunks were requested"
    assert_every_chunk_has_its_vector(conn)

    edited = scalar(conn, "SELECT id FROM court_cases ORDER BY id LIMIT 1")
    old_headnote = scalar(conn, "SELECT headnote FROM court_cases WHERE id = %s", edited)
    conn.execute("UPDATE court_cases SET full_text = full_text || %s WHERE id = %s",
                 ("\n\nAddendum: costs to follow the event.", edited))
    run(dagster_instance)
    assert scalar(conn, "SELECT stale_since IS NOT NULL FROM case_headnotes WHERE case_id = %s", edited)

    run(dagster_instance, "headnotes")  # not regenerated unless asked
    assert scalar(conn, "SELECT headnote FROM court_cases WHERE id = %s", edited) == old_headnote
    stale = stale_results(conn, {"headnotes": headnote_stale_sql(CaseSource())})
    assert [s.count for s in stale] == [1]

    monkeypatch.setenv("LEGAL_BATCH_HEADNOTE_REGENERATE_STALE", "true")
    get_settings(fresh=True)
    run(dagster_instance, "headnotes")
    assert scalar(conn, "SELECT stale_since FROM case_headnotes WHERE case_id = %s", edited) is None
    assert scalar(conn, "SELECT headnote_generated_at > now() - interval '1 minute' FROM court_cases WHERE id = %s",
                  edited)


def test_identical_text_is_requested_once_and_a_reimport_costs_nothing(lb_env, conn, dagster_instance):
    seed_demo_cases(conn, cases=3)
    twin = uuid.uuid4()  # the first case imported a second time, under another id
    conn.execute("INSERT INTO court_cases (id, case_name, full_text) SELECT %s, case_name, full_text FROM court_cases"
                 " ORDER BY id LIMIT 1", (twin,))

    run(dagster_instance)

    chunks = scalar(conn, "SELECT count(*) FROM case_chunks")
    distinct = scalar(conn, "SELECT count(DISTINCT text_sha256) FROM case_chunks")
    repeated = chunks - distinct
    assert repeated == scalar(conn, "SELECT count(*) FROM case_chunks WHERE case_id = %s", twin) > 0
    assert requested(conn) == distinct, "each distinct text was requested once"
    saved = scalar(conn, "SELECT sum(requests) FROM cache_savings")
    assert saved == repeated, "requests saved / repeated chunks = 1.0"
    assert ledger.summary(conn, "embeddings").items_by_state == {"done": chunks}
    assert_every_chunk_has_its_vector(conn)

    # the whole corpus again, under new ids: nothing is submitted and nothing is paid
    spent = scalar(conn, "SELECT coalesce(sum(actual_cost_usd), 0) FROM batch_jobs")
    jobs = len(ledger.list_jobs(conn, flow="embeddings"))
    conn.execute("INSERT INTO court_cases (id, case_name, full_text) SELECT gen_random_uuid(), case_name, full_text"
                 " FROM court_cases")
    run(dagster_instance)
    assert len(ledger.list_jobs(conn, flow="embeddings")) == jobs
    assert scalar(conn, "SELECT coalesce(sum(actual_cost_usd), 0) FROM batch_jobs") == spent
    assert scalar(conn, "SELECT sum(requests) FROM cache_savings") == saved + chunks
    materialized = dagster_instance.get_latest_materialization_event(dg.AssetKey("embedding_candidates"))
    metadata = materialized.asset_materialization.metadata
    assert metadata["cache_requests_saved"].value == chunks
    assert "saved by the vector cache" in metadata["summary"].value
    assert_every_chunk_has_its_vector(conn)
