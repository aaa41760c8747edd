"""Every vector sink, listed once: name → module. Adding a sink is its module plus one line below.

A sink module defines `TRANSACTIONAL` (its capability: writes join the ledger's Postgres transaction),
`target(*, model, dimensions, settings)` (what it writes to, without connecting) and
`open_sink(*, model, dimensions, settings, conn)`, which connects, checks the dimension of what
it will write into, and returns a `VectorSink`. Nothing here imports a sink until it is asked for,
so naming sinks (settings, CLI choices) loads no database client.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING

from legal_batch.core.errors import UserError

if TYPE_CHECKING:
    import psycopg

    from legal_batch.settings import Settings
    from legal_batch.sinks.base import VectorSink

SINKS: dict[str, str] = {
    "pgvector": "legal_batch.sinks.pgvector",
    "chroma": "legal_batch.sinks.chroma",
    "weaviate": "legal_batch.sinks.weaviate",
}


def sink_names() -> list[str]:
    return list(SINKS)


def parse_sink_names(value: str, *, setting: str = "LEGAL_BATCH_EMBEDDINGS_SINKS") -> list[str]:
    """A comma list of sink names, in order, without repeats; an unknown name is a `UserError`."""
    names: list[str] = []
    for raw in value.split(","):
        name = raw.strip().lower()
        if not name:
            continue
        if name not in SINKS:
            raise UserError(f"{setting}={value!r}: unknown sink {name!r}; use a comma list of "
                            f"{', '.join(SINKS)}")
        if name not in names:
            names.append(name)
    if not names:
        raise UserError(f"{setting}={value!r} names no sink; use a comma list of {', '.join(SINKS)}")
    return names


def is_transactional(name: str) -> bool:
    return bool(_module(name).TRANSACTIONAL)


def open_sink(name: str, *, model: str, dimensions: int, settings: Settings,
              conn: psycopg.Connection | None = None) -> VectorSink:
    """Open the named sink for `model` vectors of `dimensions` components (see the module docstring)."""
    return _module(name).open_sink(model=model, dimensions=dimensions, settings=settings, conn=conn)


def sink_target(name: str, *, model: str, dimensions: int, settings: Settings) -> str:
    """What the named sink writes to for `model` (its `where`, e.g. `chroma collection legal_batch-m-1024`),
    known from the settings without connecting."""
    return _module(name).target(model=model, dimensions=dimensions, settings=settings)


def _module(name: str):
    try:
        return import_module(SINKS[name])
    except KeyError:
        raise UserError(f"unknown sink {name!r}: one of {', '.join(SINKS)}") from None
