"""The Weaviate sink through the real weaviate-client v4 (REST + gRPC) against the emulator in
legal_batch_tests/emulators/weaviate.py: objects, ids and vectors as the server received them;
per-object and whole-batch failures accounted; the dimension, distance and vectorizer checks at open."""

from __future__ import annotations

import socket
import uuid

import numpy as np
import pytest
import weaviate
from weaviate.classes.config import Configure, VectorDistances
from weaviate.classes.init import Auth

from legal_batch.core.errors import UserError
from legal_batch.settings import Settings
from legal_batch.sinks import registry
from legal_batch.sinks.base import DimensionMismatch, SinkUnavailable, VectorRecord, vector_uuid
from legal_batch.sinks.weaviate import BATCH, collection_name
from legal_batch_tests.emulators.weaviate import WeaviateEmulator
from legal_batch_tests.sinks.support import MODEL, records, unit_vectors

KEY = "test-weaviate-key"


@pytest.fixture
def emulator():
    with WeaviateEmulator(api_key=KEY) as running:
        yield running


@pytest.fixture
def settings(emulator) -> Settings:
    return Settings(weaviate_url=emulator.url, weaviate_grpc_url=emulator.grpc_url, weaviate_api_key=KEY)


@pytest.fixture
def open_weaviate(settings):
    opened = []

    def make(dimensions: int = 32, **overrides):
        sink = registry.open_sink("weaviate", model=MODEL, dimensions=dimensions,
                                  settings=settings.model_copy(update=overrides))
        opened.append(sink)
        return sink

    yield make
    for sink in opened:
        sink.close()


def _client(emulator):
    return weaviate.connect_to_custom(
        http_host="127.0.0.1", http_port=emulator.http_port, http_secure=False, grpc_host="127.0.0.1",
        grpc_port=emulator.grpc_port, grpc_secure=False, auth_credentials=Auth.api_key(KEY), skip_init_checks=True)


def test_collection_has_no_vectorizer_and_cosine_distance(emulator, open_weaviate):
    sink = open_weaviate(32)
    assert sink.collection_name == collection_name(MODEL, 32) == "LegalBatch_local_lexical_v1_32"
    schema = emulator.collections[sink.collection_name].schema
    assert schema["vectorConfig"]["default"]["vectorizer"] == {"none": {}}
    assert schema["vectorConfig"]["default"]["vectorIndexConfig"]["distance"] == "cosine"
    assert {p["name"]: p["dataType"] for p in schema["properties"]}["chunk_index"] == ["int"]
    assert emulator.requests[:3] == ["GET /v1/meta", f"GET /v1/schema/{sink.collection_name}", "POST /v1/schema"]


def test_objects_are_stored_under_uuid5_ids_and_a_second_write_replaces_them(emulator, open_weaviate):
    sink = open_weaviate(32)
    vectors = unit_vectors(BATCH * 2 + 3, 32)
    assert sink.upsert(records("case-1", vectors)) == []
    assert emulator.requests.count("grpc BatchObjects") == 3  # at most BATCH objects a call
    stored = emulator.stored(sink.collection_name)
    assert len(stored) == BATCH * 2 + 3 == sink.count()
    obj = stored[str(vector_uuid("case-1", 4))]
    assert np.array_equal(obj.vectors["default"], vectors[4])
    assert obj.properties["text"] == "paragraph 4 of judgment case-1"
    assert obj.properties["chunk_index"] == 4 and obj.properties["case_id"] == "case-1"
    assert obj.properties["citation"] == "[2024] HKCFI 1" and obj.properties["model"] == MODEL
    assert len(obj.properties["text_sha256"]) == 64

    again = unit_vectors(2, 32, seed=5)
    assert sink.upsert(records("case-1", again, start=4)) == []
    assert sink.count() == BATCH * 2 + 3
    assert np.array_equal(emulator.stored(sink.collection_name)[str(vector_uuid("case-1", 4))].vectors["default"],
                          again[0])


def test_search_contains_and_delete(open_weaviate):
    sink = open_weaviate(32)
    vectors = unit_vectors(6, 32)
    sink.upsert(records("case-1", vectors[:3]) + records("case-2", vectors[3:], citation="[2019] HCA 4"))
    hits = sink.search(vectors[4], k=3)
    assert hits[0].id == "case-2:1" and hits[0].score == pytest.approx(1.0, abs=1e-6)
    assert hits[0].metadata["citation"] == "[2019] HCA 4" and hits[0].text == "paragraph 1 of judgment case-2"
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    assert sink.contains(["case-1:0", "case-2:2", "case-3:0"]) == {"case-1:0", "case-2:2"}
    assert sink.delete(["case-1:0", "case-1:1", "case-9:0"]) == 2
    assert sink.count() == 4


def test_every_object_the_server_rejects_comes_back_retryable_with_its_reason(emulator, open_weaviate):
    sink = open_weaviate(32)
    refused = {str(vector_uuid("case-1", 2)), str(vector_uuid("case-1", 7))}
    emulator.reject(lambda key, props: "store is read-only (disk full)" if key in refused else None)
    failures = sink.upsert(records("case-1", unit_vectors(10, 32)) + [
        VectorRecord("case-1", 10, np.full(32, np.inf, dtype=np.float32))])
    by_id = {f.id: f for f in failures}
    assert set(by_id) == {"case-1:2", "case-1:7", "case-1:10"}
    assert by_id["case-1:2"].retryable and by_id["case-1:2"].reason == (
        f"weaviate collection {sink.collection_name}: store is read-only (disk full)")
    assert not by_id["case-1:10"].retryable
    assert sink.count() == 8


def test_a_batch_that_fails_as_a_whole_returns_each_object_retryable(emulator, open_weaviate):
    sink = open_weaviate(32)
    emulator.fail_batches(10)  # more than the client's own retries
    failures = sink.upsert(records("case-1", unit_vectors(4, 32)))
    assert [f.id for f in failures] == [f"case-1:{i}" for i in range(4)]
    assert all(f.retryable and f.reason.startswith(f"weaviate collection {sink.collection_name}: ")
               for f in failures)
    emulator.fail_batches(0)
    assert sink.upsert(records("case-1", unit_vectors(4, 32))) == []  # the re-run heals it
    assert sink.count() == 4


def test_another_dimension_distance_or_vectorizer_is_refused_at_open(emulator, open_weaviate):
    open_weaviate(32).upsert(records("case-1", unit_vectors(1, 32)))
    with pytest.raises(DimensionMismatch, match="holds 32-dimensional vectors, not 64"):
        open_weaviate(64, weaviate_collection=collection_name(MODEL, 32))

    client = _client(emulator)
    try:
        client.collections.create("Theirs", vector_config=Configure.Vectors.self_provided(
            vector_index_config=Configure.VectorIndex.hnsw(distance_metric=VectorDistances.COSINE)))
        client.collections.use("Theirs").data.insert_many([
            weaviate.classes.data.DataObject(properties={}, uuid=uuid.uuid4(), vector={"default": [0.5] * 16})])
        client.collections.create("Dotted", vector_config=Configure.Vectors.self_provided(
            vector_index_config=Configure.VectorIndex.hnsw(distance_metric=VectorDistances.DOT)))
    finally:
        client.close()
    with pytest.raises(DimensionMismatch, match="holds 16-dimensional vectors, not 32"):
        open_weaviate(32, weaviate_collection="Theirs")
    with pytest.raises(DimensionMismatch, match="uses the dot distance, not cosine"):
        open_weaviate(32, weaviate_collection="Dotted")


def test_connection_settings_are_checked_and_an_unreachable_server_is_named(emulator, settings):
    with pytest.raises(UserError, match="needs LEGAL_BATCH_WEAVIATE_URL"):
        registry.open_sink("weaviate", model=MODEL, dimensions=32, settings=Settings())
    with pytest.raises(SinkUnavailable, match="cannot be reached"):
        registry.open_sink("weaviate", model=MODEL, dimensions=32,
                           settings=settings.model_copy(update={"weaviate_api_key": "wrong"}))
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = sock.getsockname()[1]
    with pytest.raises(SinkUnavailable, match=rf"Weaviate at http://127\.0\.0\.1:{closed} cannot be reached"):
        registry.open_sink("weaviate", model=MODEL, dimensions=32,
                           settings=settings.model_copy(update={"weaviate_url": f"http://127.0.0.1:{closed}"}))
    assert registry.is_transactional("weaviate") is False


def test_a_server_gone_mid_ingest_leaves_every_object_retryable(emulator, open_weaviate):
    sink = open_weaviate(32)
    assert sink.upsert(records("case-1", unit_vectors(2, 32))) == []
    emulator.stop()
    failures = sink.upsert(records("case-2", unit_vectors(3, 32)))
    assert [f.id for f in failures] == ["case-2:0", "case-2:1", "case-2:2"]
    assert all(f.retryable and sink.collection_name in f.reason for f in failures)
