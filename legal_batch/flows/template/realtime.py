"""Answering a template run's rows through the provider's real-time path (small runs, and the
fallback for rows whose batch request failed)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import psycopg

from legal_batch.core.ledger import ITEM_CLOSED_WITHOUT_RESULT_STATES, ItemState
from legal_batch.flows.template.flow import TemplateSink, chat_request
from legal_batch.flows.template.runs import FLOW, SUBJECT_EXPR, TemplateRun, custom_id
from legal_batch.providers.base import BatchProvider, Result

# -- real time ------------------------------------------------------------------------------------

@dataclass
class RealtimeReport:
    """Rows answered in real time by one :func:`answer_realtime` call."""

    requested: int = 0
    answered: int = 0
    errors: int = 0
    fallback: int = 0
    """Of ``requested``: rows whose batch request had failed."""


def answer_realtime(conn: psycopg.Connection, run: TemplateRun, provider: BatchProvider, *,
                    page_size: int = 100, on_progress: Callable[[int], None] | None = None) -> RealtimeReport:
    """Answer every row of ``run`` that needs the real-time path, ``page_size`` requests at a time.

    That is every unanswered row of a real-time run, and every unanswered row of a batch run whose
    ledger item ended ``retryable`` or ``failed`` (the fallback; such items become ``done`` when a
    response arrives). Each page is written in its own transaction, so an interruption loses at
    most one page; running it again continues where it stopped. Provider errors are recorded
    per row (``provider_error``), never raised.
    """
    report = RealtimeReport()
    last = (-1, 0)
    while True:
        page = conn.execute(
            f"SELECT f.file_no, r.file_key, r.row_no, r.user_prompt, i.id, i.last_error"
            " FROM template_rows r JOIN template_files f ON f.run_id = r.run_id AND f.file_key = r.file_key"
            f" LEFT JOIN batch_items i ON i.flow = %(flow)s AND i.subject_key = {SUBJECT_EXPR}"
            " WHERE r.run_id = %(run)s AND (f.file_no, r.row_no) > (%(file_no)s, %(row_no)s)"
            "   AND NOT EXISTS (SELECT 1 FROM template_results x WHERE x.run_id = r.run_id"
            "                   AND x.file_key = r.file_key AND x.row_no = r.row_no)"
            "   AND (%(realtime)s OR i.state = ANY(%(without_result)s))"
            " ORDER BY f.file_no, r.row_no LIMIT %(limit)s",
            {"flow": FLOW, "run": run.id, "file_no": last[0], "row_no": last[1],
             "realtime": run.execution == "realtime", "limit": page_size,
             "without_result": list(ITEM_CLOSED_WITHOUT_RESULT_STATES)},
        ).fetchall()
        if not page:
            return report
        last = (page[-1][0], page[-1][2])
        _answer_page(conn, run, provider, page, report)
        if on_progress is not None:
            on_progress(len(page))


def _answer_page(conn: psycopg.Connection, run: TemplateRun, provider: BatchProvider, page: list[tuple],
                 report: RealtimeReport) -> None:
    by_id = {custom_id(run.id, file_no, row_no): (file_key, row_no, item_id, item_error)
             for file_no, file_key, row_no, _, item_id, item_error in page}
    requests = [chat_request(custom_id(run.id, file_no, row_no), run.system_prompt, user, run.schema_json,
                              run.max_tokens, run.prefill) for file_no, _, row_no, user, _, _ in page]
    answers: dict[str, Result] = {}
    for result in provider.realtime(requests, endpoint="chat", model=run.model):
        if result.custom_id in by_id:
            answers[result.custom_id] = result
    sink = TemplateSink(conn, model=run.model, via="realtime")
    done: list[tuple[int, str]] = []
    failed: list[tuple[int, str]] = []
    for request_id, (file_key, row_no, item_id, item_error) in by_id.items():
        text, error = _text_or_error(answers.get(request_id))
        sink.add((run.id, file_key, row_no), text, error)
        report.requested += 1
        report.answered += error is None
        report.errors += error is not None
        if item_id is not None:
            report.fallback += 1
            batch_error = item_error or "batch request failed"
            if error is None:
                done.append((item_id, f"answered in real time after the batch request failed: {batch_error}"))
            else:
                failed.append((item_id, f"batch: {batch_error}; real time: {error}"))
    with conn.transaction():
        sink.finish()
        for state, updates in ((ItemState.DONE, done), (ItemState.FAILED, failed)):
            if updates:
                with conn.cursor() as cur:
                    cur.executemany("UPDATE batch_items SET state = %s, last_error = %s, updated_at = now()"
                                    " WHERE id = %s", [(state, error, item_id) for item_id, error in updates])


def _text_or_error(result: Result | None) -> tuple[str | None, str | None]:
    if result is None:
        return None, "the provider returned no real-time response for this request"
    if result.error is not None:
        return None, result.error
    if result.text is None:
        return None, "response has no text"
    return result.text.replace("\x00", ""), None


