"""Storage: the one module that reads and writes objects, on S3 or a local disk, named by URI (``s3://b/k``, a
local path, or ``file://`` + percent-encoded bytes for a local name that is not UTF-8).

* :func:`resolve` -> :class:`Location` (a ``pyarrow.fs`` filesystem, the path in it, the URI) for Parquet I/O;
  :func:`list_objects` (sizes, fingerprints), :func:`read_bytes`, :func:`put_if_absent` (S3 ``If-None-Match: *``;
  locally ``link()`` of a finished temp file), :func:`replace_if` (``body=None`` deletes; S3 ``If-Match`` on the
  ETag, locally a content hash under ``flock``).
* Clients: boto3 for what ``pyarrow.fs`` does not expose (ETags, conditional writes) and ``pyarrow.fs.S3FileSystem``
  for Parquet, both from one :class:`pipeline.config.S3Config` (endpoint, region, ``max_attempts``, timeouts; boto3
  in adaptive retry mode): S3 retries live in the client configuration only.
* One fingerprint (:func:`etag_of`: the S3 ETag, or ``<int mtime>-<size>``); one rule for relative paths in a
  manifest (:func:`resolve_relative`); local paths past ``PATH_MAX`` open one folder at a time (:func:`open_file`).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import urllib.parse
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple

log = logging.getLogger(__name__)

_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
_MISSING = ("NoSuchKey", "404", "NotFound")
_CONFLICT = ("PreconditionFailed", "412", "ConditionalRequestConflict", "409") + _MISSING


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def split_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/key/parts`` -> ``("bucket", "key/parts")``."""
    bucket, _, key = uri[len("s3://"):].partition("/") if is_s3(uri) else ("", "", "")
    if not bucket:
        raise ValueError(f"not an s3://bucket/... URI: {uri!r}")
    return bucket, key


def error_code(exc: BaseException) -> str | None:
    """The S3 error code of a botocore ``ClientError`` (``NoSuchKey``, ``404``, ``AccessDenied``...)."""
    response = getattr(exc, "response", None)
    code = response.get("Error", {}).get("Code") if isinstance(response, dict) else None
    return str(code) if code else None


def uri_for(path: str) -> str:
    """A local path as a URI: itself when its bytes are UTF-8, else ``file://`` + the percent-encoded bytes."""
    try:
        path.encode("utf-8")
        return path
    except UnicodeEncodeError:  # surrogate-escaped bytes of a non-UTF-8 name
        return "file://" + urllib.parse.quote(os.fsencode(path), safe="/")


def path_of(uri: str) -> str:
    """The local path a URI names (``file://`` URIs are percent-decoded, RFC 8089)."""
    if uri.startswith("file://"):
        return os.fsdecode(urllib.parse.unquote_to_bytes(uri[len("file://"):]))
    return uri


def resolve_relative(uri: str, base_uri: str) -> str:
    """``uri`` as written in a file at ``base_uri`` (a manifest): a relative local path is taken from the folder
    of a local ``base_uri``; an absolute path, an ``s3://`` URI or anything with a scheme (also a malformed one
    such as ``s3:/x``, which the fetch then reports as ``invalid_uri``) is kept as written."""
    if not uri or os.path.isabs(uri) or _SCHEME.match(uri) or is_s3(base_uri):
        return uri
    return os.path.join(os.path.dirname(os.path.abspath(os.path.expanduser(path_of(base_uri)))), uri)


_O_DIR = getattr(os, "O_PATH", os.O_RDONLY) | os.O_DIRECTORY | os.O_CLOEXEC


def open_file(path: str, flags: int = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK) -> int:
    """``os.open`` that also opens paths longer than ``PATH_MAX`` (raises ``OSError`` like ``os.open``).
    ``O_NONBLOCK`` by default: a FIFO named ``.mp4`` must not block the opener (regular files ignore it)."""
    try:
        return os.open(path, flags)
    except OSError as exc:
        if exc.errno != errno.ENAMETOOLONG:
            raise
    parts = [p for p in path.split("/") if p]
    fd = os.open("/" if path.startswith("/") else ".", _O_DIR)
    try:
        for part in parts[:-1]:
            nxt = os.open(part, _O_DIR, dir_fd=fd)
            os.close(fd)
            fd = nxt
        return os.open(parts[-1], flags, dir_fd=fd)
    finally:
        os.close(fd)


def etag_of(st: os.stat_result | None = None, s3_etag: str | None = None) -> str | None:
    """The fingerprint of an object: the S3 ETag without quotes, or ``<int mtime>-<size>`` of a local file."""
    if s3_etag is not None:
        return str(s3_etag).strip('"') or None
    return None if st is None else f"{int(st.st_mtime)}-{st.st_size}"


def stat_etag(uri: str, cfg=None) -> str | None:
    """The fingerprint of one object (``HeadObject`` / ``fstat``), or None when it cannot be read (the fetch
    then reports why, as an error row)."""
    try:
        if is_s3(uri):
            bucket, key = split_uri(uri)
            return etag_of(s3_etag=client(cfg).head_object(Bucket=bucket, Key=key)["ETag"])
        fd = open_file(path_of(uri), getattr(os, "O_PATH", os.O_RDONLY) | os.O_CLOEXEC)
    except Exception:  # noqa: BLE001 - missing or unreadable
        return None
    try:
        return etag_of(os.fstat(fd))
    finally:
        os.close(fd)


def _key(cfg) -> tuple:
    from pipeline.config import S3Config

    cfg = cfg or S3Config()
    return (cfg.endpoint_url, cfg.region, cfg.max_attempts, cfg.connect_timeout_s, cfg.read_timeout_s)


@lru_cache(maxsize=8)
def _client(key: tuple):
    import boto3
    from botocore.config import Config

    endpoint, region, attempts, connect_s, read_s = key
    conf = Config(retries={"max_attempts": attempts, "mode": "adaptive"}, connect_timeout=connect_s,
                  read_timeout=read_s, max_pool_connections=32)
    return boto3.session.Session().client("s3", endpoint_url=endpoint, region_name=region, config=conf)


def client(cfg=None):
    """A boto3 S3 client for ``cfg`` (an :class:`pipeline.config.S3Config`; cached per process and settings)."""
    return _client(_key(cfg))


client.cache_clear = _client.cache_clear  # type: ignore[attr-defined] - tests swap endpoints


def s3_filesystem(cfg=None):
    """A ``pyarrow.fs.S3FileSystem`` with the same endpoint, region, retries and timeouts as :func:`client`."""
    from pyarrow import fs

    endpoint, region, attempts, connect_s, read_s = _key(cfg)
    kwargs: dict = {"region": region or "us-east-1", "connect_timeout": connect_s, "request_timeout": read_s,
                    "retry_strategy": fs.AwsStandardS3RetryStrategy(max_attempts=attempts)}
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        kwargs.update(endpoint_override=host.rstrip("/"), scheme=scheme, allow_bucket_creation=True)
    return fs.S3FileSystem(**kwargs)


@dataclass(frozen=True)
class Location:
    """A folder or file: ``filesystem`` (pyarrow), ``path`` within it (no scheme), ``uri`` to show and re-resolve."""

    filesystem: object
    path: str
    uri: str

    def child(self, name: str) -> Location:
        return Location(self.filesystem, f"{self.path}/{name}", f"{self.uri}/{name}")

    @property
    def local(self) -> bool:
        return not is_s3(self.uri)


def resolve(uri: str, cfg=None) -> Location:
    """The :class:`Location` of ``uri``: S3 through ``pyarrow.fs.S3FileSystem`` or the local disk."""
    from pyarrow import fs

    if is_s3(uri):
        bucket, key = split_uri(uri.rstrip("/"))
        return Location(s3_filesystem(cfg), f"{bucket}/{key}".rstrip("/"), uri.rstrip("/"))
    local = os.path.abspath(os.path.expanduser(path_of(uri)))
    return Location(fs.LocalFileSystem(), local, local)



class Entry(NamedTuple):
    """One listed object: its URI, size in bytes and fingerprint (:func:`etag_of`)."""

    uri: str
    size: int
    etag: str | None


def list_objects(prefix_uri: str, cfg=None, suffixes: list[str] | None = None, walk=None,
                 folders: bool = False, page_size: int = 1000) -> Iterator[Entry]:
    """Every object under ``prefix_uri`` whose name ends with one of ``suffixes`` (any, when None).

    S3: ``ListObjectsV2`` pages in key order (sizes and ETags come with the listing; a botocore error
    propagates). Local: ``walk(root)`` yields ``(path, stat)`` (default: every file below ``root``, sorted); a
    missing folder lists nothing. ``folders=True`` adds folders (S3 folder markers, local folders) as URIs
    ending in ``/``."""
    ends = tuple(s.lower() for s in suffixes) if suffixes else None
    if is_s3(prefix_uri):
        bucket, prefix = split_uri(prefix_uri)
        for page in client(cfg).get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix,
                                                                       PaginationConfig={"PageSize": page_size}):
            for obj in page.get("Contents", []):
                key = obj["Key"]
                if (folders or not key.endswith("/")) and (ends is None or key.lower().endswith(ends)):
                    yield Entry(f"s3://{bucket}/{key}", int(obj.get("Size", 0)), etag_of(s3_etag=obj.get("ETag", "")))
        return
    root = resolve(prefix_uri).path
    for path, st in (walk or _walk_all)(root, folders):
        if ends is None or path.lower().endswith(ends):
            yield Entry(uri_for(path), st.st_size if st else 0, etag_of(st))  # st None: listed, not readable


def _walk_all(root: str, folders: bool = False) -> Iterator[tuple[str, os.stat_result]]:
    for folder, dirs, files in os.walk(root):
        dirs.sort()
        names = sorted(files) + (sorted(d + "/" for d in dirs) if folders else [])
        for name in names:
            path = os.path.join(folder, name)
            with contextlib.suppress(FileNotFoundError):
                yield path, os.stat(path)


def read_bytes(uri: str, cfg=None) -> bytes:
    """The bytes of one object (raises ``FileNotFoundError`` when it does not exist, else the client's error)."""
    return _read(uri, cfg)[0]


def read_json(uri: str, cfg=None):
    return json.loads(_read(uri, cfg)[0])


def read_versioned(uri: str, cfg=None) -> tuple[bytes, str] | None:
    """``(bytes, version)`` of an object, or None when it does not exist (see :func:`replace_if`)."""
    try:
        return _read(uri, cfg)
    except FileNotFoundError:
        return None


def _read(uri: str, cfg) -> tuple[bytes, str]:
    if is_s3(uri):
        bucket, key = split_uri(uri)
        try:
            resp = client(cfg).get_object(Bucket=bucket, Key=key)
        except Exception as exc:
            if error_code(exc) in _MISSING:
                raise FileNotFoundError(uri) from exc
            raise
        return resp["Body"].read(), resp["ETag"]
    with open(resolve(uri).path, "rb") as f:
        body = f.read()
    return body, hashlib.sha256(body).hexdigest()


def _local_tmp(path: str, body: bytes) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "wb") as f:
        f.write(body)
        f.flush()
        os.fsync(f.fileno())
    return tmp


def _s3_put(uri: str, body: bytes, cfg, **condition) -> str | None:
    bucket, key = split_uri(uri)
    try:
        return client(cfg).put_object(Bucket=bucket, Key=key, Body=body, **condition)["ETag"]
    except Exception as exc:
        if condition and error_code(exc) in _CONFLICT:
            return None
        raise


def put_if_absent(uri: str, body: bytes, cfg=None) -> str | None:
    """Create the object only if no object has the name: its version when this call created it, else None. Of
    racing callers exactly one wins. S3: ``PutObject`` with ``If-None-Match: *``; locally ``link()`` of a
    finished temp file (fails when the name exists; a reader never sees a partial object)."""
    if is_s3(uri):
        return _s3_put(uri, body, cfg, IfNoneMatch="*")
    path = resolve(uri).path
    tmp = _local_tmp(path, body)
    try:
        os.link(tmp, path)
        return hashlib.sha256(body).hexdigest()
    except FileExistsError:
        return None
    finally:
        os.unlink(tmp)


@contextlib.contextmanager
def local_mutex(path: str):
    """An exclusive ``flock`` on a sidecar file of ``path`` (processes of one host)."""
    import fcntl

    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.mutex"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def replace_if(uri: str, body: bytes | None, version: str, cfg=None) -> str | None:
    """Replace (``body=None``: delete) the object only if it is still ``version``: the new version (``""`` after
    a delete), or None when the object changed or is gone. S3: ``If-Match`` on the ETag; locally under ``flock``."""
    if is_s3(uri) and body is not None:
        return _s3_put(uri, body, cfg, IfMatch=version)
    if is_s3(uri):
        bucket, key = split_uri(uri)
        try:
            client(cfg).delete_object(Bucket=bucket, Key=key, IfMatch=version)
        except Exception as exc:
            if error_code(exc) in _CONFLICT:
                return None
            raise
        return ""
    path = resolve(uri).path
    with local_mutex(path):
        cur = read_versioned(path)
        if cur is None or cur[1] != version:
            return None
        if body is None:
            os.unlink(path)
            return ""
        os.replace(_local_tmp(path, body), path)
    return hashlib.sha256(body).hexdigest()


def delete(loc: Location, names: list[str]) -> None:
    """Delete files of a folder (missing ones are no error)."""
    for name in names:
        with contextlib.suppress(FileNotFoundError):
            loc.filesystem.delete_file(f"{loc.path}/{name}")
