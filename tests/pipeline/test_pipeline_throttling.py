"""S3 throttling: a loopback proxy in front of moto's S3 server answers 503 SlowDown to the first requests
for each object; the decode stage must retry (boto3, adaptive mode) and still produce ok rows, and a
video that stays throttled past ``s3.max_attempts`` must become a ``fetch_failed`` row, not an exception."""

from __future__ import annotations

import pytest

from pipeline import storage
from pipeline.config import DecodeConfig, S3Config
from pipeline.decode import DecodeStage
from tests.pipeline.s3proxy import FaultProxy, first_n_per_path
from tests.pipeline.s3server import boto_client, fake_aws_env, moto_server
from tests.pipeline.videos import make_video

pytestmark = pytest.mark.slow  # ~25 s, almost all of it boto3's retry back-off


@pytest.fixture(scope="module")
def throttled():
    video = make_video(num_frames=6)
    with fake_aws_env(), moto_server() as endpoint:
        client = boto_client(endpoint)
        client.create_bucket(Bucket="bkt")
        for i in range(4):
            client.put_object(Bucket="bkt", Key=f"v{i}.mp4", Body=video)
        plan = {"/bkt/v0.mp4": 1, "/bkt/v1.mp4": 2, "/bkt/v2.mp4": 3, "/bkt/v3.mp4": -1}
        with FaultProxy(endpoint, first_n_per_path(plan)) as proxy:
            storage.client.cache_clear()
            try:
                yield proxy
            finally:
                storage.client.cache_clear()


def test_503_slowdown_is_retried_and_persistent_throttling_is_an_error_row(throttled):
    stage = DecodeStage(DecodeConfig(num_frames=4, frame_size=32, isolation="none"),
                        S3Config(endpoint_url=throttled.url, max_attempts=3))
    rows = stage([{"video_id": f"v{i}", "video_uri": f"s3://bkt/v{i}.mp4", "questions": None}
                                  for i in range(4)]).to_pylist()
    assert [r["status"] for r in rows] == ["ok", "ok", "ok", "error"]
    assert rows[3]["error_type"] == "fetch_failed" and "SlowDown" in rows[3]["error_message"]
    # 1 + 2 + 3 injected 503s absorbed by retries; the last object got 1 + s3.max_attempts (retries) requests
    assert [throttled.injected[("GET", f"/bkt/v{i}.mp4")] for i in range(4)] == [1, 2, 3, 4]
