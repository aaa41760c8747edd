"""HTTP + gRPC emulator of the Weaviate endpoints that `weaviate-client` v4 uses for a vector store
with self-provided vectors, built from the protobuf stubs that ship inside `weaviate-client`
(`weaviate.proto.v1`), so the real client talks to it unchanged.

REST (``/v1``, a ``ThreadingHTTPServer``):

* ``GET /v1/meta``                     version (1.32.0) and gRPC message size — read on connect
* ``GET /v1/.well-known/ready|live``   200
* ``GET /v1/schema``                   every collection
* ``GET /v1/schema/{name}``            one collection (404 when absent) — ``collections.exists``,
                                       ``config.get``
* ``POST /v1/schema``                  ``collections.create``: the class is stored with the defaults a
                                       server fills in (inverted index, sharding, replication, HNSW)
* ``DELETE /v1/schema/{name}``         ``collections.delete``

gRPC (service ``weaviate.v1.Weaviate`` and ``grpc.health.v1.Health``):

* ``BatchObjects``  ``data.insert_many``: objects stored by uuid (a second write replaces the first);
  per-object errors, as Weaviate reports them, for an unknown collection, a vector whose length
  differs from the collection's first one, and objects the test rejects (``reject``)
* ``Search``        ``query.fetch_objects``/``fetch_objects_by_ids``/``near_vector``: filters on ``_id``
  and on properties (equal, not equal, contains any, and, or), cosine distance by brute force,
  properties and metadata (uuid, distance, vectors) as asked
* ``BatchDelete``   ``data.delete_many`` with the same filters
* ``Aggregate``     ``aggregate.over_all(total_count=True)``

With ``api_key`` set, every REST and gRPC request must carry ``Authorization: Bearer <key>`` (401 /
UNAUTHENTICATED otherwise). ``fail_batches(n)`` makes the next ``n`` BatchObjects calls fail as a whole
(UNAVAILABLE); ``stop()`` takes both servers down. Not emulated: GraphQL, the REST object and batch
endpoints, tenants, references, vectorizer modules, generative search.
"""

from __future__ import annotations

import copy
import json
import re
import threading
import uuid
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import grpc
import numpy as np
from google.protobuf import json_format
from grpc_health.v1 import health_pb2, health_pb2_grpc
from weaviate.proto.v1 import (
    aggregate_pb2,
    base_pb2,
    batch_delete_pb2,
    batch_pb2,
    properties_pb2,
    search_get_pb2,
    weaviate_pb2_grpc,
)

VERSION = "1.32.0"
CLASS_NAME = re.compile(r"^[A-Z][_0-9A-Za-z]*$")
_HNSW_DEFAULTS: dict[str, Any] = {
    "skip": False, "cleanupIntervalSeconds": 300, "maxConnections": 32, "efConstruction": 128, "ef": -1,
    "dynamicEfMin": 100, "dynamicEfMax": 500, "dynamicEfFactor": 8, "vectorCacheMaxObjects": 1_000_000_000_000,
    "flatSearchCutoff": 40_000, "distance": "cosine", "filterStrategy": "sweeping",
    "pq": {"enabled": False}, "bq": {"enabled": False}, "sq": {"enabled": False},
}
_CLASS_DEFAULTS: dict[str, Any] = {
    "invertedIndexConfig": {"bm25": {"b": 0.75, "k1": 1.2}, "cleanupIntervalSeconds": 60,
                            "stopwords": {"preset": "en", "additions": None, "removals": None}},
    "multiTenancyConfig": {"enabled": False, "autoTenantCreation": False, "autoTenantActivation": False},
    "replicationConfig": {"factor": 1, "asyncEnabled": False, "deletionStrategy": "NoAutomatedResolution"},
    "shardingConfig": {"virtualPerPhysical": 128, "desiredCount": 1, "actualCount": 1, "desiredVirtualCount": 128,
                       "actualVirtualCount": 128, "key": "_id", "strategy": "hash", "function": "murmur3"},
}


@dataclass
class _Object:
    properties: dict[str, Any]
    vectors: dict[str, np.ndarray]


@dataclass
class _Collection:
    schema: dict[str, Any]
    objects: dict[str, _Object] = field(default_factory=dict)
    dimensions: dict[str, int] = field(default_factory=dict)

    def property_type(self, name: str) -> str | None:
        for prop in self.schema.get("properties") or []:
            if prop["name"] == name:
                return prop["dataType"][0]
        return None


class WeaviateEmulator:
    """See the module docstring. Use as a context manager, or `start()`/`stop()`."""

    def __init__(self, *, api_key: str | None = None) -> None:
        self.api_key = api_key
        self.collections: dict[str, _Collection] = {}
        self.lock = threading.RLock()
        self.requests: list[str] = []
        """Every REST path and gRPC method served, in order (e.g. `GET /v1/meta`, `grpc BatchObjects`)."""
        self._reject: Callable[[str, dict[str, Any]], str | None] | None = None
        self._failing_batches = 0
        self._http: ThreadingHTTPServer | None = None
        self._grpc: grpc.Server | None = None
        self.http_port = 0
        self.grpc_port = 0

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self) -> WeaviateEmulator:
        self._http = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self.http_port = self._http.server_address[1]
        threading.Thread(target=self._http.serve_forever, name="weaviate-rest", daemon=True).start()
        self._grpc = grpc.server(futures.ThreadPoolExecutor(max_workers=8), options=[
            ("grpc.max_receive_message_length", 104_858_000), ("grpc.max_send_message_length", 104_858_000)])
        weaviate_pb2_grpc.add_WeaviateServicer_to_server(_Servicer(self), self._grpc)
        health = _Health(self)
        health_pb2_grpc.add_HealthServicer_to_server(health, self._grpc)
        self.grpc_port = self._grpc.add_insecure_port("127.0.0.1:0")
        self._grpc.start()
        return self

    def stop(self) -> None:
        if self._http is not None:
            self._http.shutdown()
            self._http.server_close()
            self._http = None
        if self._grpc is not None:
            self._grpc.stop(grace=None).wait()
            self._grpc = None

    def __enter__(self) -> WeaviateEmulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"http://127.0.0.1:{self.grpc_port}"

    def env(self) -> dict[str, str]:
        env = {"LEGAL_BATCH_WEAVIATE_URL": self.url, "LEGAL_BATCH_WEAVIATE_GRPC_URL": self.grpc_url}
        if self.api_key:
            env["LEGAL_BATCH_WEAVIATE_API_KEY"] = self.api_key
        return env

    # -- test controls ----------------------------------------------------------------------------

    def reject(self, predicate: Callable[[str, dict[str, Any]], str | None] | None) -> None:
        """BatchObjects answers an error for each object where `predicate(uuid, properties)` returns a
        message (None: stored as usual)."""
        self._reject = predicate

    def fail_batches(self, count: int) -> None:
        """The next `count` BatchObjects calls fail as a whole with UNAVAILABLE."""
        self._failing_batches = count

    def stored(self, collection: str) -> dict[str, _Object]:
        with self.lock:
            return dict(self.collections[collection].objects)

    # -- REST -------------------------------------------------------------------------------------

    def rest(self, method: str, path: str, headers: dict[str, str], body: bytes) -> tuple[int, Any]:
        self.requests.append(f"{method} {path}")
        if self.api_key and headers.get("authorization") != f"Bearer {self.api_key}":
            return 401, {"code": 401, "message": "anonymous access not enabled, please provide an auth scheme such "
                                                 "as OIDC"}
        if method == "GET" and path == "/v1/meta":
            return 200, {"hostname": "http://[::]:8080", "version": VERSION, "modules": {},
                         "grpcMaxMessageSize": 104_858_000}
        if method == "GET" and path in ("/v1/.well-known/ready", "/v1/.well-known/live"):
            return 200, None
        with self.lock:
            if method == "GET" and path == "/v1/schema":
                return 200, {"classes": [copy.deepcopy(c.schema) for c in self.collections.values()]}
            match = re.fullmatch(r"/v1/schema/([^/]+)", path)
            if method == "GET" and match:
                found = self._find(match.group(1))
                return (200, copy.deepcopy(found.schema)) if found else (404, None)
            if method == "DELETE" and match:
                found = self._find(match.group(1))
                if found:
                    del self.collections[found.schema["class"]]
                return 200, None
            if method == "POST" and path == "/v1/schema":
                return self._create(json.loads(body or b"{}"))
        return 404, {"error": [{"message": f"no route for {method} {path} in the emulator"}]}

    def _find(self, name: str) -> _Collection | None:
        return next((c for key, c in self.collections.items() if key.lower() == name.lower()), None)

    def _create(self, schema: dict[str, Any]) -> tuple[int, Any]:
        name = str(schema.get("class", ""))
        if not CLASS_NAME.match(name):
            return 422, {"error": [{"message": f"'{name}' is not a valid class name"}]}
        if self._find(name) is not None:
            return 422, {"error": [{"message": f"class name {name} already exists"}]}
        stored = {**copy.deepcopy(_CLASS_DEFAULTS), **copy.deepcopy(schema)}
        for prop in stored.get("properties") or []:
            prop.setdefault("indexFilterable", True)
            prop.setdefault("indexSearchable", prop["dataType"][0] == "text")
            prop.setdefault("indexRangeFilters", False)
            prop.setdefault("tokenization", "word" if prop["dataType"][0] == "text" else None)
            prop.setdefault("moduleConfig", {})
        for named in (stored.get("vectorConfig") or {}).values():
            named["vectorIndexType"] = named.get("vectorIndexType", "hnsw")
            named["vectorIndexConfig"] = {**_HNSW_DEFAULTS, **(named.get("vectorIndexConfig") or {})}
        if "vectorConfig" not in stored:
            stored.setdefault("vectorizer", "none")
            stored["vectorIndexType"] = stored.get("vectorIndexType", "hnsw")
            stored["vectorIndexConfig"] = {**_HNSW_DEFAULTS, **(stored.get("vectorIndexConfig") or {})}
        self.collections[name] = _Collection(stored)
        return 200, copy.deepcopy(stored)

    # -- gRPC -------------------------------------------------------------------------------------

    def authorized(self, context: grpc.ServicerContext) -> None:
        if not self.api_key:
            return
        metadata = dict(context.invocation_metadata())
        if metadata.get("authorization") != f"Bearer {self.api_key}":
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "anonymous access not enabled")

    def batch_objects(self, request: batch_pb2.BatchObjectsRequest, context) -> batch_pb2.BatchObjectsReply:
        self.requests.append("grpc BatchObjects")
        self.authorized(context)
        if self._failing_batches > 0:
            self._failing_batches -= 1
            context.abort(grpc.StatusCode.UNAVAILABLE, "connection reset by peer (emulated)")
        errors = []
        with self.lock:
            for index, obj in enumerate(request.objects):
                message = self._put(obj)
                if message is not None:
                    errors.append(batch_pb2.BatchObjectsReply.BatchError(index=index, error=message))
        return batch_pb2.BatchObjectsReply(took=0.001, errors=errors)

    def _put(self, obj: batch_pb2.BatchObject) -> str | None:
        collection = self._find(obj.collection)
        if collection is None:
            return f"class {obj.collection!r} not found in schema"
        properties = json_format.MessageToDict(obj.properties.non_ref_properties)
        for name, value in list(properties.items()):
            if collection.property_type(name) == "int" and isinstance(value, float):
                properties[name] = int(value)
        if self._reject is not None and (message := self._reject(obj.uuid, properties)) is not None:
            return message
        vectors: dict[str, np.ndarray] = {}
        if obj.vector_bytes:
            vectors["default"] = np.frombuffer(obj.vector_bytes, dtype="<f4").copy()
        for named in obj.vectors:
            vectors[named.name or "default"] = np.frombuffer(named.vector_bytes, dtype="<f4").copy()
        for name, vector in vectors.items():
            expected = collection.dimensions.get(name)
            if expected is not None and expected != len(vector):
                return (f"insert to vector index: new node has a vector with length {len(vector)}. Existing nodes "
                        f"have vectors with length {expected}")
        for name, vector in vectors.items():
            collection.dimensions.setdefault(name, len(vector))
        collection.objects[str(uuid.UUID(obj.uuid))] = _Object(properties, vectors)
        return None

    def search(self, request: search_get_pb2.SearchRequest, context) -> search_get_pb2.SearchReply:
        self.requests.append("grpc Search")
        self.authorized(context)
        with self.lock:
            collection = self._find(request.collection)
            if collection is None:
                context.abort(grpc.StatusCode.NOT_FOUND, f"class {request.collection!r} not found")
            rows = [(key, obj) for key, obj in collection.objects.items()
                    if not request.HasField("filters") or _matches(request.filters, key, obj)]
            distances: dict[str, float] = {}
            if request.HasField("near_vector"):
                name, query = _query_vector(request.near_vector)
                for key, obj in rows:
                    stored = obj.vectors.get(name)
                    if stored is not None and len(stored) == len(query):
                        distances[key] = _cosine_distance(query, stored)
                rows = sorted((row for row in rows if row[0] in distances), key=lambda row: distances[row[0]])
            else:
                rows = sorted(rows, key=lambda row: row[0])
            rows = rows[request.offset: request.offset + (request.limit or 10)]
            results = [self._result(request, key, obj, distances.get(key)) for key, obj in rows]
        return search_get_pb2.SearchReply(took=0.001, results=results)

    @staticmethod
    def _result(request: search_get_pb2.SearchRequest, key: str, obj: _Object, distance: float | None
                ) -> search_get_pb2.SearchResult:
        meta = search_get_pb2.MetadataResult(id=key, id_as_bytes=uuid.UUID(key).bytes)
        if distance is not None and request.metadata.distance:
            meta.distance = distance
            meta.distance_present = True
        wanted = set(request.metadata.vectors) or ({"default"} if request.metadata.vector else set())
        for name in sorted(wanted & set(obj.vectors)):
            meta.vectors.append(base_pb2.Vectors(name=name, vector_bytes=obj.vectors[name].astype("<f4").tobytes(),
                                                 type=base_pb2.Vectors.VECTOR_TYPE_SINGLE_FP32))
        every = not request.HasField("properties") or request.properties.return_all_nonref_properties
        names = set(obj.properties) if every else set(request.properties.non_ref_properties)
        fields = {name: _value(obj.properties[name]) for name in sorted(names) if name in obj.properties}
        props = search_get_pb2.PropertiesResult(non_ref_props=properties_pb2.Properties(fields=fields),
                                                target_collection=request.collection)
        return search_get_pb2.SearchResult(properties=props, metadata=meta)

    def batch_delete(self, request: batch_delete_pb2.BatchDeleteRequest, context) -> batch_delete_pb2.BatchDeleteReply:
        self.requests.append("grpc BatchDelete")
        self.authorized(context)
        with self.lock:
            collection = self._find(request.collection)
            if collection is None:
                context.abort(grpc.StatusCode.NOT_FOUND, f"class {request.collection!r} not found")
            keys = [key for key, obj in collection.objects.items() if _matches(request.filters, key, obj)]
            if not request.dry_run:
                for key in keys:
                    del collection.objects[key]
        return batch_delete_pb2.BatchDeleteReply(took=0.001, failed=0, matches=len(keys), successful=len(keys))

    def aggregate(self, request: aggregate_pb2.AggregateRequest, context) -> aggregate_pb2.AggregateReply:
        self.requests.append("grpc Aggregate")
        self.authorized(context)
        with self.lock:
            collection = self._find(request.collection)
            if collection is None:
                context.abort(grpc.StatusCode.NOT_FOUND, f"class {request.collection!r} not found")
            count = sum(1 for key, obj in collection.objects.items()
                        if not request.HasField("filters") or _matches(request.filters, key, obj))
        return aggregate_pb2.AggregateReply(took=0.001, single_result=aggregate_pb2.AggregateReply.Single(
            objects_count=count))


class _Servicer(weaviate_pb2_grpc.WeaviateServicer):
    def __init__(self, emulator: WeaviateEmulator) -> None:
        self.emulator = emulator

    def Search(self, request, context):  # noqa: N802 - gRPC method names
        return self.emulator.search(request, context)

    def BatchObjects(self, request, context):  # noqa: N802
        return self.emulator.batch_objects(request, context)

    def BatchDelete(self, request, context):  # noqa: N802
        return self.emulator.batch_delete(request, context)

    def Aggregate(self, request, context):  # noqa: N802
        return self.emulator.aggregate(request, context)


class _Health(health_pb2_grpc.HealthServicer):
    def __init__(self, emulator: WeaviateEmulator) -> None:
        self.emulator = emulator

    def Check(self, request, context):  # noqa: N802
        self.emulator.requests.append("grpc Health/Check")
        return health_pb2.HealthCheckResponse(status=health_pb2.HealthCheckResponse.SERVING)


def _handler(emulator: WeaviateEmulator) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            headers = {key.lower(): value for key, value in self.headers.items()}
            status, payload = emulator.rest(self.command, self.path.split("?")[0], headers, body)
            data = b"" if payload is None else json.dumps(payload).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PUT = do_DELETE = _serve  # noqa: N815

        def log_message(self, *args: object) -> None:
            pass

    return Handler


def _value(value: Any) -> properties_pb2.Value:
    if isinstance(value, bool):
        return properties_pb2.Value(bool_value=value)
    if isinstance(value, int):
        return properties_pb2.Value(int_value=value)
    if isinstance(value, float):
        return properties_pb2.Value(number_value=value)
    if value is None:
        return properties_pb2.Value(null_value=0)
    return properties_pb2.Value(text_value=str(value))


def _filter_values(flt: base_pb2.Filters) -> list[Any]:
    kind = flt.WhichOneof("test_value")
    if kind is None:
        return []
    value = getattr(flt, kind)
    return list(value.values) if kind.endswith("_array") else [value]


def _matches(flt: base_pb2.Filters, key: str, obj: _Object) -> bool:
    op = flt.operator
    if op == base_pb2.Filters.OPERATOR_AND:
        return all(_matches(inner, key, obj) for inner in flt.filters)
    if op == base_pb2.Filters.OPERATOR_OR:
        return any(_matches(inner, key, obj) for inner in flt.filters)
    prop = flt.target.property if flt.HasField("target") else (flt.on[0] if flt.on else "")
    actual = key if prop == "_id" else obj.properties.get(prop)
    values = _filter_values(flt)
    if prop == "_id":
        values = [str(uuid.UUID(str(v))) for v in values]
    if op == base_pb2.Filters.OPERATOR_EQUAL:
        return bool(values) and actual == values[0]
    if op == base_pb2.Filters.OPERATOR_NOT_EQUAL:
        return bool(values) and actual != values[0]
    if op == base_pb2.Filters.OPERATOR_CONTAINS_ANY:
        return actual in values
    raise NotImplementedError(f"filter operator {base_pb2.Filters.Operator.Name(op)} is not emulated")


def _query_vector(near: Any) -> tuple[str, np.ndarray]:
    """The target vector name and the query of a NearVector, in whichever form the client sent it."""
    targets = list(near.targets.target_vectors) or list(near.target_vectors) or ["default"]
    if near.vector_bytes:
        return targets[0], np.frombuffer(near.vector_bytes, dtype="<f4")
    if near.vectors:
        return near.vectors[0].name or targets[0], np.frombuffer(near.vectors[0].vector_bytes, dtype="<f4")
    for target in near.vector_for_targets:
        data = target.vector_bytes or (target.vectors[0].vector_bytes if target.vectors else b"")
        return target.name, np.frombuffer(data, dtype="<f4")
    for name, data in near.vector_per_target.items():
        return name, np.frombuffer(data, dtype="<f4")
    if near.vector:
        return targets[0], np.asarray(near.vector, dtype=np.float32)
    raise ValueError("NearVector without a vector")


def _cosine_distance(a: np.ndarray, b: np.ndarray) -> float:
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    denominator = float(np.linalg.norm(a64) * np.linalg.norm(b64))
    return 1.0 - (float(np.dot(a64, b64)) / denominator if denominator else 0.0)
