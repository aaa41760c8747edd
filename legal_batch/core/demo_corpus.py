"""Deterministic synthetic judgments that read like Hong Kong judgments, for demos and benchmarks.

Case `i` of seed `s` is always the same text. Generation streams: each case is built from a
pre-built pool of topic paragraphs, so 100,000 cases take minutes and constant memory.
"""

from __future__ import annotations

import math
import random
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, timedelta

_NAMESPACE = uuid.UUID("6f1b6c2e-3c55-4d0f-9a51-1d8f3a1d2b10")

COURTS: tuple[tuple[str, str, float], ...] = (
    ("HKCFA", "Court of Final Appeal", 0.05),
    ("HKCA", "Court of Appeal", 0.2),
    ("HKCFI", "Court of First Instance", 0.5),
    ("HKDC", "District Court", 0.25),
)
_SURNAMES = (
    ["Chan", "Wong", "Lee", "Cheung", "Lau", "Ho", "Ng", "Leung", "Tsang", "Lam", "Yip", "Fung", "Kwok", "Mak", "Tang", "Cheng", "Yeung", "Choi", "Poon", "Siu"]
)
_GIVEN = ["Tai Man", "Siu Ming", "Ka Wai", "Wing Yan", "Chi Keung", "Mei Ling", "Kwok Wai", "Hoi Lam", "Yuk Fan", "Chun Hei"]
_COMPANIES = ["Harbour Front Holdings Ltd", "Kowloon Textiles Co Ltd", "Pearl Delta Shipping Ltd", "Victoria Peak Properties Ltd", "Golden Dragon Finance Ltd", "Lantau Logistics Ltd", "Jade Garden Restaurants Ltd", "Star Ferry Trading Co"]

# topic: (criminal?, catchwords, facts sentences, reasoning sentences, order sentences)
_TOPICS: dict[str, tuple[bool, str, list[str], list[str], list[str]]] = {
    "drug trafficking": (
        True,
        "Criminal law – trafficking in a dangerous drug – sentencing guidelines – quantity of drug",
        [
            "Officers intercepted {D} at the Lok Ma Chau control point carrying a suitcase.",
            "A search of the suitcase revealed 1.2 kilograms of a crystalline solid containing methamphetamine.",
            "Under caution {D} said that a friend had asked {D_pron} to carry the suitcase for a fee.",
            "The quantity of dangerous drug was well above the threshold for trafficking.",
            "The drugs were packed in vacuum-sealed bags concealed beneath clothing.",
        ],
        [
            "The sentencing guidelines for trafficking in methamphetamine set starting points by quantity.",
            "Knowledge of the nature of the drug may be inferred from the circumstances of possession.",
            "A courier who transports dangerous drugs across the boundary plays an integral part in trafficking.",
            "The element of international trafficking is an aggravating factor warranting an enhancement.",
            "The plea of guilty entitles the defendant to a one-third discount on the starting point.",
        ],
        ["The appeal against sentence is dismissed.", "The conviction for trafficking in a dangerous drug is upheld."],
    ),
    "adverse possession": (
        False,
        "Land law – adverse possession – factual possession and intention to possess – Limitation Ordinance",
        [
            "The plaintiff has occupied the village house and the adjoining garden since 1985.",
            "The defendant is the registered owner of the lot in the New Territories.",
            "The plaintiff fenced the garden, grew vegetables and kept the only key to the gate.",
            "No rent was ever paid and the registered owner never visited the land.",
        ],
        [
            "Adverse possession requires factual possession and an intention to possess the land.",
            "Twelve years of adverse possession extinguish the paper owner's title under the Limitation Ordinance.",
            "Enclosure by fencing is strong evidence of factual possession of land.",
            "Acts of possession must be open and not by permission of the paper owner.",
        ],
        ["A declaration that the plaintiff has acquired possessory title is granted.", "Costs to the plaintiff."],
    ),
    "judicial review": (
        False,
        "Administrative law – judicial review – Wednesbury unreasonableness – procedural fairness – legitimate expectation",
        [
            "The applicant challenges the decision of the Director refusing the application for a licence.",
            "The Director did not give the applicant an opportunity to respond to the adverse material.",
            "The applicant had been told in writing that the policy would continue to apply.",
        ],
        [
            "A decision is Wednesbury unreasonable if no reasonable decision-maker could have reached it.",
            "Procedural fairness requires that a person affected be told the case to be met.",
            "A legitimate expectation arises from a clear and unambiguous representation by a public body.",
            "The court on judicial review is concerned with the legality of the decision, not its merits.",
        ],
        ["The decision is quashed and remitted to the Director for reconsideration.", "Costs to the applicant."],
    ),
    "employment": (
        False,
        "Employment law – wrongful dismissal – summary dismissal for misconduct – Employment Ordinance",
        [
            "The claimant was employed as a senior accountant by {D} for eleven years.",
            "The employer summarily dismissed the claimant alleging misappropriation of petty cash.",
            "The claimant denied the allegations and claimed wages in lieu of notice and long service payment.",
        ],
        [
            "Summary dismissal under section 9 of the Employment Ordinance requires wilful disobedience or misconduct.",
            "The burden lies on the employer to prove the misconduct justifying summary dismissal.",
            "Long service payment is payable where an employee with five years of service is dismissed.",
        ],
        ["Judgment for the claimant in the sum claimed with interest.", "The counterclaim is dismissed."],
    ),
    "contract misrepresentation": (
        False,
        "Contract – misrepresentation – rescission – entire agreement clause – Misrepresentation Ordinance",
        [
            "The parties signed a share purchase agreement for the shares in {D}.",
            "Before signing, the vendor represented that the company had no outstanding tax liabilities.",
            "Shortly after completion the Inland Revenue Department raised additional assessments.",
        ],
        [
            "A false statement of fact inducing a contract gives rise to a remedy in misrepresentation.",
            "An entire agreement clause does not exclude liability for fraudulent misrepresentation.",
            "Damages under the Misrepresentation Ordinance are assessed on the tortious measure.",
        ],
        ["The plaintiff is entitled to damages to be assessed.", "Costs of the action to the plaintiff."],
    ),
    "personal injury": (
        False,
        "Tort – negligence – personal injury – employees' compensation – assessment of damages – PSLA",
        [
            "The plaintiff, a construction worker, fell from a bamboo scaffold at a site in Kwun Tong.",
            "No safety harness or anchorage point was provided at the place of work.",
            "The plaintiff suffered fractures of the spine and has been unable to return to work.",
        ],
        [
            "An employer owes a non-delegable duty to provide a safe system of work.",
            "Damages for pain, suffering and loss of amenities are assessed by reference to comparable awards.",
            "Loss of future earnings is calculated using a multiplier and multiplicand.",
        ],
        ["Damages are assessed at the sum stated with interest.", "Costs to the plaintiff."],
    ),
    "non-refoulement": (
        False,
        "Immigration – non-refoulement claim – torture risk – persecution – Torture Claims Appeal Board",
        [
            "The applicant, a national of another country, overstayed and lodged a non-refoulement claim.",
            "The applicant claimed that a creditor in the home country would harm the applicant on return.",
            "The Torture Claims Appeal Board rejected the appeal after an oral hearing.",
        ],
        [
            "The risk of harm must be assessed as at the date of the decision.",
            "State protection and internal relocation are relevant to a non-refoulement claim.",
            "Leave to apply for judicial review is refused where there is no reasonably arguable ground.",
        ],
        ["Leave to apply for judicial review is refused.", "The application is dismissed."],
    ),
    "company winding-up": (
        False,
        "Company law – winding-up petition – insolvency – bona fide dispute on substantial grounds",
        [
            "The petitioner served a statutory demand on {D} for an unpaid sum under a loan facility.",
            "The company failed to pay and the petitioner presented a winding-up petition.",
            "The company contended that the debt was disputed and that it had a cross-claim.",
        ],
        [
            "A petition will be dismissed if the debt is disputed bona fide on substantial grounds.",
            "A company unable to pay its debts as they fall due is insolvent on the cash-flow test.",
            "A genuine and serious cross-claim exceeding the petition debt may justify dismissal.",
        ],
        ["A winding-up order is made in the usual form.", "The petitioner's costs are to be paid out of the assets."],
    ),
}
_TOPIC_NAMES = tuple(_TOPICS)
_LINKS = (
    "In my view, ",
    "It is common ground that ",
    "Counsel for {P} submitted that ",
    "Counsel for {D} argued that ",
    "The evidence shows that ",
    "I accept that ",
    "It follows that ",
    "",
)


@dataclass(frozen=True)
class DemoCase:
    """One synthetic judgment, as a row of `court_cases`."""

    id: uuid.UUID
    neutral_citation: str
    case_name: str
    court: str
    decision_date: date
    full_text: str
    topic: str


def case_id(seed: int, index: int) -> uuid.UUID:
    return uuid.uuid5(_NAMESPACE, f"{seed}:{index}")


def _person(rng: random.Random) -> str:
    return f"{rng.choice(_SURNAMES)} {rng.choice(_GIVEN)}"


def _sentence(rng: random.Random, pool: list[str]) -> str:
    link = rng.choice(_LINKS)
    body = rng.choice(pool)
    return link + (body[0].lower() + body[1:] if link else body)


def _length(rng: random.Random) -> int:
    """Characters: log-normal around 20K, clipped to 2K–200K."""
    return int(min(200_000, max(2_000, math.exp(rng.gauss(math.log(20_000), 1.0)))))


def generate_case(seed: int, index: int) -> DemoCase:
    """The judgment number `index` of corpus `seed` (deterministic)."""
    rng = random.Random(f"{seed}:{index}")
    code, court, _ = rng.choices(COURTS, weights=[w for *_, w in COURTS])[0]
    year = 2010 + rng.randrange(15)
    number = 1 + index % 997
    topic = _TOPIC_NAMES[rng.randrange(len(_TOPIC_NAMES))]
    criminal, catchwords, facts, reasoning, orders = _TOPICS[topic]
    plaintiff = "HKSAR" if criminal else _person(rng)
    defendant = rng.choice(_COMPANIES) if (not criminal and rng.random() < 0.3) else _person(rng)
    case_name = f"{plaintiff} v {defendant}"
    decided = date(year, 1, 1) + timedelta(days=rng.randrange(360))
    target = _length(rng)
    action = "CRIMINAL APPEAL" if criminal else "CIVIL ACTION"
    parts = [
        f"{court.upper()} OF THE HONG KONG SPECIAL ADMINISTRATIVE REGION",
        f"{action} NO {rng.randrange(1, 3000)} OF {year}",
        f"BETWEEN\n{plaintiff} (Plaintiff / Respondent)\nand\n{defendant} (Defendant / Appellant)",
        f"Neutral citation: [{year}] {code} {number}",
        f"Date of judgment: {decided.isoformat()}",
        f"Catchwords: {catchwords}",
        "JUDGMENT",
    ]
    size = sum(len(p) for p in parts)
    para_no = 0
    sections = (("BACKGROUND FACTS", facts), ("THE ISSUES AND DISCUSSION", reasoning), ("ORDER", orders))
    shares = (0.3, 0.65, 0.05)
    for (heading, pool), share in zip(sections, shares, strict=True):
        parts.append(heading)
        goal = size + max(200, int(target * share))
        while size < goal:
            para_no += 1
            text = " ".join(_sentence(rng, pool) for _ in range(rng.randint(2, 6)))
            text = text.replace("{P}", plaintiff).replace("{D_pron}", "them").replace("{D}", defendant)
            paragraph = f"{para_no}. {text}"
            parts.append(paragraph)
            size += len(paragraph) + 2
    parts.append(f"({_person(rng)})\nJudge of the {court}")
    return DemoCase(
        id=case_id(seed, index),
        neutral_citation=f"[{year}] {code} {number}",
        case_name=case_name,
        court=court,
        decision_date=decided,
        full_text="\n\n".join(parts),
        topic=topic,
    )


def generate_cases(count: int, *, seed: int = 42, start: int = 0) -> Iterator[DemoCase]:
    for index in range(start, start + count):
        yield generate_case(seed, index)


def headnote_examples() -> list[str]:
    """A few law-reporter headnotes, the few-shot examples of the headnotes flow."""
    return [
        "[2021] HKCFA 12 — Court of Final Appeal — HKSAR v Lam Kwok Wai\n"
        "Catchwords: Criminal law – trafficking – sentencing – international element.\n"
        "Held: A courier importing dangerous drugs across the boundary is liable to an enhancement of the "
        "starting point; the appeal against sentence was dismissed.",
        "[2019] HKCA 301 — Court of Appeal — Chan Siu Ming v Wong Tai Man\n"
        "Catchwords: Land law – adverse possession – intention to possess – fencing.\n"
        "Held: Enclosure and exclusive use of the garden for over twelve years established possessory "
        "title; the appeal was dismissed with costs.",
        "[2022] HKCFI 1450 — Court of First Instance — Re Golden Dragon Finance Ltd\n"
        "Catchwords: Company law – winding-up – disputed debt – cross-claim.\n"
        "Held: The debt was not disputed on substantial grounds and the cross-claim was not genuine; a "
        "winding-up order was made.",
        "[2023] HKCFI 88 — Court of First Instance — Leung Ka Wai v Director of Immigration\n"
        "Catchwords: Administrative law – judicial review – procedural fairness.\n"
        "Held: The applicant was not told the case to be met; the decision was quashed and remitted.",
    ]
