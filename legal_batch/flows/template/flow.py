"""The template flow on the shared batch machinery: stage rows, answer them, write the outputs.

A *run* is one input (a file, a folder, or ``train/``/``val/``/``test/`` splits) with its
``prompts.json``, JSON Schema and output folder. :func:`stage_inputs` renders one prompt per row
into ``template_rows`` (the row values stay in the files) and decides how the run is answered:

- ``batch``: the rows are candidates of :class:`TemplateFlow`, so the shared ledger shards,
  submits, polls and ingests them (``core.batch``); responses land in ``template_results``.
- ``realtime``: :func:`answer_realtime` calls the provider's real-time path directly.

Rows whose batch request failed (refused at submit, job failed/stopped/expired, a per-record
error, an unusable output line) are never re-batched: :func:`finish_run` answers them in real time
(the *fallback*) and, once every row has a response or an error, :func:`write_outputs` reads the
input files again, joins the responses on (file, row number), validates them and writes one output
file per input plus the processing summary.

Identifiers: subject key ``<run_id>:<file_key>:<row_no>`` (``file_key`` is the path relative to the
input, ``row_no`` the 1-based data row), custom id ``r<run_id>-f<file_no>-<row_no>``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Literal

import psycopg

from legal_batch.core.flow import Item
from legal_batch.core.ledger import ITEM_OPEN_STATES, ItemState, sql_in
from legal_batch.flows.template.runs import (
    COPY_ROWS,
    CUSTOM_ID_EXPR,
    FLOW,
    REQUEST_OVERHEAD_BYTES,
    SUBJECT_EXPR,
    SUBJECT_SQL,
    parse_subject,
)
from legal_batch.providers.base import ChatRequest, Endpoint, Request, Result

DONE_WITHOUT_RESULT_SQL = (
    "SELECT i.subject_key FROM batch_items i"
    f" CROSS JOIN LATERAL regexp_match(i.subject_key, {SUBJECT_SQL}) AS k(m)"
    f" WHERE i.flow = 'template' AND i.state IN {sql_in([ItemState.DONE])}"
    "  AND NOT EXISTS (SELECT 1 FROM template_results x"
    "  WHERE x.run_id = k.m[1]::bigint AND x.file_key = k.m[2] AND x.row_no = k.m[3]::int)"
)


# -- the flow the shared machinery runs --------------------------------------------------------------

class TemplateFlow:
    """Subjects are staged rows of batch runs (``<run_id>:<file_key>:<row_no>``); results are rows of
    ``template_results``. Only rows never sent before are candidates: a row whose batch request
    failed is answered in real time by :func:`finish_run`, not re-batched."""

    name = FLOW
    endpoint: Endpoint = "chat"

    def __init__(self, *, provider: str, model: str, limit: int | None = None) -> None:
        self.provider = provider
        self.model = model
        self.limit = limit

    def job_params(self) -> dict:
        """Nothing beyond the job row's provider and model: a run's templates, schema, mode and
        prefix are kept with the run (``template_runs``) when it is staged."""
        return {}

    def candidate_sql(self) -> tuple[str, dict]:
        sql = (
            f"SELECT {SUBJECT_EXPR}, {CUSTOM_ID_EXPR}, r.est_tokens,"
            "       (octet_length(r.user_prompt) * 11 / 10 + octet_length(t.system_prompt)"
            f"        + octet_length(t.schema_json::text) + {REQUEST_OVERHEAD_BYTES})::int"
            " FROM template_runs t"
            " JOIN template_files f ON f.run_id = t.id"
            " JOIN template_rows r ON r.run_id = f.run_id AND r.file_key = f.file_key"
            " WHERE t.finished_at IS NULL AND t.execution = 'batch' AND t.provider = %(provider)s"
            "   AND t.model = %(model)s"
            "   AND NOT EXISTS (SELECT 1 FROM template_results x WHERE x.run_id = r.run_id"
            "                   AND x.file_key = r.file_key AND x.row_no = r.row_no)"
            f"  AND NOT EXISTS (SELECT 1 FROM batch_items i WHERE i.flow = %(flow)s AND i.subject_key = {SUBJECT_EXPR})"
            " ORDER BY t.id, f.file_no, r.row_no"
            " LIMIT %(limit)s"
        )
        return sql, {"provider": self.provider, "model": self.model, "flow": FLOW, "limit": self.limit}

    def requests(self, conn: psycopg.Connection, job_id: int) -> Iterator[Request]:
        runs = {
            run_id: (system, schema, max_tokens, prefill)
            for run_id, system, schema, max_tokens, prefill in conn.execute(
                "SELECT t.id, t.system_prompt, t.schema_json, t.max_tokens, t.prefill FROM template_runs t"
                " WHERE t.id IN (SELECT DISTINCT split_part(subject_key, ':', 1)::bigint FROM batch_items"
                "                WHERE job_id = %s)",
                (job_id,),
            )
        }
        with conn.cursor(name=f"template_requests_{job_id}") as cur:
            cur.itersize = 2_000
            cur.execute(
                "SELECT i.custom_id, r.run_id, r.user_prompt FROM batch_items i"
                f" CROSS JOIN LATERAL regexp_match(i.subject_key, {SUBJECT_SQL}) AS k(m)"
                " JOIN template_rows r ON r.run_id = k.m[1]::bigint AND r.file_key = k.m[2]"
                "  AND r.row_no = k.m[3]::int"
                " WHERE i.job_id = %s AND i.state = ANY(%s) ORDER BY i.id",
                (job_id, list(ITEM_OPEN_STATES)),
            )
            for request_id, run_id, user in cur:
                system, schema, max_tokens, prefill = runs[run_id]
                yield chat_request(request_id, system, user, schema, max_tokens, prefill)

    def sink(self, conn: psycopg.Connection, *, model: str) -> TemplateSink:
        return TemplateSink(conn, model=model, via="batch")


def chat_request(request_id: str, system: str, user: str, schema: dict, max_tokens: int,
                  prefill: str) -> ChatRequest:
    return ChatRequest(request_id, system, user, max_tokens=max_tokens, temperature=0.0, prefill=prefill,
                       json_schema=schema)


class TemplateSink:
    """Upserts raw responses into ``template_results`` (COPY into a staging table, then one upsert).

    Parsing and validation happen when the outputs are written, so a response that is not JSON is
    kept (and reported per row) rather than asked for again."""

    def __init__(self, conn: psycopg.Connection, *, model: str, via: Literal["batch", "realtime"]) -> None:
        self.conn = conn
        self.model = model
        self.via = via
        self._rows: list[tuple[int, str, int, str | None, str | None]] = []
        self.written = 0

    def accept(self, item: Item, result: Result) -> str | None:
        if result.text is None:
            return "response has no text"
        self.add(parse_subject(item.subject_key), result.text.replace("\x00", ""), None)
        return None

    def add(self, key: tuple[int, str, int], text: str | None, error: str | None) -> None:
        """One row's response or provider error (real-time path)."""
        self._rows.append((*key, text, error))
        if len(self._rows) >= COPY_ROWS:
            self._flush()

    def _flush(self) -> None:
        if not self._rows:
            return
        self.conn.execute(
            "CREATE TEMP TABLE IF NOT EXISTS stage_template_results (run_id bigint, file_key text, row_no int,"
            " response_text text, provider_error text)"
        )
        self.conn.execute("TRUNCATE stage_template_results")
        with self.conn.cursor().copy("COPY stage_template_results FROM STDIN") as copy:
            for row in self._rows:
                copy.write_row(row)
        self.written += self.conn.execute(
            "INSERT INTO template_results (run_id, file_key, row_no, response_text, provider_error, model, via)"
            " SELECT run_id, file_key, row_no, response_text, provider_error, %s, %s FROM stage_template_results"
            " ON CONFLICT (run_id, file_key, row_no) DO UPDATE SET response_text = excluded.response_text,"
            "  provider_error = excluded.provider_error, model = excluded.model, via = excluded.via,"
            "  created_at = now()",
            (self.model, self.via),
        ).rowcount
        self._rows = []

    def finish(self) -> int:
        self._flush()
        return self.written

    def settle(self, job_id: int) -> None:
        """No further stores."""


