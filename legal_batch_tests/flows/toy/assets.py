"""The toy flow's Dagster definitions: one call to the shared builder."""

from __future__ import annotations

from legal_batch.flows.batch_assets import CandidatesConfig, FlowNames, build_flow_definitions
from legal_batch.providers.base import BatchProvider
from legal_batch_tests.flows.toy.flow import DONE_WITHOUT_RESULT_SQL, ToyFlow


def make_flow(provider: BatchProvider, config: CandidatesConfig | None, *, job=None) -> ToyFlow:
    return ToyFlow(job.model if job is not None else provider.default_model("embeddings"))


DEFS = build_flow_definitions(
    FlowNames(flow="toy", prefix="toy", results="toy_vectors"),
    make_flow=make_flow,
    done_without_result_sql=DONE_WITHOUT_RESULT_SQL,
    descriptions={"candidates": "Words to embed.", "request_files": "Request file of a shard.",
                  "batch_jobs": "Provider job of a shard.", "batch_outputs": "Downloaded outputs.",
                  "results": "One vector size per word."},
)
