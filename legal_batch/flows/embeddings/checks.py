"""Cheap invariants on a shard's ingested vectors."""

from __future__ import annotations

import dagster as dg
import psycopg

from legal_batch.core.ledger import JobRow

vector_spec = dg.AssetCheckSpec(
    "vectors_finite_unit_norm", asset="case_embeddings",
    description="Every vector ingested from the shard has the shard's number of dimensions "
                "(LEGAL_BATCH_EMBEDDING_DIMENSIONS, 1024 by default), finite components and unit norm (±1e-3).",
)


def vector_checks(conn: psycopg.Connection, job: JobRow) -> list[dg.AssetCheckResult]:
    dimensions = int((job.params or {}).get("dimensions", 1024))
    total, off_norm, wrong_dims = conn.execute(
        "SELECT count(*), count(*) FILTER (WHERE abs(vector_norm(e.embedding::vector) - 1) > 1e-3),"
        "       count(*) FILTER (WHERE vector_dims(e.embedding) <> %s)"
        " FROM batch_items i JOIN embedding_sink e"
        "   ON e.case_id = split_part(i.subject_key, ':', 1)::uuid"
        "  AND e.chunk_index = split_part(i.subject_key, ':', 2)::int AND e.model = %s"
        " WHERE i.job_id = %s AND i.state = 'done'",
        (dimensions, job.model, job.id),
    ).fetchone()
    return [dg.AssetCheckResult(
        check_name="vectors_finite_unit_norm", passed=off_norm == 0 and wrong_dims == 0,
        metadata={"vectors": total, "not_unit_norm": off_norm, "wrong_dimensions": wrong_dims,
                  "dimensions": dimensions},
    )]
