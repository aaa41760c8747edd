"""The vector cache: the same text is never paid for twice.

A vector is known by what decides it — model, dimensions and the sha256 of the exact text sent. The
cache has two parts, and a vector is stored once:

- the vector table itself: every vector ingested keeps the hash of the text it was made from
  (`text_sha256`), so a chunk of the same text finds it through `case_chunks` (indexed by hash) —
  nothing is written twice at ingest;
- `vector_cache`: vectors that left the vector table, keyed by provider, model, dimensions and text
  hash — a chunk removed because its case changed or is gone (`stash`, before the delete), and all
  of them on `legal-batch reset` (`stash_table`), so a paragraph that moved, a case deleted and
  imported again, or a reset corpus take their vectors back.

Before planning, and right after an ingest, chunks whose text is in either take their vector with
no request (`serve`): boilerplate repeated across judgments, a case imported twice under two ids, a
re-import of the same corpus, a re-chunk that left most chunks as they were. Their ledger items close
`done` with no job, and what each serve saved (requests, tokens, their batch price) is kept in
`cache_savings` (`savings`). A vector in the vector table serves chunks of the same text for its
model whichever provider made it (a model name is the provider's own).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal

import psycopg

from legal_batch.core import ledger
from legal_batch.core.cost import price


@dataclass(frozen=True)
class CacheKey:
    """What a vector depends on besides its text."""

    provider: str
    model: str
    dimensions: int


@dataclass(frozen=True)
class Savings:
    requests: int = 0
    tokens: int = 0
    usd: Decimal = Decimal(0)

    def __add__(self, other: Savings) -> Savings:
        return Savings(self.requests + other.requests, self.tokens + other.tokens, self.usd + other.usd)

    def line(self) -> str:
        return f"{self.requests:,} requests ({self.tokens:,} tokens, ${self.usd:.4f}) saved by the vector cache"


def stash(conn: psycopg.Connection, key: CacheKey, *, table: str, case_ids: Sequence[str],
          chunk_indexes: Sequence[int]) -> int:
    """Cache the stored vectors of chunks about to be removed (keyed by their chunk's text, which
    they were made from), so a chunk of the same text — the same paragraph at another index after an
    edit — takes its vector back with no request. Vectors written before the cache existed count."""
    return conn.execute(
        "INSERT INTO vector_cache (provider, model, dimensions, text_sha256, embedding)"
        " SELECT DISTINCT ON (c.text_sha256) %s, %s, %s, c.text_sha256, e.embedding"
        " FROM unnest(%s::uuid[], %s::int[]) AS k (case_id, chunk_index)"
        " JOIN case_chunks c ON c.case_id = k.case_id AND c.chunk_index = k.chunk_index"
        f" JOIN {table} e ON e.case_id = k.case_id AND e.chunk_index = k.chunk_index AND e.model = %s"
        " WHERE e.text_sha256 IS NULL OR e.text_sha256 = c.text_sha256"
        " ON CONFLICT (provider, model, dimensions, text_sha256) DO NOTHING",
        (key.provider, key.model, key.dimensions, list(case_ids), list(chunk_indexes), key.model),
    ).rowcount


def stash_table(conn: psycopg.Connection, key: CacheKey, *, table: str) -> int:
    """Cache every vector of `key.model` in `table` (by the text it was made from) before the table
    is emptied (`legal-batch reset`). Returns the vectors added."""
    return conn.execute(
        "INSERT INTO vector_cache (provider, model, dimensions, text_sha256, embedding)"
        " SELECT DISTINCT ON (e.text_sha256) %s, %s, %s, e.text_sha256, e.embedding"
        f" FROM {table} e WHERE e.model = %s AND e.text_sha256 IS NOT NULL"
        " ON CONFLICT (provider, model, dimensions, text_sha256) DO NOTHING",
        (key.provider, key.model, key.dimensions, key.model),
    ).rowcount


def serve(conn: psycopg.Connection, key: CacheKey, *, table: str, flow: str = "embeddings",
          case_ids: Sequence[str] | None = None, hashes: Sequence[str] | None = None) -> Savings:
    """Write vectors of the same text for chunks that have none (for `key.model`) and no open item —
    all of them, or those of `case_ids`, or those whose text is one of `hashes` — from the vector
    table (another chunk's vector made from the same text) or from `vector_cache`, and close their
    items `done` (inside the caller's transaction). Returns what it saved, also recorded in
    `cache_savings`."""
    conn.execute("CREATE TEMP TABLE IF NOT EXISTS cache_hits (case_id uuid, chunk_index int, tokens int,"
                 " text_sha256 text) ON COMMIT DROP")
    conn.execute("TRUNCATE cache_hits")
    params = {"provider": key.provider, "model": key.model, "dims": key.dimensions, "flow": flow,
              "cases": None if case_ids is None else list(case_ids),
              "hashes": None if hashes is None else list(hashes), "open": list(ledger.ITEM_OPEN_STATES)}
    # the chunks to look at, as a join the planner sizes from the list (not `= ANY` rechecked per row)
    chunks = ("(SELECT c.* FROM unnest(%(hashes)s::text[]) AS w (text_sha256) JOIN case_chunks c"
              " ON c.text_sha256 = w.text_sha256)" if hashes is not None else
              "(SELECT c.* FROM unnest(%(cases)s::uuid[]) AS w (case_id) JOIN case_chunks c ON c.case_id = w.case_id)"
              if case_ids is not None else "case_chunks")
    # each source a semi-join of its own (the planner hashes or probes by size), united
    found = conn.execute(
        "WITH waiting AS MATERIALIZED ("
        f" SELECT c.case_id, c.chunk_index, c.token_count, c.text_sha256 FROM {chunks} AS c"
        f" WHERE NOT EXISTS (SELECT 1 FROM {table} e WHERE e.case_id = c.case_id AND e.chunk_index = c.chunk_index"
        "                  AND e.model = %(model)s)"
        "   AND NOT EXISTS (SELECT 1 FROM batch_items i WHERE i.flow = %(flow)s"
        "                  AND i.subject_key = c.case_id::text || ':' || c.chunk_index"
        "                  AND i.state = ANY(%(open)s)))"
        " INSERT INTO cache_hits (case_id, chunk_index, tokens, text_sha256)"
        " SELECT w.* FROM waiting w WHERE EXISTS (SELECT 1 FROM case_chunks o JOIN "
        f"{table} e ON e.case_id = o.case_id AND e.chunk_index = o.chunk_index AND e.model = %(model)s"
        "   AND e.text_sha256 = o.text_sha256 WHERE o.text_sha256 = w.text_sha256)"
        " UNION"
        " SELECT w.* FROM waiting w WHERE EXISTS (SELECT 1 FROM vector_cache v WHERE v.provider = %(provider)s"
        "   AND v.model = %(model)s AND v.dimensions = %(dims)s AND v.text_sha256 = w.text_sha256)",
        params,
    ).rowcount
    if not found:
        return Savings()
    upsert = (" ON CONFLICT (case_id, chunk_index, model) DO UPDATE"
              " SET embedding = excluded.embedding, text_sha256 = excluded.text_sha256")
    conn.execute(  # from the vector table first, then what the vector table no longer holds
        f"INSERT INTO {table} (case_id, chunk_index, model, embedding, text_sha256)"
        " SELECT h.case_id, h.chunk_index, %(model)s, s.embedding, h.text_sha256 FROM cache_hits h"
        " CROSS JOIN LATERAL (SELECT e.embedding FROM case_chunks o JOIN "
        f"{table} e ON e.case_id = o.case_id AND e.chunk_index = o.chunk_index AND e.model = %(model)s"
        "   AND e.text_sha256 = o.text_sha256 WHERE o.text_sha256 = h.text_sha256 LIMIT 1) AS s" + upsert,
        params,
    )
    conn.execute(
        f"INSERT INTO {table} (case_id, chunk_index, model, embedding, text_sha256)"
        " SELECT h.case_id, h.chunk_index, %(model)s, v.embedding, h.text_sha256 FROM cache_hits h"
        " JOIN vector_cache v ON v.provider = %(provider)s AND v.model = %(model)s AND v.dimensions = %(dims)s"
        "  AND v.text_sha256 = h.text_sha256"
        f" WHERE NOT EXISTS (SELECT 1 FROM {table} e WHERE e.case_id = h.case_id AND e.chunk_index = h.chunk_index"
        "                  AND e.model = %(model)s)" + upsert,
        params,
    )
    ledger.record_served_subjects(
        conn, flow, "SELECT case_id::text || ':' || chunk_index, 'chunk-' || case_id || '-' || chunk_index, tokens"
        " FROM cache_hits", {})
    tokens = conn.execute("SELECT coalesce(sum(tokens), 0) FROM cache_hits").fetchone()[0]
    saved = Savings(found, int(tokens), price(key.model, input_tokens=int(tokens)).batch_usd)
    conn.execute("INSERT INTO cache_savings (flow, provider, model, requests, tokens, saved_usd)"
                 " VALUES (%s, %s, %s, %s, %s, %s)",
                 (flow, key.provider, key.model, saved.requests, saved.tokens, saved.usd))
    return saved


def savings(conn: psycopg.Connection, *, flow: str | None = None, since: datetime | None = None) -> Savings:
    """What the cache saved (of `flow`, since `since`; all when None)."""
    requests, tokens, usd = conn.execute(
        "SELECT coalesce(sum(requests), 0), coalesce(sum(tokens), 0), coalesce(sum(saved_usd), 0) FROM cache_savings"
        " WHERE (%(flow)s::text IS NULL OR flow = %(flow)s) AND (%(since)s::timestamptz IS NULL OR served_at >= %(since)s)",
        {"flow": flow, "since": since},
    ).fetchone()
    return Savings(int(requests), int(tokens), Decimal(usd))
