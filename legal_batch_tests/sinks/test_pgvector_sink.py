"""The pgvector sink against real Postgres + pgvector: rows in case_embeddings, bit for bit; upsert by
id; refusals with reasons; the dimension check at open; writes that roll back with the transaction."""

from __future__ import annotations

import uuid

import numpy as np
import pytest

from legal_batch.core.errors import UserError
from legal_batch.sinks import registry
from legal_batch.sinks.base import DimensionMismatch, VectorRecord, vector_id
from legal_batch.sinks.pgvector import PgvectorSink
from legal_batch_tests.sinks.support import MODEL, records, seed_case, unit_vectors


@pytest.fixture
def sink(conn):
    conn.execute("DROP INDEX IF EXISTS case_embeddings_hnsw")
    return PgvectorSink(conn, model=MODEL, dimensions=1024)


def _stored(conn) -> dict[str, np.ndarray]:
    with conn.cursor(binary=True) as cur:
        cur.execute("SELECT case_id::text, chunk_index, embedding FROM case_embeddings WHERE model = %s", (MODEL,))
        return {vector_id(case_id, index): vector.to_numpy() for case_id, index, vector in cur}


def test_upsert_stores_exact_vectors_and_a_second_write_replaces_them(conn, sink):
    case_id = seed_case(conn, 2_500)  # more than one COPY block
    vectors = unit_vectors(2_500, 1024)
    assert sink.upsert(records(case_id, vectors)) == []
    stored = _stored(conn)
    assert len(stored) == 2_500 == sink.count()
    assert np.array_equal(stored[f"{case_id}:7"], vectors[7])

    again = unit_vectors(3, 1024, seed=2)
    assert sink.upsert(records(case_id, again, start=10)) == []
    stored = _stored(conn)
    assert len(stored) == 2_500
    assert np.array_equal(stored[f"{case_id}:11"], again[1])


def test_contains_delete_and_search_answer_by_vector_id(conn, sink):
    case_id = seed_case(conn, 6, citation="[2023] UKSC 9")
    vectors = unit_vectors(6, 1024)
    sink.upsert(records(case_id, vectors))
    other = str(uuid.uuid4())
    asked = [f"{case_id}:0", f"{case_id.upper()}:5", f"{other}:0", f"{case_id}:9"]
    assert sink.contains(asked) == {f"{case_id}:0", f"{case_id.upper()}:5"}

    hits = sink.search(vectors[3], k=2)
    assert [hit.id for hit in hits][0] == f"{case_id}:3"
    assert hits[0].score == pytest.approx(1.0, abs=1e-5)
    assert hits[0].text == f"paragraph 3 of judgment {case_id}"
    assert hits[0].metadata["citation"] == "[2023] UKSC 9"
    assert hits[0].metadata["chunk_type"] == "holding"
    assert hits[0].metadata["model"] == MODEL

    assert sink.delete([f"{case_id}:0", f"{case_id}:1", f"{other}:3"]) == 2
    assert sink.count() == 4
    assert sink.contains([f"{case_id}:0"]) == set()


def test_unusable_records_are_refused_with_reasons_and_the_rest_are_stored(conn, sink):
    case_id = seed_case(conn, 4)
    good = records(case_id, unit_vectors(2, 1024))
    bad = [
        VectorRecord(case_id, 2, np.full(1024, np.nan, dtype=np.float32)),
        VectorRecord(case_id, 3, np.ones(768, dtype=np.float32)),
        VectorRecord("receipt-17", 0, unit_vectors(1, 1024)[0]),
    ]
    failures = {f.id: f for f in sink.upsert(good + bad)}
    assert set(failures) == {f"{case_id}:2", f"{case_id}:3", "receipt-17:0"}
    assert "NaN or infinite" in failures[f"{case_id}:2"].reason
    assert "768 components, expected 1024" in failures[f"{case_id}:3"].reason
    assert "not a case id" in failures["receipt-17:0"].reason
    assert not any(f.retryable for f in failures.values())
    assert sink.count() == 2

    # a chunk Postgres has no case_chunks row for: its block is refused, named, the transaction goes on
    orphan = records(str(uuid.uuid4()), unit_vectors(1, 1024))
    with conn.transaction():
        failures = sink.upsert(orphan)
        assert [f.id for f in failures] == [orphan[0].id]
        assert "case_embeddings" in failures[0].reason
        assert sink.upsert(records(case_id, unit_vectors(1, 1024), start=3)) == []
    assert sink.count() == 3


def test_writes_roll_back_with_the_callers_transaction(conn, sink):
    case_id = seed_case(conn, 3)
    with pytest.raises(RuntimeError, match="ledger failed"), conn.transaction():
        assert sink.upsert(records(case_id, unit_vectors(3, 1024))) == []
        assert sink.count() == 3
        raise RuntimeError("ledger failed")
    assert sink.count() == 0
    assert sink.transactional is True


def test_another_dimension_is_refused_when_the_sink_is_opened(lb_env, conn):
    with pytest.raises(DimensionMismatch, match=r"holds vector\(1024\) embeddings, not 768"):
        registry.open_sink("pgvector", model=MODEL, dimensions=768, settings=lb_env, conn=conn)
    with pytest.raises(Exception, match="does not exist"):
        PgvectorSink(conn, model=MODEL, dimensions=1024, table="no_such_table")


def test_registry_names_sinks_and_their_capabilities(lb_env, conn):
    assert registry.sink_names() == ["pgvector", "chroma", "weaviate"]
    assert registry.parse_sink_names(" pgvector, Chroma,pgvector") == ["pgvector", "chroma"]
    with pytest.raises(UserError, match="unknown sink 'qdrant'"):
        registry.parse_sink_names("pgvector,qdrant")
    with pytest.raises(UserError, match="names no sink"):
        registry.parse_sink_names(" , ")
    assert registry.is_transactional("pgvector") is True
    sink = registry.open_sink("pgvector", model=MODEL, dimensions=1024, settings=lb_env, conn=conn)
    assert (sink.name, sink.where, sink.count()) == ("pgvector", "case_embeddings", 0)


def test_the_text_hash_is_stored_where_the_table_has_the_column(conn):
    conn.execute("DROP INDEX IF EXISTS case_embeddings_hnsw")
    conn.execute("ALTER TABLE case_embeddings ADD COLUMN IF NOT EXISTS text_sha256 text")
    sink = PgvectorSink(conn, model=MODEL, dimensions=1024)
    case_id = seed_case(conn, 3)
    written = records(case_id, unit_vectors(3, 1024))
    assert sink.upsert(written) == []
    stored = dict(conn.execute("SELECT chunk_index, text_sha256 FROM case_embeddings WHERE model = %s",
                               (MODEL,)).fetchall())
    assert stored == {r.chunk_index: r.metadata["text_sha256"] for r in written}
