"""Sizing the HNSW build (pure) and the float16 COPY encoding."""

from __future__ import annotations

import uuid

import numpy as np
import pytest

from legal_batch.core.user_tables import VectorTable
from legal_batch.core.vector_copy import binary_copy_data
from legal_batch.flows.embeddings.flow import (
    hnsw_build_memory_mb,
    hnsw_graph_bytes,
    hnsw_index_sql,
    plan_index_build,
)

GB = 1 << 30


def test_the_graph_estimate_grows_with_rows_and_halves_its_vectors_as_halfvec():
    full = hnsw_graph_bytes(1_000_000, dimensions=1024, bytes_per_component=4)
    half = hnsw_graph_bytes(1_000_000, dimensions=1024, bytes_per_component=2)
    assert 4 * GB < full < 5 * GB  # 4 KB of vector + ~0.7 KB of neighbours and overhead per row
    assert full - half == 1_000_000 * 1024 * 2
    assert hnsw_graph_bytes(2_000_000, dimensions=1024, bytes_per_component=4) == 2 * full


@pytest.mark.parametrize(("graph_bytes", "physical", "expected_mb"), [
    (0, 24 * GB, 64),                       # an empty table: Postgres's default floor
    (100 << 20, 24 * GB, 125),              # the graph and a quarter more
    (50 * GB, 24 * GB, 6 * 1024),           # 2M × 1024-dim: capped at a quarter of the machine
    (50 * GB, 128 << 20, 64),               # a machine smaller than the floor still gets the floor
])
def test_maintenance_work_mem_holds_the_graph_within_a_quarter_of_memory(graph_bytes, physical, expected_mb):
    assert hnsw_build_memory_mb(graph_bytes, physical_bytes=physical) == expected_mb


def test_the_build_plan_counts_rows_and_leaves_one_core_to_the_leader(conn):
    conn.execute("CREATE TABLE public.vecs (case_id uuid, chunk_index int, model text, embedding halfvec(8))")
    conn.execute("INSERT INTO public.vecs SELECT gen_random_uuid(), 0, 'm', array_fill(0.5, ARRAY[8])::halfvec"
                 " FROM generate_series(1, 300)")
    table = VectorTable("public.vecs", 8, "halfvec")
    plan = plan_index_build(conn, table, physical_bytes=24 * GB, cores=4)
    assert plan.rows == 300 and plan.maintenance_work_mem_mb == 64 and plan.parallel_workers == 3
    assert plan_index_build(conn, table, physical_bytes=24 * GB, cores=1).parallel_workers == 0
    assert "halfvec_cosine_ops" in hnsw_index_sql(table) and "::halfvec" not in hnsw_index_sql(table)
    assert "maintenance_work_mem=64MB" in plan.describe()


def test_halfvec_copy_sends_float16_big_endian():
    vectors = np.array([[1.0, -0.5, 1 / 3]], dtype=np.float32)
    data = bytes(binary_copy_data([str(uuid.UUID(int=1))], [0], vectors, half=True))
    tail = data[-(2 + 4 + 4 + 3 * 2):-2]  # vector field: length, dims, unused, components; then the trailer
    assert tail[:4] == (4 + 3 * 2).to_bytes(4, "big") and tail[4:6] == (3).to_bytes(2, "big")
    assert np.frombuffer(tail[8:], dtype=">f2").tolist() == vectors[0].astype(np.float16).tolist()
    assert len(binary_copy_data([str(uuid.UUID(int=1))], [0], vectors)) == len(data) + 3 * 2


@pytest.mark.parametrize("storage", ["vector", "halfvec"])
def test_index_recall_compares_the_index_with_exact_search(conn, storage):
    from legal_batch.flows.embeddings.index_recall import index_recall

    conn.execute(f"CREATE TABLE public.vecs (case_id uuid, chunk_index int, model text, embedding {storage}(16))")
    rng = np.random.default_rng(3)
    vectors = rng.standard_normal((2_000, 16)).astype(np.float32)
    with conn.cursor().copy("COPY public.vecs (case_id, chunk_index, model, embedding) FROM STDIN") as copy:
        for row, vector in enumerate(vectors):
            copy.write_row((uuid.UUID(int=row), 0, "m", "[" + ",".join(map(str, vector)) + "]"))
    table = VectorTable("public.vecs", 16, storage)
    conn.execute(hnsw_index_sql(table))

    measured = index_recall(conn, table, queries=20, k=10, ef_search=100)
    assert measured.queries == 20 and measured.k == 10
    assert 0.8 <= measured.recall <= 1.0 and measured.index_seconds > 0 and measured.exact_seconds > 0
    poor = index_recall(conn, table, queries=20, k=10, ef_search=1)  # the index returns at most ef_search rows
    assert poor.recall <= 0.2
