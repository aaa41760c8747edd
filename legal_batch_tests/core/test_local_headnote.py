"""The local extractive headnote and the headnote prompt on judgments of other jurisdictions: US
opinions, Chinese judgments, Hong Kong judgments; citations, holdings, refusals and few-shot examples.

The excerpts are written for these tests in the style of each jurisdiction's judgments."""

from datetime import date
from pathlib import Path

import psycopg
import pytest

from legal_batch.flows.headnotes.flow import (
    BUILT_IN_EXAMPLES,
    SYSTEM_INSTRUCTIONS,
    CaseText,
    build_request,
    case_header,
    few_shot_examples,
    system_prompt,
)
from legal_batch.providers.base import ChatRequest
from legal_batch.providers.local import LocalProvider
from legal_batch.providers.local_models import CITATION, NoHeadnote, extractive_headnote

US_OPINION = """\
123 Ill. App. 3d 456

PEOPLE of the State of Illinois, Plaintiff-Appellee,

v.

Thomas R. HARLAN, Defendant-Appellant.

No. 4-18-0123.

Appellate Court of Illinois, Fourth District.

Opinion

JUSTICE KNECHT delivered the judgment of the court, with opinion.

Defendant appeals his conviction for unlawful possession of anhydrous ammonia, arguing that the deputies \
searched his trunk without consent. We hold that a general consent to search a car extends to its trunk.

I. BACKGROUND

In May 2018, deputies stopped defendant for speeding and asked to search his car. He agreed. They found a \
tank of anhydrous ammonia in the trunk.[1]

II. ANALYSIS

A. Scope of Consent

Defendant contends that the trial court erred in denying his motion to suppress. See People v. Morris, 136 \
Ill. 2d 157, 161 (1990); Smith v. Jones, 540 U.S. 1 (2003); People v. Ross, 2019 IL App (4th) 180123. A \
reasonable person would understand a consent to search a car to include its trunk.

III. CONCLUSION

Affirmed.

COOK, P.J., and TURNER, J., concur.

--------

Notes:

[1] The tank was later tested and found to contain anhydrous ammonia.
"""

DISPOSITION_ONLY = """\
540 U.S. 1

SUPREME COURT OF THE UNITED STATES

DOE v. ROE

Per Curiam

Petitioner appeals from the judgment of the Court of Appeals dismissing her claim for want of \
jurisdiction under the statute.

The facts are not in dispute. Petitioner filed her claim two days after the period ran out.

Affirmed.

JUSTICE SMITH took no part in the consideration or decision of this case.
"""

ZH_JUDGMENT = """\
最高人民法院

民事判决书

（2019）最高法民终123号

上诉人（原审原告）某某公司。

被上诉人（原审被告）某某银行。

上诉人某某公司因与被上诉人某某银行借款合同纠纷一案，不服某某省高级人民法院民事判决，向本院提起上诉。本院依法组成合议庭，\
开庭审理了本案。现已审理终结。

某某公司上诉请求：撤销一审判决，改判某某银行返还款项一千万元。

本院经审理查明：2018年1月，某某公司与某某银行签订借款合同，约定借款一千万元。

本院认为，双方签订的借款合同系当事人真实意思表示，合法有效，某某公司的上诉请求缺乏事实和法律依据，不予支持。依照《中华人民共和国\
民事诉讼法》第一百七十条第一款第一项规定，判决如下：

驳回上诉，维持原判。

本判决为终审判决。

审判长李某

二〇一九年六月一日
"""


def held(headnote: str) -> str:
    return next(line for line in headnote.splitlines() if line.startswith("Held: ")).removeprefix("Held: ")


@pytest.mark.parametrize("citation", [
    "123 Ill. App. 3d 456", "540 U.S. 1", "100 A.3d 1004", "2019 IL App (4th) 180123", "581 U.S. ___",
    "[2022] HKCA 12", "[2020] UKSC 1", "[2021] EWHC 456 (Ch)", "（2019）最高法民终123号", "(2019)京01民终1234号",
])
def test_citations_of_the_common_forms_are_recognised(citation: str):
    found = CITATION.search(f"as decided in {citation}, which we follow")
    assert found is not None and found.group(0) == citation


def test_us_opinion_headnote_takes_its_own_citation_and_holding_not_a_concurrence_or_footnote():
    headnote = extractive_headnote(US_OPINION)
    first = headnote.splitlines()[0]
    assert first.startswith("123 Ill. App. 3d 456 — Appellate Court of Illinois, Fourth District — ")
    assert "HARLAN" in first and "PEOPLE" in first
    text = held(headnote)
    assert text.startswith("A general consent to search a car extends to its trunk.")
    assert text.endswith("Affirmed.")
    for wrong in ("concur", "tested and found", "Scope of Consent", "CONCLUSION", "contends"):
        assert wrong not in text


def test_a_disposition_only_ending_is_held_with_its_context():
    text = held(extractive_headnote(DISPOSITION_ONLY))
    assert text == ("Petitioner appeals from the judgment of the Court of Appeals dismissing her claim for want of "
                    "jurisdiction under the statute. Affirmed.")


def test_nothing_to_hold_is_refused_not_written_as_an_empty_held():
    with pytest.raises(NoHeadnote, match="nothing to write as Held"):
        extractive_headnote("540 U.S. 1\n\nSUPREME COURT OF THE UNITED STATES\n\nDOE v. ROE\n\nAffirmed.")


def test_the_local_provider_fails_the_item_with_the_reason(tmp_path: Path):
    provider = LocalProvider(tmp_path)
    request = ChatRequest("case-1", "Write headnotes.", "Write the headnote of this judgment.\n\nJudgment:\n\n"
                          "DOE v. ROE\n\nAffirmed.")
    result = next(iter(provider.realtime([request], endpoint="chat", model="local-extractive-v1")))
    assert result.text is None and not result.retryable
    assert "nothing to write as Held" in (result.error or "")


def test_chinese_judgment_headnote_has_its_case_number_reasoning_and_order():
    headnote = extractive_headnote(ZH_JUDGMENT)
    assert headnote.splitlines()[0] == "（2019）最高法民终123号 — 最高人民法院"
    text = held(headnote)
    assert text.startswith("双方签订的借款合同系当事人真实意思表示，合法有效")
    assert text.endswith("驳回上诉，维持原判。")
    assert "审判长" not in headnote and "本判决为终审判决" not in text
    assert "2018年1月" in headnote.splitlines()[-1]


def test_labelled_case_details_of_the_request_come_first():
    case = CaseText("case-1", "（2019）最高法民终123号", "某某公司诉某某银行借款合同纠纷", "最高人民法院", date(2019, 6, 1),
                    ZH_JUDGMENT)
    request = build_request(case, system="s", max_chars=150_000, max_tokens=600, temperature=0.1)
    first = extractive_headnote(request.user).splitlines()[0]
    assert first == "（2019）最高法民终123号 — 最高人民法院 — 某某公司诉某某银行借款合同纠纷"


def test_the_prompt_fits_the_case_language_and_citation_kind():
    assert "British English" not in SYSTEM_INSTRUCTIONS
    assert "neutral citation —" not in SYSTEM_INSTRUCTIONS and "the case's citation" in SYSTEM_INSTRUCTIONS
    zh = case_header(CaseText("case-1", "（2019）最高法民终123号", None, "最高人民法院", None, ZH_JUDGMENT))
    assert "The judgment is in Chinese: write the headnote in Chinese." in zh
    assert "Citation: （2019）最高法民终123号" in zh
    us = case_header(CaseText("case-2", "123 Ill. App. 3d 456", None, None, None, US_OPINION))
    assert "Citation: 123 Ill. App. 3d 456" in us and "write the headnote in" not in us
    hk = case_header(CaseText("case-3", "[2022] HKCA 12", None, None, None, "JUDGMENT\n\n1. The appeal fails."))
    assert "Neutral citation: [2022] HKCA 12" in hk


def test_few_shot_examples_fall_back_to_the_built_in_ones_while_the_corpus_is_empty(conn: psycopg.Connection):
    conn.execute("DELETE FROM headnote_corpus")
    examples = few_shot_examples(conn, count=2)
    assert examples == list(BUILT_IN_EXAMPLES[:2])
    assert "Examples of the form" in system_prompt(examples)
    conn.execute("INSERT INTO headnote_corpus (headnote_text) VALUES ('[2020] HKCA 1 — Court of Appeal — A v B')")
    examples = few_shot_examples(conn, count=2)
    assert examples == ["[2020] HKCA 1 — Court of Appeal — A v B"]
    assert "house style" in system_prompt(examples)
