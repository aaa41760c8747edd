"""Streaming JSONL: read line by line with line numbers, write atomically (a full disk is one line
that says where and what to do, with no partial file left behind)."""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

import orjson

from legal_batch.core.errors import UserError

_BOM = b"\xef\xbb\xbf"
_READ_BUFFER = 1 << 20


def iter_lines(path: Path, *, start: int = 0, end: int | None = None) -> Iterator[tuple[int, bytes]]:
    """(1-based line number, raw line without newline) for every non-blank line; a BOM is dropped.
    With `start`/`end` (byte offsets of line starts, see `line_ranges`): the lines that start in
    [start, end), numbered from 1 at `start`.

    Reads through a 1 MiB buffer: output lines are ~22 KB, and the default 8 KiB buffer costs several
    reads (each one a chance for another thread to take the GIL) per line."""
    with path.open("rb", buffering=_READ_BUFFER) as handle:
        handle.seek(start)
        left = None if end is None else end - start
        for number, line in enumerate(handle, start=1):
            if left is not None:
                if left <= 0:
                    break
                left -= len(line)
            if number == 1 and start == 0 and line.startswith(_BOM):
                line = line[len(_BOM) :]
            stripped = line.strip()
            if stripped:
                yield number, stripped


def line_ranges(path: Path, *, size: int) -> list[tuple[int, int]]:
    """The file cut into byte ranges of about `size` bytes, each starting at a line start, covering it
    exactly: [(0, b1), (b1, b2), ..., (bn, file size)]."""
    total = path.stat().st_size
    bounds = [0]
    with path.open("rb") as handle:
        while bounds[-1] + size < total:
            handle.seek(bounds[-1] + size)
            handle.readline()  # to the start of the next line
            if handle.tell() >= total:
                break
            bounds.append(handle.tell())
    return list(zip(bounds, [*bounds[1:], total], strict=True))


def iter_objects(path: Path, *, start: int = 0, end: int | None = None
                 ) -> Iterator[tuple[int, dict | None, str | None]]:
    """(line number, object, None) for each line holding a JSON object, or (line number, None, why)
    for a line that does not — so a caller reports the line instead of stopping at it. `start` and
    `end` as for `iter_lines`."""
    for number, raw in iter_lines(path, start=start, end=end):
        try:
            obj = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            yield number, None, f"line is not valid JSON ({exc})"
            continue
        if isinstance(obj, dict):
            yield number, obj, None
        else:
            yield number, None, "line is not a JSON object"


def dumps_line(obj: object) -> bytes:
    return orjson.dumps(obj) + b"\n"


@contextmanager
def atomic_writer(path: Path) -> Iterator[BinaryIO]:
    """Write to `path.tmp`, then rename: readers never see a half-written file. If anything fails the
    `.tmp` file is removed; a full disk (or quota) raises `DiskFull`."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tmp.open("wb") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) and (full := disk_full(path, exc)) is not None:
            raise full from exc
        raise


class DiskFull(UserError):
    """A file could not be written because its disk (or the user's quota on it) is full."""


_DISK_FULL = {errno.ENOSPC: "no space left on its disk", errno.EDQUOT: "the disk quota is exceeded"}


def disk_full(path: Path, exc: OSError) -> DiskFull | None:
    """The error to raise when writing `path` failed with `exc`: for a full disk or quota, one line
    naming the file, the space left and what to do; None for any other failure. The caller has
    removed the partial file."""
    what = _DISK_FULL.get(exc.errno or 0)
    if what is None:
        return None
    where = path.parent
    while not where.exists() and where != where.parent:
        where = where.parent
    try:
        free = f"{shutil.disk_usage(where).free / 1e6:,.1f} MB free"
    except OSError:
        free = "free space unknown"
    return DiskFull(f"cannot write {path}: {what} ({free} under {where}); the partial file was removed and nothing "
                    "was recorded for it. Free space there, or point LEGAL_BATCH_HOME (request and output files live "
                    "in its files/ folder) at a bigger disk, then run again: the shard resumes where it stopped")
