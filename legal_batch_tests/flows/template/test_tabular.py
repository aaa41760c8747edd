"""Input discovery, streaming reads and mirrored writes of CSV, TSV and Parquet (plain and .gz)."""

from __future__ import annotations

import csv
import gzip
import io
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from legal_batch.flows.template.errors import TemplateError
from legal_batch.flows.template.results import append_results, result_column_names
from legal_batch.flows.template.tabular import (
    InputFile,
    TabularWriter,
    discover_inputs,
    output_path,
    read_rows,
)

# Values a careless reader would change: leading zeros, empty cells, "NA"/"null" text, numbers
# with trailing zeros, delimiters, quotes and newlines inside cells, non-ASCII text.
HEADER = ["id", "case_name", "full_text", "score"]
ROWS = [
    ["007", "Smith v Jones", "The appeal, in part, fails.", "1.50"],
    ["008", "", 'He said "no"\nand left', "NA"],
    ["0", "Müller v Ł", "tab\there", "null"],
    ["010", "R v X", "", ""],
    ["011", "A v B", "{json} stays", "1e3"],
]
GZIP_MAGIC = b"\x1f\x8b"


def write_text_table(path: Path, delimiter: str, rows: list[list[str]] = ROWS) -> None:
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer, delimiter=delimiter, lineterminator="\n")
    writer.writerow(HEADER)
    writer.writerows(rows)
    data = buffer.getvalue().encode("utf-8")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)


def parquet_table() -> pa.Table:
    return pa.table(
        {
            "id": pa.array(["007", "008", "0", "010", "011"]),
            "case_name": pa.array(["Smith v Jones", "", None, "R v X", "A v B"]),
            "judges": pa.array([3, None, 5, 1, 2], type=pa.int64()),
            "damages": pa.array([1.5, 2.0, None, 0.0, 10.25]),
            "decided": pa.array([1, 2, 3, 4, None], type=pa.timestamp("ms")),
            "citations": pa.array([["[2020] UKSC 1"], [], None, ["a", "b"], ["c"]]),
        }
    )


def write_parquet(path: Path, table: pa.Table | None = None) -> None:
    sink = io.BytesIO()
    pq.write_table(parquet_table() if table is None else table, sink, row_group_size=2)
    data = sink.getvalue()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)


def process(input_root: Path, output_root: Path) -> list[Path]:
    """What the flow does to each file, minus the LLM: read, add result columns, write."""
    written = []
    for input_file in discover_inputs(input_root):
        target = output_path(input_file, input_root, output_root)
        with TabularWriter(target, input_file.format, input_file.compressed) as writer:
            for chunk in read_rows(input_file, chunk_rows=2):
                results = [
                    {
                        "llm_verdict": "upheld" if n % 2 else None,
                        "llm_status": "success",
                        "llm_error": None,
                        "llm_validation_passed": bool(n % 2),
                        "llm_parse_status": "success",
                    }
                    for n in range(len(chunk))
                ]
                writer.write(append_results(chunk, results, columns=["verdict"], file=str(input_file.path)))
        written.append(target)
    return written


RESULT_COLUMNS = result_column_names(["verdict"])


@pytest.mark.parametrize("name", ["cases.csv", "cases.tsv", "cases.csv.gz", "cases.tsv.gz"])
def test_text_round_trip_keeps_every_value(tmp_path: Path, name: str) -> None:
    source = tmp_path / "in" / name
    write_text_table(source, "\t" if ".tsv" in name else ",")

    [target] = process(source, tmp_path / "out")

    assert target == tmp_path / "out" / name
    raw = target.read_bytes()
    assert raw.startswith(GZIP_MAGIC) == name.endswith(".gz")
    [output_file] = discover_inputs(target)
    output = pd.concat(list(read_rows(output_file)))
    assert list(output.columns) == HEADER + RESULT_COLUMNS
    assert output[HEADER].values.tolist() == ROWS
    assert output["llm_verdict"].tolist() == ["", "upheld", "", "upheld", ""]
    assert output["llm_validation_passed"].tolist() == ["False", "True", "False", "True", "False"]


def test_csv_output_text_is_plain(tmp_path: Path) -> None:
    source = tmp_path / "in.csv"
    write_text_table(source, ",", ROWS[:1])
    [target] = process(source, tmp_path / "out")
    assert target.read_text(encoding="utf-8") == (
        "id,case_name,full_text,score,llm_verdict,llm_status,llm_error,llm_validation_passed,llm_parse_status\n"
        '007,Smith v Jones,"The appeal, in part, fails.",1.50,,success,,False,success\n'
    )


@pytest.mark.parametrize("name", ["cases.parquet", "cases.parquet.gz"])
def test_parquet_round_trip_keeps_types_and_values(tmp_path: Path, name: str) -> None:
    source = tmp_path / "in" / name
    write_parquet(source)

    [target] = process(source, tmp_path / "out")

    assert target == tmp_path / "out" / name
    raw = target.read_bytes()
    assert raw.startswith(GZIP_MAGIC) == name.endswith(".gz")
    table = pq.read_table(io.BytesIO(gzip.decompress(raw) if name.endswith(".gz") else raw))
    original = parquet_table()
    assert table.select(original.column_names).equals(original)
    assert table.schema.field("llm_verdict").type == pa.string()
    assert table.schema.field("llm_error").type == pa.string()
    assert table.schema.field("llm_validation_passed").type == pa.bool_()
    assert table.column("llm_verdict").to_pylist() == [None, "upheld", None, "upheld", None]


def test_split_layout_is_mirrored(tmp_path: Path) -> None:
    root = tmp_path / "dataset"
    write_text_table(root / "train" / "part-1.csv", ",")
    write_text_table(root / "train" / "part-2.csv.gz", ",")
    write_text_table(root / "val" / "val.tsv", "\t")
    write_parquet(root / "test" / "test.parquet.gz")
    (root / "prompts.json").write_text("{}", encoding="utf-8")
    (root / "train" / ".DS_Store").write_bytes(b"\0")

    inputs = discover_inputs(root)
    assert [(f.path.relative_to(root).as_posix(), f.split, f.format, f.compressed) for f in inputs] == [
        ("train/part-1.csv", "train", "csv", False),
        ("train/part-2.csv.gz", "train", "csv", True),
        ("val/val.tsv", "val", "tsv", False),
        ("test/test.parquet.gz", "test", "parquet", True),
    ]

    written = process(root, tmp_path / "results")
    assert [p.relative_to(tmp_path / "results").as_posix() for p in written] == [
        "train/part-1.csv",
        "train/part-2.csv.gz",
        "val/val.tsv",
        "test/test.parquet.gz",
    ]
    assert [(f.split, f.format, f.compressed) for f in discover_inputs(tmp_path / "results")] == [
        (f.split, f.format, f.compressed) for f in inputs
    ]


def test_files_beside_split_folders_have_no_split(tmp_path: Path) -> None:
    write_text_table(tmp_path / "all.csv", ",")
    write_text_table(tmp_path / "train" / "t.csv", ",")
    assert [(f.path.name, f.split) for f in discover_inputs(tmp_path)] == [
        ("all.csv", None),
        ("t.csv", "train"),
    ]


def test_single_file_input(tmp_path: Path) -> None:
    path = tmp_path / "Cases.CSV"
    write_text_table(path, ",")
    assert discover_inputs(path) == [InputFile(path=path, split=None, format="csv", compressed=False)]
    assert output_path(discover_inputs(path)[0], path, tmp_path / "out") == tmp_path / "out" / "Cases.CSV"


def test_output_path_refuses_to_overwrite_input(tmp_path: Path) -> None:
    write_text_table(tmp_path / "a.csv", ",")
    [input_file] = discover_inputs(tmp_path)
    with pytest.raises(TemplateError, match="would overwrite its input"):
        output_path(input_file, tmp_path, tmp_path)


@pytest.mark.parametrize("name", ["cases.xlsx", "cases.jsonl", "cases.gz", "notes"])
def test_unknown_format_names_file_and_supported_formats(tmp_path: Path, name: str) -> None:
    (tmp_path / name).write_bytes(b"x")
    with pytest.raises(TemplateError) as caught:
        discover_inputs(tmp_path)
    assert str(tmp_path / name) in str(caught.value)
    assert ".csv, .tsv, .parquet (optionally .gz)" in str(caught.value)


def test_empty_folder(tmp_path: Path) -> None:
    (tmp_path / "train").mkdir()
    with pytest.raises(TemplateError, match="holds no data files"):
        discover_inputs(tmp_path)


def test_missing_path(tmp_path: Path) -> None:
    with pytest.raises(TemplateError, match="does not exist"):
        discover_inputs(tmp_path / "absent")


def test_unexpected_subfolder(tmp_path: Path) -> None:
    write_text_table(tmp_path / "validation" / "v.csv", ",")
    with pytest.raises(TemplateError, match=r"unexpected folder .*validation.*train/, val/, test/"):
        discover_inputs(tmp_path)


def rows_of(path: Path) -> list[pd.DataFrame]:
    [input_file] = discover_inputs(path)
    return list(read_rows(input_file))


@pytest.mark.parametrize("name", ["empty.csv", "empty.tsv", "empty.parquet", "empty.csv.gz"])
def test_empty_file_has_no_rows(tmp_path: Path, name: str) -> None:
    (tmp_path / name).write_bytes(b"")
    with pytest.raises(TemplateError, match=r"empty\..* has no rows"):
        rows_of(tmp_path / name)


def test_empty_gzip_content_has_no_rows(tmp_path: Path) -> None:
    (tmp_path / "empty.csv.gz").write_bytes(gzip.compress(b""))
    with pytest.raises(TemplateError, match=r"empty\.csv\.gz has no rows"):
        rows_of(tmp_path / "empty.csv.gz")


@pytest.mark.parametrize("name", ["header.csv", "header.tsv.gz"])
def test_header_only_file_has_no_rows(tmp_path: Path, name: str) -> None:
    write_text_table(tmp_path / name, "\t" if ".tsv" in name else ",", rows=[])
    with pytest.raises(TemplateError, match=r"header\..* has no rows \(it holds only a column header\)"):
        rows_of(tmp_path / name)


def test_parquet_without_rows(tmp_path: Path) -> None:
    write_parquet(tmp_path / "none.parquet", parquet_table().slice(0, 0))
    with pytest.raises(TemplateError, match=r"none\.parquet has no rows"):
        rows_of(tmp_path / "none.parquet")


@pytest.mark.parametrize("name", ["broken.parquet", "broken.parquet.gz"])
def test_corrupt_parquet_names_file_and_cause(tmp_path: Path, name: str) -> None:
    data = b"PAR1 this is not really parquet"
    (tmp_path / name).write_bytes(gzip.compress(data) if name.endswith(".gz") else data)
    with pytest.raises(TemplateError, match=rf"cannot read Parquet file .*{name}: .+"):
        rows_of(tmp_path / name)


def test_corrupt_gzip_names_file(tmp_path: Path) -> None:
    (tmp_path / "broken.csv.gz").write_bytes(b"not gzip at all")
    with pytest.raises(TemplateError, match=r"broken\.csv\.gz"):
        rows_of(tmp_path / "broken.csv.gz")


def test_ragged_csv_names_file_and_line(tmp_path: Path) -> None:
    (tmp_path / "ragged.csv").write_text("a,b\n1,2\n3,4,5\n", encoding="utf-8")
    with pytest.raises(TemplateError, match=r"cannot parse .*ragged\.csv: .*line 3"):
        rows_of(tmp_path / "ragged.csv")


def test_rows_stream_in_chunks(tmp_path: Path) -> None:
    write_text_table(tmp_path / "a.csv", ",")
    [input_file] = discover_inputs(tmp_path)
    assert [len(chunk) for chunk in read_rows(input_file, chunk_rows=2)] == [2, 2, 1]
    write_parquet(tmp_path / "p" / "b.parquet")
    [parquet_file] = discover_inputs(tmp_path / "p")
    assert [len(chunk) for chunk in read_rows(parquet_file, chunk_rows=3)] == [3, 2]


def test_writer_leaves_no_file_when_processing_fails(tmp_path: Path) -> None:
    target = tmp_path / "out" / "a.csv"
    with pytest.raises(RuntimeError), TabularWriter(target, "csv", compressed=False) as writer:
        writer.write(pd.DataFrame({"a": ["1"]}))
        raise RuntimeError("provider down")
    assert list((tmp_path / "out").iterdir()) == []


def test_writer_without_chunks_writes_nothing(tmp_path: Path) -> None:
    with TabularWriter(tmp_path / "a.parquet", "parquet", compressed=False):
        pass
    assert list(tmp_path.iterdir()) == []


def test_parquet_writer_keeps_text_columns_text_when_first_chunk_is_null(tmp_path: Path) -> None:
    target = tmp_path / "a.parquet"
    with TabularWriter(target, "parquet", compressed=False) as writer:
        writer.write(pd.DataFrame({"llm_error": [None, None]}))
        writer.write(pd.DataFrame({"llm_error": ["timeout", None]}))
        assert writer.rows_written == 4
    table = pq.read_table(target)
    assert table.schema.field("llm_error").type == pa.string()
    assert table.column("llm_error").to_pylist() == [None, None, "timeout", None]


def test_parquet_writer_rejects_changed_columns(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="differ from the first chunk"):  # noqa: SIM117
        with TabularWriter(tmp_path / "a.parquet", "parquet", compressed=False) as writer:
            writer.write(pd.DataFrame({"a": ["1"]}))
            writer.write(pd.DataFrame({"b": ["1"]}))
    assert list(tmp_path.iterdir()) == []
