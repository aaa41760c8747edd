"""The ChromaDB sink: one collection per model and dimension (`legal_batch-<model>-<dimensions>`),
cosine space, ids `<record id>:<chunk index>`, the standard metadata (`METADATA_KEYS`) and the chunk
text as the document.

Clients: an embedded `PersistentClient` under `$LEGAL_BATCH_HOME/chroma` by default, an `HttpClient`
when `LEGAL_BATCH_CHROMA_URL` is set. Writes are `upsert`s in batches of at most the client's
`get_max_batch_size()`; a batch the client refuses or cannot deliver is reported for each of its
records (retryable, with the reason) and the others still go. Not transactional with the ledger:
written before the ledger commits, healed by a re-run (same ids).

The collection is opened before anything is written: one that records another dimension (its
`dimensions` metadata, or the length of a stored vector) or another distance than cosine is refused with a `DimensionMismatch` that says what to do.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import numpy as np

from legal_batch.core.errors import UserError
from legal_batch.sinks.base import (
    DimensionMismatch,
    SearchHit,
    SinkUnavailable,
    VectorRecord,
    WriteFailure,
    batches,
    collection_slug,
    screen,
    split_vector_id,
)

if TYPE_CHECKING:
    import psycopg
    from chromadb.api import ClientAPI

    from legal_batch.settings import Settings

TRANSACTIONAL = False
_READ_BATCH = 1_000


def collection_name(model: str, dimensions: int) -> str:
    """Chroma allows 3–512 characters of `[a-zA-Z0-9._-]`, starting and ending with a letter or digit."""
    return f"legal_batch-{collection_slug(model, dimensions)}"[:512]


def client_for(settings: Settings) -> ClientAPI:
    """`HttpClient` for `LEGAL_BATCH_CHROMA_URL`, else a `PersistentClient` under `$LEGAL_BATCH_HOME/chroma`;
    anonymous telemetry off either way."""
    import chromadb
    from chromadb.config import Settings as ChromaSettings

    quiet = ChromaSettings(anonymized_telemetry=False)
    if not settings.chroma_url:
        path: Path = settings.home_dir / "chroma"
        return chromadb.PersistentClient(path=str(path), settings=quiet)
    url = urlsplit(settings.chroma_url)
    if url.scheme not in ("http", "https") or not url.hostname:
        from legal_batch.core.errors import UserError

        raise UserError(f"LEGAL_BATCH_CHROMA_URL={settings.chroma_url!r} is not an http(s)://host[:port] URL")
    ssl = url.scheme == "https"
    try:
        return chromadb.HttpClient(host=url.hostname, port=url.port or (443 if ssl else 8000), ssl=ssl,
                                   settings=quiet)
    except Exception as exc:  # the client checks the server on construction
        raise SinkUnavailable(f"Chroma at {settings.chroma_url} cannot be reached ({_first_line(exc)}): start "
                              "the server, or unset LEGAL_BATCH_CHROMA_URL to use the embedded one") from exc


def target(*, model: str, dimensions: int, settings: Settings) -> str:
    """What the sink writes to (its `where`), known without connecting."""
    return f"chroma collection {settings.chroma_collection or collection_name(model, dimensions)}"


def open_sink(*, model: str, dimensions: int, settings: Settings, conn: psycopg.Connection | None = None
              ) -> ChromaSink:
    sink = ChromaSink(client_for(settings), model=model, dimensions=dimensions,
                      collection=settings.chroma_collection)
    sink.one_writer = not settings.chroma_url  # the embedded PersistentClient: one writing process at a time
    return sink


class ChromaSink:
    """See the module docstring."""

    name = "chroma"
    transactional = TRANSACTIONAL
    one_writer = False

    def __init__(self, client: ClientAPI, *, model: str, dimensions: int, collection: str | None = None) -> None:
        from chromadb.errors import NotFoundError

        self.client = client
        self.model = model
        self.dimensions = dimensions
        self.collection_name = collection or collection_name(model, dimensions)
        self.where = f"chroma collection {self.collection_name}"
        try:
            self.collection = client.get_collection(self.collection_name, embedding_function=None)
        except NotFoundError:
            from chromadb.errors import InvalidArgumentError

            try:
                self.collection = client.get_or_create_collection(
                    self.collection_name, configuration={"hnsw": {"space": "cosine"}}, embedding_function=None,
                    metadata={"model": model, "dimensions": dimensions, "created_by": "legal_batch"})
            except (InvalidArgumentError, ValueError) as exc:
                raise UserError(f"{self.where} cannot be created ({_first_line(exc)}): set LEGAL_BATCH_CHROMA_COLLECTION "
                                "to 3–512 characters of letters, digits, '.', '_' and '-', or unset it") from None
        except Exception as exc:
            raise SinkUnavailable(f"{self.where}: {_first_line(exc)}") from exc
        self._check()
        self.batch_size = max(1, int(client.get_max_batch_size()))

    def _check(self) -> None:
        metadata = self.collection.metadata or {}
        if metadata.get("model") not in (None, self.model):  # ids are per chunk: one model per collection
            raise DimensionMismatch(
                f"{self.where} holds vectors of {metadata['model']}, not {self.model}: name another collection "
                "with LEGAL_BATCH_CHROMA_COLLECTION (unset → one per model and dimension)")
        stored = metadata.get("dimensions")
        if stored is None:
            sample = self.collection.get(limit=1, include=["embeddings"])
            embeddings = sample.get("embeddings")
            stored = len(embeddings[0]) if embeddings is not None and len(embeddings) else None
        if stored is not None and int(stored) != self.dimensions:
            raise DimensionMismatch(
                f"{self.where} holds {stored}-dimensional vectors, not {self.dimensions}: set "
                f"LEGAL_BATCH_EMBEDDING_DIMENSIONS={stored}, or name another collection with "
                "LEGAL_BATCH_CHROMA_COLLECTION (unset → one per model and dimension)")
        configuration = self.collection.configuration or {}
        space = (configuration.get("hnsw") or configuration.get("spann") or {}).get("space") or metadata.get(
            "hnsw:space")
        if space not in (None, "cosine"):
            raise DimensionMismatch(f"{self.where} uses the {space} distance, not cosine: name another collection "
                                    "with LEGAL_BATCH_CHROMA_COLLECTION")

    def upsert(self, records: Sequence[VectorRecord]) -> list[WriteFailure]:
        good, failures = screen(records, self.dimensions, self.where)
        latest = {record.id: record for record in good}  # Chroma refuses repeated ids in one call; last wins
        for batch in batches(list(latest.values()), self.batch_size):
            try:
                self.collection.upsert(
                    ids=[record.id for record in batch],
                    embeddings=np.stack([np.asarray(record.vector, dtype=np.float32) for record in batch]),
                    documents=[record.text for record in batch],
                    metadatas=[_metadata(record) for record in batch],
                )
            except Exception as exc:
                reason = f"{self.where}: {_first_line(exc)}"
                failures.extend(WriteFailure(record.id, reason, retryable=True) for record in batch)
        return failures

    def delete(self, ids: Iterable[str]) -> int:
        deleted = 0
        for batch in batches(list(dict.fromkeys(ids)), self.batch_size):
            present = self.contains(batch)
            if present:
                self.collection.delete(ids=sorted(present))
                deleted += len(present)
        return deleted

    def count(self) -> int:
        return int(self.collection.count())

    def contains(self, ids: Sequence[str]) -> set[str]:
        found: set[str] = set()
        for batch in batches(list(ids), _READ_BATCH):
            found.update(self.collection.get(ids=list(batch), include=[])["ids"])
        return found

    def vectors(self, ids: Sequence[str]) -> dict[str, np.ndarray]:
        found: dict[str, np.ndarray] = {}
        for batch in batches(list(ids), _READ_BATCH):
            answer = self.collection.get(ids=list(batch), include=["embeddings"])
            for id_, vector in zip(answer["ids"], answer["embeddings"], strict=True):
                found[id_] = np.asarray(vector, dtype=np.float32)
        return found

    def search(self, vector: np.ndarray, *, k: int = 5) -> list[SearchHit]:
        answer = self.collection.query(query_embeddings=[np.asarray(vector, dtype=np.float32)], n_results=k,
                                       include=["documents", "metadatas", "distances"])
        hits = []
        for id_, text, metadata, distance in zip(answer["ids"][0], answer["documents"][0], answer["metadatas"][0],
                                                 answer["distances"][0], strict=True):
            record_id, index = split_vector_id(id_)
            hits.append(SearchHit(id_, record_id, index, 1.0 - float(distance), text or "", dict(metadata or {})))
        return hits

    def close(self) -> None:
        """Chroma clients hold no connection to release; the embedded one persists on every write."""


def _metadata(record: VectorRecord) -> dict[str, Any]:
    metadata: dict[str, Any] = {key: value for key, value in record.metadata.items() if value is not None}
    metadata.setdefault("case_id", record.record_id)
    metadata.setdefault("chunk_index", int(record.chunk_index))
    return metadata


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
