"""Caselaw Access Project (CAP) records: the judgment's plain text and its court, date, citations and
name, in every form CAP has published.

The casebody comes as:

- XML (the API's and bulk exports' `body_format=xml`): `<casebody>` with `<parties>`, `<court>`,
  `<decisiondate>`, `<attorneys>`, ... and `<opinion>` elements holding `<author>`, `<p>`,
  `<blockquote>` and `<footnote label="1">`; inline `<footnotemark>`, `<page-number>`;
- HTML (`body_format=html` and the static site's `html/` files): `<section class="head-matter">`,
  `<article class="opinion">` with `<p class="author">`, `<aside class="footnote" data-label="1">`,
  inline `<a class="footnotemark">` and `<a class="page-label">*1080</a>`;
- text, as an object (bulk `casebody.data` with `body_format=text`, and the static site's
  `casebody`): `head_matter` and `opinions[]` of `{text, type, author}`, one paragraph a line.

The plain text keeps one paragraph per block element (or per line of the text form), separated by
one blank line; headings, head matter and opinion authors are kept; page labels (`*1080`) are dropped;
a footnote mark reads `[1]` and its footnote starts with `[1] `. Whitespace inside a paragraph is
collapsed, except in `<pre>`; `<br>` is a line break within its paragraph.
"""

from __future__ import annotations

from collections.abc import Mapping
from html.parser import HTMLParser
from xml.etree import ElementTree

from legal_batch.core.markup import DROPPED_ELEMENTS as _DROPPED
from legal_batch.core.markup import INLINE_ELEMENTS as _INLINE
from legal_batch.core.markup import VOID_ELEMENTS as _VOID

__all__ = ["FIELDS", "case_fields", "casebody_text", "markup_to_text"]

FIELDS = ("id", "name", "name_abbreviation", "decision_date", "citations", "court", "casebody")
"""The fields of a CAP record that `case_fields` reads."""

_BREAK = "\x00"  # a <br> while a paragraph is collected (a newline in the markup is only a space)


class _TextBuilder(HTMLParser):
    """Collects paragraphs from XML or HTML markup (tolerant: never raises on broken markup)."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.paragraphs: list[str] = []
        self._parts: list[str] = []
        self._skip: list[str] = []  # the stack of open elements whose content is dropped
        self._marks: list[str] = []  # open footnote-mark elements (their text is wrapped in [])
        self._pre = 0
        self._footnote_label: str | None = None

    # -- paragraphs ----------------------------------------------------------------------------------

    def _flush(self) -> None:
        raw = "".join(self._parts)
        self._parts.clear()
        if self._pre:
            text = raw.replace(_BREAK, "\n").strip("\n")
        else:
            text = "\n".join(" ".join(line.split()) for line in raw.split(_BREAK)).strip()
        if not text.strip():
            return
        if self._footnote_label is not None:
            label = self._footnote_label
            self._footnote_label = None
            if text.startswith(label + " "):  # some footnotes repeat their label in their text
                text = text[len(label) + 1:]
            text = f"[{label}] {text}"
        self.paragraphs.append(text)

    # -- parser callbacks ----------------------------------------------------------------------------

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if self._skip:
            if tag not in _VOID:
                self._skip.append(tag)
            return
        attributes = dict(attrs)
        classes = (attributes.get("class") or "").split()
        if tag in _DROPPED or "page-label" in classes or (tag == "a" and (attributes.get("href") or "").startswith(
                "#ref_")):  # a page label, or a footnote's link back to its mark
            if tag not in _VOID:
                self._skip.append(tag)
            return
        if tag == "br":
            self._parts.append(_BREAK)
            return
        if tag == "footnotemark" or "footnotemark" in classes:
            self._marks.append(tag)
            self._parts.append("[")
            return
        if tag in _INLINE or tag in _VOID:
            return
        self._flush()
        if tag == "pre":
            self._pre += 1
        if tag == "footnote" or (tag == "aside" and "footnote" in classes):
            label = attributes.get("label") or attributes.get("data-label")
            self._footnote_label = label.strip() if label and label.strip() else None

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "br" and not self._skip:
            self._parts.append(_BREAK)
        elif tag not in _INLINE and tag not in _VOID and not self._skip:
            self._flush()

    def handle_endtag(self, tag: str) -> None:
        if self._skip:
            if tag in self._skip:
                while self._skip.pop() != tag:
                    pass
            return
        if self._marks and tag == self._marks[-1]:
            self._marks.pop()
            self._parts.append("]")
            return
        if tag in _INLINE or tag in _VOID:
            return
        self._flush()
        if tag == "pre" and self._pre:
            self._pre -= 1
        if tag == "footnote" or tag == "aside":
            self._footnote_label = None

    def handle_data(self, data: str) -> None:
        if not self._skip:
            self._parts.append(data.replace(_BREAK, " ") if _BREAK in data else data)

    def close(self) -> None:
        super().close()
        self._flush()


def _walk(element: ElementTree.Element, builder: _TextBuilder) -> None:
    """Replay a parsed XML tree as the parser callbacks (namespaces dropped from names)."""
    tag = element.tag.rpartition("}")[2].lower() if isinstance(element.tag, str) else ""
    if tag:
        builder.handle_starttag(tag, [(name.rpartition("}")[2], value) for name, value in element.attrib.items()])
    if element.text:
        builder.handle_data(element.text)
    for child in element:
        _walk(child, builder)
        if child.tail:
            builder.handle_data(child.tail)
    if tag:
        builder.handle_endtag(tag)


def markup_to_text(markup: str) -> str:
    """Plain text of a CAP casebody in XML or HTML (or any HTML): paragraphs separated by one blank line.

    Well-formed XML (CAP's XML form) is parsed by expat, several times faster than the tolerant HTML
    parser that reads everything else; both apply the same rules. Raises ValueError for markup even
    the HTML parser cannot read (a broken `<![` section)."""
    builder = _TextBuilder()
    head = markup[:200].lstrip()
    if head.startswith(("<?xml", "<casebody")):
        try:
            root = ElementTree.fromstring(markup)
        except ElementTree.ParseError:
            builder = _TextBuilder()
        else:
            _walk(root, builder)
            builder._flush()
            return "\n\n".join(builder.paragraphs)
    try:
        builder.feed(markup)
        builder.close()
    except AssertionError as exc:  # html.parser's way of refusing a construct
        raise ValueError(f"the casebody markup cannot be read ({exc})") from None
    return "\n\n".join(builder.paragraphs)


def _lines_to_paragraphs(text: str) -> list[str]:
    return [line.strip() for line in text.replace("\r\n", "\n").split("\n") if line.strip()]


def _text_form(body: Mapping[str, object]) -> str:
    """The text form: head matter, then each opinion with its author (when the text does not open with it)."""
    paragraphs: list[str] = []
    head = body.get("head_matter")
    if isinstance(head, str):
        paragraphs += _lines_to_paragraphs(head)
    opinions = body.get("opinions")
    for opinion in opinions if isinstance(opinions, list) else ():
        if not isinstance(opinion, Mapping):
            continue
        text = opinion.get("text")
        lines = _lines_to_paragraphs(text) if isinstance(text, str) else []
        author = opinion.get("author")
        if isinstance(author, str) and author.strip() and not (lines and lines[0].startswith(author.strip())):
            paragraphs.append(author.strip())
        paragraphs += lines
    return "\n\n".join(paragraphs)


def casebody_text(casebody: object) -> tuple[str | None, str | None]:
    """(plain text, None), or (None, why there is none) for a record's `casebody` in any CAP form:
    a markup string, `{"data": markup | text form, "status": ...}`, or the text form itself."""
    if isinstance(casebody, str):
        try:
            return markup_to_text(casebody), None
        except ValueError as exc:
            return None, str(exc)
    if not isinstance(casebody, Mapping):
        return None, "casebody is neither markup nor an object"
    if "data" in casebody and not ("opinions" in casebody or "head_matter" in casebody):
        data = casebody.get("data")
        if data is None:
            status = casebody.get("status")
            return None, f"casebody has no data (status {status!r})" if status else "casebody has no data"
        return casebody_text(data)
    return _text_form(casebody), None


def _citations(value: object) -> str | None:
    """`citations[].cite` joined with "; ", the official citation first."""
    if not isinstance(value, list):
        return value if isinstance(value, str) and value.strip() else None
    entries = [entry for entry in value if isinstance(entry, Mapping) and isinstance(entry.get("cite"), str)]
    entries.sort(key=lambda entry: entry.get("type") != "official")  # stable: the rest keep their order
    cites = [entry["cite"].strip() for entry in entries if entry["cite"].strip()]
    return "; ".join(cites) or None


def _court(value: object) -> str | None:
    if isinstance(value, Mapping):
        value = value.get("name") or value.get("name_abbreviation")
    return value.strip() if isinstance(value, str) and value.strip() else None


def _name(record: Mapping[str, object]) -> str | None:
    for key in ("name_abbreviation", "name"):
        value = record.get(key)
        if isinstance(value, str) and value.strip():
            return " ".join(value.split())
    return None


def case_fields(record: Mapping[str, object]) -> tuple[dict[str, object], str | None]:
    """The `court_cases` columns a CAP record fills — `full_text` from its casebody, `court` from
    `court.name`, `decision_date`, `neutral_citation` from `citations[].cite` (official first),
    `case_name` from `name_abbreviation` (else `name`) — and why there is no text, if there is none.
    Columns the record does not have are left out."""
    fields: dict[str, object] = {}
    text, why = casebody_text(record.get("casebody")) if "casebody" in record else (None, None)
    if text:
        fields["full_text"] = text
    for column, value in (("neutral_citation", _citations(record.get("citations"))),
                          ("case_name", _name(record)), ("court", _court(record.get("court"))),
                          ("decision_date", record.get("decision_date"))):
        if value is not None:
            fields[column] = value
    return fields, why
