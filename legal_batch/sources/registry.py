"""Every record source besides our own `court_cases`, listed once: name → module. Adding a source is its
module plus one line below; nothing here imports a source until it is asked for."""

from __future__ import annotations

from importlib import import_module
from types import ModuleType

from legal_batch.core.errors import UserError

SOURCES: dict[str, str] = {
    "dynamodb": "legal_batch.sources.dynamodb",
}


def source_module(name: str) -> ModuleType:
    try:
        return import_module(SOURCES[name])
    except KeyError:
        raise UserError(f"unknown source {name!r}: one of {', '.join(SOURCES)}") from None
