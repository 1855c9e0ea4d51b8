"""S3 access: one boto3 client factory (endpoint override, adaptive retries), URI helpers, the
pyarrow filesystem for the Parquet sink, and the once-per-node copy of an ``s3://`` model checkpoint.
"""

from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class S3Settings:
    """Picklable client settings (the fields of :class:`pipeline.config.S3Config`)."""

    endpoint_url: str | None = None
    region: str | None = "us-east-1"
    max_attempts: int = 8
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 60.0

    @classmethod
    def from_config(cls, cfg) -> S3Settings:
        return cls(cfg.endpoint_url, cfg.region, cfg.max_attempts, cfg.connect_timeout_s, cfg.read_timeout_s)


def split_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/key/parts`` -> ``("bucket", "key/parts")``."""
    if not uri.startswith("s3://"):
        raise ValueError(f"not an s3:// URI: {uri!r}")
    rest = uri[len("s3://") :]
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise ValueError(f"no bucket in {uri!r}")
    return bucket, key


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


@lru_cache(maxsize=8)
def client(settings: S3Settings = S3Settings()):
    """A boto3 S3 client (cached per process and settings; boto3 clients are thread-safe)."""
    import boto3
    from botocore.config import Config

    cfg = Config(
        retries={"max_attempts": settings.max_attempts, "mode": "adaptive"},
        connect_timeout=settings.connect_timeout_s,
        read_timeout=settings.read_timeout_s,
        max_pool_connections=32,
    )
    return boto3.session.Session().client(
        "s3", endpoint_url=settings.endpoint_url, region_name=settings.region, config=cfg
    )


def pyarrow_filesystem(settings: S3Settings):
    """A pyarrow S3 filesystem with the same endpoint and region (credentials from the usual AWS chain)."""
    from pyarrow import fs

    kwargs: dict = {"region": settings.region or "us-east-1", "retry_strategy": fs.AwsStandardS3RetryStrategy(max_attempts=settings.max_attempts)}
    if settings.endpoint_url:
        scheme, _, host = settings.endpoint_url.partition("://")
        kwargs["endpoint_override"] = host.rstrip("/")
        kwargs["scheme"] = scheme
        kwargs["allow_bucket_creation"] = True
    return fs.S3FileSystem(**kwargs)


def error_code(exc: BaseException) -> str | None:
    """The S3 error code of a botocore ``ClientError`` (``NoSuchKey``, ``404``, ``AccessDenied``...)."""
    response = getattr(exc, "response", None)
    if isinstance(response, dict):
        code = response.get("Error", {}).get("Code")
        return str(code) if code else None
    return None


# ------------------------------------------------------------------------------------------------
# Model checkpoints under s3://: copied once per node


def cache_path_for(uri: str, cache_dir: str | Path) -> Path:
    digest = hashlib.sha256(uri.rstrip("/").encode()).hexdigest()[:16]
    name = uri.rstrip("/").rsplit("/", 1)[-1] or "model"
    return Path(os.path.expanduser(str(cache_dir))) / f"{name}-{digest}"


def download_prefix(uri: str, dest: Path, settings: S3Settings) -> int:
    """Copy every object under ``uri`` to ``dest`` (keys relative to the prefix); returns the count."""
    bucket, prefix = split_uri(uri.rstrip("/") + "/")
    s3 = client(settings)
    count = 0
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            rel = obj["Key"][len(prefix) :]
            if not rel or rel.endswith("/"):
                continue
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(target.name + ".part")
            s3.download_file(bucket, obj["Key"], str(tmp))
            tmp.replace(target)
            count += 1
    return count


def ensure_local_model(source: str, cache_dir: str | Path, settings: S3Settings) -> str:
    """Return a local path (or hub id) for ``source``; an ``s3://`` prefix is copied once per node.

    Concurrent actors on one node serialise on a file lock; the first copies, the others find the
    ``.complete`` marker and reuse the copy.
    """
    if not is_s3(source):
        return source
    dest = cache_path_for(source, cache_dir)
    dest.parent.mkdir(parents=True, exist_ok=True)
    marker = dest / ".complete"
    if marker.exists():
        return str(dest)
    lock_path = dest.parent / (dest.name + ".lock")
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            if marker.exists():
                return str(dest)
            t0 = time.perf_counter()
            dest.mkdir(parents=True, exist_ok=True)
            n = download_prefix(source, dest, settings)
            if n == 0:
                raise FileNotFoundError(f"no objects under model prefix {source}")
            marker.write_text(source + "\n")
            log.info("copied %d model files from %s to %s in %.1fs", n, source, dest, time.perf_counter() - t0)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    return str(dest)
