"""S3 throttling: a loopback proxy in front of moto's S3 server answers 503 SlowDown to the first requests
for each object; the decode stage must retry (boto3, adaptive mode) and still produce ok rows, and a
video that stays throttled past ``s3.max_attempts`` must become a ``fetch_failed`` row, not an exception."""

from __future__ import annotations

import http.client
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import pytest

from pipeline import s3
from pipeline.decode import DecodeSettings, DecodeStage
from tests.pipeline.s3server import boto_client, fake_aws_env, moto_server
from tests.pipeline.videos import make_video

pytestmark = pytest.mark.slow  # ~25 s, almost all of it boto3's retry back-off

SLOWDOWN = (b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
            b"<Message>Please reduce your request rate.</Message></Error>")


class ThrottlingProxy:
    """Forwards to ``upstream``; the first ``fail_first`` GETs of each path (``-1``: all) get a 503."""

    def __init__(self, upstream: str, fail_first: dict[str, int]):
        self.upstream = urlsplit(upstream)
        self.fail_first = fail_first
        self.injected: Counter = Counter()
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _forward(self):
                path = self.path.split("?", 1)[0]
                with proxy.lock:
                    limit = proxy.fail_first.get(path, 0)
                    throttle = self.command == "GET" and (limit < 0 or proxy.injected[path] < limit)
                    if throttle:
                        proxy.injected[path] += 1
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                if throttle:
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(SLOWDOWN)))
                    self.end_headers()
                    self.wfile.write(SLOWDOWN)
                    return
                conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=30)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "connection"}
                conn.request(self.command, self.path, body=body or None, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_PUT = do_HEAD = do_POST = do_DELETE = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def throttled():
    video = make_video(num_frames=6)
    with fake_aws_env(), moto_server() as endpoint:
        client = boto_client(endpoint)
        client.create_bucket(Bucket="bkt")
        for i in range(4):
            client.put_object(Bucket="bkt", Key=f"v{i}.mp4", Body=video)
        plan = {"/bkt/v0.mp4": 1, "/bkt/v1.mp4": 2, "/bkt/v2.mp4": 3, "/bkt/v3.mp4": -1}
        with ThrottlingProxy(endpoint, plan) as proxy:
            s3.client.cache_clear()
            try:
                yield proxy
            finally:
                s3.client.cache_clear()


def test_503_slowdown_is_retried_and_persistent_throttling_is_an_error_row(throttled):
    settings = DecodeSettings(num_frames=4, frame_size=32, s3=s3.S3Settings(endpoint_url=throttled.url, max_attempts=3))
    rows = DecodeStage(settings)([{"video_id": f"v{i}", "video_uri": f"s3://bkt/v{i}.mp4", "questions": None}
                                  for i in range(4)]).to_pylist()
    assert [r["status"] for r in rows] == ["ok", "ok", "ok", "error"]
    assert rows[3]["error_type"] == "fetch_failed" and "SlowDown" in rows[3]["error_message"]
    # 1 + 2 + 3 injected 503s absorbed by retries; the last object got 1 + s3.max_attempts (retries) requests
    assert [throttled.injected[f"/bkt/v{i}.mp4"] for i in range(4)] == [1, 2, 3, 4]
