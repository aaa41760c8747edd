"""Semantic search over the vector table in use (cosine distance, HNSW index)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import psycopg

from legal_batch.core.user_tables import CaseSource, stored_type
from legal_batch.flows.embeddings.flow import HNSW_MAX_DIMENSIONS


def cosine_distance_sql(dimensions: int, *, storage: str, column: str = "e.embedding", query: str = "%(q)s") -> str:
    """`column <=> query` as the HNSW index of a table of that storage is built (see `hnsw_index_sql`),
    so that the index serves the ORDER BY."""
    if storage == "halfvec":
        return f"{column} <=> {query}::halfvec({dimensions})"
    if dimensions <= HNSW_MAX_DIMENSIONS:
        return f"{column} <=> {query}"
    return f"{column}::halfvec({dimensions}) <=> {query}::halfvec({dimensions})"


@dataclass(frozen=True)
class Hit:
    score: float
    case_name: str
    neutral_citation: str
    court: str
    chunk_index: int
    chunk_type: str
    chunk_text: str


def search(conn: psycopg.Connection, query_vector: np.ndarray, *, model: str, k: int = 5,
           source: CaseSource | None = None) -> list[Hit]:
    """The `k` chunks nearest to the query vector, with their case name, citation and text: vectors of
    the table in use (`embedding_sink`), cases of `source` (the built-in court_cases). The distance is
    taken as the index is built: on `halfvec` for a `halfvec` table (the query rounded likewise) and
    above 2,000 dimensions."""
    source = source or CaseSource()
    dims = int(query_vector.shape[0])
    distance = cosine_distance_sql(dims, storage=stored_type(conn, "embedding_sink") or "vector")
    cases = source.select("id", "case_name", "neutral_citation", "court")
    conn.execute("SET hnsw.ef_search = 100")
    rows = conn.execute(
        f"SELECT 1 - ({distance}) AS score, k.case_name, k.neutral_citation, k.court, c.chunk_index,"
        "       c.chunk_type, c.chunk_text"
        " FROM embedding_sink e"
        " JOIN case_chunks c ON c.case_id = e.case_id AND c.chunk_index = e.chunk_index"
        f" JOIN {cases} AS k ON k.id = e.case_id"
        f" WHERE e.model = %(model)s ORDER BY {distance} LIMIT %(k)s",
        {"q": query_vector.astype(np.float32), "model": model, "k": k},
    ).fetchall()
    return [Hit(float(r[0]), r[1] or "", r[2] or "", r[3] or "", r[4], r[5], r[6]) for r in rows]
