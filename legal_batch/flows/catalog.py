"""What the asset graph shows around the flows: the inputs they read (external source assets), the
kinds of storage and service each stage touches, and the table schemas of the tables that are assets.

Source assets are `dg.AssetSpec`s with no materialization function: their rows arrive through
`legal-batch cases import`, `demo seed` or the user's own loads. A flow names the sources its
candidates read (`build_flow_definitions(..., sources=...)`), so the groups are joined through
them in the graph; `definitions.py` keeps each source once.
"""

from __future__ import annotations

import dagster as dg

OWNERS = ["team:legal-batch"]
"""Who answers for the assets (Dagster owners: an e-mail or `team:<name>`)."""

SOURCES_GROUP = "sources"

COURT_CASES_SCHEMA = dg.TableSchema(columns=[
    dg.TableColumn("id", "uuid", description="Stable case id (a UUID kept on import, else uuid5 of the source id).",
                   constraints=dg.TableColumnConstraints(nullable=False, unique=True)),
    dg.TableColumn("neutral_citation", "text"),
    dg.TableColumn("case_name", "text"),
    dg.TableColumn("court", "text"),
    dg.TableColumn("decision_date", "date"),
    dg.TableColumn("full_text", "text", description="The judgment; chunked for embeddings, sent for headnotes."),
    dg.TableColumn("headnote", "text", description="Written by the headnotes flow (court_case_headnotes)."),
    dg.TableColumn("headnote_model", "text", description="Written by the headnotes flow."),
    dg.TableColumn("headnote_generated_at", "timestamptz", description="Written by the headnotes flow."),
    dg.TableColumn("updated_at", "timestamptz", constraints=dg.TableColumnConstraints(nullable=False)),
])

COURT_CASES = dg.AssetSpec(
    "court_cases", group_name=SOURCES_GROUP, kinds={"postgres"}, owners=OWNERS,
    tags={"layer": "source"},
    description="Court judgments, the input of the embeddings and headnotes flows. Grain: one case (id). "
                "Loaded by `legal-batch cases import` or `legal-batch demo seed` (upsert by id); the headnotes "
                "flow writes its headnote columns back (see court_case_headnotes).",
    metadata={"dagster/table_name": "court_cases", "dagster/column_schema": COURT_CASES_SCHEMA},
)


def provider_kinds(provider: str) -> set[str]:
    """The kinds a provider's batch jobs show in the graph: its service (and S3 for Bedrock's files)."""
    return {
        "local": {"python"},
        "openai": {"openai"},
        "azure_openai": {"azure", "openai"},
        "bedrock": {"bedrock", "s3"},
    }.get(provider, {provider})


def file_kinds(provider: str) -> set[str]:
    """Where a provider's request and output files go besides `$LEGAL_BATCH_HOME/files`: Bedrock
    reads and writes them in S3 (`LEGAL_BATCH_S3_BUCKET`); the others upload them to the provider."""
    return {"file", "jsonl", "s3"} if provider == "bedrock" else {"file", "jsonl"}
