"""Cheap invariants on a shard's ingested headnotes, and its cost against the estimate.

Only headnotes this shard wrote are looked at: done items whose case's headnote is recorded with the
shard's model and a generation time after the shard was planned (`case_headnotes`).
"""

from __future__ import annotations

import dagster as dg
import psycopg

from legal_batch.core.cost import batch_discount, price
from legal_batch.core.ledger import ItemState, Shard
from legal_batch.core.user_tables import CaseSource

RESULTS = "court_case_headnotes"
MIN_CHARS = 200
MAX_CHARS = 6_000

length_spec = dg.AssetCheckSpec(
    "headnotes_within_length_band", asset=RESULTS,
    description=f"Every headnote the shard wrote is non-empty and {MIN_CHARS:,}–{MAX_CHARS:,} characters long "
                "(warning: a model that rambles or stops short, not a broken shard).",
)
citation_spec = dg.AssetCheckSpec(
    "headnotes_cite_neutral_citation", asset=RESULTS,
    description="At least LEGAL_BATCH_HEADNOTE_MIN_CITATION_RATE (default 0.5) of the shard's headnotes whose "
                "case has a neutral citation mention it (warning: a model that drops the citation).",
)
cost_spec = dg.AssetCheckSpec(
    "shard_cost_within_estimate", asset=RESULTS,
    description="The shard's actual batch cost (from the provider's usage) is within the estimate made before "
                "submit, with output counted at max_tokens per request (warning only).",
)
HEADNOTE_CHECK_SPECS = [length_spec, citation_spec, cost_spec]

def _written(source: CaseSource) -> str:
    """FROM/WHERE of the headnotes a shard wrote: done items whose case's headnote is recorded
    (`case_headnotes`) with the shard's model and a generation time after the shard was planned."""
    return (
        f" FROM batch_items i JOIN {source.select('id', 'neutral_citation', 'headnote')} AS k"
        "   ON k.id = i.subject_key::uuid JOIN case_headnotes h ON h.case_id = k.id"
        " WHERE i.job_id = %(job)s AND i.state = %(done)s AND h.model = %(model)s AND h.generated_at >= %(since)s"
    )


def headnote_checks(conn: psycopg.Connection, job: Shard, *, max_tokens: int,
                    min_citation_rate: float, source: CaseSource | None = None) -> list[dg.AssetCheckResult]:
    """The three checks above, for one ingested shard (of `source`: the built-in court_cases).

    The citation check fails when fewer than ``min_citation_rate`` (0..1) of the headnotes whose
    case has a neutral citation mention it; with no such headnote there is nothing to fail.
    """
    params = {"job": job.id, "model": job.model, "since": job.created_at, "done": ItemState.DONE}
    written_sql = _written(source or CaseSource())
    written, empty, short, long, cited, with_citation = conn.execute(
        "SELECT count(*), count(*) FILTER (WHERE btrim(k.headnote) = ''),"
        "       count(*) FILTER (WHERE char_length(btrim(k.headnote)) BETWEEN 1 AND %(min)s - 1),"
        "       count(*) FILTER (WHERE char_length(btrim(k.headnote)) > %(max)s),"
        "       count(*) FILTER (WHERE k.neutral_citation IS NOT NULL AND strpos(lower(regexp_replace(k.headnote,"
        "             '\\s+', ' ', 'g')), lower(regexp_replace(btrim(k.neutral_citation), '\\s+', ' ', 'g'))) > 0),"
        "       count(*) FILTER (WHERE coalesce(btrim(k.neutral_citation), '') <> '')" + written_sql,
        {**params, "min": MIN_CHARS, "max": MAX_CHARS},
    ).fetchone()
    missing = [row[0] for row in conn.execute(
        "SELECT k.neutral_citation" + written_sql + " AND coalesce(btrim(k.neutral_citation), '') <> ''"
        " AND strpos(lower(regexp_replace(k.headnote, '\\s+', ' ', 'g')),"
        "            lower(regexp_replace(btrim(k.neutral_citation), '\\s+', ' ', 'g'))) = 0"
        " ORDER BY k.id LIMIT 5", params).fetchall()]
    rate = cited / with_citation if with_citation else None
    return [
        dg.AssetCheckResult(
            check_name=length_spec.name, passed=empty == 0 and short == 0 and long == 0,
            severity=dg.AssetCheckSeverity.WARN,
            metadata={"headnotes_written": written, "empty": empty, f"under_{MIN_CHARS}_chars": short,
                      f"over_{MAX_CHARS}_chars": long},
        ),
        dg.AssetCheckResult(
            check_name=citation_spec.name, passed=rate is None or rate >= min_citation_rate,
            severity=dg.AssetCheckSeverity.WARN,
            metadata={"headnotes_with_known_citation": with_citation, "mention_citation": cited,
                      "mention_rate": float(round(rate, 4)) if rate is not None else dg.MetadataValue.text("n/a"),
                      "min_mention_rate": float(min_citation_rate),
                      "examples_missing": dg.MetadataValue.json(missing)},
        ),
        _cost_check(job, max_tokens=max_tokens),
    ]


def _cost_check(job: Shard, *, max_tokens: int) -> dg.AssetCheckResult:
    est_output = job.request_count * max_tokens
    estimate = price(job.model, input_tokens=job.est_input_tokens or 0, output_tokens=est_output)
    actual = price(job.model, input_tokens=job.input_tokens or 0, output_tokens=job.output_tokens or 0)
    return dg.AssetCheckResult(
        check_name=cost_spec.name, passed=actual.batch_usd <= estimate.batch_usd or not actual.priced,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={
            "priced": actual.priced,
            "batch_discount": batch_discount(),
            "est_input_tokens": job.est_input_tokens or 0,
            "est_output_tokens_max": est_output,
            "est_batch_usd": float(estimate.batch_usd),
            "input_tokens": job.input_tokens or 0,
            "output_tokens": job.output_tokens or 0,
            "actual_batch_usd": float(actual.batch_usd),
            "realtime_equivalent_usd": float(actual.realtime_usd),
            "saved_usd": float(actual.realtime_usd - actual.batch_usd),
        },
    )
