"""The headnotes flow's own logic: candidate cases, the law-reporter prompt (few-shot examples from
`headnote_corpus`, judgment truncated at a paragraph boundary), and the sink that validates each
answer and writes accepted headnotes back to the source's headnote column with one set-based UPDATE.

Cases come from the source the settings name (`core.user_tables.CaseSource`: the built-in
`court_cases` by default, whose `headnote_model` and `headnote_generated_at` are kept up to date
too). Whatever the source, each headnote written is recorded in our `case_headnotes` (model, when,
and the hash of the judgment text it was written from): a headnote whose judgment changed since is
flagged stale there, and regenerated only when asked (`regenerate_stale`).

Subjects are cases (`subject_key` = the case id, `custom_id` = `case-<uuid>`); results are joined on
the custom id, never on a line number. Limits:

- the judgment is cut at `max_chars` characters (default 150,000), and further if the request would
  pass `max_input_tokens` (when the caller gives a chat model's input limit), always at a paragraph
  boundary and with a visible marker;
- the planner's token estimate is exact (tiktoken) for the instructions, examples and case header,
  and 1 token per 4 characters for the judgment text (SQL cannot run tiktoken); the real figures
  come back in the provider's usage;
- few-shot examples are the newest `few_shot` rows of `headnote_corpus` that existed when the shard
  was planned, read once per shard, so every request of a shard (and every rewrite of its file)
  carries the same examples.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from functools import lru_cache

import psycopg

from legal_batch.core.cost import batch_discount, price
from legal_batch.core.errors import UserError
from legal_batch.core.flow import Item, Permanent
from legal_batch.core.ledger import ITEM_NOT_CANDIDATE_STATES, ITEM_OPEN_STATES, ItemState, sql_in
from legal_batch.core.tokens import EncodingName, count_tokens, encoding, encoding_for_model
from legal_batch.core.user_tables import CaseSource
from legal_batch.flows.headnotes.prompt_template import PromptTemplate, default_prompt
from legal_batch.providers.base import ChatRequest, Endpoint, Request, Result

FLOW = "headnotes"
CHARS_PER_TOKEN = 4
"""Planning estimate for judgment text (tiktoken measures ~5 characters per token on English judgments)."""
_CHAT_FORMAT_TOKENS = 16
"""Per-request message framing (role markers, separators) on top of the message texts."""
_ENVELOPE_BYTES = 400
"""JSON envelope of a request line (custom_id, url, model, parameters) beyond the message texts."""
_STAGE_BATCH = 2_000

SYSTEM_INSTRUCTIONS = default_prompt().system
"""The law reporter's instructions of the built-in prompt template (`headnote_prompt.toml`; a run may
use another: `prompt_template`)."""

BUILT_IN_EXAMPLES = (
    "[2021] HKCA 512 — Court of Appeal — HKSAR v Lam Ka Fai\n"
    "Catchwords: Criminal law – trafficking in a dangerous drug – courier – sentence – discount for plea\n"
    "Held: The starting point of 12 years for 1.2 kg of methamphetamine accorded with the guidelines; a courier "
    "plays an integral part in trafficking and the element of international trafficking justified an "
    "enhancement of two years. Appeal against sentence dismissed.\n"
    "Summary: The applicant was stopped at the boundary carrying a suitcase in which the drug was concealed. He "
    "pleaded guilty and received the usual one-third discount. He argued that the judge double-counted the "
    "cross-boundary element. The court held that the enhancement reflected a distinct aggravating feature.",
    "128 N.E.3d 455 (Ill. App. Ct. 2019) — Appellate Court of Illinois — People v. Marsh\n"
    "Catchwords: Criminal procedure – motion to suppress – consent to search – scope of consent\n"
    "Held: A general consent to search a vehicle for \"anything illegal\" extends to closed containers inside it "
    "that could hold the object of the search; the trial court did not err in denying the motion to suppress. "
    "Affirmed.\n"
    "Summary: Officers stopped the defendant for speeding and asked to search the car; he agreed. They opened a "
    "closed bag on the back seat and found cocaine. The defendant argued that his consent did not reach the bag. "
    "Applying the objective-reasonableness test, the court held that it did.",
    "（2020）京01刑终123号 — 北京市第一中级人民法院 — 张某盗窃二审刑事裁定书\n"
    "Catchwords: 刑法 – 盗窃罪 – 入户盗窃 – 量刑 – 上诉\n"
    "Held: 上诉人张某以非法占有为目的，入户窃取他人财物，其行为已构成盗窃罪；原判认定事实清楚，证据确实、充分，量刑适当。"
    "驳回上诉，维持原判。\n"
    "Summary: 张某于2019年5月进入被害人住所，窃取现金及手机，价值共计人民币八千元。一审以盗窃罪判处其有期徒刑一年六个月。"
    "张某以量刑过重为由提出上诉。二审法院认为其入户盗窃，依法应从重处罚，原判量刑并无不当。",
)
"""Headnotes of three kinds of judgment (Hong Kong, US, PRC), written for this product, used as the
few-shot examples while `headnote_corpus` is empty: they show the form, not a house style."""

_CANDIDATE_COLUMNS = {True: ("id", "full_text", "headnote", "headnote_generated_at"),
                      False: ("id", "full_text", "headnote")}
"""What candidate selection reads of a case: of the built-in source also its own generation time."""

TRUNCATION_MARKER = "[… judgment truncated at {kept:,} of {total:,} characters …]"


@dataclass(frozen=True)
class CaseText:
    """What the prompt needs of one case of the source."""

    custom_id: str
    neutral_citation: str | None
    case_name: str | None
    court: str | None
    decision_date: date | None
    full_text: str


def system_prompt(examples: Sequence[str], template: PromptTemplate | None = None) -> str:
    """The instructions, followed by the few-shot examples when there are any: the house style from
    `headnote_corpus`, or (`BUILT_IN_EXAMPLES`) the form only; texts from `template` (the built-in one
    by default)."""
    template = template or default_prompt()
    if not examples:
        return template.system
    shown = "\n\n".join(f"{template.example_heading(n)}\n{text.strip()}" for n, text in enumerate(examples, start=1))
    if all(text in BUILT_IN_EXAMPLES for text in examples):
        return f"{template.system}\n\n{template.examples_of_the_form}\n\n{shown}"
    return f"{template.system}\n\n{template.examples_in_house_style}\n\n{shown}"


_NEUTRAL_CITATION = re.compile(r"^\[\d{4}\]\s+[A-Z]")
_LANGUAGES = (("\u3040-\u30ff", "Japanese"), ("\uac00-\ud7af", "Korean"), ("\u3400-\u4dbf\u4e00-\u9fff", "Chinese"))


def judgment_language(text: str) -> str | None:
    """"Chinese", "Japanese" or "Korean" when at least a fifth of the judgment's first 5,000 letters
    are of that script (kana or Hangul decide between them and Chinese), else None (a language
    written in the Latin alphabet, read from the judgment itself)."""
    sample = [c for c in text[:5_000] if c.isalpha()]
    if not sample:
        return None
    for ranges, name in _LANGUAGES:
        if len(re.findall(f"[{ranges}]", "".join(sample))) >= 0.2 * len(sample):
            return name
    return None


def case_header(case: CaseText, template: PromptTemplate | None = None) -> str:
    """The user message up to the judgment text: the case's own metadata, where known, with the
    wording of `template` (the built-in one by default)."""
    template = template or default_prompt()
    lines = [template.request]
    if (language := judgment_language(case.full_text)) is not None and (line := template.language_line(language)):
        lines.append(line)
    citation_label = (template.label_neutral_citation if case.neutral_citation
                      and _NEUTRAL_CITATION.match(case.neutral_citation) else template.label_citation)
    facts = [(citation_label, case.neutral_citation), (template.label_court, case.court),
             (template.label_case_name, case.case_name),
             (template.label_decision_date, case.decision_date.isoformat() if case.decision_date else None)]
    details = [f"{label}: {value}" for label, value in facts if value]
    if details:
        lines += ["", *details]
    lines += ["", template.label_judgment, "", ""]
    return "\n".join(lines)


def truncate_judgment(text: str, *, max_chars: int, max_tokens: int | None = None,
                      encoding_name: EncodingName = "cl100k_base") -> str:
    """`text`, or its head cut at a paragraph boundary and followed by the truncation marker.

    The head holds at most `max_chars` characters and, when `max_tokens` is given, at most that
    many tokens (marker included). Cuts at the last blank line before the limit; failing one in
    the second half, at the last line break, then the last space."""
    limit = min(len(text), max_chars)
    if max_tokens is not None and len(text[:limit].encode()) > max_tokens:  # a token is at least one byte
        enc = encoding(encoding_name)
        budget = max_tokens - _cached_tokens(TRUNCATION_MARKER.format(kept=len(text), total=len(text)),
                                             encoding_name) - 4
        tokens = enc.encode_ordinary(text[:limit])
        if len(tokens) > budget:
            if budget <= 0:
                raise ValueError(f"no room for any judgment text within {max_tokens} tokens")
            limit = min(limit, len(enc.decode(tokens[:budget], errors="ignore")))
    if limit >= len(text):
        return text
    cut = _paragraph_cut(text, limit)
    head = text[:cut].rstrip()
    return f"{head}\n\n{TRUNCATION_MARKER.format(kept=len(head), total=len(text))}"


@lru_cache(maxsize=16)
def _cached_tokens(text: str, encoding_name: EncodingName) -> int:
    """Token count of a text repeated across requests (a shard's system prompt, the marker)."""
    return count_tokens(text, encoding_name)


def _paragraph_cut(text: str, limit: int) -> int:
    for separator in ("\n\n", "\n", " "):
        cut = text.rfind(separator, 0, limit + 1)
        if cut >= limit // 2:
            return cut
    return limit


def build_request(case: CaseText, *, system: str, max_chars: int, max_tokens: int, temperature: float,
                  max_input_tokens: int | None = None, encoding_name: EncodingName = "cl100k_base",
                  template: PromptTemplate | None = None) -> ChatRequest:
    """One chat request: `system` (instructions + examples), the case header (in `template`'s
    wording) and its judgment, truncated to `max_chars` and to what fits in `max_input_tokens` (a chat
    model's input limit)."""
    header = case_header(case, template)
    room = None
    if max_input_tokens is not None:
        room = (max_input_tokens - _CHAT_FORMAT_TOKENS - _cached_tokens(system, encoding_name)
                - count_tokens(header, encoding_name))
        if room <= 0:
            raise ValueError(f"{case.custom_id}: instructions and examples alone exceed the model's "
                             f"{max_input_tokens}-token input limit; lower LEGAL_BATCH_HEADNOTE_FEW_SHOT")
    judgment = truncate_judgment(case.full_text, max_chars=max_chars, max_tokens=room, encoding_name=encoding_name)
    return ChatRequest(case.custom_id, system, header + judgment, max_tokens=max_tokens, temperature=temperature)


def few_shot_examples(conn: psycopg.Connection, *, count: int, created_before: datetime | None = None) -> list[str]:
    """The newest `count` headnotes of `headnote_corpus` (optionally only those created by a time);
    while it has none, the first `count` of `BUILT_IN_EXAMPLES`."""
    if count <= 0:
        return []
    rows = conn.execute(
        "SELECT headnote_text FROM headnote_corpus"
        " WHERE btrim(headnote_text) <> '' AND (%(before)s::timestamptz IS NULL OR created_at <= %(before)s)"
        " ORDER BY created_at DESC, id DESC LIMIT %(count)s",
        {"before": created_before, "count": count},
    ).fetchall()
    return [text for (text,) in rows] or list(BUILT_IN_EXAMPLES[:count])


@dataclass(frozen=True)
class CandidateEstimate:
    """What the current candidates would cost: an upper bound on output (max_tokens each)."""

    requests: int
    est_input_tokens: int
    est_output_tokens_max: int
    est_batch_usd: float
    realtime_equivalent_usd: float
    batch_discount: float
    priced: bool


class HeadnotesFlow:
    """Cases with judgment text and no headnote (all of them with `overwrite`; also those whose
    headnote is stale with `regenerate_stale`), one chat request each; accepted headnotes go to the
    source's headnote column (see the module docstring)."""

    name = FLOW
    endpoint: Endpoint = "chat"

    def __init__(self, *, model: str, prompt: PromptTemplate | None = None, few_shot: int = 3,
                 max_chars: int = 150_000, max_tokens: int = 600,
                 temperature: float = 0.1, limit_cases: int | None = None, overwrite: bool = False,
                 overwrite_before: datetime | None = None, max_input_tokens: int | None = None,
                 regenerate_stale: bool = False, source: CaseSource | None = None) -> None:
        """`overwrite`: also regenerate cases that already have a headnote — those generated before
        `overwrite_before` (or by hand, with no generation time) — so one overwrite pass never
        regenerates the headnotes it has just written. `regenerate_stale`: also regenerate headnotes
        flagged stale (their judgment changed after they were written). `max_input_tokens`: a chat
        model's input limit, if judgments must be cut further than `max_chars` to fit it
        (tiktoken-exact). `source`: where cases are read and headnotes written (built-in court_cases)."""
        if overwrite and overwrite_before is None:
            raise ValueError("overwrite needs overwrite_before (the instant the overwrite was asked for)")
        self.model = model
        self.few_shot = few_shot
        self.max_chars = max_chars
        self.max_tokens = max_tokens
        self.temperature = temperature
        self.limit_cases = limit_cases
        self.overwrite = overwrite
        self.overwrite_before = overwrite_before
        self.max_input_tokens = max_input_tokens
        self.prompt = prompt or default_prompt()  # the run's prompt template, kept with each shard it plans
        self.regenerate_stale = regenerate_stale
        self.source = source or CaseSource()
        self.encoding_name = encoding_for_model(model)

    def job_params(self) -> dict:
        """Everything but the model (on the job row) and the case limit (planning only)."""
        return {
            "few_shot": self.few_shot, "max_chars": self.max_chars, "max_tokens": self.max_tokens,
            "temperature": self.temperature, "overwrite": self.overwrite,
            "overwrite_before": self.overwrite_before.isoformat() if self.overwrite_before else None,
            "max_input_tokens": self.max_input_tokens, "regenerate_stale": self.regenerate_stale,
            "prompt": self.prompt.as_params(),
        }

    @classmethod
    def for_job(cls, *, model: str, params: dict, source: CaseSource | None = None) -> HeadnotesFlow:
        """The flow a shard was planned with (`job_params` as stored on its job row)."""
        before = params.get("overwrite_before")
        return cls(model=model, prompt=PromptTemplate.from_params(params.get("prompt")),
                   few_shot=int(params["few_shot"]), max_chars=int(params["max_chars"]),
                   max_tokens=int(params["max_tokens"]), temperature=float(params["temperature"]),
                   overwrite=bool(params["overwrite"]),
                   overwrite_before=datetime.fromisoformat(before) if before else None,
                   max_input_tokens=params.get("max_input_tokens"),
                   regenerate_stale=bool(params.get("regenerate_stale", False)), source=source)

    # -- candidates -------------------------------------------------------------------------------
    def _fixed_overhead(self) -> tuple[int, int]:
        """(tokens, bytes) of a request without its judgment and examples: instructions, header, marker."""
        header = case_header(CaseText("case-" + "0" * 36, "[2000] HKCFI 0000", "A" * 60, "Court of First Instance",
                                      date(2000, 1, 1), ""), self.prompt)
        text = system_prompt(["x"] * max(self.few_shot, 0), self.prompt) + header + TRUNCATION_MARKER
        tokens = _CHAT_FORMAT_TOKENS + count_tokens(text, self.encoding_name)
        return tokens, _ENVELOPE_BYTES + int(len(text.encode()) * 1.1)

    def candidate_sql(self) -> tuple[str, dict]:
        """Cases with non-empty `full_text`, no headnote (or an old one, with overwrite) and no open or
        failed ledger item: `subject_key, custom_id, tokens, size_bytes`, in id order.

        Tokens: exact for the fixed prompt text, 1 per 4 characters for the examples and the
        judgment (at most `max_chars`), capped at `max_input_tokens` when the request is cut to it."""
        fixed_tokens, fixed_bytes = self._fixed_overhead()
        max_input = self.max_input_tokens if self.max_input_tokens is not None else 2**31 - 1
        cases = self.source.select(*_CANDIDATE_COLUMNS[self.source.builtin])
        condition = _wanted_sql("k.id", "k.headnote", "k.headnote_generated_at" if self.source.builtin else None)
        sql = (
            "WITH examples AS (SELECT coalesce(sum(octet_length(e.headnote_text)), %(built_in_bytes)s) AS bytes"
            "   FROM (SELECT headnote_text FROM headnote_corpus WHERE btrim(headnote_text) <> ''"
            "         ORDER BY created_at DESC, id DESC LIMIT %(few_shot)s) e)"
            " SELECT k.id::text, 'case-' || k.id,"
            "   least(%(fixed_tokens)s + ceil((x.bytes + least(char_length(k.full_text), %(max_chars)s))::numeric"
            "         / %(chars_per_token)s)::int, %(max_input)s),"
            "   %(fixed_bytes)s + ((x.bytes + octet_length(left(k.full_text, %(max_chars)s))) * 11) / 10"
            f" FROM {cases} AS k CROSS JOIN examples x"
            " WHERE k.full_text IS NOT NULL AND btrim(k.full_text) <> ''"
            f"   AND {condition}"
            "   AND NOT EXISTS (SELECT 1 FROM batch_items i WHERE i.flow = %(flow)s AND i.subject_key = k.id::text"
            "                   AND i.state = ANY(%(not_candidate)s))"
        )
        if not self.source.has("headnote"):
            sql += " AND false"  # nowhere to write a headnote: nothing to request (`estimate` says why)
        if self.limit_cases is not None:
            sql += (f" AND k.id IN (SELECT id FROM {self.source.select('id', 'full_text')} AS s"
                    " WHERE full_text IS NOT NULL AND btrim(full_text) <> '' ORDER BY id LIMIT %(limit)s)")
        sql += " ORDER BY k.id"
        return sql, {
            "few_shot": max(self.few_shot, 0), "fixed_tokens": fixed_tokens, "fixed_bytes": fixed_bytes,
            "built_in_bytes": sum(len(text.encode()) for text in BUILT_IN_EXAMPLES[:max(self.few_shot, 0)]),
            "max_chars": self.max_chars, "chars_per_token": CHARS_PER_TOKEN, "max_input": max_input,
            "overwrite": self.overwrite, "before": self.overwrite_before, "flow": FLOW, "limit": self.limit_cases,
            "stale": self.regenerate_stale, "not_candidate": list(ITEM_NOT_CANDIDATE_STATES),
        }

    def estimate(self, conn: psycopg.Connection) -> CandidateEstimate:
        """Requests, tokens and cost of the current candidates (output at its `max_tokens` bound); a
        `UserError` when the source has no headnote column to write to."""
        if not self.source.has("headnote"):
            raise UserError(no_headnote_column(self.source))
        sql, params = self.candidate_sql()
        requests, tokens = conn.execute(f"SELECT count(*), coalesce(sum(c.tokens), 0) FROM ({sql}) AS c (subject,"
                                        " custom_id, tokens, size_bytes)", params).fetchone()
        output = requests * self.max_tokens
        cost = price(self.model, input_tokens=int(tokens), output_tokens=output)
        return CandidateEstimate(requests, int(tokens), output, float(cost.batch_usd), float(cost.realtime_usd),
                                 batch_discount(), cost.priced)

    # -- requests ---------------------------------------------------------------------------------
    def requests(self, conn: psycopg.Connection, job_id: int) -> Iterator[Request]:
        """The shard's requests in item order; its few-shot examples are read once, here."""
        created = conn.execute("SELECT created_at FROM batch_jobs WHERE id = %s", (job_id,)).fetchone()
        examples = few_shot_examples(conn, count=self.few_shot, created_before=created[0] if created else None)
        system = system_prompt(examples, self.prompt)
        cases = self.source.select()
        with conn.cursor(name=f"headnote_requests_{job_id}") as cur:
            cur.itersize = 100  # judgments reach 200 KB each
            cur.execute(
                "SELECT i.custom_id, k.neutral_citation, k.case_name, k.court, k.decision_date, k.full_text"
                f" FROM batch_items i JOIN {cases} AS k ON k.id = i.subject_key::uuid"
                " WHERE i.job_id = %s AND i.state = ANY(%s) ORDER BY i.id",
                (job_id, list(ITEM_OPEN_STATES)),
            )
            for row in cur:
                yield build_request(CaseText(*row), system=system, max_chars=self.max_chars,
                                    max_tokens=self.max_tokens, temperature=self.temperature,
                                    max_input_tokens=self.max_input_tokens, encoding_name=self.encoding_name,
                                    template=self.prompt)

    def sink(self, conn: psycopg.Connection, *, model: str) -> HeadnoteSink:
        return HeadnoteSink(conn, model=model, max_tokens=self.max_tokens, overwrite=self.overwrite,
                            overwrite_before=self.overwrite_before, regenerate_stale=self.regenerate_stale,
                            source=self.source)


# -- results ------------------------------------------------------------------------------------------

_REFUSAL_FINISH = frozenset({"content_filter", "refusal", "guardrail_intervened"})
_LENGTH_FINISH = frozenset({"length", "max_tokens"})
_REFUSAL_OPENING = re.compile(
    r"^\s*(i'?m sorry|i am sorry|sorry,|i can(?:no|')t|i am unable|i'?m unable|as an ai\b)", re.IGNORECASE
)


def unusable_reason(result: Result, *, max_tokens: int) -> str | None:
    """Why a successful response line is still not a headnote (None when it is one)."""
    text = (result.text or "").strip()
    refusal = result.extra.get("refusal") if result.extra else None
    if refusal:
        return f"the model refused: {str(refusal)[:200]}"
    if result.finish_reason in _REFUSAL_FINISH:
        return f"the answer was withheld (finish_reason={result.finish_reason})"
    if result.finish_reason in _LENGTH_FINISH:
        return Permanent(f"headnote cut off at max_tokens={max_tokens} (finish_reason={result.finish_reason}); "
                         "the same request would be cut again: raise LEGAL_BATCH_HEADNOTE_MAX_TOKENS and "
                         "re-queue these items")
    if not text:
        return f"empty headnote (finish_reason={result.finish_reason})"
    if len(text) < 300 and _REFUSAL_OPENING.match(text):
        return f"the model refused: {text[:200]}"
    return None


class HeadnoteSink:
    """Validates each answer and stages accepted headnotes (COPY, in batches of 2,000); `finish`
    writes them to the source's headnote column with one UPDATE in the ingest transaction — only
    where the case still has no headnote (or, with overwrite, one generated before the overwrite was
    asked for; with `regenerate_stale`, one flagged stale) — and records each in `case_headnotes`."""

    def __init__(self, conn: psycopg.Connection, *, model: str, max_tokens: int, overwrite: bool = False,
                 overwrite_before: datetime | None = None, regenerate_stale: bool = False,
                 source: CaseSource | None = None) -> None:
        self.conn = conn
        self.model = model
        self.max_tokens = max_tokens
        self.overwrite = overwrite
        self.overwrite_before = overwrite_before
        self.regenerate_stale = regenerate_stale
        self.source = source or CaseSource()
        self.accepted = 0
        self._batch: list[tuple[uuid.UUID, str]] = []
        conn.execute("CREATE TEMP TABLE IF NOT EXISTS stage_headnotes (case_id uuid, headnote text) ON COMMIT DROP")
        conn.execute("TRUNCATE stage_headnotes")

    def accept(self, item: Item, result: Result) -> str | None:
        reason = unusable_reason(result, max_tokens=self.max_tokens)
        if reason is not None:
            return reason
        try:
            case_id = uuid.UUID(item.subject_key)
        except ValueError:
            return f"subject key {item.subject_key!r} is not a case id"
        self._batch.append((case_id, (result.text or "").strip()))
        self.accepted += 1
        if len(self._batch) >= _STAGE_BATCH:
            self._flush()
        return None

    def _flush(self) -> None:
        with self.conn.cursor().copy("COPY stage_headnotes (case_id, headnote) FROM STDIN") as copy:
            for row in self._batch:
                copy.write_row(row)
        self._batch = []

    def finish(self) -> int:
        if self._batch:
            self._flush()
        source = self.source
        headnote, id_column, text_column = source.column("headnote"), source.column("id"), source.column("full_text")
        if headnote is None:
            raise UserError(no_headnote_column(source))
        own = (", headnote_model = %(model)s, headnote_generated_at = now(), updated_at = now()"
               if source.builtin else "")
        relation, clause = source.relation, f"{headnote} = s.headnote{own}"
        condition = _wanted_sql(f"t.{id_column}", f"t.{headnote}", "t.headnote_generated_at" if source.builtin else None)
        text_hash = source.text_sha256_sql("written")
        return self.conn.execute(
            f"WITH written AS (UPDATE {relation} t SET {clause}"
            "  FROM (SELECT DISTINCT ON (case_id) case_id, headnote FROM stage_headnotes) s"
            f" WHERE t.{id_column} = s.case_id AND {condition}"
            f" RETURNING t.{id_column} AS case_id, t.{text_column} AS full_text)"
            " INSERT INTO case_headnotes (case_id, model, generated_at, text_sha256)"
            f" SELECT case_id, %(model)s, now(), {text_hash} FROM written"
            " ON CONFLICT (case_id) DO UPDATE SET model = excluded.model, generated_at = excluded.generated_at,"
            "  text_sha256 = excluded.text_sha256, stale_since = NULL",
            {"model": self.model, "overwrite": self.overwrite, "before": self.overwrite_before,
             "stale": self.regenerate_stale},
        ).rowcount

    def settle(self, job_id: int) -> None:
        """No further stores."""


def _wanted_sql(case_id: str, headnote: str, generated_at: str | None) -> str:
    """SQL: the headnote of the case whose id and headnote are these expressions may be (re)written:
    it has none; or with %(overwrite)s one generated before %(before)s (by our record, else the
    source's own `generated_at` column, else never: by hand); or with %(stale)s one flagged stale."""
    own = f" {generated_at}," if generated_at else ""
    generated = f"coalesce((SELECT h.generated_at FROM case_headnotes h WHERE h.case_id = {case_id}),{own} NULL)"
    return (f"({headnote} IS NULL OR (%(overwrite)s AND ({generated} IS NULL OR {generated} < %(before)s))"
            f" OR (%(stale)s AND EXISTS (SELECT 1 FROM case_headnotes h WHERE h.case_id = {case_id}"
            "   AND h.stale_since IS NOT NULL)))")


def no_headnote_column(source: CaseSource) -> str:
    return (f"LEGAL_BATCH_SOURCE_HEADNOTE_COLUMN is not set: the headnotes flow writes each headnote into a text "
            f"column of {source.name}; name one")


def flag_stale_headnotes(conn: psycopg.Connection, source: CaseSource | None = None) -> int:
    """Flag the headnotes (in `case_headnotes`) whose judgment text changed after they were written;
    they are regenerated only with `regenerate_stale`. Returns how many were flagged now."""
    source = source or CaseSource()
    cases, text_hash = source.select("id", "full_text"), source.text_sha256_sql("k")
    return conn.execute(
        f"UPDATE case_headnotes h SET stale_since = now() FROM {cases} AS k"
        " WHERE k.id = h.case_id AND h.stale_since IS NULL AND h.text_sha256 IS NOT NULL"
        f"  AND h.text_sha256 <> {text_hash}"
    ).rowcount


DONE_WITHOUT_RESULT_SQL = (
    "SELECT i.subject_key FROM batch_items i JOIN batch_jobs j ON j.id = i.job_id"
    " LEFT JOIN case_headnotes h ON h.case_id = i.subject_key::uuid"
    f" WHERE i.flow = 'headnotes' AND i.state IN {sql_in([ItemState.DONE])} AND (h.case_id IS NULL"
    "   OR h.model IS DISTINCT FROM j.model OR h.generated_at < j.created_at)"
)
"""Done headnote items whose headnote was not written by their job (for `legal-batch verify`): no
record of one in `case_headnotes`, or one from another model, or one generated before the job was
planned (e.g. an overwrite shard ingested without overwrite kept the old one)."""


def stale_result_sql(source: CaseSource | None = None) -> str:
    """Headnotes whose judgment changed after they were written (flagged, or found now), one line
    each, for `legal-batch verify`."""
    source = source or CaseSource()
    return (
        "SELECT h.case_id || ' (' || h.model || '): the judgment changed after its headnote was written'"
        f" FROM case_headnotes h JOIN {source.select('id', 'full_text')} AS k ON k.id = h.case_id"
        " WHERE h.stale_since IS NOT NULL"
        f"  OR (h.text_sha256 IS NOT NULL AND h.text_sha256 <> {source.text_sha256_sql('k')})"
        " ORDER BY h.case_id"
    )
