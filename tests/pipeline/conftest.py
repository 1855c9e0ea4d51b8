"""Fixtures shared by the pipeline tests: generated sample videos and an in-process S3 mock
(``tiny_model`` comes from tests/conftest.py)."""

from __future__ import annotations

import pytest

from tests.pipeline.videos import sample_set, write_video


@pytest.fixture(scope="session")
def sample_videos() -> dict[str, bytes]:
    return sample_set()


@pytest.fixture(scope="session")
def video_dir(tmp_path_factory, sample_videos):
    root = tmp_path_factory.mktemp("videos")
    for name, data in sample_videos.items():
        write_video(root / name, data)
    return root


@pytest.fixture()
def mocked_s3():
    """moto's in-process S3 (``mock_aws``) with fake credentials and a bucket ``bkt``; yields a boto3 client.
    The pipeline's cached S3 clients are dropped before and after, so they talk to the mock."""
    moto = pytest.importorskip("moto")
    import boto3

    from pipeline import storage
    from tests.pipeline.s3server import fake_aws_env

    with fake_aws_env(), moto.mock_aws():
        storage.client.cache_clear()
        try:
            client = boto3.client("s3", region_name="us-east-1")
            client.create_bucket(Bucket="bkt")
            yield client
        finally:
            storage.client.cache_clear()
