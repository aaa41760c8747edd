"""Assembles the Dagster definitions from the flow registry; nothing else.

`dagster dev` / `dagster job execute -m legal_batch.definitions` load `defs` from here (see
`workspace.yaml` and `[tool.dagster]` in `pyproject.toml`)."""

from collections.abc import Iterable

import dagster as dg

from legal_batch.flows.registry import FLOWS, FlowEntry
from legal_batch.resources import DatabaseResource, FileStoreResource, ProvidersResource


def build_definitions(entries: Iterable[FlowEntry]) -> dg.Definitions:
    """One `Definitions` holding every listed flow's assets, jobs and sensors, and the resources."""
    flows = [entry.definitions() for entry in entries]
    sources = {spec.key: spec for flow in flows for spec in flow.sources}  # court_cases feeds two flows
    return dg.Definitions(
        assets=[*sources.values(), *(asset for flow in flows for asset in flow.assets),
                *(flow.progress for flow in flows)],
        jobs=[job for flow in flows for job in flow.jobs],
        sensors=[sensor for flow in flows for sensor in flow.sensors],
        resources={
            "database": DatabaseResource(),
            "files": FileStoreResource(),
            "providers": ProvidersResource(),
        },
    )


FLOWS_BY_NAME = {entry.name: entry.definitions() for entry in FLOWS}
DONE_WITHOUT_RESULT = {entry.name: entry.done_without_result_sql() for entry in FLOWS}
defs = build_definitions(FLOWS)
