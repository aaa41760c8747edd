"""Tabular inputs and outputs: find the files, stream their rows, write results alongside.

Supported: ``.csv``, ``.tsv``, ``.parquet`` and their ``.gz`` forms. An input is one file, a
folder of such files, or a folder with ``train/``, ``val/`` and ``test/`` subfolders. CSV and
TSV cells are read as text exactly as written ("007" stays "007", an empty cell stays "");
Parquet columns keep their Arrow types. Outputs mirror the input's relative path, format and
compression.
"""

from __future__ import annotations

import csv
import gzip
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Literal

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from legal_batch.flows.template.errors import TemplateError

__all__ = [
    "SPLITS",
    "InputFile",
    "TabularFormat",
    "TabularWriter",
    "discover_inputs",
    "output_path",
    "read_rows",
]

TabularFormat = Literal["csv", "tsv", "parquet"]
SPLITS = ("train", "val", "test")
_FORMATS: dict[str, TabularFormat] = {".csv": "csv", ".tsv": "tsv", ".parquet": "parquet"}
_SUPPORTED = ".csv, .tsv, .parquet (optionally .gz)"
_SEPARATORS = {"csv": ",", "tsv": "\t"}


@dataclass(frozen=True)
class InputFile:
    """One input file; ``split`` is ``"train"``/``"val"``/``"test"`` when it sits in such a folder."""

    path: Path
    split: str | None
    format: TabularFormat
    compressed: bool


def discover_inputs(path: str | Path) -> list[InputFile]:
    """List the input files under ``path``, in split order then name order.

    ``path`` is a file, a folder of files, or a folder with ``train/``, ``val/``, ``test/``
    subfolders (files beside them have no split). Hidden files and ``*.json`` files (a
    ``prompts.json`` or schema kept with the data) are skipped in folders. Raises
    ``TemplateError`` for a missing path, an unsupported file, an unexpected subfolder, or no files.
    """
    root = Path(path)
    if root.is_file():
        return [_input_file(root, split=None)]
    if not root.is_dir():
        raise TemplateError(f"input path {root} does not exist")
    found = [_input_file(file, split=None) for file in _data_files(root, split_folders=True)]
    for split in SPLITS:
        if (root / split).is_dir():
            found.extend(
                _input_file(file, split=split) for file in _data_files(root / split, split_folders=False)
            )
    if not found:
        raise TemplateError(
            f"input folder {root} holds no data files; add {_SUPPORTED} files to it "
            "or to train/, val/, test/ subfolders"
        )
    return found


def _data_files(folder: Path, *, split_folders: bool) -> list[Path]:
    """Data files directly in ``folder``; with ``split_folders``, train/val/test are left to the caller."""
    files = []
    for entry in sorted(folder.iterdir()):
        if entry.name.startswith(".") or (entry.is_file() and entry.suffix.lower() == ".json"):
            continue
        if entry.is_dir():
            if split_folders and entry.name in SPLITS:
                continue
            expected = "files or train/, val/, test/ subfolders" if split_folders else "only data files"
            raise TemplateError(f"unexpected folder {entry} in input {folder}; expected {expected}")
        files.append(entry)
    return files


def _input_file(path: Path, *, split: str | None) -> InputFile:
    name = path.name.lower()
    compressed = name.endswith(".gz")
    stem = name.removesuffix(".gz")
    for suffix, file_format in _FORMATS.items():
        if stem.endswith(suffix) and len(stem) > len(suffix):
            return InputFile(path=path, split=split, format=file_format, compressed=compressed)
    raise TemplateError(f"unsupported input file {path}; supported formats: {_SUPPORTED}")


def read_rows(input_file: InputFile, *, chunk_rows: int = 10_000) -> Iterator[pd.DataFrame]:
    """Stream ``input_file`` as DataFrames of at most ``chunk_rows`` rows.

    CSV/TSV columns are all text (``dtype=str``, no NA conversion); Parquet columns are
    ``pandas.ArrowDtype`` so they are written back with their original types. Raises
    ``TemplateError`` naming the file when it has no rows or cannot be read.
    """
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be at least 1, got {chunk_rows}")
    path = input_file.path
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise TemplateError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if size == 0:
        raise TemplateError(f"{path} has no rows (the file is empty)")
    chunks = (
        _read_parquet(input_file, chunk_rows)
        if input_file.format == "parquet"
        else _read_text(input_file, chunk_rows)
    )
    rows = 0
    for chunk in chunks:
        if len(chunk):
            rows += len(chunk)
            yield chunk
    if rows == 0:
        detail = "only a column header" if input_file.format != "parquet" else "a schema but no rows"
        raise TemplateError(f"{path} has no rows (it holds {detail})")


def _read_text(input_file: InputFile, chunk_rows: int) -> Iterator[pd.DataFrame]:
    path = input_file.path
    try:
        reader = pd.read_csv(
            path,
            sep=_SEPARATORS[input_file.format],
            dtype=str,
            keep_default_na=False,
            na_filter=False,
            chunksize=chunk_rows,
            compression="gzip" if input_file.compressed else None,
            encoding="utf-8",
        )
        with reader:
            yield from reader
    except pd.errors.EmptyDataError:
        raise TemplateError(f"{path} has no rows (the file is empty)") from None
    except pd.errors.ParserError as exc:
        raise TemplateError(f"cannot parse {path}: {str(exc).strip()}") from exc
    except UnicodeDecodeError as exc:
        raise TemplateError(f"{path} is not UTF-8 text ({exc.reason}); save it as UTF-8") from exc
    except (OSError, EOFError) as exc:
        raise TemplateError(f"cannot read {path}: {exc}") from exc


def _read_parquet(input_file: InputFile, chunk_rows: int) -> Iterator[pd.DataFrame]:
    path = input_file.path
    with tempfile.TemporaryDirectory(prefix="legal_batch_") as scratch:
        source = path
        if input_file.compressed:
            # Parquet needs random access; gunzip to scratch space rather than into memory.
            source = Path(scratch) / path.name.removesuffix(".gz")
            try:
                with gzip.open(path, "rb") as packed, source.open("wb") as plain:
                    shutil.copyfileobj(packed, plain)
            except (OSError, EOFError) as exc:
                raise TemplateError(f"cannot decompress {path}: {exc}") from exc
        try:
            with pq.ParquetFile(source) as parquet:
                for batch in parquet.iter_batches(batch_size=chunk_rows):
                    yield batch.to_pandas(types_mapper=pd.ArrowDtype)
        except (pa.ArrowException, OSError) as exc:
            raise TemplateError(f"cannot read Parquet file {path}: {exc}") from exc


def output_path(input_file: InputFile, input_root: str | Path, output_root: str | Path) -> Path:
    """Where ``input_file``'s results go: same relative path (and so split, format, compression).

    Raises ``TemplateError`` if that would overwrite the input.
    """
    root = Path(input_root)
    relative = Path(input_file.path.name) if root.is_file() else input_file.path.relative_to(root)
    target = Path(output_root) / relative
    if target.resolve() == input_file.path.resolve():
        raise TemplateError(
            f"output {target} would overwrite its input; choose an output folder outside {root}"
        )
    return target


class TabularWriter:
    """Write DataFrame chunks to one CSV/TSV/Parquet file, gzipped when ``compressed``.

    Use as a context manager. Chunks are appended as they come (CSV/TSV header once). Data goes
    to a hidden ``.partial`` file renamed into place on a clean exit and removed on error, so a
    file at ``path`` is always complete. Nothing is created if no chunk was written.

    Parquet column types come from the first chunk; later chunks are cast to them. A column that
    is all null in the first chunk is typed as string, so text result columns stay text.
    """

    def __init__(self, path: str | Path, format: TabularFormat, compressed: bool) -> None:
        self.path = Path(path)
        self.format: TabularFormat = format
        self.compressed = compressed
        self.rows_written = 0
        self._partial = self.path.with_name(f".{self.path.name}.partial")
        self._text: IO[str] | None = None
        self._sink: pa.NativeFile | None = None
        self._parquet: pq.ParquetWriter | None = None
        self._schema: pa.Schema | None = None

    def __enter__(self) -> TabularWriter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.close(keep=exc_type is None)

    def write(self, frame: pd.DataFrame) -> None:
        """Append one chunk; its columns must match the first chunk's."""
        if self.format == "parquet":
            self._write_parquet(frame)
        else:
            self._write_text(frame)
        self.rows_written += len(frame)

    def close(self, *, keep: bool = True) -> None:
        """Finish the file and move it into place (``keep=False``: discard it)."""
        if self._parquet is not None:
            self._parquet.close()
        for handle in (self._sink, self._text):
            if handle is not None:
                handle.close()
        self._parquet = self._sink = self._text = None
        if not self._partial.exists():
            return
        if keep:
            os.replace(self._partial, self.path)
        else:
            self._partial.unlink()

    def _write_text(self, frame: pd.DataFrame) -> None:
        header = self._text is None
        if self._text is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # Held open across write() calls; close() closes it.
            if self.compressed:
                self._text = gzip.open(self._partial, "wt", encoding="utf-8", newline="")  # noqa: SIM115
            else:
                self._text = self._partial.open("w", encoding="utf-8", newline="")  # noqa: SIM115
        frame.to_csv(
            self._text,
            sep=_SEPARATORS[self.format],
            header=header,
            index=False,
            lineterminator="\n",
            quoting=csv.QUOTE_MINIMAL,
        )

    def _write_parquet(self, frame: pd.DataFrame) -> None:
        table = pa.Table.from_pandas(frame, preserve_index=False)
        if self._parquet is None:
            self._schema = pa.schema(
                [pa.field(f.name, pa.string()) if pa.types.is_null(f.type) else f for f in table.schema]
            ).remove_metadata()
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._sink = (
                pa.CompressedOutputStream(str(self._partial), "gzip")
                if self.compressed
                else pa.OSFile(str(self._partial), "wb")
            )
            self._parquet = pq.ParquetWriter(self._sink, self._schema)
        assert self._schema is not None
        if table.column_names != self._schema.names:
            raise ValueError(
                f"{self.path}: chunk columns {table.column_names} differ from the first chunk's {self._schema.names}"
            )
        try:
            table = table.cast(self._schema)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            raise ValueError(f"{self.path}: chunk types differ from the first chunk's: {exc}") from exc
        self._parquet.write_table(table)
