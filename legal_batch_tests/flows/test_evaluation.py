"""`legal-batch eval`: recall@k, MRR and nDCG@10 of the stored embeddings for a file of queries — the
query file formats and their bad lines, the figures on known rankings, and an evaluation of real
local-model vectors in pgvector through the command."""

from __future__ import annotations

import json
import math
import uuid
from pathlib import Path

import psycopg
import pytest

from legal_batch.core.chunking import chunk_text
from legal_batch.core.corpus_import import ID_NAMESPACE
from legal_batch.core.errors import UserError
from legal_batch.flows.embeddings.evaluation import QueryScore, evaluate, figures_of, read_queries
from legal_batch.providers.base import EmbeddingRequest
from legal_batch.providers.local import LocalProvider
from legal_batch.sinks.base import VectorRecord, chunk_metadata
from legal_batch.sinks.pgvector import PgvectorSink
from legal_batch_tests.test_cli_errors import assert_one_line, run_main

MODEL = "local-lexical-v1"
CASES = {
    "HK-1": "The appellant was convicted of trafficking in a dangerous drug, 1.2 kg of methamphetamine found in a "
            "suitcase at the boundary. The appeal against sentence is dismissed.",
    "US-2": "Officers stopped the defendant for speeding and searched the car with his consent. A general consent "
            "to search a vehicle extends to closed containers inside it. Affirmed.",
    "ZH-3": "经审理查明，被告人张某于2019年5月进入被害人住所，窃取现金及手机。本院认为，被告人的行为已构成盗窃罪。",
    "UK-4": "The claimant fenced a garden and used it openly for twelve years; adverse possession of the land was "
            "established and the registered owner's title was extinguished.",
}


def _uuid(source_id: str) -> str:
    return str(uuid.uuid5(ID_NAMESPACE, source_id))


def _write(path: Path, lines: list[object]) -> Path:
    path.write_bytes(b"".join((line if isinstance(line, bytes) else
                               (line if isinstance(line, str) else json.dumps(line, ensure_ascii=False)).encode())
                              + b"\n" for line in lines))
    return path


# -- figures --------------------------------------------------------------------------------------------

def test_figures_of_known_rankings():
    scores = [QueryScore(1, "a", (1,)), QueryScore(2, "b", (3,)), QueryScore(3, "c", ()),
              QueryScore(4, "d", (2, 7))]
    figures = figures_of(scores, [1, 1, 1, 2], k=10)
    assert figures["recall_at_1"] == 0.25
    assert figures["recall_at_5"] == round((1 + 1 + 0 + 0.5) / 4, 4)
    assert figures["recall_at_10"] == round((1 + 1 + 0 + 1) / 4, 4)
    assert figures["mrr"] == round((1 + 1 / 3 + 0 + 1 / 2) / 4, 4)
    ideal_two = 1 + 1 / math.log2(3)
    expected = (1 + 1 / math.log2(4) + 0 + (1 / math.log2(3) + 1 / math.log2(8)) / ideal_two) / 4
    assert figures["ndcg_at_10"] == round(expected, 4)
    assert list(figures_of(scores, [1, 1, 1, 2], k=20)) == ["recall_at_1", "recall_at_5", "recall_at_10",
                                                           "recall_at_20", "mrr", "ndcg_at_20"]


# -- query files ----------------------------------------------------------------------------------------

def test_query_files_in_the_corpus_form_the_generic_form_and_by_chunk(tmp_path: Path):
    case_uuid = str(uuid.uuid4())
    path = _write(tmp_path / "q.jsonl", [
        {"query": "drug courier sentence", "expected_id": "HK-1"},
        "",
        {"query": "consent to search a car", "case_ids": ["US-2", case_uuid.upper(), 42]},
        {"query": "盗窃", "chunk_ids": ["ZH-3:0", f"{case_uuid}:2", "courtlistener:4151829:1"]},
    ])
    parsed = read_queries(path)
    assert parsed.bad_lines == ()
    first, second, third = parsed.queries
    assert (first.line, first.case_ids, first.given) == (1, (_uuid("HK-1"),), ("HK-1",))
    assert second.line == 3 and second.case_ids == (_uuid("US-2"), case_uuid, _uuid("42"))
    assert third.chunk_ids == (f"{_uuid('ZH-3')}:0", f"{case_uuid}:2", f"{_uuid('courtlistener:4151829')}:1")


def test_the_shared_corpora_query_files_read_without_a_bad_line():
    for path in sorted(Path("/work/shared/corpora").glob("*_queries.jsonl")):
        parsed = read_queries(path)
        assert len(parsed.queries) >= 10 and parsed.bad_lines == ()


def test_bad_lines_are_named_by_file_and_line_and_the_rest_is_read(tmp_path: Path):
    path = _write(tmp_path / "q.jsonl", [
        {"query": "fine", "case_ids": ["A"]},
        "{oops",
        [1, 2],
        {"query": "  ", "case_ids": ["A"]},
        {"query": "no ids"},
        {"query": "both", "case_ids": ["A"], "chunk_ids": ["A:1"]},
        {"query": "bad chunk", "chunk_ids": ["A"]},
        {"query": "bad case", "case_ids": [True]},
        {"query": "not a list", "case_ids": "A"},
        json.dumps({"query": "société", "case_ids": ["A"]}, ensure_ascii=False).encode("cp1252"),
    ])
    parsed = read_queries(path)
    assert [q.text for q in parsed.queries] == ["fine"]
    reasons = [str(bad).removeprefix(f"{path}:") for bad in parsed.bad_lines]
    assert reasons[0].startswith("2: not JSON (")
    assert reasons[1:9] == [
        "3: not a JSON object but a JSON list",
        '4: no query: give the text to search for as "query": "..."',
        '5: no expected ids: give "case_ids": [...], "expected_id": "..." or "chunk_ids": ["<case id>:<index>"]',
        "6: both 'case_ids' and 'chunk_ids': give the cases or the chunks the query should find, not both",
        "7: chunk id 'A' is not \"<case id>:<chunk index>\"",
        "8: case id True is not a string, a whole number or a UUID",
        "9: 'case_ids' is a JSON str, not a list of ids",
        "10: the line is not UTF-8 (byte 0xE9 at byte 16); it looks like Windows-1252 (Latin-1): convert the file "
        "to UTF-8, e.g. iconv -f WINDOWS-1252 -t UTF-8",
    ]


def test_a_missing_file_or_one_without_a_query_is_a_user_error(tmp_path: Path):
    with pytest.raises(UserError, match="QUERIES '.*nowhere.jsonl' does not exist"):
        read_queries(tmp_path / "nowhere.jsonl")
    with pytest.raises(UserError, match=r"holds no usable query \(.*q.jsonl:1: no query"):
        read_queries(_write(tmp_path / "q.jsonl", [{"case_ids": ["A"]}]))


# -- an evaluation of stored vectors ------------------------------------------------------------------

@pytest.fixture
def embedded(conn: psycopg.Connection, lb_env) -> PgvectorSink:
    """The four cases, chunked and embedded by the local model into case_embeddings."""
    provider = LocalProvider(lb_env.home_dir / "local_provider")
    sink = PgvectorSink(conn, model=MODEL, dimensions=1024)
    with conn.transaction():
        for source_id, text in CASES.items():
            case_id = _uuid(source_id)
            conn.execute("INSERT INTO court_cases (id, case_name, full_text) VALUES (%s, %s, %s)",
                         (case_id, source_id, text))
            chunks = chunk_text(text, max_tokens=24, overlap_tokens=4)
            for chunk in chunks:
                conn.execute("INSERT INTO case_chunks (case_id, chunk_index, chunk_type, chunk_text, char_start, char_end,"
                             " token_count, text_sha256) VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
                             (case_id, chunk.chunk_index, chunk.chunk_type, chunk.text, chunk.char_start,
                              chunk.char_end, chunk.token_count, chunk.sha256))
            results = provider.realtime([EmbeddingRequest(f"c{c.chunk_index}", c.text) for c in chunks],
                                        endpoint="embeddings", model=MODEL)
            records = [VectorRecord(case_id, chunk.chunk_index, result.vector, chunk.text, chunk_metadata(
                record_id=case_id, chunk_index=chunk.chunk_index, model=MODEL, text=chunk.text))
                for chunk, result in zip(chunks, results, strict=True)]
            assert sink.upsert(records) == []
    return sink


def test_evaluate_scores_queries_against_the_sink(embedded: PgvectorSink, lb_env, tmp_path: Path):
    path = _write(tmp_path / "q.jsonl", [
        {"query": "methamphetamine courier at the boundary, sentence appeal", "expected_id": "HK-1"},
        {"query": "consent to search closed containers in a vehicle", "case_ids": ["US-2"]},
        {"query": "被告人窃取现金构成盗窃罪", "case_ids": ["ZH-3"]},
        {"query": "fenced garden twelve years adverse possession", "case_ids": ["UK-4", "NOT-STORED"]},
        {"query": "the of and", "case_ids": ["HK-1"]},
        {"query": "consent search chunk", "chunk_ids": ["US-2:0", "US-2:1"]},
    ])
    provider = LocalProvider(lb_env.home_dir / "local_provider")
    result = evaluate(read_queries(path), provider=provider, model=MODEL, sink=embedded, k=10)
    ranks = {score.line: score.ranks for score in result.scores}
    assert ranks[1] == (1,) and ranks[2] == (1,) and ranks[3] == (1,)
    assert ranks[4] == (1,), "the stored case is found; the unknown one cannot be"
    assert ranks[5] == () and result.not_embedded == 1, "a query without features scores 0, not a match at 1.000"
    assert ranks[6] and min(ranks[6]) <= 2
    assert result.missing == ("4: NOT-STORED",)
    assert result.figures["recall_at_1"] == round((1 + 1 + 1 + 0.5 + 0 + sum(r <= 1 for r in ranks[6]) / 2) / 6, 4)
    assert result.figures["mrr"] == round((4 + 0 + 1 / min(ranks[6])) / 6, 4)
    assert result.as_dict()["queries"] == 6 and result.as_dict()["sink"] == "case_embeddings"


# -- the command ------------------------------------------------------------------------------------------

def test_the_command_prints_a_table_and_json_and_exits_1_for_bad_lines(embedded, capsys, monkeypatch, tmp_path):
    path = _write(tmp_path / "q.jsonl", [
        {"query": "methamphetamine courier at the boundary", "expected_id": "HK-1"},
        {"query": "adverse possession of a fenced garden", "case_ids": ["UK-4"]},
    ])
    code, out, err = run_main(capsys, monkeypatch, "eval", str(path))
    assert code == 0, err
    assert f"retrieval quality of {MODEL} in case_embeddings (2 queries of {path})" in out
    for column in ("recall@1", "recall@5", "recall@10", "MRR", "nDCG@10"):
        assert column in out
    assert "1.000" in out

    code, out, err = run_main(capsys, monkeypatch, "eval", str(path), "--json", "--k", "5")
    assert code == 0, err
    figures = json.loads(out)
    assert figures["recall_at_1"] == 1.0 and figures["ndcg_at_5"] == 1.0 and figures["queries"] == 2
    assert "recall_at_10" not in figures and figures["model"] == MODEL

    _write(path, [{"query": "adverse possession of a fenced garden", "case_ids": ["UK-4"]}, "{oops"])
    code, out, err = run_main(capsys, monkeypatch, "eval", str(path))
    assert code == 1
    assert err.startswith(f"{path}:2: not JSON (")
    assert "1 line of" in out and "left out" in out


@pytest.mark.parametrize(("args", "words"), [
    (["eval", "nowhere.jsonl"], ["QUERIES 'nowhere.jsonl' does not exist"]),
    (["eval", "{file}", "--k", "0"], ["--k 0 is out of range"]),
    (["eval", "{file}", "--sink", "elastic"], ["--sink='elastic'", "unknown sink 'elastic'"]),
    (["eval", "{file}", "--model", "other-model"], ["no vectors of other-model in case_embeddings"]),
])
def test_a_user_mistake_is_one_line_with_exit_code_2(embedded, capsys, monkeypatch, tmp_path, args, words):
    path = _write(tmp_path / "q.jsonl", [{"query": "drug", "case_ids": ["HK-1"]}])
    code, _, err = run_main(capsys, monkeypatch, *[arg.replace("{file}", str(path)) for arg in args])
    assert_one_line(code, err, *words)
