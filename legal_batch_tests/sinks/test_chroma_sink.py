"""The ChromaDB sink with the real `chromadb` package: an embedded PersistentClient in tmp_path, and an
HttpClient against the Chroma server the package ships (`chroma run`)."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import chromadb
import numpy as np
import pytest
from chromadb.config import Settings as ChromaSettings

from legal_batch.settings import get_settings
from legal_batch.sinks import registry
from legal_batch.sinks.base import DimensionMismatch, SinkUnavailable, VectorRecord, text_sha256
from legal_batch.sinks.chroma import ChromaSink, collection_name
from legal_batch_tests.sinks.support import MODEL, records, unit_vectors

QUIET = ChromaSettings(anonymized_telemetry=False)


@pytest.fixture
def client(tmp_path: Path):
    return chromadb.PersistentClient(path=str(tmp_path / "chroma"), settings=QUIET)


def test_upsert_stores_vectors_documents_and_metadata_under_deterministic_ids(client):
    sink = ChromaSink(client, model=MODEL, dimensions=64)
    vectors = unit_vectors(5, 64)
    assert sink.upsert(records("case-1", vectors)) == []
    assert sink.count() == 5

    stored = client.get_collection(collection_name(MODEL, 64)).get(
        ids=["case-1:3"], include=["embeddings", "documents", "metadatas"])
    assert np.allclose(stored["embeddings"][0], vectors[3], atol=1e-7)
    assert stored["documents"][0] == "paragraph 3 of judgment case-1"
    assert stored["metadatas"][0] == {
        "case_id": "case-1", "chunk_index": 3, "chunk_type": "holding", "citation": "[2024] HKCFI 1",
        "model": MODEL, "text_sha256": text_sha256("paragraph 3 of judgment case-1")}

    # the same ids again replace, never add
    again = unit_vectors(5, 64, seed=9)
    assert sink.upsert(records("case-1", again)) == []
    assert sink.count() == 5
    stored = client.get_collection(collection_name(MODEL, 64)).get(ids=["case-1:3"], include=["embeddings"])
    assert np.allclose(stored["embeddings"][0], again[3], atol=1e-7)


def test_collection_is_cosine_and_named_by_model_and_dimension(client):
    sink = ChromaSink(client, model="amazon.titan-embed-text-v2:0", dimensions=64)
    assert sink.collection_name == "legal_batch-amazon-titan-embed-text-v2-0-64"
    collection = client.get_collection(sink.collection_name)
    assert collection.configuration["hnsw"]["space"] == "cosine"
    assert collection.metadata["dimensions"] == 64


def test_search_contains_and_delete(client):
    sink = ChromaSink(client, model=MODEL, dimensions=64)
    vectors = unit_vectors(8, 64)
    sink.upsert(records("case-1", vectors[:4]) + records("case-2", vectors[4:], citation="[2020] EWCA Civ 2"))
    hits = sink.search(vectors[5], k=3)
    assert hits[0].id == "case-2:1" and hits[0].record_id == "case-2" and hits[0].chunk_index == 1
    assert hits[0].score == pytest.approx(1.0, abs=1e-5)
    assert hits[0].metadata["citation"] == "[2020] EWCA Civ 2"
    assert hits[0].text == "paragraph 1 of judgment case-2"
    assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)

    assert sink.contains(["case-1:0", "case-2:3", "case-3:0"]) == {"case-1:0", "case-2:3"}
    assert sink.delete(["case-1:0", "case-1:1", "nope:0"]) == 2
    assert sink.count() == 6


def test_writes_go_in_batches_under_the_clients_maximum(client, monkeypatch):
    sizes: list[int] = []
    sink = ChromaSink(client, model=MODEL, dimensions=16)
    sink.batch_size = 7  # as if the server allowed 7 records per request
    original = sink.collection.upsert

    def counting(**kwargs):
        sizes.append(len(kwargs["ids"]))
        return original(**kwargs)

    monkeypatch.setattr(sink.collection, "upsert", counting)
    assert sink.upsert(records("case-1", unit_vectors(30, 16))) == []
    assert sizes == [7, 7, 7, 7, 2]
    assert sink.count() == 30
    assert ChromaSink(client, model=MODEL, dimensions=16).batch_size == client.get_max_batch_size()


def test_bad_vectors_are_refused_and_a_refused_batch_is_retryable_with_its_reason(client):
    sink = ChromaSink(client, model=MODEL, dimensions=16)
    good = records("case-1", unit_vectors(3, 16))
    bad = [VectorRecord("case-1", 7, np.zeros(16, dtype=np.float32)),
           VectorRecord("case-1", 8, np.ones(8, dtype=np.float32))]
    failures = {f.id: f for f in sink.upsert(good + bad)}
    assert set(failures) == {"case-1:7", "case-1:8"}
    assert "all zeros" in failures["case-1:7"].reason and not failures["case-1:7"].retryable
    assert sink.count() == 3

    # metadata Chroma refuses (a nested object): the whole batch comes back retryable, named, nothing half-written
    refused = [VectorRecord("case-2", 0, unit_vectors(1, 16)[0], "t", {"model": MODEL, "citation": {"nested": "x"}})]
    failures = sink.upsert(refused)
    assert [f.id for f in failures] == ["case-2:0"]
    assert failures[0].retryable and failures[0].reason.startswith("chroma collection legal_batch-")


def test_a_collection_of_another_dimension_is_refused_at_open(client):
    ChromaSink(client, model=MODEL, dimensions=64).upsert(records("case-1", unit_vectors(1, 64)))
    with pytest.raises(DimensionMismatch, match="holds 64-dimensional vectors, not 1024"):
        ChromaSink(client, model=MODEL, dimensions=1024, collection=collection_name(MODEL, 64))

    # a collection made elsewhere, without our metadata: its stored vectors tell the dimension
    foreign = client.create_collection("theirs", embedding_function=None,
                                       configuration={"hnsw": {"space": "cosine"}})
    foreign.add(ids=["a"], embeddings=unit_vectors(1, 32))
    with pytest.raises(DimensionMismatch, match="holds 32-dimensional vectors, not 64"):
        ChromaSink(client, model=MODEL, dimensions=64, collection="theirs")
    client.create_collection("euclid", embedding_function=None)
    with pytest.raises(DimensionMismatch, match="uses the l2 distance"):
        ChromaSink(client, model=MODEL, dimensions=64, collection="euclid")


def test_registry_opens_the_embedded_client_under_the_home_folder(lb_env):
    sink = registry.open_sink("chroma", model=MODEL, dimensions=32, settings=lb_env)
    assert sink.upsert(records("case-1", unit_vectors(2, 32))) == []
    assert (lb_env.home_dir / "chroma" / "chroma.sqlite3").exists()
    assert registry.is_transactional("chroma") is False
    reopened = chromadb.PersistentClient(path=str(lb_env.home_dir / "chroma"), settings=QUIET)
    assert reopened.get_collection(collection_name(MODEL, 32)).count() == 2


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def chroma_server(tmp_path: Path):
    """The Chroma server shipped in the chromadb package (`chroma run`), on a free loopback port."""
    port = _free_port()
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "chroma"), "run", "--path", str(tmp_path / "server"), "--host",
         "127.0.0.1", "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            break
        except OSError:
            time.sleep(0.1)
    else:
        server.kill()
        pytest.fail("chroma run did not listen within 30 s")
    yield f"http://127.0.0.1:{port}"
    server.terminate()
    server.wait(timeout=10)


def test_http_client_when_chroma_url_is_set(lb_env, monkeypatch, chroma_server):
    monkeypatch.setenv("LEGAL_BATCH_CHROMA_URL", chroma_server)
    settings = get_settings(fresh=True)
    sink = registry.open_sink("chroma", model=MODEL, dimensions=32, settings=settings)
    vectors = unit_vectors(4, 32)
    assert sink.upsert(records("case-9", vectors)) == []
    assert sink.search(vectors[2], k=1)[0].id == "case-9:2"
    assert not (lb_env.home_dir / "chroma").exists()
    with pytest.raises(DimensionMismatch):
        registry.open_sink("chroma", model=MODEL, dimensions=16, settings=settings.model_copy(
            update={"chroma_collection": collection_name(MODEL, 32)}))


def test_an_unreachable_chroma_server_is_named(lb_env, monkeypatch):
    monkeypatch.setenv("LEGAL_BATCH_CHROMA_URL", f"http://127.0.0.1:{_free_port()}")
    with pytest.raises(SinkUnavailable, match=r"Chroma at http://127\.0\.0\.1:\d+ cannot be reached"):
        registry.open_sink("chroma", model=MODEL, dimensions=32, settings=get_settings(fresh=True))
