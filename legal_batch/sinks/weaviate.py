"""The Weaviate sink (weaviate-client v4): one collection per model and dimension
(`LegalBatch_<model>_<dimensions>`), created with no vectorizer (self-provided vectors, named vector
`default`) and an HNSW index with cosine distance; object uuids are uuid5 of `<record id>:<chunk
index>` (`vector_uuid`), so writing a chunk again replaces its object.

Connection: `LEGAL_BATCH_WEAVIATE_URL` (REST) and `LEGAL_BATCH_WEAVIATE_GRPC_URL` (gRPC; unset → the
REST host on port 50051, or 443 for an https URL on 443), `LEGAL_BATCH_WEAVIATE_API_KEY` as the
bearer token. The client's start-up checks are skipped (they ask PyPI for the newest client
version); opening reads `/v1/meta` and the collection's schema instead.

Writes are `insert_many` calls (gRPC `BatchObjects`) of at most `BATCH` objects: every object the
server rejects is returned as a retryable `WriteFailure` with the server's message, and a call that
fails as a whole (server unreachable, deadline) returns each of its objects with that reason. Not
transactional with the ledger: written before the ledger commits, healed by a re-run (same uuids).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
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
    vector_id,
    vector_uuid,
)

if TYPE_CHECKING:
    import psycopg
    from weaviate import WeaviateClient

    from legal_batch.settings import Settings

TRANSACTIONAL = False
BATCH = 500
"""Objects per `insert_many` (one gRPC message: ~4 KB of vector plus the text each, under the server's
default 10 MB message size)."""
VECTOR = "default"
_READ_BATCH = 1_000
_TEXT_PROPERTIES = ("case_id", "chunk_type", "citation", "model", "text_sha256", "text")
_DIMENSIONS = re.compile(r"dimensions=(\d+)")


def collection_name(model: str, dimensions: int) -> str:
    """Weaviate class names match `[A-Z][_0-9A-Za-z]*`."""
    return "LegalBatch_" + collection_slug(model, dimensions, separator="_").replace("-", "_")


def connect(settings: Settings) -> WeaviateClient:
    """A connected client for the `LEGAL_BATCH_WEAVIATE_*` settings (see the module docstring)."""
    import weaviate
    from weaviate.classes.init import AdditionalConfig, Auth, Timeout

    if not settings.weaviate_url:
        raise UserError("the weaviate sink needs LEGAL_BATCH_WEAVIATE_URL (e.g. http://localhost:8080); set it, or "
                        "drop weaviate from LEGAL_BATCH_EMBEDDINGS_SINKS")
    http = _endpoint(settings.weaviate_url, "LEGAL_BATCH_WEAVIATE_URL", default_port=8080)
    grpc = (_endpoint(settings.weaviate_grpc_url, "LEGAL_BATCH_WEAVIATE_GRPC_URL", default_port=50051)
            if settings.weaviate_grpc_url
            else (http[0], 443 if http[2] and http[1] == 443 else 50051, http[2]))
    auth = Auth.api_key(settings.weaviate_api_key) if settings.weaviate_api_key else None
    try:
        return weaviate.connect_to_custom(
            http_host=http[0], http_port=http[1], http_secure=http[2], grpc_host=grpc[0], grpc_port=grpc[1],
            grpc_secure=grpc[2], auth_credentials=auth, skip_init_checks=True,
            additional_config=AdditionalConfig(timeout=Timeout(init=10, query=30, insert=120)))
    except Exception as exc:
        raise SinkUnavailable(f"Weaviate at {settings.weaviate_url} cannot be reached ({_first_line(exc)}): start it, "
                              "or correct LEGAL_BATCH_WEAVIATE_URL") from exc


def target(*, model: str, dimensions: int, settings: Settings) -> str:
    """What the sink writes to (its `where`), known without connecting."""
    return f"weaviate collection {settings.weaviate_collection or collection_name(model, dimensions)}"


def open_sink(*, model: str, dimensions: int, settings: Settings, conn: psycopg.Connection | None = None
              ) -> WeaviateSink:
    client = connect(settings)
    try:
        return WeaviateSink(client, model=model, dimensions=dimensions, collection=settings.weaviate_collection,
                            owns_client=True)
    except BaseException:
        client.close()
        raise


class WeaviateSink:
    """See the module docstring."""

    name = "weaviate"
    transactional = TRANSACTIONAL
    one_writer = False

    def __init__(self, client: WeaviateClient, *, model: str, dimensions: int, collection: str | None = None,
                 owns_client: bool = False) -> None:
        self.client = client
        self.model = model
        self.dimensions = dimensions
        self.collection_name = collection or collection_name(model, dimensions)
        self.where = f"weaviate collection {self.collection_name}"
        self._owns_client = owns_client
        try:
            exists = client.collections.exists(self.collection_name)
            self.collection = (client.collections.use(self.collection_name) if exists
                               else self._create())
            if exists:
                self._check()
        except DimensionMismatch:
            raise
        except Exception as exc:
            raise SinkUnavailable(f"{self.where}: {_first_line(exc)}") from exc

    def _create(self):
        from weaviate.classes.config import Configure, DataType, Property, VectorDistances

        properties = [Property(name=name, data_type=DataType.TEXT, skip_vectorization=True)
                      for name in _TEXT_PROPERTIES]
        properties.insert(1, Property(name="chunk_index", data_type=DataType.INT))
        return self.client.collections.create(
            self.collection_name,
            description=f"legal_batch vectors: model={self.model}, dimensions={self.dimensions}",
            vector_config=Configure.Vectors.self_provided(
                name=VECTOR,
                vector_index_config=Configure.VectorIndex.hnsw(distance_metric=VectorDistances.COSINE)),
            properties=properties,
        )

    def _check(self) -> None:
        from weaviate.classes.config import VectorDistances, Vectorizers

        config = self.collection.config.get(simple=True)
        named = (config.vector_config or {}).get(VECTOR)
        if named is None:
            raise DimensionMismatch(f"{self.where} has no vector named {VECTOR!r} (it has "
                                    f"{sorted(config.vector_config or {}) or 'an unnamed vector'}): name another "
                                    "collection with LEGAL_BATCH_WEAVIATE_COLLECTION")
        distance = named.vector_index_config.distance_metric
        if distance != VectorDistances.COSINE:
            raise DimensionMismatch(f"{self.where} uses the {distance.value} distance, not cosine: name another "
                                    "collection with LEGAL_BATCH_WEAVIATE_COLLECTION")
        if named.vectorizer.vectorizer != Vectorizers.NONE:
            raise DimensionMismatch(f"{self.where} vectorizes with {named.vectorizer.vectorizer}; this sink stores "
                                    "the provider's vectors: name another collection with "
                                    "LEGAL_BATCH_WEAVIATE_COLLECTION")
        match = _DIMENSIONS.search(config.description or "")
        stored = int(match.group(1)) if match else self._sampled_dimensions()
        if stored is not None and stored != self.dimensions:
            raise DimensionMismatch(
                f"{self.where} holds {stored}-dimensional vectors, not {self.dimensions}: set "
                f"LEGAL_BATCH_EMBEDDING_DIMENSIONS={stored}, or name another collection with "
                "LEGAL_BATCH_WEAVIATE_COLLECTION (unset → one per model and dimension)")

    def _sampled_dimensions(self) -> int | None:
        sample = self.collection.query.fetch_objects(limit=1, include_vector=True).objects
        if not sample:
            return None
        vector = sample[0].vector.get(VECTOR)
        return len(vector) if vector is not None else None

    def upsert(self, records: Sequence[VectorRecord]) -> list[WriteFailure]:
        from weaviate.classes.data import DataObject

        good, failures = screen(records, self.dimensions, self.where)
        latest = list({record.id: record for record in good}.values())  # one object per uuid in a call
        for batch in batches(latest, BATCH):
            objects = [DataObject(properties=_properties(record), uuid=vector_uuid(record.record_id, record.chunk_index),
                                  vector={VECTOR: np.asarray(record.vector, dtype=np.float32).tolist()})
                       for record in batch]
            try:
                answer = self.collection.data.insert_many(objects)
            except Exception as exc:
                reason = f"{self.where}: {_first_line(exc)}"
                failures.extend(WriteFailure(record.id, reason, retryable=True) for record in batch)
                continue
            for index, error in sorted(answer.errors.items()):
                failures.append(WriteFailure(batch[index].id, f"{self.where}: {error.message}", retryable=True))
        return failures

    def delete(self, ids: Iterable[str]) -> int:
        from weaviate.classes.query import Filter

        deleted = 0
        for batch in batches(list(dict.fromkeys(ids)), _READ_BATCH):
            uuids = [str(vector_uuid(*split_vector_id(value))) for value in batch]
            deleted += self.collection.data.delete_many(where=Filter.by_id().contains_any(uuids)).successful
        return deleted

    def count(self) -> int:
        return int(self.collection.aggregate.over_all(total_count=True).total_count or 0)

    def contains(self, ids: Sequence[str]) -> set[str]:
        found: set[str] = set()
        for batch in batches(list(ids), _READ_BATCH):
            by_uuid = {str(vector_uuid(*split_vector_id(value))): value for value in batch}
            answer = self.collection.query.fetch_objects_by_ids(list(by_uuid), limit=len(by_uuid),
                                                                return_properties=[])
            found.update(by_uuid[str(obj.uuid)] for obj in answer.objects if str(obj.uuid) in by_uuid)
        return found

    def vectors(self, ids: Sequence[str]) -> dict[str, np.ndarray]:
        found: dict[str, np.ndarray] = {}
        for batch in batches(list(ids), _READ_BATCH):
            by_uuid = {str(vector_uuid(*split_vector_id(value))): value for value in batch}
            answer = self.collection.query.fetch_objects_by_ids(list(by_uuid), limit=len(by_uuid),
                                                                return_properties=[], include_vector=True)
            for obj in answer.objects:
                vector = (obj.vector or {}).get(VECTOR) or (obj.vector or {}).get("default")
                if str(obj.uuid) in by_uuid and vector is not None:
                    found[by_uuid[str(obj.uuid)]] = np.asarray(vector, dtype=np.float32)
        return found

    def search(self, vector: np.ndarray, *, k: int = 5) -> list[SearchHit]:
        from weaviate.classes.query import MetadataQuery

        answer = self.collection.query.near_vector(
            near_vector=np.asarray(vector, dtype=np.float32).tolist(), target_vector=VECTOR, limit=k,
            return_metadata=MetadataQuery(distance=True))
        hits = []
        for obj in answer.objects:
            props = dict(obj.properties)
            record_id, index = str(props.get("case_id", "")), int(props.get("chunk_index", 0))
            metadata = {key: value for key, value in props.items() if key != "text" and value is not None}
            hits.append(SearchHit(vector_id(record_id, index), record_id, index, 1.0 - float(obj.metadata.distance),
                                  str(props.get("text") or ""), metadata))
        return hits

    def close(self) -> None:
        if self._owns_client:
            self.client.close()


def _properties(record: VectorRecord) -> dict[str, Any]:
    properties: dict[str, Any] = {key: record.metadata[key] for key in _TEXT_PROPERTIES if key in record.metadata}
    properties["case_id"] = str(record.metadata.get("case_id", record.record_id))
    properties["chunk_index"] = int(record.chunk_index)
    properties["text"] = record.text
    return properties


def _endpoint(url: str, setting: str, *, default_port: int) -> tuple[str, int, bool]:
    parts = urlsplit(url if "://" in url else f"http://{url}")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise UserError(f"{setting}={url!r} is not an http(s)://host[:port] URL")
    secure = parts.scheme == "https"
    return parts.hostname, parts.port or (443 if secure else default_port), secure


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
