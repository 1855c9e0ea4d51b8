"""A real S3 API for tests: moto's threaded server on 127.0.0.1 at a free port, with fake credentials."""

from __future__ import annotations

import contextlib
import os

FAKE_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}


@contextlib.contextmanager
def fake_aws_env(values: dict[str, str] | None = None):
    """Set fake credentials (default FAKE_ENV; inherited by Ray workers started afterwards); restore on exit."""
    values = FAKE_ENV if values is None else values
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def moto_server():
    """Yield the endpoint URL of a running moto S3 server (port 0: the OS picks a free one)."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def boto_client(endpoint: str):
    import boto3

    return boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")


def upload_dir(client, local_dir, bucket: str, prefix: str) -> None:
    from pathlib import Path

    root = Path(local_dir)
    for p in sorted(root.rglob("*")):
        if p.is_file():
            client.upload_file(str(p), bucket, prefix.rstrip("/") + "/" + str(p.relative_to(root)))
