"""Several sinks at once: the flow's own pgvector sink plus Chroma and Weaviate (emulator) in one
ingest transaction; what a further sink did not store is named per ledger item."""

from __future__ import annotations

import chromadb
import numpy as np
from chromadb.config import Settings as ChromaSettings

from legal_batch.core.flow import Item
from legal_batch.flows.embeddings.flow import EmbeddingSink
from legal_batch.providers.base import Result
from legal_batch.settings import Settings
from legal_batch.sinks import registry
from legal_batch.sinks.base import vector_uuid
from legal_batch.sinks.chroma import ChromaSink
from legal_batch.sinks.fanout import FanOutSink, describe_case_chunks
from legal_batch_tests.emulators.weaviate import WeaviateEmulator
from legal_batch_tests.sinks.support import MODEL, seed_case, unit_vectors


def test_every_sink_gets_the_accepted_vectors_and_refusals_are_named_per_item(conn, tmp_path):
    conn.execute("DROP INDEX IF EXISTS case_embeddings_hnsw")
    case_id = seed_case(conn, 12, citation="[2022] HKCFA 3")
    vectors = unit_vectors(12, 1024)
    vectors[5] = np.zeros(1024, dtype=np.float32)  # refused by the flow's own sink: no other sink gets it
    chroma = ChromaSink(chromadb.PersistentClient(path=str(tmp_path / "chroma"),
                                                  settings=ChromaSettings(anonymized_telemetry=False)),
                        model=MODEL, dimensions=1024)
    with WeaviateEmulator() as emulator:
        weaviate = registry.open_sink("weaviate", model=MODEL, dimensions=1024, settings=Settings(
            weaviate_url=emulator.url, weaviate_grpc_url=emulator.grpc_url))
        refused = str(vector_uuid(case_id, 7))
        emulator.reject(lambda key, props: "shard is read-only" if key == refused else None)
        with conn.transaction():
            sink = FanOutSink(EmbeddingSink(conn, model=MODEL, dimensions=1024), [chroma, weaviate], model=MODEL,
                              describe=describe_case_chunks(conn), batch=5)
            reasons = [sink.accept(Item(100 + n, f"{case_id}:{n}", f"c{n}"),
                                   Result(f"c{n}", "out.jsonl", n, vector=vectors[n])) for n in range(12)]
            rows = sink.finish()
        weaviate_count = weaviate.count()
        sink.close()

    assert [n for n, reason in enumerate(reasons) if reason] == [5]
    assert rows == 11
    assert sink.rejected == {107: "not stored in the weaviate sink: weaviate collection LegalBatch_local_lexical_v1_1024:"
                                  " shard is read-only"}
    assert weaviate_count == 10
    assert chroma.count() == 11 and not chroma.contains([f"{case_id}:5"])
    stored = chroma.collection.get(ids=[f"{case_id}:3"], include=["documents", "metadatas"])
    assert stored["documents"] == [f"paragraph 3 of judgment {case_id}"]
    assert stored["metadatas"][0]["citation"] == "[2022] HKCFA 3"
    assert stored["metadatas"][0]["chunk_type"] == "holding"
