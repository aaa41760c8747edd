"""Finding and reading the files a corpus import loads: JSON Lines, JSON documents (an array, or
pretty-printed objects such as CAP's per-case files), CSV/TSV and Parquet, each optionally
compressed with gzip, xz or bzip2 (told by the file's first bytes, whatever its name).

Every reader streams, with memory flat in the file size: JSON Lines and CSV line by line, Parquet in
record batches, a JSON document value by value. A record that cannot be read is yielded as its line
and the reason, and reading goes on; a file that cannot be read on (truncated, corrupt) raises one of
`UNREADABLE` — what came before it has been yielded.

Text must be UTF-8 (a BOM is allowed): a line in another encoding is reported as `invalid UTF-8`
with the encoding it looks like (`encoding_hint`) and how to convert the file, and a UTF-16 or
UTF-32 file raises `NotUTF8` before anything of it is read.
"""

from __future__ import annotations

import bz2
import csv
import gzip
import io
import json
import lzma
import re
import shutil
import sys
import tempfile
import zlib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, BinaryIO, Literal, get_args

import orjson

from legal_batch.core.errors import UserError

__all__ = [
    "FORMATS",
    "UNREADABLE",
    "NotUTF8",
    "ImportFormat",
    "ReadPosition",
    "RecordLine",
    "SkipReason",
    "SourceFile",
    "Sources",
    "encoding_hint",
    "find_sources",
    "read_records",
]

ImportFormat = Literal["jsonl", "csv", "parquet", "cap"]
FORMATS: tuple[ImportFormat, ...] = get_args(ImportFormat)
SkipReason = Literal["not JSON", "not an object", "no id", "no text", "NUL byte", "invalid UTF-8",
                     "unknown mapped field", "bad row", "duplicate id", "unreadable file"]
"""Why a record was not loaded (the readers give the first three and `bad row`; the import the rest)."""

UNREADABLE = (OSError, EOFError, zlib.error, lzma.LZMAError, UnicodeDecodeError)
"""What reading raises when a file cannot be read on (besides pyarrow's errors for Parquet)."""

_COMPRESSION_SUFFIXES = (".gz", ".xz", ".bz2")
Family = Literal["json", "csv", "parquet"]
_SUFFIX_FAMILY: dict[str, Family] = {".jsonl": "json", ".ndjson": "json", ".json": "json",
                                     ".csv": "csv", ".tsv": "csv",
                  ".parquet": "parquet", ".pq": "parquet"}
_FORMAT_FAMILY: dict[str, Family] = {"jsonl": "json", "cap": "json", "csv": "csv", "parquet": "parquet"}
_SUPPORTED = ".jsonl, .ndjson, .json, .csv, .tsv, .parquet (each also .gz, .xz or .bz2)"
_CAP_METADATA = re.compile(r"(Cases|Volumes?|Reporters?|Jurisdictions?|Courts?)Metadata\.json$")
_READ_BUFFER = 1 << 20
_MAX_JSON_VALUE = 1 << 30  # a single JSON value (one judgment) larger than this is not read
_MAX_DETECT_LINE = 64 << 20  # telling JSON Lines from a document reads at most this much of a line


# -- which files -------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SourceFile:
    """One file to import. `name` is how reports name it (relative to the folder imported);
    `family` is how it is read (json, csv, parquet); `cap` is True when `--format cap` was given."""

    path: Path
    name: str
    family: Family
    cap: bool
    size: int


@dataclass(frozen=True)
class Sources:
    """The files an import reads, and the files of the folder it passes over (other kinds, CAP's
    `*Metadata.json`), with why."""

    files: tuple[SourceFile, ...]
    passed_over: tuple[str, ...] = ()

    @property
    def total_bytes(self) -> int:
        return sum(source.size for source in self.files)


def _stem_suffix(path: Path) -> str:
    """The data suffix of a file name, past a compression suffix: `a.jsonl.gz` → `.jsonl`."""
    name = path.name.lower()
    for compressed in _COMPRESSION_SUFFIXES:
        if name.endswith(compressed):
            name = name[: -len(compressed)]
            break
    return Path(name).suffix


def _sniff_family(path: Path) -> Family | None:
    """json, csv or parquet from the first bytes of a file (decompressed), or None."""
    try:
        with _open_binary(path) as stream:
            head = stream.read(4096)
    except UNREADABLE:
        return None
    if head.startswith(b"PAR1"):
        return "parquet"
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n")
    if text[:1] in (b"{", b"["):
        return "json"
    first_line = text.split(b"\n", 1)[0]
    if b"," in first_line or b"\t" in first_line:
        return "csv"
    return None


def _format_error(value: str) -> UserError:
    return UserError(f"--format {value!r} is not a format: give one of {', '.join(FORMATS)}, or leave it out "
                     f"to tell each file's format from its name and contents")


def find_sources(path: str | Path, *, format: str | None = None) -> Sources:
    """The files to import from `path` (a file, or a folder searched recursively, hidden files and
    folders left out), in name order.

    `format` (one of `FORMATS`) reads every file that way; without it each file's format comes from
    its extension (`_SUPPORTED`), or, for a single file with another name, from its contents; JSON
    records holding a `casebody` are read as CAP. Raises `UserError` for a missing path, an unknown
    format, a file whose format cannot be told, or a folder with nothing to import."""
    if format is not None and format not in FORMATS:
        raise _format_error(format)
    root = Path(path).expanduser()
    if not root.exists():
        raise UserError(f"PATH {str(path)!r} does not exist: give a file or a folder of {_SUPPORTED} files")
    wanted = _FORMAT_FAMILY[format] if format else None
    if root.is_file():
        family = wanted or _SUFFIX_FAMILY.get(_stem_suffix(root)) or _sniff_family(root)
        if family is None:
            raise UserError(f"cannot tell the format of {root} from its name or contents: give --format "
                            f"({', '.join(FORMATS)})")
        return Sources((SourceFile(root, str(path), family, format == "cap", root.stat().st_size),))
    files: list[SourceFile] = []
    passed: list[str] = []
    for file in sorted(p for p in root.rglob("*") if p.is_file()):
        relative = file.relative_to(root)
        if any(part.startswith(".") for part in relative.parts):
            continue
        family = _SUFFIX_FAMILY.get(_stem_suffix(file))
        if family is None or (wanted is not None and family != wanted):
            passed.append(f"{relative} (not {'a ' + format if format else 'a supported'} file)")
        elif family == "json" and _CAP_METADATA.search(file.name):
            passed.append(f"{relative} (CAP metadata, not cases)")
        else:
            files.append(SourceFile(file, str(relative), family, format == "cap", file.stat().st_size))
    if not files:
        kinds = f"{format} files" if format else f"{_SUPPORTED} files"
        raise UserError(f"folder {root} holds no {kinds} to import"
                        + (f" (passed over: {', '.join(passed[:5])}{', ...' if len(passed) > 5 else ''})" if passed
                           else ""))
    return Sources(tuple(files), tuple(passed))


# -- reading records ----------------------------------------------------------------------------------

def _compression(magic: bytes) -> Literal["gzip", "xz", "bz2"] | None:
    if magic[:2] == b"\x1f\x8b":
        return "gzip"
    if magic[:6] == b"\xfd7zXZ\x00":
        return "xz"
    if magic[:3] == b"BZh":
        return "bz2"
    return None


@contextmanager
def _open_binary(path: Path) -> Iterator[BinaryIO]:
    """The file's bytes, decompressed when it is gzip, xz or bzip2 (told by its first bytes, whatever
    its name)."""
    with path.open("rb", buffering=_READ_BUFFER) as raw:
        kind = _compression(raw.peek(6)[:6])
        if kind is None:
            yield raw
            return
        with (gzip.GzipFile(fileobj=raw) if kind == "gzip" else lzma.LZMAFile(raw) if kind == "xz"
              else bz2.BZ2File(raw)) as stream:
            yield stream  # type: ignore[misc]


class ReadPosition:
    """How far into a file (its bytes on disk) reading has got, for progress."""

    def __init__(self, raw: IO[bytes] | None = None, *, size: int = 0) -> None:
        self.raw = raw
        self.size = size
        self.estimate = 0

    def bytes_read(self) -> int:
        if self.raw is not None and not self.raw.closed:
            return self.raw.tell()
        return self.estimate


# One record read from a file: (line, the record, None) or (line, None, (reason, detail)).
RecordLine = tuple[int, Mapping[str, object] | None, tuple[SkipReason, str] | None]


class NotUTF8(ValueError):
    """A file (or the rest of one) in an encoding other than UTF-8; the message says which it looks
    like and how to convert it. `line`: where reading stopped."""

    def __init__(self, message: str, *, line: int = 1) -> None:
        super().__init__(message)
        self.line = line


_DOUBLE_BYTE = (("gb18030", "GB18030 (GBK, simplified Chinese)"), ("big5", "Big5 (traditional Chinese)"),
                ("shift_jis", "Shift_JIS (Japanese)"), ("euc_kr", "EUC-KR (Korean)"))
_COMMON_CJK = frozenset("的一是不了人在有中上年月日法院被告罪刑民判本审審理原为為以其事案"
                        "의이다는에을를하고한지가로서으사기인원법피")
"""Characters frequent in Chinese (simplified and traditional) and Korean judgments: the decoding
that yields most of them, or of kana, is the likely encoding."""
_ICONV = {"gb18030": "GB18030", "big5": "BIG5", "shift_jis": "SHIFT_JIS", "euc_kr": "EUC-KR", "cp1252": "WINDOWS-1252",
          "latin_1": "ISO-8859-1"}


def _wide_unicode(head: bytes) -> str | None:
    """"UTF-16" or "UTF-32" when the first bytes of a file are text in one of them (a byte-order
    mark, or every other byte NUL as in UTF-16 ASCII), else None."""
    if head.startswith((b"\xff\xfe\x00\x00", b"\x00\x00\xfe\xff")):
        return "UTF-32"
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        return "UTF-16"
    sample = head[:512]
    if len(sample) >= 8 and (sample[1::2].count(0) > 0.4 * len(sample) / 2 or sample[0::2].count(0) > 0.4 * len(sample) / 2):
        return "UTF-16"
    return None


def encoding_hint(data: bytes) -> str:
    """Why `data` is not UTF-8 and what to do: where the first bad byte is, the encoding the bytes
    look like (UTF-16/32, a Chinese, Japanese or Korean double-byte encoding, else Windows-1252), and
    the conversion. Empty when `data` is valid UTF-8."""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        bad = exc.start
    else:
        return ""
    where = f"byte 0x{data[bad]:02X} at byte {bad + 1}"
    wide = _wide_unicode(data)
    if wide:
        return f"not UTF-8 but {wide} ({where}): convert the file, e.g. iconv -f {wide} -t UTF-8"
    high = [i for i, byte in enumerate(data) if byte >= 0x80]
    paired = sum(1 for i in high if i + 1 < len(data) and data[i + 1] >= 0x40 and data[i] >= 0x81)
    codec, name = ("cp1252", "Windows-1252 (Latin-1)")
    if high and paired >= 0.6 * len(high):
        scored = []
        for candidate, candidate_name in _DOUBLE_BYTE:
            try:
                decoded = data.decode(candidate)
            except UnicodeDecodeError:
                continue
            scored.append((sum(c in _COMMON_CJK or "\u3040" <= c <= "\u30ff" for c in decoded), -len(scored),
                           candidate, candidate_name))
        if scored:
            _, _, codec, name = max(scored)
    if codec == "cp1252":
        try:
            data.decode("cp1252")
        except UnicodeDecodeError:
            codec, name = "latin_1", "ISO-8859-1 (Latin-1)"
    return f"not UTF-8 ({where}); it looks like {name}: convert the file to UTF-8, e.g. iconv -f {_ICONV[codec]} -t UTF-8"


def _check_wide_unicode(stream: BinaryIO) -> None:
    """Raise `NotUTF8` when the file is UTF-16 or UTF-32 text."""
    peek = getattr(stream, "peek", None)
    head = peek(4096)[:4096] if peek is not None else b""
    wide = _wide_unicode(head)
    if wide:
        raise NotUTF8(f"the file is {wide}, not UTF-8: convert it, e.g. iconv -f {wide} -t UTF-8; nothing of it "
                      "was loaded")


def _json_line_records(stream: BinaryIO) -> Iterator[RecordLine]:
    """JSON Lines: one object a line; blank lines are passed over; a BOM on line 1 is dropped."""
    for number, line in enumerate(stream, start=1):
        if number == 1 and line.startswith(b"\xef\xbb\xbf"):
            line = line[3:]
        if not line.strip():
            continue
        try:
            value = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            hint = encoding_hint(line)
            yield number, None, (("invalid UTF-8", f"the line is {hint}") if hint else ("not JSON", str(exc)))
            continue
        if isinstance(value, dict):
            yield number, value, None
        else:
            yield number, None, ("not an object", f"the line holds a JSON {type(value).__name__}")


class _TextWindow:
    """A sliding window over a text stream for decoding JSON values one at a time: what has been
    decoded is dropped, so memory holds one value (plus a read chunk), never the file."""

    def __init__(self, stream: IO[str]) -> None:
        self.stream = stream
        self.buffer = ""
        self.pos = 0
        self.eof = False
        self._line = 1  # the line number at self._counted
        self._counted = 0

    def more(self) -> bool:
        """Read another chunk (at least as large as what is pending); False at the end of the file."""
        if self.eof:
            return False
        self.line_at(self.pos)
        pending = len(self.buffer) - self.pos
        chunk = self.stream.read(max(_READ_BUFFER, pending))
        self.buffer = self.buffer[self.pos:] + chunk
        self._counted -= self.pos
        self.pos = 0
        self.eof = not chunk
        return bool(chunk)

    def line_at(self, index: int) -> int:
        self._line += self.buffer.count("\n", self._counted, index)
        self._counted = index
        return self._line

    def next_char(self) -> str | None:
        """The next character that is not whitespace (the window moves to it), or None at the end."""
        while True:
            while self.pos < len(self.buffer) and self.buffer[self.pos] in " \t\r\n\ufeff":
                self.pos += 1
            if self.pos < len(self.buffer):
                return self.buffer[self.pos]
            if not self.more():
                return None


def _json_document_records(stream: BinaryIO) -> Iterator[RecordLine]:
    """A JSON file that is not one object a line: one (pretty-printed) object, several in a row, or an
    array of objects. Values are decoded one at a time; a syntax error ends the file (there is no
    next line to resume at), reported at the line where the bad value starts."""
    window = _TextWindow(io.TextIOWrapper(stream, encoding="utf-8-sig"))
    try:
        yield from _json_values(window)
    except UnicodeDecodeError as exc:
        line = window.line_at(len(window.buffer)) + exc.object[:exc.start].count(b"\n")
        raise NotUTF8(f"the file is {encoding_hint(exc.object)}; the rest of the file is not read",
                      line=line) from None


def _json_values(window: _TextWindow) -> Iterator[RecordLine]:
    decoder = json.JSONDecoder()
    first = window.next_char()
    in_array = first == "["
    if in_array:
        window.pos += 1
    while True:
        char = window.next_char()
        if char is None:
            if in_array:
                yield window.line_at(window.pos), None, ("not JSON", "the array is not closed with ]")
            return
        if in_array and char == "]":
            return
        if in_array and char == ",":
            window.pos += 1
            continue
        line = window.line_at(window.pos)
        while True:
            try:
                value, end = decoder.raw_decode(window.buffer, window.pos)
            except json.JSONDecodeError as exc:
                if len(window.buffer) - window.pos < _MAX_JSON_VALUE and window.more():
                    continue
                yield line, None, ("not JSON", f"{exc.msg} (the rest of the file is not read)")
                return
            if end < len(window.buffer) or window.eof or not window.more():
                break  # a value touching the end of the window may continue in the next chunk
        window.pos = end
        if isinstance(value, dict):
            yield line, value, None
        else:
            yield line, None, ("not an object", f"the value is a JSON {type(value).__name__}")


def _json_layout(path: Path) -> Literal["lines", "document"]:
    """JSON Lines, or a JSON document (an array, or pretty-printed objects): `.jsonl`/`.ndjson` are
    lines; otherwise a file opening with `[` is a document, and one whose first or second non-blank
    line is a whole object is lines."""
    if _stem_suffix(path) in (".jsonl", ".ndjson"):
        return "lines"
    with _open_binary(path) as stream:
        buffered = io.BufferedReader(stream, _READ_BUFFER) if not hasattr(stream, "peek") else stream
        while True:  # the first character that is not whitespace (never reading a whole line for it)
            head = buffered.peek(1)[:1]
            if head in (b" ", b"\t", b"\r", b"\n", b"\xef", b"\xbb", b"\xbf"):
                buffered.read(1)
                continue
            if head in (b"[", b""):
                return "document"
            break
        for _ in range(2):
            line = buffered.readline(_MAX_DETECT_LINE).strip()
            while not line:
                line = buffered.readline(_MAX_DETECT_LINE)
                if not line:
                    return "document"
                line = line.strip()
            try:
                if isinstance(orjson.loads(line), dict):
                    return "lines"
            except orjson.JSONDecodeError:
                pass
    return "document"


def _csv_records(stream: BinaryIO, *, delimiter: str, header_out: list[str]) -> Iterator[RecordLine]:
    """CSV/TSV with a header row; a cell may span lines. Cells are text exactly as written; an empty
    cell is no value. `header_out` receives the header (for the mapping check)."""
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # judgments are longer than the default 128 KiB
    text = io.TextIOWrapper(stream, encoding="utf-8-sig", errors="surrogateescape", newline="")
    reader = csv.reader(text, delimiter=delimiter)
    try:
        header = next(reader)
    except StopIteration:
        return
    header_out[:] = [name.strip() for name in header]
    previous = reader.line_num
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            yield previous + 1, None, ("bad row", f"{exc}")
            if reader.line_num == previous:
                return
            previous = reader.line_num
            continue
        line, previous = previous + 1, reader.line_num
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != len(header_out):
            yield line, None, ("bad row", f"{len(row)} fields where the header has {len(header_out)} (a quote "
                                          f"not closed, or a {delimiter!r} not quoted?)")
            continue
        yield line, dict(zip(header_out, row, strict=True)), None


def _csv_delimiter(path: Path) -> str:
    if _stem_suffix(path) == ".tsv":
        return "\t"
    if _stem_suffix(path) == ".csv":
        return ","
    with _open_binary(path) as stream:
        first = stream.readline(1 << 16)
    return "\t" if b"\t" in first and b"," not in first else ","


@contextmanager
def _parquet_file(path: Path) -> Iterator[Path]:
    """A Parquet file on disk: the file itself, or its decompressed copy (Parquet needs random access)."""
    with path.open("rb") as raw:
        magic = raw.read(6)
    if _compression(magic) is None:
        yield path
        return
    with tempfile.NamedTemporaryFile(suffix=".parquet") as copy, _open_binary(path) as stream:
        shutil.copyfileobj(stream, copy, _READ_BUFFER)
        copy.flush()
        yield Path(copy.name)


def _parquet_records(path: Path, *, wanted: set[str] | None, position: ReadPosition,
                     header_out: list[str]) -> Iterator[RecordLine]:
    """Parquet in record batches of 256 rows, only the columns that can be mapped; line = row number."""
    import pyarrow.parquet as pq

    with _parquet_file(path) as local:
        parquet = pq.ParquetFile(local, buffer_size=_READ_BUFFER, pre_buffer=False)
        names = parquet.schema_arrow.names
        header_out[:] = names
        rows = parquet.metadata.num_rows or 1
        columns = names if wanted is None else [name for name in names if name in wanted]
        number = 0
        for batch in parquet.iter_batches(batch_size=256, columns=columns):
            for row in batch.to_pylist():
                number += 1
                yield number, row, None
            position.estimate = position.size * number // rows


def read_records(source: SourceFile, *, columns: set[str] | None = None, position: ReadPosition | None = None,
                 header_out: list[str] | None = None) -> Iterator[RecordLine]:
    """Every record of `source` as (line, record, None), or (line, None, (reason, detail)) for one
    that cannot be read; for Parquet, line is the row number and only `columns` (default: all) are
    read. `header_out` receives a CSV header or the Parquet column names before the first record;
    `position` follows the bytes read. Raises one of `UNREADABLE` (or pyarrow's errors) when the
    file cannot be read on, `NotUTF8` when it is not UTF-8 text."""
    position = position or ReadPosition(size=source.size)
    header = header_out if header_out is not None else []
    if source.family == "parquet":
        yield from _parquet_records(source.path, wanted=columns, position=position, header_out=header)
        return
    with _open_binary(source.path) as stream:
        position.raw = getattr(stream, "fileobj", None) or getattr(stream, "_fp", None) or stream
        _check_wide_unicode(stream)
        if source.family == "csv":
            yield from _csv_records(stream, delimiter=_csv_delimiter(source.path), header_out=header)
        elif _json_layout(source.path) == "lines":
            yield from _json_line_records(stream)
        else:
            yield from _json_document_records(stream)
