"""Retrieval quality of the stored embeddings: given queries with the cases (or chunks) each should
find, recall@1/5/10, MRR and nDCG@10 of what a search returns, for one model in one vector sink.

Query files are JSON Lines, one query an object (blank lines passed over, UTF-8):

- `{"query": "...", "case_ids": ["<id>", ...]}` — the cases the query should find;
- `{"query": "...", "expected_id": "<id>"}` — one case (the form of `shared/corpora/*_queries.jsonl`);
- `{"query": "...", "chunk_ids": ["<id>:<chunk index>", ...]}` — chunks (`case_chunks.chunk_index`).

An id is a `court_cases` id (a UUID), or the id the case had in the file it was imported from (its
`uuid5`, as `legal-batch cases import` stores it). A line that is not such an object is reported as
`file:line: reason` and left out; the rest are evaluated.

How a query is scored: it is embedded with the model (the provider's real-time path) and searched in
the sink (`VectorSink.search`, the index the product searches with); cases are ranked by their best
chunk, so a case appears once in a ranking (chunk queries rank chunks). With `k` the cut-off
(default 10): recall@n is the share of a query's relevant cases (or chunks) in its top n, for n in
1, 5, 10 and k; MRR is the mean of 1/rank of the first relevant one within the top k (0 beyond);
nDCG@k uses binary relevance, 1/log2(rank + 1) per relevant one, over the ideal ordering. Every figure
is a mean over the queries. A query the model cannot embed (no features) scores 0 everywhere and is
counted in `not_embedded`; an expected case with no vector in the sink is named in `missing`
(its queries score what they find).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import orjson

from legal_batch.core.corpus_files import encoding_hint
from legal_batch.core.corpus_import import case_id
from legal_batch.core.errors import UserError
from legal_batch.providers.base import BatchProvider, EmbeddingRequest
from legal_batch.sinks.base import VectorSink, split_vector_id, vector_id

CUT_OFFS = (1, 5, 10)
MAX_DEPTH = 1_000
"""Most chunks fetched for one query (pgvector's largest `hnsw.ef_search`)."""
_EMBED_BATCH = 100


@dataclass(frozen=True)
class Query:
    """One query of a query file: its text, where it is, and what it should find."""

    text: str
    line: int
    case_ids: tuple[str, ...] = ()
    """Relevant cases (canonical UUID text), for a case-level query."""
    chunk_ids: tuple[str, ...] = ()
    """Relevant chunks (`<case uuid>:<chunk index>`), for a chunk-level query."""
    given: tuple[str, ...] = ()
    """The relevant ids as the file spells them, in the same order."""

    @property
    def relevant(self) -> tuple[str, ...]:
        return self.chunk_ids or self.case_ids


@dataclass(frozen=True)
class BadLine:
    file: str
    line: int
    reason: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.reason}"


@dataclass(frozen=True)
class QueryFile:
    name: str
    queries: tuple[Query, ...]
    bad_lines: tuple[BadLine, ...] = ()


@dataclass(frozen=True)
class QueryScore:
    line: int
    query: str
    ranks: tuple[int, ...]
    """Ranks (1-based, within the top k) of the relevant cases or chunks found, best first."""
    embedded: bool = True


@dataclass(frozen=True)
class Evaluation:
    """The figures of one evaluation (see the module docstring)."""

    model: str
    sink: str
    k: int
    scores: tuple[QueryScore, ...]
    figures: dict[str, float]
    missing: tuple[str, ...] = ()
    """Expected cases (or chunks) with no vector of the model in the sink: `line: id as given`."""
    queries_file: str = ""
    bad_lines: tuple[BadLine, ...] = field(default=())

    @property
    def not_embedded(self) -> int:
        return sum(not score.embedded for score in self.scores)

    def as_dict(self) -> dict:
        return {
            "queries_file": self.queries_file, "model": self.model, "sink": self.sink, "k": self.k,
            "queries": len(self.scores), **self.figures, "not_embedded": self.not_embedded,
            "missing_expected_ids": list(self.missing), "bad_lines": [str(bad) for bad in self.bad_lines],
            "ranks": [{"line": s.line, "ranks": list(s.ranks)} for s in self.scores],
        }


def figure_names(k: int) -> list[str]:
    """The figures an evaluation at cut-off `k` reports, in table order."""
    return [f"recall_at_{n}" for n in cut_offs(k)] + ["mrr", f"ndcg_at_{k}"]


def cut_offs(k: int) -> list[int]:
    return sorted({n for n in (*CUT_OFFS, k) if n <= k})


# -- the query file ---------------------------------------------------------------------------------

def read_queries(path: str | Path) -> QueryFile:
    """The queries of a JSON Lines file (see the module docstring); bad lines are collected, not
    raised. Raises `UserError` when the file cannot be read or holds no query at all."""
    path = Path(path)
    name = str(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise UserError(f"QUERIES {name!r} does not exist: give a JSON Lines file of "
                        '{"query": ..., "case_ids": [...]} objects') from None
    except OSError as exc:
        raise UserError(f"QUERIES {name!r} cannot be read: {exc.strerror or exc}") from None
    queries: list[Query] = []
    bad: list[BadLine] = []
    for number, line in enumerate(raw.splitlines(), start=1):
        if number == 1 and line.startswith(b"\xef\xbb\xbf"):
            line = line[3:]
        if not line.strip():
            continue
        parsed = _query(line, number)
        if isinstance(parsed, str):
            bad.append(BadLine(name, number, parsed))
        else:
            queries.append(parsed)
    if not queries:
        reasons = f" ({bad[0]}{' ...' if len(bad) > 1 else ''})" if bad else ""
        raise UserError(f"QUERIES {name!r} holds no usable query{reasons}: each line must be a JSON object "
                        'such as {"query": "...", "case_ids": ["..."]}')
    return QueryFile(name, tuple(queries), tuple(bad))


def _query(line: bytes, number: int) -> Query | str:
    """The line's query, or why it is not one."""
    try:
        value = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        hint = encoding_hint(line)
        return f"the line is {hint}" if hint else f"not JSON ({exc})"
    if not isinstance(value, dict):
        return f"not a JSON object but a JSON {type(value).__name__}"
    text = value.get("query")
    if not isinstance(text, str) or not text.strip():
        return 'no query: give the text to search for as "query": "..."'
    given = [key for key in ("case_ids", "expected_id", "chunk_ids") if value.get(key) not in (None, "", [])]
    if not given:
        return 'no expected ids: give "case_ids": [...], "expected_id": "..." or "chunk_ids": ["<case id>:<index>"]'
    if len(given) > 1:
        return f"both {given[0]!r} and {given[1]!r}: give the cases or the chunks the query should find, not both"
    key = given[0]
    values = value[key] if key != "expected_id" else [value[key]]
    if not isinstance(values, list):
        return f"{key!r} is a JSON {type(values).__name__}, not a list of ids"
    ids: dict[str, str] = {}
    for item in values:
        if key == "chunk_ids":
            found = _chunk_id(item)
            if found is None:
                return f"chunk id {item!r} is not \"<case id>:<chunk index>\""
        else:
            parsed = case_id(item)
            if parsed is None:
                return f"case id {item!r} is not a string, a whole number or a UUID"
            found = str(parsed[0])
        ids.setdefault(found, str(item))
    if key == "chunk_ids":
        return Query(text.strip(), number, chunk_ids=tuple(ids), given=tuple(ids.values()))
    return Query(text.strip(), number, case_ids=tuple(ids), given=tuple(ids.values()))


def _chunk_id(value: object) -> str | None:
    if not isinstance(value, str):
        return None
    try:
        record, index = split_vector_id(value)
    except ValueError:
        return None
    found = case_id(record)
    return None if found is None or index < 0 else vector_id(str(found[0]), index)


# -- scoring ----------------------------------------------------------------------------------------

def figures_of(scores: Sequence[QueryScore], relevant: Sequence[int], *, k: int) -> dict[str, float]:
    """recall@n (n in `cut_offs(k)`), MRR and nDCG@k of queries whose relevant items were found at
    `scores[i].ranks` out of `relevant[i]` relevant ones (see the module docstring), rounded to 4 places."""
    count = len(scores) or 1
    figures: dict[str, float] = {}
    for n in cut_offs(k):
        figures[f"recall_at_{n}"] = sum(sum(r <= n for r in s.ranks) / max(total, 1)
                                        for s, total in zip(scores, relevant, strict=True)) / count
    figures["mrr"] = sum(1 / min(s.ranks) for s in scores if s.ranks) / count
    figures[f"ndcg_at_{k}"] = sum(
        sum(1 / math.log2(r + 1) for r in s.ranks if r <= k)
        / sum(1 / math.log2(i + 2) for i in range(min(max(total, 1), k)))
        for s, total in zip(scores, relevant, strict=True)) / count
    return {name: round(value, 4) for name, value in figures.items()}


Search = Callable[[np.ndarray, int], Sequence[tuple[str, int]]]
"""(query vector, chunks wanted) → (case id, chunk index) of the nearest chunks, best first."""


def sink_search(sink: VectorSink) -> Search:
    """`Search` by the sink's own index (`VectorSink.search`)."""
    return lambda vector, depth: [(hit.record_id, hit.chunk_index) for hit in sink.search(vector, k=depth)]


def ranking(search: Search, vector: np.ndarray, *, k: int, by_case: bool) -> list[str]:
    """The top `k` case ids (each case by its best chunk), or chunk ids, for one query vector. Fetches
    10·k chunks (at least 50), more while they hold fewer than k cases, up to `MAX_DEPTH`."""
    depth = min(max(10 * k, 50), MAX_DEPTH)
    while True:
        hits = search(vector, depth)
        ranked = list(dict.fromkeys(str(case) if by_case else vector_id(str(case), index) for case, index in hits))
        if len(ranked) >= k or len(hits) < depth or depth >= MAX_DEPTH:
            return ranked[:k]
        depth = min(depth * 2, MAX_DEPTH)


def embed_queries(provider: BatchProvider, texts: Sequence[str], *, model: str) -> Iterator[np.ndarray | None]:
    """Each text's query vector, in order (None for one the model cannot embed), by the provider's
    real-time path in batches of `_EMBED_BATCH`."""
    for start in range(0, len(texts), _EMBED_BATCH):
        batch = texts[start:start + _EMBED_BATCH]
        requests = [EmbeddingRequest(f"q{start + n}", text) for n, text in enumerate(batch)]
        vectors = {result.custom_id: result.vector
                   for result in provider.realtime(requests, endpoint="embeddings", model=model)}
        yield from (vectors.get(request.custom_id) for request in requests)


def evaluate(queries: QueryFile, *, provider: BatchProvider, model: str, sink: VectorSink, k: int = 10,
             on_query: Callable[[int], None] | None = None) -> Evaluation:
    """Score every query of `queries` against `model`'s vectors in `sink` (module docstring)."""
    if k < 1:
        raise UserError(f"--k {k} is out of range: give 1 or more")
    search = sink_search(sink)
    scores: list[QueryScore] = []
    for query, vector in zip(queries.queries, embed_queries(provider, [q.text for q in queries.queries],
                                                            model=model), strict=True):
        if vector is None:
            scores.append(QueryScore(query.line, query.text, (), embedded=False))
        else:
            ranked = ranking(search, vector, k=k, by_case=not query.chunk_ids)
            relevant = set(query.relevant)
            scores.append(QueryScore(query.line, query.text,
                                     tuple(rank for rank, item in enumerate(ranked, start=1) if item in relevant)))
        if on_query is not None:
            on_query(len(scores))
    figures = figures_of(scores, [len(q.relevant) for q in queries.queries], k=k)
    return Evaluation(model=model, sink=sink.where, k=k, scores=tuple(scores), figures=figures,
                      missing=_missing(queries.queries, sink), queries_file=queries.name,
                      bad_lines=queries.bad_lines)


def _missing(queries: Sequence[Query], sink: VectorSink) -> tuple[str, ...]:
    """`line: id` of each expected case (probed by its chunk 0) or chunk with no vector in the sink."""
    probes = list(dict.fromkeys(item if query.chunk_ids else vector_id(item, 0)
                                for query in queries for item in query.relevant))
    stored: set[str] = set()
    for start in range(0, len(probes), 1_000):
        stored |= sink.contains(probes[start:start + 1_000])
    return tuple(f"{query.line}: {given}" for query in queries
                 for item, given in zip(query.relevant, query.given, strict=True)
                 if (item if query.chunk_ids else vector_id(item, 0)) not in stored)
