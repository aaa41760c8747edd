"""Cheap invariants on a shard's ingested vectors."""

from __future__ import annotations

import dagster as dg
import numpy as np
import psycopg

from legal_batch.core.ledger import ItemState, Shard

vector_spec = dg.AssetCheckSpec(
    "vectors_finite_unit_norm", asset="case_embeddings",
    description="Every vector ingested from the shard has the shard's number of dimensions "
                "(LEGAL_BATCH_EMBEDDING_DIMENSIONS, 1024 by default), finite components and unit norm (±1e-3).",
)


sinks_spec = dg.AssetCheckSpec(
    "vectors_in_every_sink", asset="case_embeddings",
    description="Every chunk of the shard that is done is in every further vector sink the shard was planned "
                "with (LEGAL_BATCH_EMBEDDINGS_SINKS / --sink: chroma, weaviate), and a sample of up to 200 of "
                "its vectors there has the shard's dimensions and unit norm (±1e-3).",
)
_SAMPLE = 200


def sink_checks(conn: psycopg.Connection, job: Shard) -> dg.AssetCheckResult:
    """`vectors_in_every_sink` for one shard (passes with nothing to check when it has no further sinks)."""
    from legal_batch.flows.embeddings.replicas import further_sinks, open_sinks
    from legal_batch.settings import get_settings

    params = job.params or {}
    names = further_sinks(params.get("sinks") or ())
    dimensions = int(params.get("dimensions", 1024))
    ids = [row[0] for row in conn.execute(
        "SELECT subject_key FROM batch_items WHERE job_id = %s AND state = %s ORDER BY id", (job.id, ItemState.DONE))]
    sinks, unavailable = open_sinks(names, model=job.model, dimensions=dimensions, settings=get_settings(),
                                    strict=False)
    metadata: dict = {"done_chunks": len(ids), "further_sinks": ", ".join(names) or "none"}
    passed = not unavailable
    for name, reason in unavailable.items():
        metadata[f"{name}_unavailable"] = reason
    try:
        for sink in sinks:
            missing = len(ids) - len(sink.contains(ids))
            sample = sink.vectors(ids[:_SAMPLE])
            norms = [float(np.linalg.norm(vector)) for vector in sample.values()]
            wrong = sum(1 for vector in sample.values() if vector.shape != (dimensions,))
            off = sum(1 for norm in norms if abs(norm - 1) > 1e-3)
            metadata |= {f"{sink.name}_missing": missing, f"{sink.name}_wrong_dimensions": wrong,
                         f"{sink.name}_not_unit_norm": off, f"{sink.name}_where": sink.where}
            passed = passed and missing == 0 and wrong == 0 and off == 0
    finally:
        for sink in sinks:
            sink.close()
    return dg.AssetCheckResult(check_name="vectors_in_every_sink", passed=passed, metadata=metadata)


def vector_checks(conn: psycopg.Connection, job: Shard) -> list[dg.AssetCheckResult]:
    dimensions = int((job.params or {}).get("dimensions", 1024))
    total, off_norm, wrong_dims = conn.execute(
        "SELECT count(*), count(*) FILTER (WHERE abs(vector_norm(e.embedding::vector) - 1) > 1e-3),"
        "       count(*) FILTER (WHERE vector_dims(e.embedding) <> %s)"
        " FROM batch_items i JOIN embedding_sink e"
        "   ON e.case_id = split_part(i.subject_key, ':', 1)::uuid"
        "  AND e.chunk_index = split_part(i.subject_key, ':', 2)::int AND e.model = %s"
        " WHERE i.job_id = %s AND i.state = %s",
        (dimensions, job.model, job.id, ItemState.DONE),
    ).fetchone()
    return [sink_checks(conn, job), dg.AssetCheckResult(
        check_name="vectors_finite_unit_norm", passed=off_norm == 0 and wrong_dims == 0,
        metadata={"vectors": total, "not_unit_norm": off_norm, "wrong_dimensions": wrong_dims,
                  "dimensions": dimensions},
    )]
