"""Chunking and segmentation of judgments as real courts publish them: US opinions, Chinese judgments,
single-newline and CRLF layouts, legal abbreviations (pure, no database).

The excerpts are written for these tests in the style of each jurisdiction's judgments."""

import re

import pytest

from legal_batch.core.chunking import chunk_text
from legal_batch.core.segmentation import paragraphs, sections, sentences

US_OPINION = """\
123 Ill. App. 3d 456

PEOPLE of the State of Illinois, Plaintiff-Appellee,

v.

Thomas R. HARLAN, Defendant-Appellant.

No. 4-18-0123.

Appellate Court of Illinois, Fourth District.

Opinion filed March 3, 2020.

Jane Doe, of State Appellate Defender's Office, of Springfield, for appellant.

Opinion

JUSTICE KNECHT delivered the judgment of the court, with opinion.

Defendant appeals his conviction for unlawful possession of anhydrous ammonia. We affirm.

I. BACKGROUND

In May 2018, deputies found a tank of anhydrous ammonia in the trunk of defendant's car. See People v. Morris, 136 Ill. 2d 157, 161 (1990). The tank bore a tampered valve, cf. Smith v. Jones, 540 U.S. 1 (2003), and the deputies seized it.

II. ANALYSIS

A. Standard of Review

We review the denial of a motion to suppress de novo. Id. at 162. The question is whether the search exceeded the consent given by defendant (Tex. 2001). Acme Co. and Widget Inc. filed briefs as amici, et al. The trial court did not err.

III. CONCLUSION

For the reasons stated, we affirm the trial court's judgment.

Affirmed.

COOK, P.J., and TURNER, J., concur.
"""

ZH_JUDGMENT = """\
广东省某某市人民法院

刑事判决书

（2019）粤0101刑初123号

公诉机关某某市某某区人民检察院。

被告人王某，男，1980年1月1日出生。

某某区人民检察院以起诉书指控被告人王某犯盗窃罪，于2019年3月1日向本院提起公诉。本院依法适用简易程序，公开开庭审理了本案。现已审理终结。

公诉机关指控，2019年1月5日，被告人王某在某商场窃取他人手机一部。

经审理查明，2019年1月5日14时许，被告人王某在某商场内窃取被害人李某手机一部，价值人民币三千元。案发后手机已发还被害人！

本院认为，被告人王某以非法占有为目的，秘密窃取他人财物，数额较大，其行为已构成盗窃罪。被告人归案后如实供述罪行，可以从轻处罚；依照《中华人民共和国刑法》第二百六十四条的规定，判决如下：

被告人王某犯盗窃罪，判处拘役四个月，并处罚金人民币二千元。

审判员张某

二〇一九年三月二十日

书记员刘某

附：相关法律条文

《中华人民共和国刑法》第二百六十四条盗窃公私财物，数额较大的，处三年以下有期徒刑、拘役或者管制。
"""


class kinds_by_start:  # noqa: N801 - reads as a mapping
    """The section of the paragraph that starts with a given prefix."""

    def __init__(self, text: str) -> None:
        self.found = [(text[s:e], kind) for s, e, kind in sections(text)]

    def __getitem__(self, prefix: str) -> str:
        return next(kind for paragraph, kind in self.found if paragraph.startswith(prefix))


def test_us_opinion_sections_come_from_its_own_headings_and_lines():
    kinds = kinds_by_start(US_OPINION)
    assert kinds["123 Ill. App"] == "header" and kinds["PEOPLE of th"] == "header"
    assert kinds["Jane Doe, of"] == "header"
    assert kinds["Defendant ap"] == "body"
    assert kinds["In May 2018,"] == "facts"
    assert kinds["We review th"] == "reasoning", "a lettered sub-heading stays in its section"
    assert kinds["For the reas"] == "order"
    assert kinds["Affirmed."] == "order"
    assert kinds["COOK, P.J., "] == "order"


def test_chinese_judgment_sections_come_from_its_phrases():
    kinds = kinds_by_start(ZH_JUDGMENT)
    assert kinds["广东省某某市人民法院"] == "header"
    assert kinds["某某区人民检察院以起诉书"] == "header", "the procedural history closes the header"
    assert kinds["公诉机关指控，2019"] == "issues"
    assert kinds["经审理查明，2019"] == "facts"
    assert kinds["本院认为，被告人王某以非"] == "reasoning"
    assert kinds["被告人王某犯盗窃罪，判处"] == "order"
    assert kinds["附：相关法律条文"] == "footnotes"


def test_hong_kong_layout_still_starts_the_body_at_judgment():
    text = ("IN THE HIGH COURT OF THE HONG KONG SPECIAL ADMINISTRATIVE REGION\n\nCOURT OF FIRST INSTANCE\n\n"
            "HCA 1234/2020\n\nBETWEEN\nChan Tai Man (Plaintiff)\nand\nWong Siu Ming (Defendant)\n\nJUDGMENT\n\n"
            "1. This is a claim for possession of land.\n\nTHE ISSUES\n\n2. The issue is whether time ran.\n\n"
            "DISCUSSION\n\n3. It did.\n\nORDERS\n\n4. The claim is dismissed.")
    kinds = kinds_by_start(text)
    assert kinds["HCA 1234/202"] == "header" and kinds["JUDGMENT"] == "header"
    assert kinds["1. This is a"] == "body"
    assert kinds["2. The issue"] == "issues"
    assert kinds["3. It did."] == "reasoning"
    assert kinds["4. The claim"] == "order"


def test_chunk_types_of_real_layouts_are_not_all_header():
    for text in (US_OPINION, ZH_JUDGMENT):
        chunks = chunk_text(text, max_tokens=60, overlap_tokens=0)
        types = [c.chunk_type for c in chunks]
        assert types.count("header") < len(types) / 2, types
        assert "order" in types and ("facts" in types or "reasoning" in types)


def test_single_newline_and_crlf_layouts_give_the_same_paragraphs():
    blank = US_OPINION
    single = US_OPINION.replace("\n\n", "\n")
    crlf = US_OPINION.replace("\n\n", "\r\n")
    crlf_blank = US_OPINION.replace("\n", "\r\n")

    def texts(text: str) -> list[str]:
        return [text[s:e] for s, e in paragraphs(text)]

    expected = texts(blank)
    assert len(expected) == blank.count("\n\n") + 1
    assert texts(single) == expected
    assert texts(crlf) == expected
    assert texts(crlf_blank) == expected


def test_hard_wrapped_lines_continue_their_paragraph():
    text = ("The deputies found the tank in the trunk of the\ncar and seized it. Defendant moved to suppress\n"
            "the evidence, citing Morris, 136 Ill.\n2d 157 (1990).\nThe motion was denied.\n\nII. ANALYSIS\n"
            "We affirm.")
    found = [text[s:e] for s, e in paragraphs(text)]
    assert found[0].startswith("The deputies") and found[0].endswith("2d 157 (1990).")
    assert found[1:] == ["The motion was denied.", "II. ANALYSIS", "We affirm."]


@pytest.mark.parametrize("citation_sentence", [
    "See People v. Morris, 136 Ill. 2d 157, 161 (1990).",
    "The tank bore a tampered valve, cf. Smith v. Jones, 540 U.S. 1 (2003), and the deputies seized it.",
    "The question is whether the search exceeded the consent (Tex. 2001).",
    "Acme Co. and Widget Inc. filed briefs as amici, et al.",
    "Under s. 12(3) of the Ordinance, para. 5 applies, see [2020] UKSC 1 and No. 4-18-0123.",
    "The claim arises under 42 U.S.C. § 1983 and 123 F.3d 456 (5th Cir. 1997), e.g. in Doe v. Roe.",
])
def test_sentences_do_not_end_at_legal_abbreviations(citation_sentence: str):
    text = f"The court heard argument. {citation_sentence} The appeal fails."
    found = [text[s:e] for s, e in sentences(text)]
    assert found == ["The court heard argument.", citation_sentence, "The appeal fails."]


def test_chinese_sentences_end_at_chinese_punctuation():
    text = "被告人王某到案。本院认为，其行为构成盗窃罪！是否从轻？可以从轻；判决如下："
    found = [text[s:e] for s, e in sentences(text)]
    assert found == ["被告人王某到案。", "本院认为，其行为构成盗窃罪！", "是否从轻？", "可以从轻；", "判决如下："]


def test_overlaps_start_at_a_sentence_not_an_abbreviation_nor_inside_a_word():
    paragraph = ("The deputies found anhydrous ammonia in the trunk, as in People v. Morris, 136 Ill. 2d 157, 161 "
                 "(1990), and in Smith v. Jones, 2001 Tex. App. LEXIS 5 (Tex. App. 2001). ")
    text = "\n\n".join(f"{n}. {paragraph * 3}" for n in range(1, 9))
    chunks = chunk_text(text, max_tokens=120, overlap_tokens=30)
    assert len(chunks) > 4
    for chunk in chunks[1:]:
        start = chunk.text[:20]
        assert not re.match(r"(2d|2001\)|Tex\.|App\.|Jones|Morris)", start), start
        assert chunk.char_start == 0 or not (text[chunk.char_start - 1].isalnum() and text[chunk.char_start].isalnum())
    for chunk in chunks:
        end = chunk.char_end
        assert end == len(text) or not (text[end - 1].isalnum() and text[end].isalnum()), text[end - 10:end + 10]


def test_a_paragraph_over_the_budget_is_cut_between_sentences_then_words():
    sentence = "The deputies found a tank of anhydrous ammonia in the trunk of the defendant's car. "
    text = sentence * 60 + "x" + " averylongwordwithoutspaces" * 80
    chunks = chunk_text(text, max_tokens=100, overlap_tokens=0)
    assert all(c.token_count <= 105 for c in chunks)
    for chunk in chunks:
        end = chunk.char_end
        assert end == len(text) or not (text[end - 1].isalnum() and text[end].isalnum())
    assert chunks[0].text.endswith("car.")


def test_a_long_chinese_paragraph_is_cut_at_sentence_ends():
    text = "经审理查明，" + "被告人王某在某商场内窃取被害人李某手机一部，价值人民币三千元。" * 60
    chunks = chunk_text(text, max_tokens=120, overlap_tokens=0)
    assert len(chunks) > 3
    assert all(c.text.endswith("。") for c in chunks)
    assert {c.chunk_type for c in chunks} == {"facts"}
