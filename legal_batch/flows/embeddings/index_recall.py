"""How much the HNSW index loses against exact search: recall@k of the index on the table's own vectors.

Query vectors are sampled from the vector table itself (`TABLESAMPLE BERNOULLI ... REPEATABLE`, so the
same table gives the same sample). For each, the index's top `k` (`hnsw.ef_search` as given, the
planner made to use the index) is compared with the exact top `k` (a scan computing every distance,
the index disabled): recall@k is the mean share of the exact top `k` the index returns. Each
query's own vector is in both lists, as it would be for a stored chunk; with `k` 10 that is one of ten.
The distance is taken as search takes it (`search.cosine_distance_sql`), so a `halfvec` table is
measured in `halfvec`, as it is searched.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import psycopg
from psycopg import sql

from legal_batch.core.user_tables import VectorTable, stored_type
from legal_batch.flows.embeddings.search import cosine_distance_sql


@dataclass(frozen=True)
class IndexRecall:
    queries: int
    k: int
    ef_search: int
    recall: float
    """Mean over the queries of |index top k ∩ exact top k| / k."""
    index_seconds: float
    """Wall time of all the index searches."""
    exact_seconds: float
    """Wall time of all the exact searches."""

    @property
    def index_queries_per_s(self) -> float:
        return self.queries / self.index_seconds if self.index_seconds else 0.0

    @property
    def exact_queries_per_s(self) -> float:
        return self.queries / self.exact_seconds if self.exact_seconds else 0.0


def index_recall(conn: psycopg.Connection, table: VectorTable, *, queries: int = 100, k: int = 10,
                 ef_search: int = 40, seed: int = 1, exact: VectorTable | None = None) -> IndexRecall:
    """Recall@`k` of the table's HNSW index against exact search, over `queries` vectors sampled from
    the table (fewer when it holds fewer). `ef_search` is pgvector's default (40) unless given; the
    product searches with 100 (`search.search`). With `exact`, another table of the same vectors (the
    `vector` table a `halfvec` copy was made from), the queries are sampled from it and the exact
    top `k` is taken there: what storing and indexing as `halfvec` loses against float32 search.
    Reads only; each search runs in its own transaction with `SET LOCAL` settings."""
    relation = (exact or table).relation  # where the queries come from and the exact top k is taken
    rows = conn.execute(f"SELECT count(*) FROM {relation}").fetchone()[0]
    if not rows:
        return IndexRecall(0, k, ef_search, 0.0, 0.0, 0.0)
    percent = min(100.0, 100.0 * queries * 3 / rows)
    sample = conn.execute(f"SELECT embedding::real[] FROM {relation} TABLESAMPLE BERNOULLI (%s) REPEATABLE (%s)"
                          " LIMIT %s", (percent, seed, queries)).fetchall()
    exact_sql = _nearest_sql(conn, exact or table)
    nearest_sql = _nearest_sql(conn, table)
    found = 0
    index_seconds = exact_seconds = 0.0
    for (components,) in sample:
        query = {"q": np.asarray(components, dtype=np.float32), "k": k}
        started = time.perf_counter()
        with conn.transaction():
            conn.execute(sql.SQL("SET LOCAL hnsw.ef_search = {}").format(sql.Literal(int(ef_search))))
            conn.execute("SET LOCAL enable_seqscan = off")  # the index, also on a table the planner finds small
            approximate = {tuple(row) for row in conn.execute(nearest_sql, query).fetchall()}
        index_seconds += time.perf_counter() - started
        started = time.perf_counter()
        with conn.transaction():
            conn.execute("SET LOCAL enable_indexscan = off")  # every distance computed: the exact top k
            best = {tuple(row) for row in conn.execute(exact_sql, query).fetchall()}
        exact_seconds += time.perf_counter() - started
        found += len(approximate & best) / max(len(best), 1)
    return IndexRecall(len(sample), k, ef_search, found / len(sample) if sample else 0.0, index_seconds,
                       exact_seconds)


def _nearest_sql(conn: psycopg.Connection, table: VectorTable) -> str:
    """The `k` (a parameter) keys nearest to the query `q` in the table, as its index is searched."""
    relation = table.relation
    distance = cosine_distance_sql(table.dimensions, storage=stored_type(conn, relation) or table.storage,
                                   column="embedding")
    nearest_sql = f"SELECT case_id, chunk_index, model FROM {relation} ORDER BY {distance} LIMIT %(k)s"
    return nearest_sql
