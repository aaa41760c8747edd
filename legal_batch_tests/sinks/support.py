"""Vectors and records for the sink tests: unit vectors, chunk records with the standard metadata."""

from __future__ import annotations

import uuid

import numpy as np
import psycopg

from legal_batch.sinks.base import VectorRecord, chunk_metadata

MODEL = "local-lexical-v1"


def unit_vectors(rows: int, dims: int, *, seed: int = 1) -> np.ndarray:
    vectors = np.random.default_rng(seed).standard_normal((rows, dims)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def records(record_id: str, vectors: np.ndarray, *, model: str = MODEL, citation: str = "[2024] HKCFI 1",
            start: int = 0) -> list[VectorRecord]:
    """One record per vector: chunks `start`, `start + 1`, ... of `record_id`."""
    out = []
    for offset, vector in enumerate(vectors):
        index = start + offset
        text = f"paragraph {index} of judgment {record_id}"
        out.append(VectorRecord(record_id, index, vector, text, chunk_metadata(
            record_id=record_id, chunk_index=index, model=model, text=text,
            chunk_type="holding" if index % 2 else "facts", citation=citation)))
    return out


def seed_case(conn: psycopg.Connection, chunks: int, *, citation: str = "[2024] HKCFI 1") -> str:
    """A court case with `chunks` chunks (the rows `case_embeddings` refers to); returns its id."""
    case_id = str(uuid.uuid4())
    with conn.transaction():
        conn.execute("INSERT INTO court_cases (id, neutral_citation, case_name, court, full_text)"
                     " VALUES (%s, %s, 'A v B', 'CFI', 'text')", (case_id, citation))
        with conn.cursor().copy("COPY case_chunks (case_id, chunk_index, chunk_type, chunk_text, char_start,"
                                " char_end, token_count, text_sha256) FROM STDIN") as copy:
            for index in range(chunks):
                copy.write_row((case_id, index, "holding" if index % 2 else "facts",
                                f"paragraph {index} of judgment {case_id}", 0, 10, 6, "x"))
    return case_id
