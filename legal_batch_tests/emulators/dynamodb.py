"""DynamoDB over HTTP: moto's server (``ThreadedMotoServer``) behind a small pass-through proxy that can
throttle, so code under test uses unpatched boto3 exactly as against AWS.

moto does not throttle, so the proxy answers the next ``n`` calls of an operation (``X-Amz-Target``
``DynamoDB_20120810.<Operation>``) with HTTP 400 and
``com.amazonaws.dynamodb.v20120810#ProvisionedThroughputExceededException`` — the response AWS sends —
before passing anything else through to moto unchanged. ``calls`` counts every operation received.
"""

from __future__ import annotations

import http.client
import json
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from moto.server import ThreadedMotoServer

REGION = "eu-west-2"
_TARGET_PREFIX = "DynamoDB_20120810."


class DynamoDBServer:
    """See the module docstring. Use as a context manager; `env()` points boto3 at it."""

    def __init__(self) -> None:
        self._moto: ThreadedMotoServer | None = None
        self._proxy: ThreadingHTTPServer | None = None
        self._lock = threading.Lock()
        self._throttles: Counter[str] = Counter()
        self.calls: Counter[str] = Counter()
        self.throttled: Counter[str] = Counter()
        self.endpoint_url = ""

    def __enter__(self) -> DynamoDBServer:
        self._moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._moto.start()
        moto_host, moto_port = self._moto.get_host_and_port()
        self._proxy = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self, moto_host, moto_port))
        threading.Thread(target=self._proxy.serve_forever, name="dynamodb-proxy", daemon=True).start()
        self.endpoint_url = f"http://127.0.0.1:{self._proxy.server_address[1]}"
        return self

    def __exit__(self, *exc: object) -> None:
        if self._proxy is not None:
            self._proxy.shutdown()
            self._proxy.server_close()
        if self._moto is not None:
            self._moto.stop()

    def env(self) -> dict[str, str]:
        return {"AWS_ENDPOINT_URL_DYNAMODB": self.endpoint_url, "AWS_REGION": REGION, "AWS_DEFAULT_REGION": REGION,
                "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing"}

    def throttle(self, operation: str, times: int) -> None:
        """Answer the next `times` calls of `operation` (e.g. `Scan`, `UpdateItem`) as throttled."""
        with self._lock:
            self._throttles[operation] = times

    def _take_throttle(self, operation: str) -> bool:
        with self._lock:
            self.calls[operation] += 1
            if self._throttles[operation] > 0:
                self._throttles[operation] -= 1
                self.throttled[operation] += 1
                return True
            return False


def _handler(server: DynamoDBServer, moto_host: str, moto_port: int) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length)
            operation = (self.headers.get("X-Amz-Target") or "").removeprefix(_TARGET_PREFIX)
            if server._take_throttle(operation):
                payload = json.dumps({
                    "__type": "com.amazonaws.dynamodb.v20120810#ProvisionedThroughputExceededException",
                    "message": "The level of configured provisioned throughput for the table was exceeded. "
                               "Consider increasing your provisioning level with the UpdateTable API."}).encode()
                self._reply(400, {"Content-Type": "application/x-amz-json-1.0"}, payload)
                return
            upstream = http.client.HTTPConnection(moto_host, moto_port, timeout=30)
            try:
                headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
                upstream.request("POST", self.path, body=body, headers=headers)
                answer = upstream.getresponse()
                data = answer.read()
                passed = {k: v for k, v in answer.getheaders()
                          if k.lower() not in ("content-length", "connection", "transfer-encoding", "date", "server")}
                self._reply(answer.status, passed, data)
            finally:
                upstream.close()

        def _reply(self, status: int, headers: dict[str, str], data: bytes) -> None:
            self.send_response(status)
            for key, value in headers.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args: object) -> None:
            pass

    return Handler
