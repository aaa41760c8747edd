"""Write throughput of the vector sinks next to the raw client write of the same vectors, and the DynamoDB
source's scan and status write-back rates.

    python -m benchmarks.bench_sinks [--vectors 10000] [--dims 1024] [--items 2000] [--repeat 2]
                                     [--stages pgvector,chroma,weaviate,dynamodb]

The same `--vectors` unit vectors (with ~600 characters of chunk text and the standard metadata each)
are written, in the same process and run, through

- pgvector:  `PgvectorSink.upsert` (binary COPY into a staging table, then upsert, in one transaction)
             vs psycopg's own binary `COPY case_embeddings ... FROM STDIN` with `write_row` per vector,
             on a throwaway database `lb_bench_<random>_sinks` of the embedded server under
             `.legal_batch/bench` (dropped at the end); the table is emptied before each write;
- chroma:    `ChromaSink.upsert` vs `collection.upsert` in batches of `get_max_batch_size()`, each into
             a fresh collection of an embedded `PersistentClient` in a temporary folder;
- weaviate:  `WeaviateSink.upsert` vs `collection.data.insert_many` in batches of the same size, each
             into a fresh collection, through weaviate-client to the HTTP + gRPC emulator in
             legal_batch_tests/emulators/weaviate.py (no Weaviate server can run here: the figure is
             the client's encoding plus the emulator, not a Weaviate server's);

and `ratio` = sink rate / raw rate. For DynamoDB, `--items` receipt lines are put into moto's server
(through the throttling proxy, never throttling here) and read back with `DynamoDBSource.scan` (pages
of 100) and marked `SUCCESS` with `write_status` (4 threads). The fastest of `--repeat` runs counts.

Prints one `name=value` per line (progress on stderr) and writes them to
`benchmarks/results/sinks.json`. Timings are of this machine at this moment (the load average is
recorded); nothing here is a test.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from legal_batch.sinks.base import VectorRecord, chunk_metadata  # noqa: E402

MODEL = "bench-model"
TEXT = ("The appellant contends that the judge erred in admitting the evidence of the search of the flat, "
        "which was carried out without a warrant and in the absence of the occupier; the respondent answers "
        "that the officers acted under the statutory power of entry and that any irregularity did not affect "
        "the fairness of the trial. We are unable to accept the appellant's submission. ") * 2


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def make_records(count: int, dims: int, cases: list[str]) -> list[VectorRecord]:
    rng = np.random.default_rng(7)
    vectors = rng.standard_normal((count, dims)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    per_case = -(-count // len(cases))
    records = []
    for n in range(count):
        case_id, index = cases[n // per_case], n % per_case
        text = f"{TEXT} [{n}]"
        records.append(VectorRecord(case_id, index, vectors[n], text, chunk_metadata(
            record_id=case_id, chunk_index=index, model=MODEL, text=text, chunk_type="reasoning",
            citation=f"[2024] HKCA {n // per_case}")))
    return records


def best_pair(repeat: int, through_sink: Callable[[], float], raw: Callable[[], float]) -> tuple[float, float]:
    """The shortest of `repeat` timed runs of each, in seconds, the two taking turns (so neither gets the
    cold start or a burst of other work on the machine alone)."""
    sink_s, raw_s = [], []
    for _ in range(repeat):
        sink_s.append(through_sink())
        raw_s.append(raw())
    return min(sink_s), min(raw_s)


def bench_pgvector(records: list[VectorRecord], repeat: int) -> dict[str, float]:
    import psycopg

    from legal_batch.db import connect, embedded, upgrade
    from legal_batch.sinks.pgvector import PgvectorSink

    home = ROOT / ".legal_batch" / "bench"
    started_server = not embedded.is_running(home)  # stopped again at the end
    admin_url = embedded.start(home)
    name = f"lb_bench_{uuid.uuid4().hex[:8]}_sinks"
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    base, _, query = admin_url.partition("?")
    url = f"{base.rsplit('/', 1)[0]}/{name}" + (f"?{query}" if query else "")
    try:
        upgrade(url)
        conn = connect(url)
        dims = len(records[0].vector)
        conn.execute("DROP INDEX IF EXISTS case_embeddings_hnsw")
        table = conn.execute("SELECT to_regclass('case_embeddings')::text").fetchone()[0]
        if dims != 1024:
            conn.execute(f"ALTER TABLE {table} ALTER COLUMN embedding TYPE vector({dims})")
        chunks_table = table.replace("case_embeddings", "case_chunks")
        cases_table = table.replace("case_embeddings", "court_cases")
        with conn.transaction():
            keys = sorted({(r.record_id, r.chunk_index) for r in records})
            with conn.cursor().copy(f"COPY {cases_table} (id, full_text) FROM STDIN") as copy:
                for case_id in sorted({k[0] for k in keys}):
                    copy.write_row((case_id, "text"))
            with conn.cursor().copy(f"COPY {chunks_table} (case_id, chunk_index, chunk_type, chunk_text, char_start,"
                                    " char_end, token_count, text_sha256) FROM STDIN") as copy:
                for case_id, index in keys:
                    copy.write_row((case_id, index, "reasoning", "t", 0, 1, 1, "x"))
        sink = PgvectorSink(conn, model=MODEL, dimensions=dims)

        def through_sink() -> float:
            conn.execute(f"TRUNCATE {table}")
            started = time.perf_counter()
            with conn.transaction():
                failures = sink.upsert(records)
            assert not failures, failures[:3]
            return time.perf_counter() - started

        def raw() -> float:
            conn.execute(f"TRUNCATE {table}")
            started = time.perf_counter()
            statement = f"COPY {table} (case_id, chunk_index, model, embedding) FROM STDIN WITH (FORMAT BINARY)"
            with conn.transaction(), conn.cursor() as cur, cur.copy(statement) as copy:
                copy.set_types(["uuid", "int4", "text", "vector"])
                for record in records:
                    copy.write_row((uuid.UUID(record.record_id), record.chunk_index, MODEL, record.vector))
            return time.perf_counter() - started

        sink_s, raw_s = best_pair(repeat, through_sink, raw)
        assert conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0] == len(records)
        conn.close()
    finally:
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        if started_server:
            embedded.stop(home)
    return _rates("pgvector", len(records), sink_s, raw_s)


def bench_chroma(records: list[VectorRecord], repeat: int) -> dict[str, float]:
    import chromadb
    from chromadb.config import Settings as ChromaSettings

    from legal_batch.sinks.chroma import ChromaSink, _metadata

    dims = len(records[0].vector)
    with tempfile.TemporaryDirectory(prefix="lb_bench_chroma_") as folder:
        client = chromadb.PersistentClient(path=folder, settings=ChromaSettings(anonymized_telemetry=False))
        size = client.get_max_batch_size()
        runs = iter(range(1_000))

        def through_sink() -> float:
            sink = ChromaSink(client, model=MODEL, dimensions=dims, collection=f"sink-{next(runs)}")
            started = time.perf_counter()
            failures = sink.upsert(records)
            assert not failures, failures[:3]
            return time.perf_counter() - started

        def raw() -> float:
            collection = client.create_collection(f"raw-{next(runs)}", embedding_function=None,
                                                  configuration={"hnsw": {"space": "cosine"}})
            started = time.perf_counter()
            for start in range(0, len(records), size):
                batch = records[start: start + size]
                collection.upsert(ids=[r.id for r in batch], embeddings=np.stack([r.vector for r in batch]),
                                  documents=[r.text for r in batch], metadatas=[_metadata(r) for r in batch])
            return time.perf_counter() - started

        sink_s, raw_s = best_pair(repeat, through_sink, raw)
    return _rates("chroma", len(records), sink_s, raw_s)


def bench_weaviate(records: list[VectorRecord], repeat: int) -> dict[str, float]:
    import weaviate
    from weaviate.classes.config import Configure, VectorDistances
    from weaviate.classes.data import DataObject

    from legal_batch.sinks.base import vector_uuid
    from legal_batch.sinks.weaviate import BATCH, WeaviateSink, _properties
    from legal_batch_tests.emulators.weaviate import WeaviateEmulator

    dims = len(records[0].vector)
    with WeaviateEmulator() as emulator:
        client = weaviate.connect_to_custom(
            http_host="127.0.0.1", http_port=emulator.http_port, http_secure=False, grpc_host="127.0.0.1",
            grpc_port=emulator.grpc_port, grpc_secure=False, skip_init_checks=True)
        runs = iter(range(1_000))
        try:
            def through_sink() -> float:
                sink = WeaviateSink(client, model=MODEL, dimensions=dims, collection=f"Sink{next(runs)}")
                started = time.perf_counter()
                failures = sink.upsert(records)
                assert not failures, failures[:3]
                return time.perf_counter() - started

            def raw() -> float:
                collection = client.collections.create(f"Raw{next(runs)}", vector_config=Configure.Vectors.self_provided(
                    vector_index_config=Configure.VectorIndex.hnsw(distance_metric=VectorDistances.COSINE)))
                started = time.perf_counter()
                for start in range(0, len(records), BATCH):
                    batch = records[start: start + BATCH]
                    answer = collection.data.insert_many([
                        DataObject(properties=_properties(r), uuid=vector_uuid(r.record_id, r.chunk_index),
                                   vector={"default": r.vector.tolist()}) for r in batch])
                    assert not answer.errors
                return time.perf_counter() - started

            sink_s, raw_s = best_pair(repeat, through_sink, raw)
        finally:
            client.close()
    return _rates("weaviate_emulator", len(records), sink_s, raw_s)


def bench_dynamodb(items: int, repeat: int) -> dict[str, float]:
    from legal_batch.sources.base import StatusUpdate
    from legal_batch.sources.dynamodb import DynamoDBSource, dynamodb_client
    from legal_batch_tests.emulators.dynamodb import DynamoDBServer

    figures: dict[str, float] = {}
    with DynamoDBServer() as server:
        os.environ.update(server.env())
        client = dynamodb_client()
        scan_s = write_s = float("inf")
        for run in range(repeat):
            table = f"receipt_lines_{run}_{uuid.uuid4().hex[:6]}"
            client.create_table(TableName=table, BillingMode="PAY_PER_REQUEST",
                                KeySchema=[{"AttributeName": "pk", "KeyType": "HASH"},
                                           {"AttributeName": "sk", "KeyType": "RANGE"}],
                                AttributeDefinitions=[{"AttributeName": "pk", "AttributeType": "S"},
                                                      {"AttributeName": "sk", "AttributeType": "S"}])
            lines = [{"PutRequest": {"Item": {"pk": {"S": f"IMAGE#{n // 40}"}, "sk": {"S": f"LINE#{n % 40:05d}"},
                                              "text": {"S": f"ORGANIC MILK 2L {n}"}, "price": {"N": "1.25"}}}}
                     for n in range(items)]
            for start in range(0, items, 25):
                client.batch_write_item(RequestItems={table: lines[start: start + 25]})
            source = DynamoDBSource(table, page_size=100, client=client)
            started = time.perf_counter()
            cursor, ids = None, []
            while True:
                page = source.scan(cursor=cursor, page_budget=10)
                ids += [record.id for record in page.records]
                cursor = page.cursor
                if cursor is None:
                    break
            scan_s = min(scan_s, time.perf_counter() - started)
            assert len(ids) == items, len(ids)
            started = time.perf_counter()
            report = source.write_status([StatusUpdate(i, model=MODEL) for i in ids])
            write_s = min(write_s, time.perf_counter() - started)
            assert report.written == items, report.not_written[:3]
        figures["dynamodb_items"] = items
        figures["dynamodb_scan_items_per_s"] = round(items / scan_s)
        figures["dynamodb_status_writes_per_s"] = round(items / write_s)
    return figures


def _rates(name: str, count: int, sink_s: float, raw_s: float) -> dict[str, float]:
    sink_rate, raw_rate = count / sink_s, count / raw_s
    return {f"{name}_sink_vectors_per_s": round(sink_rate), f"{name}_raw_vectors_per_s": round(raw_rate),
            f"{name}_ratio": round(sink_rate / raw_rate, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vectors", type=int, default=10_000)
    parser.add_argument("--dims", type=int, default=1024)
    parser.add_argument("--items", type=int, default=2_000, help="DynamoDB items scanned and marked")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--stages", default="pgvector,chroma,weaviate,dynamodb")
    args = parser.parse_args()
    stages = [s.strip() for s in args.stages.split(",") if s.strip()]
    figures: dict[str, float | str] = {"vectors": args.vectors, "dims": args.dims,
                                       "load_average_1m": round(os.getloadavg()[0], 2),
                                       "at": datetime.now(UTC).isoformat(timespec="seconds")}
    cases = [str(uuid.uuid4()) for _ in range(max(1, args.vectors // 40))]
    records = make_records(args.vectors, args.dims, cases)
    runners = {"pgvector": lambda: bench_pgvector(records, args.repeat),
               "chroma": lambda: bench_chroma(records, args.repeat),
               "weaviate": lambda: bench_weaviate(records, args.repeat),
               "dynamodb": lambda: bench_dynamodb(args.items, args.repeat)}
    for stage in stages:
        log(f"{stage} ...")
        figures.update(runners[stage]())
    figures["load_average_1m_end"] = round(os.getloadavg()[0], 2)
    for key, value in figures.items():
        print(f"{key}={value}")
    out = ROOT / "benchmarks" / "results" / "sinks.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(figures, indent=2) + "\n")


if __name__ == "__main__":
    main()
