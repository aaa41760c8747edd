"""Semantic search over `case_embeddings` (cosine distance, HNSW index)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import psycopg


@dataclass(frozen=True)
class Hit:
    score: float
    case_name: str
    neutral_citation: str
    court: str
    chunk_index: int
    chunk_type: str
    chunk_text: str


def search(conn: psycopg.Connection, query_vector: np.ndarray, *, model: str, k: int = 5) -> list[Hit]:
    """The `k` chunks nearest to the query vector, with their case name, citation and text."""
    conn.execute("SET hnsw.ef_search = 100")
    rows = conn.execute(
        "SELECT 1 - (e.embedding <=> %(q)s) AS score, k.case_name, k.neutral_citation, k.court, c.chunk_index,"
        "       c.chunk_type, c.chunk_text"
        " FROM case_embeddings e"
        " JOIN case_chunks c ON c.case_id = e.case_id AND c.chunk_index = e.chunk_index"
        " JOIN court_cases k ON k.id = e.case_id"
        " WHERE e.model = %(model)s ORDER BY e.embedding <=> %(q)s LIMIT %(k)s",
        {"q": query_vector.astype(np.float32), "model": model, "k": k},
    ).fetchall()
    return [Hit(float(r[0]), r[1] or "", r[2] or "", r[3] or "", r[4], r[5], r[6]) for r in rows]
