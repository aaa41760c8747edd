"""A toy flow — the shape a new flow takes: embed the words of `toy_words` into `toy_vectors`."""

from __future__ import annotations

from collections.abc import Iterator

import psycopg

from legal_batch.core.flow import Item
from legal_batch.providers.base import EmbeddingRequest, Request, Result

DONE_WITHOUT_RESULT_SQL = (
    "SELECT i.subject_key FROM batch_items i WHERE i.flow = 'toy' AND i.state = 'done'"
    " AND NOT EXISTS (SELECT 1 FROM toy_vectors v WHERE v.word = i.subject_key)")


class ToyFlow:
    name = "toy"
    endpoint = "embeddings"

    def __init__(self, model: str) -> None:
        self.model = model

    def candidate_sql(self) -> tuple[str, dict]:
        return ("SELECT w.word, 'toy-' || w.word, 1, 100 FROM toy_words w WHERE NOT EXISTS (SELECT 1 FROM"
                " batch_items i WHERE i.flow = 'toy' AND i.subject_key = w.word AND i.state <> 'retryable')"
                " ORDER BY w.word", {})

    def job_params(self) -> dict:
        return {}

    def requests(self, conn: psycopg.Connection, job_id: int) -> Iterator[Request]:
        for (custom_id,) in conn.execute("SELECT custom_id FROM batch_items WHERE job_id = %s ORDER BY id",
                                         (job_id,)).fetchall():
            yield EmbeddingRequest(custom_id, custom_id.removeprefix("toy-"))

    def sink(self, conn: psycopg.Connection, *, model: str) -> _Sink:
        return _Sink(conn)


class _Sink:
    def __init__(self, conn: psycopg.Connection) -> None:
        self.conn = conn
        self.rows: list[tuple[str, int]] = []

    def accept(self, item: Item, result: Result) -> str | None:
        if result.vector is None:
            return "no vector"
        self.rows.append((item.subject_key, len(result.vector)))
        return None

    def finish(self) -> int:
        with self.conn.cursor() as cur:
            cur.executemany("INSERT INTO toy_vectors (word, dims) VALUES (%s, %s) ON CONFLICT DO NOTHING", self.rows)
        return len(self.rows)

    def settle(self, job_id: int) -> None:
        """No further stores."""
