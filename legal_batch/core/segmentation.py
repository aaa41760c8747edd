"""Paragraphs, sentences and sections of a judgment's text, in the layouts real judgments come in.

- **Paragraphs** are separated by a blank line, or by a single line break (LF, CRLF or CR) where the
  line before ends a sentence, is a heading or a short line, or the next line starts a numbered
  paragraph (`1.`, `[1]`, `¶ 1`, `(1)`, `一、`, `（一）`), a heading or an indented block; a line that
  ends mid-sentence continues its paragraph (hard-wrapped text).
- **Sentences** in alphabetic scripts come from nupunkt (ALEA Institute's Punkt, trained on legal and
  financial text; its parameters ship inside the wheel, nothing is downloaded, pure Python, no
  dependencies), with the legal abbreviations of `LEGAL_ABBREVIATIONS` added so `v.`, `cf.`, `Ill.`,
  `F.3d`, `U.S.`, `No.`, `Inc.`, `J.`, `P.J.`, `et al.`, `para.` or `s.` never end one. Chinese and
  Japanese sentences end at 。！？； (closing quotes and brackets stay with their sentence).
- **Sections** (`SectionTracker`): header (court, parties, counsel, coram), facts, issues,
  reasoning, order (conclusion, disposition, costs), footnotes (notes and annexes), or body when
  nothing says which. They come from headings in the US, UK, Hong Kong and Commonwealth styles
  (`BACKGROUND`, `I. FACTS`, `II. ANALYSIS`, `CONCLUSION`, `Opinion`, `JUDGMENT`, `REASONS FOR
  JUDGMENT`), Chinese section phrases (经审理查明, 本院认为, 判决如下, traditional forms too), opinion
  lines (`LAVINE, J.`, `JUSTICE KAGAN delivered the opinion of the Court.`), disposition lines
  (`Affirmed.`, `It is so ordered.`), concurrence lines and separate opinions.

Offsets are always into the original text: nothing here rewrites it.
"""

from __future__ import annotations

import re
import statistics
from collections.abc import Iterator
from functools import lru_cache
from typing import Literal

SectionType = Literal["header", "facts", "issues", "reasoning", "order", "footnotes", "body"]

LEGAL_ABBREVIATIONS = (
    # signals, case names and references
    "v", "vs", "cf", "id", "ibid", "supra", "infra", "e.g", "i.e", "et al", "al", "etc", "viz", "seq", "ff",
    "no", "nos", "para", "paras", "s", "ss", "art", "arts", "reg", "regs", "sch", "ch", "cap", "pt", "sec",
    "secs", "r", "rr", "o", "cl", "sub", "n", "nn", "p", "pp", "fn", "op", "slip", "ed", "eds", "rev", "stat",
    "ann", "const", "amend", "div", "dist", "cir", "app", "ct", "supp", "super", "sup", "ch", "crim", "civ",
    "proc", "evid", "admin", "gen", "code", "ord", "cong", "sess", "misc",
    # parties, courts and judges
    "inc", "co", "corp", "ltd", "llc", "llp", "bros", "assn", "ass'n", "dep't", "dept", "comm'n", "comm",
    "int'l", "nat'l", "gov't", "univ", "mfg", "ins", "mut", "j", "jj", "c.j", "p.j", "l.j", "v.p", "mr", "mrs",
    "ms", "dr", "hon", "st", "mt", "ft", "jr", "sr", "esq",
    # US reporters and states
    "u.s", "s.ct", "l.ed", "f", "f.2d", "f.3d", "f.4th", "a.2d", "a.3d", "n.e", "n.e.2d", "n.e.3d", "n.w",
    "n.w.2d", "s.e", "s.e.2d", "s.w", "s.w.2d", "s.w.3d", "so", "p.2d", "p.3d", "cal", "rptr", "ill", "tex",
    "conn", "mass", "md", "va", "w.va", "pa", "n.y", "n.j", "ohio", "mich", "minn", "wis", "ala", "ariz", "ark",
    "colo", "del", "fla", "ga", "ind", "kan", "ky", "la", "me", "miss", "mo", "mont", "neb", "nev", "n.h",
    "n.m", "n.c", "n.d", "okla", "or", "r.i", "s.c", "s.d", "tenn", "vt", "wash", "wyo", "d.c", "u.s.c",
    "c.f.r", "jan", "feb", "mar", "apr", "jun", "jul", "aug", "sept", "sep", "oct", "nov", "dec",
)

_NEWLINE = re.compile(r"\r\n|\r|\n")
_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af"
_CJK_CHAR = re.compile(f"[{_CJK}]")
_CJK_SENTENCE_END = re.compile(r"[。！？；!?]+[”’」』）)\]】]*")
_SENTENCE_END = re.compile(r"(?:[.!?;:。！？；：]|\.\.\.)[\"'”’)\]】」』]*(?:\[\d{1,3}\]|\*+)?$")
_LAST_WORD = re.compile(r"(\S+)\.[\"'”’)\]]*$")
_INITIALS = re.compile(r"^(?:[A-Za-z]\.)*[A-Za-z]$")
_BLOCK_START = re.compile(
    r"^(?:\d{1,4}\.\s|\[\d{1,4}\]|¶+\s*\d|\(\d{1,3}\)\s|\([a-z]{1,4}\)\s|[一二三四五六七八九十百]+、|"
    r"[（(][一二三四五六七八九十百]+[）)]|第[一二三四五六七八九十百零〇\d]+条)"
)
_NUMBERED_PARAGRAPH = re.compile(r"^(?:\d{1,4}\.\s+\S|\[\d{1,4}\]\s*\S|¶+\s*\d{1,4}\.?\s+\S)")
_NUMBERING = re.compile(r"^(?:(?:[IVXLC]{1,7}|[A-Za-z]|\d{1,2}(?:\.\d{1,2})*)[.)]|\(\s*(?:[ivxlc]{1,6}|[a-z]|\d{1,2})\s*\))\s*")
_BARE_NUMBERING = re.compile(r"^(?:[IVXLC]{1,7}|[A-Z]|\d{1,2})\.?$")
_ROMAN_HEADING = re.compile(r"^[IVXLC]{1,7}(?:[.)]|$)")
_SUBHEADING = re.compile(r"^(?:[A-Za-z]|\d{1,2}(?:\.\d{1,2})*)[.)]\s|^\(")


# -- lines and paragraphs -------------------------------------------------------------------------------

def _lines(text: str, start: int = 0, end: int | None = None) -> Iterator[tuple[int, int]]:
    """(start, end) of each line of `text[start:end]`, without its line break."""
    end = len(text) if end is None else end
    pos = start
    for match in _NEWLINE.finditer(text, start, end):
        yield pos, match.start()
        pos = match.end()
    if pos < end:
        yield pos, end


def has_cjk(text: str) -> bool:
    return _CJK_CHAR.search(text) is not None


def ends_sentence(line: str) -> bool:
    """Whether `line` ends with sentence-final punctuation that is not an abbreviation's period."""
    line = line.rstrip()
    if not _SENTENCE_END.search(line):
        return False
    last = _LAST_WORD.search(line)
    if last is None or line.endswith(("..", "?", "!")):
        return True
    word = last.group(1).lstrip("([\"'“‘").lower()
    return not (word in _ABBREVIATIONS or _INITIALS.match(word) and len(word) <= 3)


_ABBREVIATIONS = frozenset(LEGAL_ABBREVIATIONS)


def _indent(text: str, start: int, end: int) -> int:
    line = text[start:end]
    return len(line) - len(line.lstrip(" \t\u3000"))


def paragraphs(text: str, start: int = 0, end: int | None = None) -> Iterator[tuple[int, int]]:
    """(start, end) of each paragraph of `text[start:end]`, surrounding whitespace excluded."""
    lines = [(s, e) for s, e in _lines(text, start, end)]
    widths = [len(text[s:e].strip()) for s, e in lines]
    filled = [w for w in widths if w]
    long_line = statistics.quantiles(filled, n=10)[-1] if len(filled) >= 10 else max(filled, default=0)
    short = max(24.0, 0.6 * long_line)
    current: tuple[int, int] | None = None
    previous = ""
    previous_indent = 0
    for (line_start, line_end), width in zip(lines, widths, strict=True):
        if not width:
            if current is not None:
                yield current
                current = None
            continue
        line = text[line_start:line_end]
        indent = _indent(text, line_start, line_end)
        stripped = line.strip()
        left = line_start + indent
        right = line_start + len(line.rstrip())
        if current is not None and _breaks_before(previous, stripped, abs(indent - previous_indent) >= 2, short):
            yield current
            current = None
        current = (left, right) if current is None else (current[0], right)
        previous, previous_indent = stripped, indent
    if current is not None:
        yield current


def _breaks_before(previous: str, line: str, indent_changed: bool, short: float) -> bool:
    """Whether a single line break between `previous` and `line` separates two paragraphs."""
    if indent_changed or _BLOCK_START.match(line) or heading_words(line) is not None:
        return True
    if heading_words(previous) is not None or _opinion_line(previous) or len(previous) < short:
        return True
    first = line[:1]
    if first.islower() and not has_cjk(first):
        return False
    return ends_sentence(previous)


# -- sentences ------------------------------------------------------------------------------------------

@lru_cache(maxsize=1)
def _tokenizer():  # noqa: ANN202 - nupunkt's tokenizer type
    from nupunkt.models import load_default_model

    tokenizer = load_default_model()  # a fresh instance: the abbreviations below stay ours
    tokenizer.add_abbreviations([a for a in LEGAL_ABBREVIATIONS if " " not in a])
    return tokenizer


def sentences(text: str, start: int = 0, end: int | None = None) -> list[tuple[int, int]]:
    """(start, end) of each sentence of `text[start:end]` (treated as one paragraph)."""
    end = len(text) if end is None else end
    piece = text[start:end]
    if not piece.strip():
        return []
    spans: list[tuple[int, int]] = []
    for s, e in _tokenizer().span_tokenize(piece):
        spans.extend(_cjk_sentences(piece, s, e))
    spans = _merge_abbreviation_only(piece, spans)
    return [(start + s, start + e) for s, e in spans]


def _cjk_sentences(piece: str, start: int, end: int) -> Iterator[tuple[int, int]]:
    pos = start
    for match in _CJK_SENTENCE_END.finditer(piece, start, end):
        if match.end() < end and has_cjk(piece[pos:match.end()]):
            yield _trim(piece, pos, match.end())
            pos = match.end()
    if piece[pos:end].strip():
        yield _trim(piece, pos, end)


def _trim(piece: str, start: int, end: int) -> tuple[int, int]:
    while start < end and piece[start].isspace():
        start += 1
    while end > start and piece[end - 1].isspace():
        end -= 1
    return start, end


def _merge_abbreviation_only(piece: str, spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Join a "sentence" that is one abbreviation (`Cf.`, `Id.`, `No.`) to the sentence after it."""
    merged: list[tuple[int, int]] = []
    pending: int | None = None
    for s, e in spans:
        if pending is not None:
            s, pending = pending, None
        word = piece[s:e].strip().rstrip(".").lower()
        if " " not in word and word in _ABBREVIATIONS and piece[s:e].rstrip().endswith("."):
            pending = s
            continue
        merged.append((s, e))
    if pending is not None:
        merged.append((pending, spans[-1][1]))
    return merged


def sentence_start(text: str, pos: int, end: int) -> int | None:
    """The first sentence or paragraph start in `text[pos:end]`, or None."""
    window = max(0, pos - 300)
    space = text.find(" ", window, pos)
    window = space + 1 if window and space != -1 else window
    for para_start, para_end in paragraphs(text, window, end):
        if para_start >= pos:
            return para_start
        if para_end <= pos:
            continue
        for s, _ in sentences(text, para_start, para_end):
            if s >= pos:
                return s
    return None


def word_start(text: str, pos: int, end: int) -> int:
    """`pos` if a word may start there (after a space, at a CJK character), else the next such place."""
    while pos < end:
        if pos == 0 or text[pos - 1].isspace() or _CJK_CHAR.match(text, pos) or _CJK_CHAR.match(text, pos - 1):
            while pos < end and text[pos].isspace():
                pos += 1
            return pos
        pos += 1
    return end


def word_end(text: str, pos: int, start: int) -> int:
    """`pos` if a word may end there (before a space, at a CJK character), else the last such place
    after `start`; `pos` itself when the whole of `text[start:pos]` is one word."""
    cut = pos
    while cut > start:
        if cut == len(text) or text[cut].isspace() or _CJK_CHAR.match(text, cut) or _CJK_CHAR.match(text, cut - 1):
            while cut > start and text[cut - 1].isspace():
                cut -= 1
            return cut if cut > start else pos
        cut -= 1
    return pos


# -- headings and sections ------------------------------------------------------------------------------

_BODY_START_HEADINGS = re.compile(
    r"^(?:(?:judgm?ent|judgement|opinion|majority opinion|memorandum opinion|memorandum|summary order)\b(?! on costs).*"
    r"|per curiam|ruling|decision|reasons|reasons for (?:judgm?ent|decision|verdict|sentence|ruling))$"
)
_SYLLABUS = re.compile(r"^syllabus(?: by the court)?$")
_SECTION_WORDS: dict[SectionType, tuple[str, ...]] = {
    "footnotes": ("footnotes", "footnote", "endnotes", "notes", "annex", "annexure", "appendix", "schedule"),
    "facts": ("facts", "fact", "factual", "background", "the evidence", "history", "circumstances", "introduction",
              "statement of the case", "proceedings below", "procedural posture", "the proceedings", "the trial"),
    "issues": ("issues", "issue", "questions presented", "question presented", "questions", "grounds of appeal",
               "points of law", "point of law", "the question"),
    "reasoning": ("discussion", "analysis", "reasons", "reasoning", "law", "standard of review", "submissions",
                  "arguments", "argument", "merits", "legal framework", "applicable law", "consideration",
                  "considerations", "jurisdiction", "findings", "assessment", "evaluation"),
    "order": ("orders", "order", "disposition", "conclusions", "conclusion", "costs", "sentence", "sentencing",
              "result", "outcome", "relief", "decree", "remedy", "remedies", "mandate", "judgment of the court"),
}
_SECTION_PATTERN = re.compile(
    r"\b(" + "|".join(sorted((re.escape(w) for words in _SECTION_WORDS.values() for w in words), key=len,
                             reverse=True)) + r")\b"
)
_SECTION_OF_WORD = {w: kind for kind, words in _SECTION_WORDS.items() for w in words}
_ZH_HEADING_WORDS: tuple[tuple[str, SectionType], ...] = (
    ("注释|註釋|脚注|腳註|附录|附錄|附件", "footnotes"),
    ("事实|事實|案情|背景|经过|經過", "facts"),
    ("争议焦点|爭議焦點|争议|爭議|上诉理由|上訴理由|问题|問題|争点|爭點", "issues"),
    ("讨论|討論|分析|理由|本院认为|本院認為|法律|裁判理由|考虑|考慮", "reasoning"),
    ("结论|結論|判决|判決|命令|裁决|裁決|判项|判項|判令|刑罚|刑罰|量刑", "order"),
)
_ZH_PARAGRAPH: tuple[tuple[re.Pattern[str], SectionType], ...] = (
    (re.compile(r"^(?:附[：:\s]|附[相有本引件录錄]|本案(?:所)?(?:引用|适用|適用|依据|依據|主要适用)|本判决书(?:所)?(?:引用|援引)"
                r"|本判決書(?:所)?(?:引用|援引)|相关法律条文|相關法律條文)"), "footnotes"),
    (re.compile(r"^(?:[^，。：:,]{0,8}?(?:查明|(?:审|審)理(?:认定|認定))|(?:经|經)(?:审|審)查(?:认定|認定)"
                r"|(?:一审|一審|原审|原審|二审|二審|本院二审|本院二審)(?:查明|认定|認定)|上述事实|上述事實|以上事实|以上事實"
                r"|认定上述事实|認定上述事實|本院(?:确认|確認|认定如下|認定如下))"), "facts"),
    (re.compile(r"^(?:本院(?:经审查|經審查|经审理|經審理|二审)?(?:认为|認為)|综上所述|綜上所述)"), "reasoning"),
    (re.compile(r"^(?:判决如下|判決如下|裁定如下|决定如下|決定如下|如不服本判决|如不服本判決|如不服本裁定|本判决为终审判决"
                r"|本判決為終審判決|本裁定为终审裁定)"), "order"),
    (re.compile(r"^(?:[^。，,：:]{0,40}?(?:公诉机关|公訴機關|检察院|檢察院|原告|被告|上诉人|上訴人|被上诉人|被上訴人|申请人|申請人|"
                r"被申请人|申诉人|辩护人|辯護人|代理人)[^。，,]{0,30}?(?:指控|诉称|訴稱|辩称|辯稱|上诉称|上訴稱|申请称|申請稱|"
                r"请求|請求|提出|辩解|辯解|答辩|答辯|无异议|無異議)|争议焦点|爭議焦點)"), "issues"),
)
_ZH_ORDER_NEXT = re.compile(r"(?:判决如下|判決如下|裁定如下|决定如下|決定如下)[：:]?\s*$")
_ZH_HEADER_END = re.compile(r"(?:审理终结|審理終結)")
_JUDGE_TITLE = r"(?:C\.\s?J\.|P\.\s?J\.|A\.\s?J\.|L\.\s?J\.|JJ?\.|J\.A\.|JA|CJHC|CJ|VP|PJ|NPJ|JJA|LJ|SPJ|Associate Judge|Chief Judge|Senior Judge|Judge|Justice|Chief Justice|Presiding Judge)"
_OPINION_LINE = re.compile(
    r"^(?:(?:Opinion of the Court by |Opinion by |Statement of |By )?(?:(?:CHIEF |SENIOR )?JUSTICE |Justice |Judge |JUDGE |"
    r"Lord |LORD |Lady |LADY |Hon\.? |The Hon\.? |Mr\.? Justice |Mrs\.? Justice |Ms\.? Justice )?"
    r"[A-Z][A-Za-z'’\-]+(?:\s[A-Z][A-Za-z'’\-]+){0,3}"
    r"(?:(?:,\s*|\s+)" + _JUDGE_TITLE + r")?(?:\s*\([^)]{1,40}\))?\s*[.:]?"
    r"|.{0,80}\bdelivered the (?:opinion|judgment|decision|leading judgment)\b.{0,80}"
    r"|per curiam\.?|PER CURIAM\.?|Per Curiam\.?)$"
)
_JUDGE_MARK = re.compile(r"\b(?:" + _JUDGE_TITLE + r"|JUSTICES?|Justices?|Judges?|LORDS?|Lords?|LADY|Lady|Hon)(?=\W|$)|,\s*JJ?\.")
_SEPARATE_OPINION = re.compile(r"\b(?:concurring|dissenting)\b", re.I)
_CONCUR_LINE = re.compile(
    r"(?:\b(?:concurs?|concurred|agrees?|agreed|joins?|joined)(?: in (?:the )?(?:judgment|opinion|result)"
    r"(?: and (?:the )?(?:judgment|opinion))?)?\.?\s*$|\btook no part in the (?:consideration|decision)\b)",
    re.I)
_SEPARATE_OPENING = re.compile(
    r"^(?:(?:CHIEF |SENIOR )?JUSTICE [A-Z][A-Za-z'’\-]+|[A-Z][A-Za-z'’\-]+,\s*(?:C\.\s?|P\.\s?)?JJ?\.)"
    r"(?:,? with whom .{1,200}? joins?(?: as to [^,]{1,80})?,)?,?\s*\(?(?:concurring|dissenting)\b")
_PANEL = re.compile(r"\b(?:judges|justices|the court|all)\b", re.I)
_DISPOSITION = re.compile(
    r"^(?:(?:the )?(?:judgments?|orders?|decisions?|convictions?|sentences?|decrees?|rulings?)\b[^.]{0,160}?\b"
    r"(?:is|are|be) (?:hereby |therefore |accordingly )?(?:affirmed|reversed|vacated|remanded|modified|set aside|"
    r"quashed|dismissed|allowed|upheld|restored)\b"
    r"|(?:affirmed|reversed|vacated|remanded|dismissed|modified|quashed|granted|denied)(?:\s*(?:,|;|and|in part)\s*"
    r"(?:affirmed|reversed|vacated|remanded|dismissed|modified|quashed|granted|denied)?)*[\s.]*(?:\[\d+\])?$"
    r"|(?:it is )?so ordered\b|it is (?:hereby )?ordered\b|(?:appeal|appeals|petition|application|motion|writ|action|"
    r"claim)s? (?:is |are )?(?:dismissed|allowed|denied|granted|refused)\b|judgment (?:affirmed|reversed|for)\b"
    r"|[a-z ]{3,40} ordered\.?$)",
    re.I,
)


def heading_words(line: str) -> str | None:
    """The words of `line` if it is a heading (`II. ANALYSIS` → "analysis", `I` → ""), else None."""
    line = line.strip()
    if not line or len(line) > 100 or "\n" in line:
        return None
    if _BARE_NUMBERING.match(line):
        return ""
    if has_cjk(line):
        compact = re.sub(r"\s+", "", line)
        compact = re.sub(r"^(?:[一二三四五六七八九十]+、|[（(][一二三四五六七八九十]+[）)]|第[一二三四五六七八九十]+[部节節章])", "", compact)
        if len(compact) <= 16 and not re.search(r"[。，,；;：:！？!?]$", compact) and not compact.endswith(("书", "書")):
            return compact
        return None
    words = _NUMBERING.sub("", line, count=1).strip()
    numbered = words != line
    words = words.rstrip(":").strip()
    if not words or not re.search(r"[A-Za-z]", words) or len(words.split()) > 12:
        return None
    if words.endswith(".") and len(words.split()) <= 3 and words.isupper():
        words = words[:-1]
    if re.search(r"[.;,!?]$", words) and not re.search(r"\b(?:[A-Z]\.)+$", words):
        return None
    letters = [c for c in words if c.isalpha()]
    if sum(c.isupper() for c in letters) >= 0.8 * len(letters):
        return words.lower()
    significant = [w for w in re.findall(r"[A-Za-z][A-Za-z'’\-]*", words) if len(w) > 3]
    if numbered and significant and all(w[0].isupper() for w in significant):
        return words.lower()
    lowered = words.lower()
    if _BODY_START_HEADINGS.match(lowered) or _SYLLABUS.match(lowered) or lowered in _SECTION_OF_WORD:
        return lowered
    return None


def _heading_section(words: str) -> SectionType | None:
    if has_cjk(words):
        found: tuple[int, SectionType] | None = None
        for pattern, kind in _ZH_HEADING_WORDS:
            for match in re.finditer(pattern, words):
                if found is None or match.start() >= found[0]:
                    found = (match.start(), kind)
        return found[1] if found else None
    matches = list(_SECTION_PATTERN.finditer(words))
    return _SECTION_OF_WORD[matches[-1].group(1)] if matches else None


def _opinion_line(line: str) -> bool:
    """`LAVINE, J.`, `THOMPSON, Associate Judge:`, `JUSTICE KAGAN delivered the opinion of the Court.`"""
    if len(line) > 200 or "\n" in line.strip():
        return False
    if "delivered the" in line or line.strip().lower().rstrip(".") == "per curiam":
        return bool(_OPINION_LINE.match(line.strip()))
    return bool(_OPINION_LINE.match(line.strip())) and bool(_JUDGE_MARK.search(line))


_DELIVERED = re.compile(r"^(?:(?:CHIEF |SENIOR )?JUSTICE [A-Z][A-Za-z'’\-]+|[A-Z][A-Za-z'’\-]+,\s*(?:C\.\s?)?J\.,)"
                        r" delivered the (?:opinion|judgment)")


def _prose(text: str) -> bool:
    """A paragraph of running prose (not a list of counsel or parties): 60+ words, mostly lower case,
    in two or more sentences."""
    words = text.split()
    if len(words) < 60 or sum(w[:1].islower() for w in words) < 0.4 * len(words):
        return False
    return len(sentences(text)) >= 2


def _at_most(text: str, words: int) -> bool:
    """Whether `text` has at most `words` words (splits no further than that: paragraphs are long)."""
    return len(text.split(None, words)) <= words


def is_heading(paragraph: str) -> bool:
    """`II. ANALYSIS`, `A. The Certificate`, `Notes:`, `本院认为` (a one-line paragraph naming a part)."""
    return heading_words(paragraph) is not None


def is_concurrence(paragraph: str) -> bool:
    """A closing line recording agreement (`COOK, P.J., and KNECHT, J., concur.`, `In this opinion the
    other judges concurred.`) or a judge's absence (`JUSTICE GORSUCH took no part in the decision`)."""
    text = paragraph.strip()
    return (_at_most(text, 30) and bool(_CONCUR_LINE.search(text)) and not _SEPARATE_OPINION.search(text)
            and bool(_JUDGE_MARK.search(text.split("\n", 1)[0]) or _PANEL.search(text)))


def opens_separate_opinion(paragraph: str) -> bool:
    """The line opening a concurring or dissenting opinion: `JUSTICE GINSBURG, dissenting.`"""
    text = paragraph.strip()
    if _SEPARATE_OPENING.match(text):
        return True
    return _at_most(text, 30) and bool(_JUDGE_MARK.search(text.split("\n", 1)[0])) and bool(_SEPARATE_OPINION.search(text))


def is_judge_line(paragraph: str) -> bool:
    """An opinion's author line (`LAVINE, J.`), a concurrence line or the opening of a separate opinion."""
    text = paragraph.strip()
    return is_concurrence(text) or opens_separate_opinion(text) or (_at_most(text, 40) and _opinion_line(text))


_MARKERS = re.compile(r"\[\d+\]|\*+")


def _too_long_for_a_line(paragraph: str) -> bool:
    """More than 40 words even without its footnote markers (`[12]`, `*`; removing them removes at
    most as many words as they are): no heading, judge line, concurrence or disposition is this long."""
    return not _at_most(paragraph, 40 + paragraph.count("[") + paragraph.count("*"))


def is_disposition(paragraph: str) -> bool:
    """A short paragraph giving the outcome: `Affirmed.`, `It is so ordered.`, `The judgment is reversed.`"""
    if _too_long_for_a_line(paragraph):
        return False
    text = _MARKERS.sub("", paragraph).strip()
    return _at_most(text, 40) and bool(_DISPOSITION.match(text))


class SectionTracker:
    """Feed a judgment's paragraphs in order; `section_of` says which section each belongs to."""

    def __init__(self) -> None:
        self.section: SectionType = "header"
        self.started = False
        """Whether the judgment's body has begun (everything before it is the header)."""
        self._syllabus = False
        self._next: SectionType | None = None

    def _enter(self, kind: SectionType) -> SectionType:
        self.section = kind
        self.started = True
        self._syllabus = False
        return kind

    def section_of(self, paragraph: str) -> SectionType:
        text = paragraph.strip()
        if self._next is not None:
            self._enter(self._next)
            self._next = None
        if not text:
            return self.section
        first_line = text.split("\n", 1)[0].strip()
        if has_cjk(text[:40]) and (kind := self._chinese(text)) is not None:
            return kind
        if self.started and _too_long_for_a_line(text):  # running prose: only a separate opinion may open in it
            return self._enter("reasoning") if _SEPARATE_OPENING.match(text) else self.section
        words = heading_words(text)
        if words is not None:
            return self._heading(words, text)
        if is_concurrence(text):
            return self._enter("order") if self.started else self.section  # "COOK, P.J., and KNECHT, J., concur."
        if opens_separate_opinion(text):
            return self._enter("reasoning") if self.started else self.section  # a concurrence or dissent begins
        if _DELIVERED.match(text) and not self.started and (not self._syllabus or text.startswith(("JUSTICE", "CHIEF"))):
            return self._enter("body")  # "JUSTICE BREYER delivered the opinion of the Court. A federal statute ..."
        if _opinion_line(first_line) and _at_most(text, 40):
            if not self.started and not (self._syllabus and "delivered the" in text):
                return self._enter("body")
            return self.section
        if self.started and self.section != "footnotes" and is_disposition(text):
            return "order"  # the outcome; what follows it may still be reasoning ("Order affirmed. ...")
        if not self.started and not self._syllabus and (_NUMBERED_PARAGRAPH.match(text) or _prose(text)):
            return self._enter("body")
        return self.section

    def _heading(self, words: str, line: str) -> SectionType:
        if _BODY_START_HEADINGS.match(words):
            if not self.started:
                self.started = True
                self._syllabus = False
                self._next = "body"
            return self.section
        if _SYLLABUS.match(words):
            if not self.started:
                self._syllabus = True
            return self.section
        kind = _heading_section(words)
        if kind is None:
            if not self.started and _ROMAN_HEADING.match(line):
                return self._enter("body")  # "I", "II. The Statute": the opinion's own parts
            return self.section
        letters = [c for c in line if c.isalpha()]
        capitals = sum(c.isupper() for c in letters)
        if self.started and _SUBHEADING.match(line) and capitals < 0.8 * len(letters):
            return self.section  # "A. The Remaining Issues" under "II. ANALYSIS"
        return self._enter(kind)

    def _chinese(self, text: str) -> SectionType | None:
        """The section a Chinese paragraph's opening phrase names, or None when it names none."""
        kind: SectionType | None = None
        if not self.started and (_ZH_HEADER_END.search(text) or "提起公诉" in text or "提起公訴" in text):
            self.started = True  # the procedural history closing the header: "……提起公诉。……现已审理终结。"
            self._next = "body"
            return self.section
        for pattern, candidate in _ZH_PARAGRAPH:
            if not pattern.match(text):
                continue
            if (candidate == "issues" and self.section not in ("header", "body", "issues")) or (
                    candidate != "footnotes" and self.section == "footnotes"):
                continue
            kind = self._enter(candidate)
            break
        if _ZH_ORDER_NEXT.search(text):
            self._next = "order"
            return self.section
        return kind


def sections(text: str) -> Iterator[tuple[int, int, SectionType]]:
    """(start, end, section) of each paragraph of `text`."""
    tracker = SectionTracker()
    for start, end in paragraphs(text):
        yield start, end, tracker.section_of(text[start:end])
