"""Where embedding vectors are stored: one small protocol, one module per sink (listed in `registry.py`).

A sink stores one vector per chunk under a deterministic id of (record id, chunk index), so writing
the same chunk again replaces it (upsert) and a re-run heals a write that was interrupted. Each sink
declares whether its writes are part of the ledger's Postgres transaction (`transactional`): a
non-transactional sink is written before the ledger commits, and its idempotent ids make a crash
between the two harmless. A sink checks the dimension of what it writes into when it is opened, so a
collection made for another model or dimension is refused before any request is sent.
"""

from __future__ import annotations

import hashlib
import math
import uuid
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

import numpy as np

from legal_batch.core.errors import UserError

VECTOR_NAMESPACE = uuid.UUID("6f1c7b1e-2f43-5d0a-9a51-6c6567616c62")
"""uuid5 namespace of vector ids (`vector_uuid`): the same chunk has the same uuid in every sink and run."""

METADATA_KEYS = ("case_id", "chunk_index", "chunk_type", "citation", "model", "text_sha256")
"""The metadata every sink stores next to a vector (and its document text)."""

MetadataValue = str | int | float | bool


@dataclass(frozen=True)
class VectorRecord:
    """One chunk's vector, with its text and metadata (`chunk_metadata`)."""

    record_id: str
    """The case id (or the source record's id) the chunk belongs to."""
    chunk_index: int
    vector: np.ndarray
    text: str = ""
    metadata: Mapping[str, MetadataValue] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return vector_id(self.record_id, self.chunk_index)


@dataclass(frozen=True)
class WriteFailure:
    """A record a sink did not store: its id, why, and whether writing it again may succeed."""

    id: str
    reason: str
    retryable: bool = True


@dataclass(frozen=True)
class SearchHit:
    id: str
    record_id: str
    chunk_index: int
    score: float
    """Cosine similarity (1 − cosine distance)."""
    text: str
    metadata: Mapping[str, MetadataValue]


class SinkError(RuntimeError):
    """A sink cannot be used: unreachable, or refused a request. The message names the sink and where."""


class SinkUnavailable(SinkError):
    """The sink's server cannot be reached (at open, or mid-write)."""


class DimensionMismatch(UserError):
    """The table or collection holds vectors of another dimension (or another distance) than asked."""


class VectorSink(Protocol):
    """Stores vectors by deterministic id; see the module docstring."""

    name: str
    transactional: bool
    """True when writes join the caller's Postgres transaction (committed or rolled back with the ledger)."""
    model: str
    dimensions: int
    where: str
    """The table or collection written, e.g. `case_embeddings` or `chroma:legal_batch-m-1024`."""
    one_writer: bool
    """Only one process may write at a time (an embedded store in a local folder): writers take turns."""

    def upsert(self, records: Sequence[VectorRecord]) -> list[WriteFailure]:
        """Store the records (replacing any with the same id); return those not stored, with why.
        A record whose vector has the wrong dimension or is not finite is refused, not retried."""
        ...

    def delete(self, ids: Iterable[str]) -> int:
        """Remove the vectors with these ids (`vector_id`); return how many existed."""
        ...

    def count(self) -> int:
        """Vectors stored for this sink's model."""
        ...

    def contains(self, ids: Sequence[str]) -> set[str]:
        """The ids among `ids` that are stored."""
        ...

    def vectors(self, ids: Sequence[str]) -> dict[str, np.ndarray]:
        """The stored vectors of those of `ids` that are stored (for `legal-batch verify`)."""
        ...

    def search(self, vector: np.ndarray, *, k: int = 5) -> list[SearchHit]:
        """The `k` nearest vectors by cosine distance, best first."""
        ...

    def close(self) -> None: ...


def vector_id(record_id: str, chunk_index: int) -> str:
    """The id of a chunk's vector in every sink: `<record id>:<chunk index>` (the ledger's subject key
    of a chunk)."""
    return f"{record_id}:{int(chunk_index)}"


def split_vector_id(value: str) -> tuple[str, int]:
    record_id, sep, index = value.rpartition(":")
    if not sep or not record_id or not index.lstrip("-").isdigit():
        raise ValueError(f"{value!r} is not a vector id of the form <record id>:<chunk index>")
    return record_id, int(index)


def vector_uuid(record_id: str, chunk_index: int) -> uuid.UUID:
    """A uuid5 of `vector_id`, for stores whose ids must be uuids (Weaviate)."""
    return uuid.uuid5(VECTOR_NAMESPACE, vector_id(record_id, chunk_index))


def text_sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def chunk_metadata(*, record_id: str, chunk_index: int, model: str, text: str, chunk_type: str | None = None,
                   citation: str | None = None) -> dict[str, MetadataValue]:
    """The standard metadata of a chunk's vector (`METADATA_KEYS`); absent values are left out."""
    values: dict[str, MetadataValue | None] = {
        "case_id": record_id, "chunk_index": int(chunk_index), "chunk_type": chunk_type, "citation": citation,
        "model": model, "text_sha256": text_sha256(text),
    }
    return {key: value for key, value in values.items() if value is not None}


def as_array(vector: object) -> np.ndarray:
    """A stored vector as float32 (pgvector's psycopg loaders give an array or a `Vector`)."""
    to_numpy = getattr(vector, "to_numpy", None)
    return np.asarray(to_numpy() if to_numpy is not None else vector, dtype=np.float32)


def vector_problem(vector: np.ndarray | None, dimensions: int) -> str | None:
    """Why a vector cannot be stored (wrong shape, NaN or infinite components, all zeros), or None."""
    if vector is None:
        return "no vector"
    if vector.ndim != 1 or vector.shape[0] != dimensions:
        shape = vector.shape[0] if vector.ndim == 1 else vector.shape
        return f"vector has {shape} components, expected {dimensions}"
    energy = float(np.dot(vector.astype(np.float64), vector.astype(np.float64)))
    if not 0.0 < energy < math.inf:
        if not np.isfinite(vector).all():
            return "vector contains NaN or infinite components"
        if not vector.any():
            return "vector is all zeros"
    return None


def screen(records: Sequence[VectorRecord], dimensions: int, where: str
           ) -> tuple[list[VectorRecord], list[WriteFailure]]:
    """Split records into those a sink may write and refusals (not retryable) naming `where`."""
    good: list[VectorRecord] = []
    refused: list[WriteFailure] = []
    for record in records:
        problem = vector_problem(record.vector, dimensions)
        if problem is None:
            good.append(record)
        else:
            refused.append(WriteFailure(record.id, f"{where}: {problem}", retryable=False))
    return good, refused


T = TypeVar("T")


def batches(values: Sequence[T], size: int) -> Iterator[Sequence[T]]:
    for start in range(0, len(values), max(1, size)):
        yield values[start: start + size]


def collection_slug(model: str, dimensions: int, *, separator: str = "-") -> str:
    """`<model>-<dimensions>` with every character other than letters, digits, `_` and `-` replaced,
    for collection names (e.g. `amazon.titan-embed-text-v2:0` → `amazon-titan-embed-text-v2-0-1024`)."""
    cleaned = "".join(ch if ch.isascii() and (ch.isalnum() or ch in "_-") else "-" for ch in model).strip("-_")
    return f"{cleaned or 'model'}{separator}{int(dimensions)}"
