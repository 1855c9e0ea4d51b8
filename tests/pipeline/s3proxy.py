"""A fault-injecting HTTP proxy on loopback, in front of moto's S3 server.

``FaultProxy(upstream, rule)`` forwards every request to ``upstream`` unless ``rule(method, path, query, n)``
(``n``: how many requests with this method and path came before) returns a fault:

* ``("status", 503)`` answers that status with an S3 ``SlowDown`` error body (503) or ``InternalError``;
* ``("stall", seconds)`` holds the connection open without answering (a hung S3 connection).

``proxy.injected`` counts faults per ``(method, path)``; ``proxy.requests`` counts all requests.
"""

from __future__ import annotations

import http.client
import threading
import time
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

Fault = tuple[str, float] | None
Rule = Callable[[str, str, str, int], Fault]

_BODIES = {
    503: b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>",
    500: b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>InternalError</Code>'
    b"<Message>We encountered an internal error. Please try again.</Message></Error>",
}


class FaultProxy:
    """Forwards to ``upstream`` except where ``rule`` injects a fault (see the module docstring)."""

    def __init__(self, upstream: str, rule: Rule):
        self.upstream = urlsplit(upstream)
        self.rule = rule
        self.injected: Counter = Counter()
        self.requests: Counter = Counter()
        self.lock = threading.Lock()
        self._stop = threading.Event()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):  # quiet
                pass

            def _forward(self):
                path, _, query = self.path.partition("?")
                key = (self.command, path)
                with proxy.lock:
                    fault = proxy.rule(self.command, path, query, proxy.requests[key])
                    proxy.requests[key] += 1
                    if fault is not None:
                        proxy.injected[key] += 1
                body = self._body()
                if fault is not None and fault[0] == "stall":
                    proxy._stop.wait(float(fault[1]))
                    self.close_connection = True
                    return
                if fault is not None:
                    status = int(fault[1])
                    data = _BODIES.get(status, _BODIES[500])
                    self.send_response(status)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                    return
                conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=60)
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in ("connection", "transfer-encoding", "expect", "content-length")}
                if body or self.command in ("PUT", "POST"):
                    headers["Content-Length"] = str(len(body))
                conn.request(self.command, self.path, body=body or None, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                # a HEAD answer has no body but carries the object's length
                length = resp.getheader("Content-Length", "0") if self.command == "HEAD" else str(len(data))
                self.send_header("Content-Length", length)
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            def _body(self) -> bytes:
                """The request body, plain or chunked (clients upload with chunked encoding too)."""
                if "chunked" not in self.headers.get("Transfer-Encoding", "").lower():
                    return self.rfile.read(int(self.headers.get("Content-Length") or 0))
                parts = []
                while True:
                    size = int(self.rfile.readline().split(b";", 1)[0].strip() or b"0", 16)
                    if size == 0:
                        while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                            pass
                        return b"".join(parts)
                    parts.append(self.rfile.read(size))
                    self.rfile.readline()

            do_GET = do_PUT = do_HEAD = do_POST = do_DELETE = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def faults(self, method: str | None = None) -> int:
        """Faults injected so far (for one HTTP method, or all)."""
        with self.lock:
            return sum(v for (m, _), v in self.injected.items() if method is None or m == method)

    def __enter__(self) -> FaultProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()  # release stalled connections
        time.sleep(0.05)
        self.server.shutdown()
        self.server.server_close()


def first_n_per_path(plan: dict[str, int], methods: tuple[str, ...] = ("GET",), status: int = 503) -> Rule:
    """A rule: the first ``plan[path]`` requests (``-1``: all) of ``methods`` to ``path`` get ``status``."""

    def rule(method: str, path: str, query: str, n: int) -> Fault:
        limit = plan.get(path, 0)
        if method in methods and (limit < 0 or n < limit):
            return ("status", status)
        return None

    return rule
