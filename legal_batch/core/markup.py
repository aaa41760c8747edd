"""HTML and XML left in a judgment's text (a scraped page, an export with its tags, CAP casebody XML
stored as is): the text a reader sees, and where each part of it comes from in the original.

What is markup: comments, `<?…?>` processing instructions, `<!DOCTYPE …>`, CDATA brackets, the
elements of `DROPPED_ELEMENTS` with their content (`<script>`, `<style>`, CAP's `<page-number>`),
character references (`&amp;`, `&nbsp;`, `&#8217;`, `&#x2019;`),
and tags — closing tags, self-closing tags, tags of HTML elements, and opening tags of any other
element whose closing tag the text also holds (`<opinion>…</opinion>`). A `<` that opens none of
these (`x < y`, `<2>`, `<unclosed words`) is text. Block elements (`<p>`, `<div>`, `<li>`, `<h2>`,
unknown XML elements) become a paragraph break, `<br>` a line break, table cells a space, inline and
void elements (`<i>`, `<span>`, `<img>`, CAP's `<footnotemark>`) nothing. The element lists are the
ones `core.cap` reads CAP casebodies with.

Text without markup is returned as it is, at the cost of one search.
"""

from __future__ import annotations

import html
import re
from bisect import bisect_right
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import lru_cache

_HTML_ELEMENTS = frozenset({
    "a", "abbr", "address", "article", "aside", "b", "bdi", "bdo", "big", "blockquote", "body", "br",
    "caption", "center", "cite", "code", "col", "colgroup", "dd", "del", "details", "dfn", "div", "dl",
    "dt", "em", "figcaption", "figure", "font", "footer", "form", "h1", "h2", "h3", "h4", "h5", "h6",
    "head", "header", "hr", "html", "i", "img", "ins", "kbd", "label", "legend", "li", "main", "mark",
    "meta", "nav", "ol", "p", "pre", "q", "s", "samp", "section", "small", "span", "strike", "strong",
    "sub", "summary", "sup", "table", "tbody", "td", "tfoot", "th", "thead", "time", "title", "tr", "tt",
    "u", "ul", "var", "wbr", "link",
})
INLINE_ELEMENTS = frozenset({
    "a", "abbr", "b", "bdi", "bdo", "big", "cite", "code", "data", "del", "dfn", "em", "extracted-citation",
    "font", "i", "ins", "kbd", "mark", "q", "s", "samp", "small", "span", "strike", "strong", "sub", "sup",
    "time", "tt", "u", "var", "wbr", "bracketnum", "key", "footnotemark",
})
"""Elements that flow inside a paragraph; every other element starts and ends one (CAP's XML has its
own block elements — parties, docketnumber, court, decisiondate, author, footnote... — so the
inline set is the short list)."""
DROPPED_ELEMENTS = frozenset({"script", "style", "head", "template", "page-number", "noscript"})
"""Elements whose content is not text of the judgment (CAP's `<page-number>*1080</page-number>`)."""
VOID_ELEMENTS = frozenset({"br", "hr", "img", "meta", "link", "input", "col", "area", "base", "embed", "source",
                           "track", "param", "wbr"})
"""Elements without content or closing tag; within a paragraph they are nothing, `<br>` a line break."""
_DROPPED_NAMES = "|".join(sorted(DROPPED_ELEMENTS))
_CELL = frozenset({"td", "th"})
_LINE = frozenset({"br"})

_TAG_OR_ENTITY = (
    r"(?P<tag><(?P<closing>/)?(?P<name>[A-Za-z][\w:.-]{0,40})"
    r"(?P<attributes>(?:\s+[\w:.-]+(?:\s*=\s*(?:\"[^\"]*\"|'[^']*'|[^\s\"'<>]+))?)*)\s*(?P<self>/)?>)"
    r"|(?P<entity>&(?:#\d{1,7}|#[xX][0-9a-fA-F]{1,6}|[A-Za-z][A-Za-z0-9]{1,31});)"
)
_COMMENT = r"<!--.*?-->"
_INSTRUCTION = r"<\?.*?\?>"
_ALWAYS_DROPPED = r"<!doctype[^>]*>|<!\[CDATA\[|\]\]>"


@lru_cache(maxsize=16)
def _pattern(comments: bool, instructions: bool, dropped_elements: bool) -> re.Pattern[str]:
    """The markup pattern, with the constructs that need a closing delimiter only when the text has
    one (so an unclosed `<!--` costs no scan to the end of the text for each occurrence)."""
    dropped = [_ALWAYS_DROPPED] + ([_COMMENT] if comments else []) + ([_INSTRUCTION] if instructions else [])
    alternatives = [f"(?P<drop>{'|'.join(dropped)})"]
    if dropped_elements:
        alternatives.append(f"(?P<element><(?P<element_name>{_DROPPED_NAMES})\\b[^>]*>.*?</(?P=element_name)\\s*>)")
    return re.compile("|".join([*alternatives, _TAG_OR_ENTITY]), re.S | re.I)


def _matches(text: str) -> Iterator[re.Match[str]]:
    dropped_elements = re.search(f"</(?:{_DROPPED_NAMES})\\s*>", text, re.I) is not None
    return _pattern("-->" in text, "?>" in text, dropped_elements).finditer(text)


@dataclass(frozen=True)
class PlainText:
    """`text` without markup, and where its characters come from in `original`."""

    original: str
    text: str
    spans: tuple[tuple[int, int, int, int, bool], ...] = field(default=(), repr=False)
    """(plain start, original start, plain length, original length, kept), in order: kept runs are
    copied characters; the others are what a piece of markup became (a paragraph break, a space, a
    decoded character reference, nothing). Empty when there was no markup."""

    @property
    def changed(self) -> bool:
        return bool(self.spans)

    def original_start(self, index: int) -> int:
        """Where the plain character at `index` begins in the original text."""
        if not self.spans:
            return index
        plain, orig, _, _, kept = self._span(index)
        return orig + (index - plain) if kept else orig

    def original_end(self, index: int) -> int:
        """Where the plain text up to `index` (exclusive) ends in the original text."""
        if not self.spans or index <= 0:
            return max(index, 0)
        plain, orig, _, orig_length, kept = self._span(index - 1)
        return orig + (index - plain) if kept else orig + orig_length

    def _span(self, index: int) -> tuple[int, int, int, int, bool]:
        starts = self.__dict__.get("_starts")
        if starts is None:
            starts = [span[0] for span in self.spans]
            object.__setattr__(self, "_starts", starts)
        if index >= len(self.text):
            return len(self.text), len(self.original), 0, 0, True
        return self.spans[max(bisect_right(starts, index) - 1, 0)]


def has_markup(text: str) -> bool:
    """Whether `text` holds anything `plain_text` would remove or replace."""
    closed: dict[str, set[str]] = {}
    return any(_replacement(match, text, closed) is not None for match in _matches(text))


def plain_text(text: str) -> PlainText:
    """`text` without its markup (see the module docstring), with the map back to `text`."""
    if "<" not in text and "&" not in text and "]]>" not in text:  # every piece of markup starts so
        return PlainText(text, text)
    pieces: list[str] = []
    spans: list[tuple[int, int, int, int, bool]] = []
    closed: dict[str, set[str]] = {}
    plain = done = 0
    for match in _matches(text):
        replacement = _replacement(match, text, closed)
        if replacement is None:
            continue
        if match.start() > done:
            length = match.start() - done
            pieces.append(text[done:match.start()])
            spans.append((plain, done, length, length, True))
            plain += length
        pieces.append(replacement)
        spans.append((plain, match.start(), len(replacement), match.end() - match.start(), False))
        plain += len(replacement)
        done = match.end()
    if not spans:
        return PlainText(text, text)
    if done < len(text):
        pieces.append(text[done:])
        spans.append((plain, done, len(text) - done, len(text) - done, True))
    return PlainText(text, "".join(pieces), tuple(spans))


_CLOSING_TAG = re.compile(r"</([A-Za-z][\w:.-]{0,40})\s*>")


def _replacement(match: re.Match[str], text: str, closed: dict[str, set[str]]) -> str | None:
    """What a match becomes (None: it is text, not markup). `closed` caches the names of the
    elements the text closes somewhere."""
    if match.group("drop") is not None or ("element" in match.re.groupindex and match.group("element") is not None):
        return ""
    if match.group("entity") is not None:
        decoded = html.unescape(match.group("entity"))
        if decoded == match.group("entity"):
            return None
        return " " if decoded in ("\xa0", "\u2007", "\u202f") else decoded
    name = match.group("name").lower()
    if not (name in _HTML_ELEMENTS or name in INLINE_ELEMENTS or name in VOID_ELEMENTS or match.group("closing")
            or match.group("self")):
        if "names" not in closed:
            closed["names"] = {found.lower() for found in _CLOSING_TAG.findall(text)}
        if name not in closed["names"]:
            return None
    if name in _LINE:
        return "\n"
    if name in INLINE_ELEMENTS or name in VOID_ELEMENTS:
        return ""
    if name in _CELL:
        return " "
    return "\n\n"
