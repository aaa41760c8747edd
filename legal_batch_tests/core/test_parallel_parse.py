"""Parsing a result file in worker processes gives what a sequential read gives: the same results,
vectors bit for bit, file:line, errors and order."""

from __future__ import annotations

import base64
from pathlib import Path

import numpy as np
import orjson

from legal_batch.core import parallel_parse
from legal_batch.core.jsonl import line_ranges
from legal_batch.providers import openai_format


def _output_file(path: Path, lines: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    vectors: dict[str, np.ndarray] = {}
    with path.open("wb") as out:
        out.write(b"\xef\xbb\xbf")  # a BOM on the first line, dropped
        for n in range(lines):
            custom_id = f"chunk-{n}"
            vector = rng.standard_normal(64).astype(np.float32)
            vectors[custom_id] = vector
            embedding: object = (base64.b64encode(vector.astype("<f4").tobytes()).decode() if n % 2
                                 else vector.astype(np.float64).tolist())
            if n == 7:
                embedding = [0.5, "0.5"]  # a string among the numbers
            if n == 11:
                embedding = "not base64!"
            body = {"data": [{"embedding": embedding}], "usage": {"prompt_tokens": n}}
            line = orjson.dumps({"custom_id": custom_id, "response": {"status_code": 200, "body": body},
                                 "error": None})
            if n == 23:
                line = line[: len(line) // 2]  # cut short: not JSON
            if n == 31:
                out.write(b"\n")  # a blank line still counts
            out.write(line + b"\n")
    return vectors


def _fields(results: list) -> list[tuple]:
    return [(r.custom_id, r.source, r.line_no, None if r.vector is None else r.vector.tolist(), r.error,
             r.retryable, r.input_tokens) for r in results]


def test_ranges_cover_the_file_at_line_starts(tmp_path: Path) -> None:
    path = tmp_path / "output.jsonl"
    _output_file(path, 50)
    content = path.read_bytes()
    ranges = line_ranges(path, size=1_000)
    assert len(ranges) > 5 and ranges[0][0] == 0 and ranges[-1][1] == len(content)
    assert all(end == next_start for (_, end), (next_start, _) in zip(ranges, ranges[1:], strict=False))
    assert all(content[start - 1:start] == b"\n" for start, _ in ranges[1:])


def test_workers_give_the_sequential_results_in_file_order(tmp_path: Path) -> None:
    path = tmp_path / "output.jsonl"
    vectors = _output_file(path, 200)

    sequential = list(openai_format.iter_results([path], endpoint="embeddings"))
    parallel = list(parallel_parse.iter_parsed(path, openai_format.parse_range, "embeddings", workers=2,
                                               range_bytes=2_000))

    assert _fields(parallel) == _fields(sequential)
    assert len(parallel) == 200 and parallel[-1].line_no == 201  # the blank line counted
    by_id = {r.custom_id: r for r in parallel}
    assert np.array_equal(by_id["chunk-1"].vector, vectors["chunk-1"])  # base64
    assert np.array_equal(by_id["chunk-2"].vector, vectors["chunk-2"])  # floats
    assert "not a list of numbers" in by_id["chunk-7"].error and by_id["chunk-7"].where == "output.jsonl:8"
    assert "not valid base64" in by_id["chunk-11"].error and by_id["chunk-11"].where == "output.jsonl:12"
    assert next(r for r in parallel if r.custom_id is None).where == "output.jsonl:24"


def test_a_large_file_is_parsed_by_workers_through_iter_results(tmp_path: Path, monkeypatch) -> None:
    path = tmp_path / "output.jsonl"
    _output_file(path, 60)
    monkeypatch.setattr(parallel_parse, "MIN_FILE_BYTES", 0)
    monkeypatch.setattr(parallel_parse, "RANGE_BYTES", 1_500)

    assert _fields(list(openai_format.iter_results([path], endpoint="embeddings", workers=2))) == _fields(
        list(openai_format.iter_results([path], endpoint="embeddings")))
