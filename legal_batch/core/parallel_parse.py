"""Parsing one large result file on every core, results still in file order.

The file is cut into line-aligned byte ranges (`jsonl.line_ranges`); worker processes parse them
with a provider's range parser, a few ranges ahead of the consumer, and send each range's results
back packed (the vectors as one float32 block, the rest as plain tuples). The consumer gets the
same `Result`s, with the same file:line, in the same order as a sequential read — so "the first
result for an id wins" and every error location mean what they meant — while it writes what came
before. Memory holds at most `2 × workers` ranges, whatever the file's size.
"""

from __future__ import annotations

import multiprocessing
import sys
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from legal_batch.core.jsonl import line_ranges
from legal_batch.providers.base import Result

RANGE_BYTES = 8 << 20
"""Bytes of file per task: ~1,400 base64 or ~380 JSON-float embedding lines."""
MIN_FILE_BYTES = 64 << 20
"""Smaller files are parsed in the calling process: starting workers (~0.5 s) would cost more."""

RangeParser = Callable[..., list[Result]]
"""`parse(path, start, end, *args)`: the results of the lines starting in [start, end), numbered
from 1 at `start`. A module-level function (it is sent to worker processes by name)."""

_Packed = tuple[list[tuple], np.ndarray, int]


def usable() -> bool:
    """Whether worker processes can start here: they are spawned, and a spawned process first
    imports the main module from its file (not possible for a program read from standard input)."""
    main_file = getattr(sys.modules.get("__main__"), "__file__", None)
    return main_file is None or Path(main_file).is_file()


def iter_parsed(path: Path, parse: RangeParser, *args: Any, workers: int,
                range_bytes: int | None = None) -> Iterator[Result]:
    """The results of `path`, parsed by `workers` processes, in file order (`range_bytes` a task,
    default `RANGE_BYTES`)."""
    ranges = line_ranges(path, size=range_bytes or RANGE_BYTES)
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"))
    pending: deque[Future[_Packed]] = deque()
    lines_before = 0
    try:
        for start, end in ranges:
            pending.append(pool.submit(_parse_packed, parse, str(path), start, end, args))
            if len(pending) >= 2 * workers:
                lines_before = yield from _unpack(pending.popleft().result(), path.name, lines_before)
        while pending:
            lines_before = yield from _unpack(pending.popleft().result(), path.name, lines_before)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _parse_packed(parse: RangeParser, path: str, start: int, end: int, args: tuple) -> _Packed:
    """In a worker: parse the range and pack its results; also count its lines (blank ones too)."""
    results = parse(Path(path), start, end, *args)
    with open(path, "rb") as handle:
        handle.seek(start)
        lines = handle.read(end - start).count(b"\n")
    rows = []
    vectors = []
    for r in results:
        size = -1 if r.vector is None else int(r.vector.shape[0]) if r.vector.ndim == 1 else -2
        if size == -2:  # not a flat vector: sent as it is, for the sink to refuse with its shape
            rows.append((r.custom_id, r.line_no, r.vector, r.text, r.finish_reason, r.input_tokens,
                         r.output_tokens, r.error, r.retryable, r.extra))
            continue
        if r.vector is not None:
            vectors.append(np.asarray(r.vector, dtype=np.float32))
        rows.append((r.custom_id, r.line_no, size, r.text, r.finish_reason, r.input_tokens, r.output_tokens,
                     r.error, r.retryable, r.extra))
    block = np.concatenate(vectors) if vectors else np.empty(0, dtype=np.float32)
    return rows, block, lines


def _unpack(packed: _Packed, source: str, lines_before: int) -> Iterator[Result]:
    """Yield a range's results with file line numbers; return the lines seen so far."""
    rows, block, lines = packed
    offset = 0
    for custom_id, line_no, size, text, finish, input_tokens, output_tokens, error, retryable, extra in rows:
        if isinstance(size, np.ndarray):
            vector = size
        elif size < 0:
            vector = None
        else:
            vector = block[offset:offset + size]
            offset += size
        yield Result(custom_id, source, lines_before + line_no, vector=vector, text=text, finish_reason=finish,
                     input_tokens=input_tokens, output_tokens=output_tokens, error=error, retryable=retryable,
                     extra=extra)
    return lines_before + lines
