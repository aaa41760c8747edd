"""Bad input has a clear outcome, never a crash: text in another encoding than UTF-8 (reported at
import, with the encoding it looks like), HTML/XML left in a judgment's text, empty paragraphs, a
judgment of a few words, and one of more than 500,000 characters — through import, chunking, the
embeddings flow's chunk step and the local headnote."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import psycopg
import pytest

from legal_batch.core.chunking import chunk_text
from legal_batch.core.markup import plain_text
from legal_batch.flows.embeddings.flow import sync_chunks
from legal_batch.providers.base import ChatRequest
from legal_batch.providers.local import LocalProvider
from legal_batch.providers.local_models import NoHeadnote, extractive_headnote
from legal_batch_tests.core.test_chunking_real import US_OPINION
from legal_batch_tests.core.test_corpus_import import _case, _import, _rows, _uuid5

# -- text in another encoding, at import ---------------------------------------------------------------


def _jsonl_line(record: dict, encoding: str) -> bytes:
    return (json.dumps(record, ensure_ascii=False) + "\n").encode(encoding)


@pytest.mark.parametrize(("encoding", "text", "looks_like", "iconv"), [
    ("cp1252", "The défendeur’s “appeal” is dismissed.", "Windows-1252", "WINDOWS-1252"),
    ("gb18030", "本院认为，被告人张某以非法占有为目的，窃取他人财物，其行为已构成盗窃罪。", "GB18030", "GB18030"),
    ("big5", "本院認為，被告人以非法佔有為目的，竊取他人財物，其行為已構成盜竊罪。", "Big5", "BIG5"),
])
def test_a_jsonl_line_in_another_encoding_is_reported_with_the_encoding_it_looks_like(
        conn: psycopg.Connection, tmp_path: Path, encoding: str, text: str, looks_like: str, iconv: str):
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(_jsonl_line(_case("E1", "Plain ASCII judgment."), "utf-8")
                     + _jsonl_line(_case("E2", text), encoding)
                     + _jsonl_line(_case("E3", "Another one, café in UTF-8."), "utf-8"))
    report, skipped = _import(conn, Path(path.name))  # the working directory is tmp_path
    assert report.inserted == 2 and report.exit_code == 1
    assert len(skipped) == 1
    assert skipped[0].startswith("mixed.jsonl:2: invalid UTF-8: the line is not UTF-8 (byte 0x")
    assert f"it looks like {looks_like}" in skipped[0] and f"iconv -f {iconv} -t UTF-8" in skipped[0]
    assert _rows(conn)[_uuid5("E3")][4] == "Another one, café in UTF-8."


def test_a_utf16_file_is_reported_once_and_nothing_of_it_is_loaded(conn: psycopg.Connection, tmp_path: Path):
    path = tmp_path / "wide.jsonl"
    path.write_bytes("".join(json.dumps(_case(f"W{i}", "Text.")) + "\n" for i in range(3)).encode("utf-16"))
    report, skipped = _import(conn, Path(path.name))  # the working directory is tmp_path
    assert report.inserted == 0 and report.exit_code == 1
    assert skipped == ["wide.jsonl:1: invalid UTF-8: the file is UTF-16, not UTF-8: convert it, e.g. iconv -f UTF-16 "
                       "-t UTF-8; nothing of it was loaded"]


def test_a_csv_cell_in_windows_1252_names_the_encoding(conn: psycopg.Connection, tmp_path: Path):
    (tmp_path / "rows.csv").write_bytes(b"id,text\nC1,Fine.\n" + "C2,“Quoted” – café.\n".encode("cp1252"))
    report, skipped = _import(conn, Path("rows.csv"))  # the working directory is tmp_path
    assert report.inserted == 1
    assert skipped == ["rows.csv:3: invalid UTF-8: full_text is not UTF-8 (byte 0x93 at byte 1); it looks like "
                       "Windows-1252 (Latin-1): convert the file to UTF-8, e.g. iconv -f WINDOWS-1252 -t UTF-8"]


def test_a_json_document_in_latin_1_stops_where_the_encoding_breaks(conn: psycopg.Connection, tmp_path: Path):
    records = [_case("J1", "First."), _case("J2", "Société générale.")]
    (tmp_path / "cases.json").write_bytes(json.dumps(records, ensure_ascii=False, indent=1).encode("latin-1"))
    report, skipped = _import(conn, Path("cases.json"))  # the working directory is tmp_path
    assert report.exit_code == 1
    assert len(skipped) == 1 and skipped[0].startswith("cases.json:")
    assert ": invalid UTF-8: the file is not UTF-8 (byte 0xE9" in skipped[0]
    assert "iconv -f WINDOWS-1252 -t UTF-8; the rest of the file is not read" in skipped[0]


# -- HTML and XML left in the text -------------------------------------------------------------------------

HTML_OPINION = "<html><head><title>People v. Harlan</title><style>p {margin: 0}</style></head><body>\n" + "".join(
    f"<p class=\"para\">{paragraph.replace('&', '&amp;').replace('  ', ' &nbsp;')}</p>\n"
    for paragraph in US_OPINION.split("\n\n") if paragraph.strip()) + "<!-- end of opinion --></body></html>"


def test_markup_is_read_as_the_text_it_marks_up_and_offsets_still_locate_each_chunk():
    plain_chunks = chunk_text(US_OPINION, max_tokens=80, overlap_tokens=10)
    chunks = chunk_text(HTML_OPINION, max_tokens=80, overlap_tokens=10)
    for chunk in chunks:
        assert not any(mark in chunk.text for mark in ("<p", "</p>", "&nbsp;", "&amp;", "<!--", "margin")), chunk.text
        located = HTML_OPINION[chunk.char_start:chunk.char_end]
        assert plain_text(located).text.split() == chunk.text.split()
    assert [c.chunk_type for c in chunks] == [c.chunk_type for c in plain_chunks]
    assert [" ".join(c.text.split()) for c in chunks] == [" ".join(c.text.split()) for c in plain_chunks]


def test_xml_elements_are_markup_but_a_less_than_sign_in_prose_is_not():
    xml = ("<?xml version='1.0'?><casebody><opinion><author>LAVINE, J.</author><p>The value was &lt; 10 "
           "and x < y held.<page-number>*1080</page-number></p></opinion></casebody>")
    assert plain_text(xml).text.split() == ["LAVINE,", "J.", "The", "value", "was", "<", "10", "and", "x", "<", "y",
                                            "held."]
    prose = "Where x < y and <2> the rule in <unclosed cases applies."
    assert plain_text(prose).text == prose and not plain_text(prose).changed


def test_the_local_headnote_reads_an_html_judgment_like_its_text():
    assert extractive_headnote(HTML_OPINION) == extractive_headnote(US_OPINION)


# -- empty paragraphs and judgments with (almost) nothing to say -------------------------------------------

def test_empty_and_wordless_paragraphs_start_no_chunk():
    text = "\n\n \n\n\u00a0\n\n* * *\n\n—\n\nThe appeal is dismissed.\n\n\u200b\n\n\t\n\n"
    chunks = chunk_text(text, max_tokens=64, overlap_tokens=8)
    assert [c.text for c in chunks] == ["The appeal is dismissed."]


@pytest.mark.parametrize("text", ["", "   \n\n\t", ".", "* * *\n\n—\n\n…", "<p></p><p>&nbsp;</p>", "\u200b\u00a0"])
def test_a_text_without_a_letter_or_digit_has_no_chunks(text: str):
    assert chunk_text(text, max_tokens=64, overlap_tokens=8) == []


def test_a_judgment_of_a_few_words_is_one_chunk_and_no_headnote():
    chunks = chunk_text("Appeal dismissed.", max_tokens=512, overlap_tokens=64)
    assert [(c.text, c.char_start, c.char_end) for c in chunks] == [("Appeal dismissed.", 0, 17)]
    with pytest.raises(NoHeadnote, match=r"the judgment has 2 words \('Appeal dismissed.'\): too little to say"):
        extractive_headnote("Appeal dismissed.")


def test_the_local_provider_refuses_a_few_words_judgment_with_the_reason(tmp_path: Path):
    request = ChatRequest("case-1", "s", "Write the headnote of this judgment.\n\nJudgment:\n\nAppeal dismissed.")
    result = next(iter(LocalProvider(tmp_path).realtime([request], endpoint="chat", model="local-extractive-v1")))
    assert result.text is None and "the judgment has 2 words" in (result.error or "")


def _insert_case(conn: psycopg.Connection, text: str) -> str:
    case_id = str(uuid.uuid4())
    conn.execute("INSERT INTO court_cases (id, case_name, full_text) VALUES (%s, 'X v Y', %s)", (case_id, text))
    return case_id


def test_the_chunk_step_fails_a_wordless_case_with_its_reason_and_chunks_the_others(conn: psycopg.Connection):
    wordless = _insert_case(conn, "<p>&nbsp;</p>\n\n* * *\n\n")
    few = _insert_case(conn, "Appeal dismissed.")
    html = _insert_case(conn, HTML_OPINION)
    synced = sync_chunks(conn, max_tokens=128, overlap_tokens=16)
    assert (synced.cases, synced.rejected) == (3, 1)
    reason = conn.execute("SELECT last_error FROM batch_items WHERE flow = 'embeddings' AND state = 'failed'"
                          " AND subject_key = %s", (f"case:{wordless}",)).fetchone()[0]
    assert "has no words to embed" in reason
    stored = dict(conn.execute("SELECT case_id::text, count(*) FROM case_chunks GROUP BY 1").fetchall())
    assert stored[few] == 1 and stored[html] > 1 and wordless not in stored
    assert conn.execute("SELECT count(*) FROM case_chunks WHERE chunk_text ~ '<p|&nbsp;'").fetchone()[0] == 0


# -- a judgment of more than 500,000 characters -------------------------------------------------------------

BODY = [paragraph for paragraph in US_OPINION.split("\n\n") if paragraph.strip()][10:-3]


@pytest.mark.parametrize(("kind", "text"), [
    ("paragraphs", "\n\n".join(US_OPINION.split("\n\n")[:10] + BODY * 800)),
    ("one paragraph without a sentence end", "the deputies found a tank of anhydrous ammonia " * 11_000),
    ("one giant word", "x" * 520_000),
    ("Chinese without punctuation", "本院认为被告人以非法占有为目的窃取他人财物" * 26_000),
])
def test_a_judgment_of_over_500k_characters_is_chunked_in_linear_time(kind: str, text: str):
    assert len(text) > 500_000
    started = time.perf_counter()
    chunks = chunk_text(text, max_tokens=512, overlap_tokens=64)
    seconds = time.perf_counter() - started
    assert chunks and max(c.token_count for c in chunks) <= 520
    assert chunks[-1].char_end >= len(text.rstrip()) - 1
    assert all(b.char_start <= a.char_end < b.char_end for a, b in zip(chunks, chunks[1:], strict=False))
    assert seconds < 60, f"{kind}: {seconds:.1f} s (quadratic cutting took minutes)"


def test_the_local_headnote_of_a_judgment_of_over_500k_characters():
    text = "\n\n".join(US_OPINION.split("\n\n")[:-3] + BODY * 800 + US_OPINION.split("\n\n")[-3:])
    assert len(text) > 500_000
    headnote = extractive_headnote(text)
    assert headnote.startswith("123 Ill. App. 3d 456 — Appellate Court of Illinois, Fourth District")
    assert "Held: " in headnote and len(headnote) < 2_000
