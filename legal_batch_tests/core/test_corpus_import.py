"""`legal-batch cases import`: files of every supported kind into `court_cases` on a real Postgres —
stable ids, upsert by id, CAP casebodies as plain text with their paragraphs, bad lines reported as
file:line and skipped, the exit code."""

from __future__ import annotations

import bz2
import csv
import gzip
import json
import uuid
from datetime import date
from pathlib import Path

import psycopg
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from legal_batch.core import corpus_import
from legal_batch.core.corpus_import import ID_NAMESPACE, field_map, find_sources, import_cases
from legal_batch.core.errors import UserError
from legal_batch_tests.test_cli_errors import assert_one_line, run_main

CORPORA = Path("/work/shared/corpora")
CAP_NAMESPACE = "http://nrs.harvard.edu/urn-3:HLS.Libr.US_Case_Law.Schema.Case_Body:v1"

CAP_XML = f"""<?xml version='1.0' encoding='utf-8'?>
<casebody firstpage="1076" lastpage="1080" xmlns="{CAP_NAMESPACE}">
  <parties id="b1-1">Bernard WEST, Appellant,
    v. UNITED STATES, Appellee.</parties>
  <docketnumber id="b1-2">No. 12-CF-1657.</docketnumber>
  <court id="b1-3">District of Columbia Court of Appeals.</court>
  <decisiondate id="b1-4">Decided Sept. 18, 2014.</decisiondate>
  <opinion type="majority">
    <author id="b1-5">THOMPSON, Associate Judge:</author>
    <p id="b1-6">A jury convicted appellant of possession of PCP.<footnotemark>1</footnotemark> He
      contends that the trial court erred in denying his <page-number citation-index="1" label="1080">*1080</page-number>motion to suppress.</p>
    <p id="b1-7">I. Facts</p>
    <blockquote id="b1-8">After the police officers saw the traffic offense they were permitted to stop the vehicle.</blockquote>
    <footnote label="1">
      <p id="b1-9">Liquid PCP is typically amber.</p>
    </footnote>
  </opinion>
  <opinion type="dissent">
    <author id="b1-10">KING, Senior Judge, dissenting:</author>
    <p id="b1-11">I would reverse &amp; remand.</p>
  </opinion>
</casebody>
"""

CAP_XML_TEXT = """Bernard WEST, Appellant, v. UNITED STATES, Appellee.

No. 12-CF-1657.

District of Columbia Court of Appeals.

Decided Sept. 18, 2014.

THOMPSON, Associate Judge:

A jury convicted appellant of possession of PCP.[1] He contends that the trial court erred in denying his motion to suppress.

I. Facts

After the police officers saw the traffic offense they were permitted to stop the vehicle.

[1] Liquid PCP is typically amber.

KING, Senior Judge, dissenting:

I would reverse & remand."""

CAP_HTML = """<section class="casebody" data-case-id="00000001" data-firstpage="2" data-lastpage="6">
  <section class="head-matter">
    <h4 class="parties" id="b81-4">John DOE,<br> Plaintiff in Error,<br> v. The PEOPLE.</h4>
    <p class="court">Supreme Court of Illinois.</p>
  </section>
  <article class="opinion" data-type="majority">
    <p class="author" id="b83-5">Mr. Justice Craig delivered the opinion of the court:</p>
    <h2>Background</h2>
    <p id="b83-6">The <em>defendant</em> was indicted&nbsp;for larceny.<a class="footnotemark" href="#footnote_1_1"
       id="ref_footnote_1_1">1</a> The jury <a id="p3" href="#p3" data-label="3" class="page-label">*3</a>found him guilty.</p>
    <aside data-label="1" class="footnote" id="footnote_1_1">
      <a href="#ref_footnote_1_1">1</a>
      <p id="b83-11">Rev. Stat. ch. 38, sec. 167.</p>
    </aside>
  </article>
</section>
"""

CAP_HTML_TEXT = """John DOE,
Plaintiff in Error,
v. The PEOPLE.

Supreme Court of Illinois.

Mr. Justice Craig delivered the opinion of the court:

Background

The defendant was indicted for larceny.[1] The jury found him guilty.

[1] Rev. Stat. ch. 38, sec. 167."""


def _cap_record(case_id: int, casebody: object, **extra: object) -> dict:
    return {"id": case_id, "name": "Bernard West, Appellant, v. United States, Appellee",
            "name_abbreviation": "West v. United States", "decision_date": "2014-09-18",
            "citations": [{"type": "parallel", "cite": "2014 D.C. App. LEXIS 1"},
                          {"type": "official", "cite": "100 A.3d 1076"}],
            "court": {"id": 8826, "name": "District of Columbia Court of Appeals", "name_abbreviation": "D.C."},
            "casebody": casebody, **extra}


def _case(case_id: str, text: str, **extra: object) -> dict:
    return {"id": case_id, "case_name": f"Case {case_id}", "citation": f"[2020] HKCFA {case_id}",
            "court": "Court of Final Appeal", "decision_date": "2020-03-01", "full_text": text, **extra}


def _write_jsonl(path: Path, records: list[object], *, opener=open) -> Path:
    with opener(path, "wt", encoding="utf-8") as handle:
        for record in records:
            handle.write((record if isinstance(record, str) else json.dumps(record, ensure_ascii=False)) + "\n")
    return path


def _import(conn: psycopg.Connection, path: Path, *, format: str | None = None, **options):
    fields = field_map(id_field=options.pop("id_field", None), text_field=options.pop("text_field", None),
                       mapping=options.pop("mapping", ()))
    skipped: list[str] = []
    report = import_cases(conn, find_sources(path, format=format), fields, on_skip=lambda s: skipped.append(str(s)))
    return report, skipped


def _rows(conn: psycopg.Connection) -> dict[uuid.UUID, tuple]:
    return {row[0]: row[1:] for row in conn.execute(
        "SELECT id, neutral_citation, case_name, court, decision_date, full_text, headnote, updated_at"
        " FROM court_cases")}


def _uuid5(source_id: str) -> uuid.UUID:
    return uuid.uuid5(ID_NAMESPACE, source_id)


# -- formats ------------------------------------------------------------------------------------------

def test_jsonl_loads_every_case_with_stable_ids_and_its_fields(conn, tmp_path):
    kept = str(uuid.uuid4())
    path = _write_jsonl(tmp_path / "cases.jsonl", [_case("A1", "First paragraph.\n\nSecond paragraph."),
                                                   _case(kept, "A case whose id is a UUID."),
                                                   _case("A3", "Third.", decision_date=None)])
    report, skipped = _import(conn, path)

    assert (report.records_read, report.inserted, report.updated, report.unchanged, report.skipped) == (3, 3, 0, 0, 0)
    assert skipped == [] and report.exit_code == 0
    rows = _rows(conn)
    assert set(rows) == {_uuid5("A1"), uuid.UUID(kept), _uuid5("A3")}
    citation, name, court, decided, text, headnote, _ = rows[_uuid5("A1")]
    assert (citation, name, court, decided) == ("[2020] HKCFA A1", "Case A1", "Court of Final Appeal", date(2020, 3, 1))
    assert text == "First paragraph.\n\nSecond paragraph." and headnote is None
    assert rows[_uuid5("A3")][3] is None


def test_reimport_of_the_same_file_changes_nothing_and_an_edit_updates_only_that_case(conn, tmp_path):
    records = [_case(f"C{i}", f"Judgment {i}.") for i in range(5)]
    path = _write_jsonl(tmp_path / "cases.jsonl", records)
    _import(conn, path)
    before = _rows(conn)

    again, _ = _import(conn, path)
    assert (again.inserted, again.updated, again.unchanged) == (0, 0, 5)
    assert _rows(conn) == before  # updated_at included

    records[2]["full_text"] = "Judgment 2, corrected."
    records.append(_case("C5", "A new one."))
    _write_jsonl(path, records)
    edited, _ = _import(conn, path)
    assert (edited.inserted, edited.updated, edited.unchanged) == (1, 1, 4)
    after = _rows(conn)
    assert after[_uuid5("C2")][4] == "Judgment 2, corrected." and after[_uuid5("C2")][6] > before[_uuid5("C2")][6]
    assert all(after[key] == before[key] for key in before if key != _uuid5("C2"))


def test_a_reimport_without_headnotes_keeps_generated_ones_and_an_imported_one_replaces_them(conn, tmp_path):
    path = _write_jsonl(tmp_path / "cases.jsonl", [_case("H1", "Text.")])
    _import(conn, path)
    conn.execute("UPDATE court_cases SET headnote = 'generated', headnote_model = 'm', headnote_generated_at = now()")

    again, _ = _import(conn, path)
    assert again.unchanged == 1
    assert conn.execute("SELECT headnote, headnote_model FROM court_cases").fetchone() == ("generated", "m")

    _write_jsonl(path, [_case("H1", "Text.", headnote="The reporter's own headnote.")])
    replaced, _ = _import(conn, path)
    assert replaced.updated == 1
    assert conn.execute("SELECT headnote, headnote_model, headnote_generated_at FROM court_cases").fetchone() == (
        "The reporter's own headnote.", None, None)


def test_csv_and_tsv_with_long_multiline_cells_and_mapped_columns(conn, tmp_path):
    long_text = "\n\n".join(f"Paragraph {i}, quoting \"the statute\", section {i}." for i in range(6000))
    assert len(long_text) > 131072  # past the csv module's default field limit
    folder = tmp_path / "tables"
    folder.mkdir()
    with (folder / "a.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["ref", "title", "tribunal", "decided", "body"])
        writer.writerow(["R-1", "Chan v Wong", "High Court", "2019-05-02", long_text])
        writer.writerow(["R-2", "Lee v Ho", "District Court", "", "Short, with a comma."])
    with (folder / "b.tsv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, delimiter="\t")
        writer.writerow(["ref", "title", "tribunal", "decided", "body"])
        writer.writerow(["R-3", "Ma v Lam", "Court of Appeal", "2021", "Tab\tseparated."])

    report, skipped = _import(conn, folder, id_field="ref", text_field="body",
                              mapping=["case_name=title", "court=tribunal", "decision_date=decided"])
    assert skipped == [] and report.files == 2 and report.inserted == 3
    rows = _rows(conn)
    assert rows[_uuid5("R-1")][1:5] == ("Chan v Wong", "High Court", date(2019, 5, 2), long_text)
    assert rows[_uuid5("R-2")][3] is None
    assert rows[_uuid5("R-3")][2:5] == ("Court of Appeal", date(2021, 1, 1), "Tab\tseparated.")


def test_parquet_plain_and_gzipped_in_record_batches(conn, tmp_path):
    table = pa.table({"id": [f"P{i}" for i in range(600)], "text": [f"Judgment number {i}." for i in range(600)],
                      "decision_date": [date(2000, 1, 1 + i % 28) for i in range(600)],
                      "court": ["Court of First Instance"] * 600})
    pq.write_table(table, tmp_path / "cases.parquet", row_group_size=250)
    report, skipped = _import(conn, tmp_path / "cases.parquet")
    assert skipped == [] and report.inserted == 600

    gzipped = tmp_path / "copy" / "cases.parquet.gz"
    gzipped.parent.mkdir()
    gzipped.write_bytes(gzip.compress((tmp_path / "cases.parquet").read_bytes()))
    again, _ = _import(conn, gzipped)
    assert (again.inserted, again.unchanged) == (0, 600)
    assert _rows(conn)[_uuid5("P30")][3:5] == (date(2000, 1, 3), "Judgment number 30.")


def test_a_folder_of_compressed_files_in_subfolders(conn, tmp_path):
    root = tmp_path / "corpus"
    (root / "2019").mkdir(parents=True)
    (root / ".cache").mkdir()
    _write_jsonl(root / "2019" / "a.jsonl.gz", [_case("G1", "Gzipped.")], opener=gzip.open)
    _write_jsonl(root / "b.ndjson.bz2", [_case("B1", "Bzipped.")], opener=bz2.open)
    _write_jsonl(root / "c.jsonl", [_case("J1", "Plain.")])
    _write_jsonl(root / ".cache" / "hidden.jsonl", [_case("X", "Never read.")])
    (root / "README.md").write_text("notes")

    sources = find_sources(root)
    assert [source.name for source in sources.files] == ["2019/a.jsonl.gz", "b.ndjson.bz2", "c.jsonl"]
    report, skipped = _import(conn, root)
    assert skipped == [] and (report.files, report.inserted) == (3, 3)
    assert report.passed_over == ("README.md (not a supported file)",)
    assert {row[4] for row in _rows(conn).values()} == {"Gzipped.", "Bzipped.", "Plain."}


def test_json_arrays_and_pretty_printed_files_are_read_value_by_value(conn, tmp_path):
    (tmp_path / "array.json").write_text(json.dumps([_case("Y1", "One."), _case("Y2", "Two.")], indent=2))
    (tmp_path / "lines.json").write_text("\n".join(json.dumps(_case(f"L{i}", f"Line {i}.")) for i in range(3)))
    report, skipped = _import(conn, tmp_path)
    assert skipped == [] and report.inserted == 5


# -- CAP ----------------------------------------------------------------------------------------------

def test_cap_xml_casebody_becomes_paragraphs_with_court_date_citations_and_name(conn, tmp_path):
    path = _write_jsonl(tmp_path / "data.jsonl", [_cap_record(435800, {"status": "ok", "data": CAP_XML})])
    report, skipped = _import(conn, path)
    assert skipped == [] and report.inserted == 1
    citation, name, court, decided, text, _, _ = _rows(conn)[_uuid5("435800")]
    assert citation == "100 A.3d 1076; 2014 D.C. App. LEXIS 1"  # the official one first
    assert (name, court, decided) == ("West v. United States", "District of Columbia Court of Appeals",
                                      date(2014, 9, 18))
    assert text == CAP_XML_TEXT


def test_cap_html_casebody_keeps_headings_authors_and_line_breaks(conn, tmp_path):
    path = _write_jsonl(tmp_path / "data.jsonl", [_cap_record(1, {"status": "ok", "data": CAP_HTML})])
    _, skipped = _import(conn, path, format="cap")
    assert skipped == []
    assert _rows(conn)[_uuid5("1")][4] == CAP_HTML_TEXT


def test_cap_text_forms_bulk_and_static(conn, tmp_path):
    opinions = [{"type": "majority", "author": "Smith, J.", "text": "The appeal is dismissed.\nCosts to follow."},
                {"type": "dissent", "author": "Jones, J.", "text": "Jones, J., dissenting.\nI would allow it."}]
    body = {"head_matter": "A v. B\nSupreme Court of Ohio", "opinions": opinions, "judges": [], "parties": []}
    _write_jsonl(tmp_path / "bulk.jsonl", [_cap_record(7, {"status": "ok", "data": body})])
    volume = tmp_path / "static" / "ohio" / "1"
    (volume / "cases").mkdir(parents=True)
    (volume / "cases" / "0001-01.json").write_text(json.dumps(_cap_record(8, body), indent=2))
    (volume / "CasesMetadata.json").write_text(json.dumps([{"id": 8, "name": "metadata only"}], indent=2))

    report, skipped = _import(conn, tmp_path)
    assert skipped == [] and report.inserted == 2
    assert report.passed_over == ("static/ohio/1/CasesMetadata.json (CAP metadata, not cases)",)
    expected = ("A v. B\n\nSupreme Court of Ohio\n\nSmith, J.\n\nThe appeal is dismissed.\n\nCosts to follow.\n\n"
                "Jones, J., dissenting.\n\nI would allow it.")
    rows = _rows(conn)
    assert rows[_uuid5("7")][4] == expected and rows[_uuid5("8")][4] == expected


def test_real_corpora_import_whole(conn):
    for name, count in (("us_opinions.jsonl", 42), ("zh_judgments.jsonl", 40)):
        report, skipped = _import(conn, CORPORA / name)
        assert skipped == [] and report.inserted == count
    source = [json.loads(line) for line in (CORPORA / "zh_judgments.jsonl").read_text().splitlines()]
    rows = _rows(conn)
    first = rows[_uuid5(source[0]["id"])]
    assert first[:3] == (source[0]["citation"], source[0]["case_name"], source[0]["court"])
    assert first[4] == source[0]["full_text"].strip()


# -- bad input ----------------------------------------------------------------------------------------

def test_bad_lines_are_reported_as_file_and_line_and_the_rest_is_loaded(conn, tmp_path):
    path = _write_jsonl(tmp_path / "mixed.jsonl", [
        _case("OK1", "Fine."),
        "{not json",
        _case("NT", "   "),
        _case("OK1", "Same id again."),
        _case("NUL", "A text with a \x00 byte."),
        "[1, 2]",
        {"full_text": "No id at all."},
        _case("OK2", "Fine too.", decision_date="sometime in May"),
        _case("OK3", "Also fine."),
    ])
    notes: list[str] = []
    skipped: list[str] = []
    report = import_cases(conn, find_sources(path.name), field_map(),  # the working directory is tmp_path
                          on_skip=lambda s: skipped.append(str(s)), on_note=lambda n: notes.append(str(n)))

    assert report.records_read == 9 and report.inserted == 3 and report.skipped == 6 and report.exit_code == 1
    assert [line.split(": ")[0:2] for line in sorted(skipped, key=lambda s: int(s.split(":")[1]))] == [
        ["mixed.jsonl:2", "not JSON"], ["mixed.jsonl:3", "no text"], ["mixed.jsonl:4", "duplicate id"],
        ["mixed.jsonl:5", "NUL byte"], ["mixed.jsonl:6", "not an object"], ["mixed.jsonl:7", "no id"]]
    assert "first seen at mixed.jsonl:1" in next(line for line in skipped if "duplicate" in line)
    assert notes == ["mixed.jsonl:8: decision_date 'sometime in May' is not a date (YYYY-MM-DD): stored empty"]
    assert _rows(conn)[_uuid5("OK1")][4] == "Fine."  # the first of a duplicated id wins
    assert dict(report.skipped_by_reason) == {"not JSON": 1, "no text": 1, "duplicate id": 1, "NUL byte": 1,
                                              "not an object": 1, "no id": 1}


def test_a_duplicate_across_batches_and_files_is_reported(conn, tmp_path, monkeypatch):
    monkeypatch.setattr(corpus_import, "_BATCH_ROWS", 2)
    _write_jsonl(tmp_path / "a.jsonl", [_case(f"D{i}", f"Text {i}.") for i in range(5)])
    _write_jsonl(tmp_path / "b.jsonl", [_case("D1", "Text 1 again.")])
    report, skipped = _import(conn, tmp_path)
    assert report.inserted == 5
    assert skipped == ["b.jsonl:1: duplicate id: id 'D1' was first seen at a.jsonl:2 (this one is not loaded)"]


def test_a_mapped_field_a_record_lacks_is_skipped_and_a_missing_column_skips_the_file(conn, tmp_path):
    _write_jsonl(tmp_path / "a.jsonl", [{"id": "M1", "body": "Has it."}, {"id": "M2", "text": "No body."}])
    with (tmp_path / "b.csv").open("w", newline="") as handle:
        csv.writer(handle).writerows([["id", "text"], ["M3", "CSV without a body column."]])
    report, skipped = _import(conn, tmp_path, text_field="body")
    assert report.inserted == 1
    assert skipped == [
        "a.jsonl:2: unknown mapped field: the record has no field 'body' (--text-field body)",
        "b.csv:1: unknown mapped field: the header has no column 'body' (--text-field body); columns: id, text "
        "(the file is not read)"]


def test_csv_rows_with_bad_bytes_or_the_wrong_number_of_fields_are_skipped(conn, tmp_path):
    (tmp_path / "rows.csv").write_bytes(b"id,text,court\n"
                                        b"R1,Fine.,High Court\n"
                                        b"R2,Bad byte \xff here.,High Court\n"
                                        b"R3,One field too many,High Court,extra\n"
                                        b'R4,"A quoted cell\nover two lines.",High Court\n')
    report, skipped = _import(conn, Path("rows.csv"))  # the working directory is tmp_path
    assert report.inserted == 2
    assert skipped == ["rows.csv:3: invalid UTF-8: full_text is not UTF-8 (byte 0xFF at byte 10); it looks like "
                       "Windows-1252 (Latin-1): convert the file to UTF-8, e.g. iconv -f WINDOWS-1252 -t UTF-8",
                       "rows.csv:4: bad row: 4 fields where the header has 3 (a quote not closed, or a ',' not "
                       "quoted?)"]
    assert _rows(conn)[_uuid5("R4")][4] == "A quoted cell\nover two lines."


def test_a_truncated_gzip_keeps_what_came_before(conn, tmp_path):
    whole = gzip.compress("".join(json.dumps(_case(f"T{i}", "x" * 2000 + str(i))) + "\n"
                                  for i in range(200)).encode())
    path = tmp_path / "cut.jsonl.gz"
    path.write_bytes(whole[: len(whole) // 2])
    report, skipped = _import(conn, Path(path.name))  # the working directory is tmp_path
    assert 0 < report.inserted < 200 and report.exit_code == 1
    assert skipped == [f"cut.jsonl.gz:{report.inserted + 1}: unreadable file: cannot read on (EOFError: Compressed "
                       "file ended before the end-of-stream marker was reached); what came before was loaded"]


@pytest.mark.parametrize(("kwargs", "words"), [
    ({"path": "nowhere"}, ["PATH 'nowhere' does not exist"]),
    ({"format": "xml"}, ["--format 'xml'", "jsonl, csv, parquet, cap"]),
])
def test_user_mistakes_about_sources_are_user_errors(tmp_path, kwargs, words):
    path = tmp_path / "x.jsonl"
    path.write_text("{}\n")
    with pytest.raises(UserError) as raised:
        find_sources(kwargs.get("path", path), format=kwargs.get("format"))
    for word in words:
        assert word in str(raised.value)


@pytest.mark.parametrize("pair", ["court", "=x", "tribunal=court", "court="])
def test_a_bad_map_is_a_user_error(pair):
    with pytest.raises(UserError, match="--map"):
        field_map(mapping=[pair])


# -- the command --------------------------------------------------------------------------------------

def test_the_command_loads_reports_and_exits_1_when_lines_were_skipped(lb_env, capsys, monkeypatch, tmp_path):
    path = _write_jsonl(tmp_path / "cases.jsonl", [_case("K1", "Fine."), "{oops", _case("K2", "Fine too.")])
    code, out, err = run_main(capsys, monkeypatch, "cases", "import", str(path))
    assert code == 1, err
    assert "cases.jsonl:2: not JSON:" in err
    assert "1 file, 3 records read: 2 inserted, 0 updated, 0 unchanged, 1 skipped" in out
    assert "skipped: not JSON 1" in out

    _write_jsonl(path, [_case("K1", "Fine."), _case("K2", "Fine too.")])
    code, out, err = run_main(capsys, monkeypatch, "cases", "import", str(path), "--format", "jsonl")
    assert code == 0, err
    assert "2 records read: 0 inserted, 0 updated, 2 unchanged, 0 skipped" in out


@pytest.mark.parametrize(("args", "words"), [
    (["cases", "import", "missing.jsonl"], ["missing.jsonl", "does not exist"]),
    (["cases", "import", "{file}", "--format", "yaml"], ["--format 'yaml'", "jsonl, csv, parquet, cap"]),
    (["cases", "import", "{file}", "--map", "court"], ["--map 'court'", "column=field"]),
])
def test_a_user_mistake_is_one_line_with_exit_code_2(lb_env, capsys, monkeypatch, tmp_path, args, words):
    file = _write_jsonl(tmp_path / "f.jsonl", [_case("U1", "Text.")])
    code, _, err = run_main(capsys, monkeypatch, *[arg.replace("{file}", str(file)) for arg in args])
    assert_one_line(code, err, *words)
