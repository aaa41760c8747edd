"""Loading the synthetic demo corpus into `court_cases` and `headnote_corpus` (streamed, idempotent)."""

from __future__ import annotations

from collections.abc import Callable

import psycopg

from legal_batch.core.demo_corpus import generate_cases, headnote_examples

_BATCH = 500


def seed_demo_cases(conn: psycopg.Connection, *, cases: int, seed: int = 42,
                    on_progress: Callable[[int], None] | None = None) -> int:
    """Write `cases` deterministic judgments (ids fixed by seed and index); existing ones are kept.

    Returns the number of cases inserted now."""
    inserted = 0
    for start in range(0, cases, _BATCH):
        count = min(_BATCH, cases - start)
        with conn.transaction():
            conn.execute(
                "CREATE TEMP TABLE IF NOT EXISTS stage_cases (LIKE court_cases INCLUDING DEFAULTS) ON COMMIT DROP"
            )
            with conn.cursor().copy(
                "COPY stage_cases (id, neutral_citation, case_name, court, decision_date, full_text) FROM STDIN"
            ) as copy:
                for case in generate_cases(count, seed=seed, start=start):
                    copy.write_row((case.id, case.neutral_citation, case.case_name, case.court,
                                    case.decision_date, case.full_text))
            inserted += conn.execute(
                "INSERT INTO court_cases (id, neutral_citation, case_name, court, decision_date, full_text)"
                " SELECT id, neutral_citation, case_name, court, decision_date, full_text FROM stage_cases"
                " ON CONFLICT (id) DO NOTHING"
            ).rowcount
        if on_progress is not None:
            on_progress(count)
    with conn.transaction():
        if not conn.execute("SELECT EXISTS (SELECT 1 FROM headnote_corpus)").fetchone()[0]:
            with conn.cursor() as cur:
                cur.executemany("INSERT INTO headnote_corpus (headnote_text) VALUES (%s)",
                                [(text,) for text in headnote_examples()])
    return inserted
