"""Every flow, listed once: `definitions.py`, the CLI and the provider factory iterate `FLOWS`.

A flow is a folder `flows/<name>/` holding its Dagster-free logic (`flow.py`: candidates, requests,
sink, `DONE_WITHOUT_RESULT_SQL`) and its Dagster definitions (`assets.py`: `DEFS`, built with
`flows.batch_assets`); adding one is that folder plus one `FlowEntry` line below. Nothing here
imports a flow until it is asked for, so importing the registry stays cheap.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import import_module
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from legal_batch.flows.batch_assets import FlowDefinitions


@dataclass(frozen=True)
class FlowEntry:
    name: str
    """The flow's name in the ledger (`batch_jobs.flow`), the CLI and the settings."""
    package: str
    """The flow's folder as a module path, e.g. `legal_batch.flows.embeddings`."""
    provider_setting: str
    """The `Settings` field (and `LEGAL_BATCH_*` variable) naming the flow's provider."""
    standard_cli: bool = True
    """Gets the standard verbs (`export`, `submit`, `status`, `ingest`, `run`); otherwise the folder's
    `cli.py` provides `app`."""
    overwritable: bool = False
    """Has results a run may regenerate (`--overwrite`)."""
    prompted: bool = False
    """Has a prompt template a run may replace (`--prompt`)."""
    stores_vectors: bool = False
    """Writes vectors to the vector sinks and may read a record source (`--sink`, `--source`)."""

    def definitions(self) -> FlowDefinitions:
        return import_module(f"{self.package}.assets").DEFS

    def done_without_result_sql(self) -> str | None:
        return getattr(import_module(f"{self.package}.flow"), "DONE_WITHOUT_RESULT_SQL", None)

    def stale_result_sql(self, source: Any) -> str | None:
        """The flow's `stale_result_sql(source)` (results whose text no longer matches the source),
        if it has one."""
        make = getattr(import_module(f"{self.package}.flow"), "stale_result_sql", None)
        return None if make is None else make(source)

    def cli_app(self) -> Any:
        return import_module(f"{self.package}.cli").app

    def provider_name(self, settings: Any) -> str:
        return getattr(settings, self.provider_setting)


FLOWS: list[FlowEntry] = [
    FlowEntry("embeddings", "legal_batch.flows.embeddings", "embeddings_provider", stores_vectors=True),
    FlowEntry("headnotes", "legal_batch.flows.headnotes", "headnotes_provider", overwritable=True, prompted=True),
    FlowEntry("template", "legal_batch.flows.template", "template_provider", standard_cli=False),
]


def flow_names() -> list[str]:
    return [entry.name for entry in FLOWS]


def entry(name: str) -> FlowEntry:
    for candidate in FLOWS:
        if candidate.name == name:
            return candidate
    raise KeyError(f"unknown flow {name!r}: one of {', '.join(flow_names())}")


def provider_name_for(flow: str, settings: Any) -> str:
    """The provider the flow is configured to use (its `LEGAL_BATCH_<FLOW>_PROVIDER`)."""
    return entry(flow).provider_name(settings)
