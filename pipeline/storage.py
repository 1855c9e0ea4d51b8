"""Storage: the one module that reads and writes objects, on S3 or a local disk, named by URI (``s3://b/k``, a
local path, or ``file://`` + percent-encoded bytes for a local name that is not UTF-8).

:func:`resolve` gives a ``pyarrow.fs`` :class:`Location` (Parquet I/O, copies); boto3 does what ``pyarrow.fs`` does
not expose: listing with ETags (:func:`list_objects`), conditional writes (:func:`put_if_absent`, :func:`replace_if`;
locally ``link()`` and ``flock``). Both clients come from one :class:`pipeline.config.S3Config` (S3 retries live
there only). One fingerprint (:func:`etag_of`), one rule for relative paths in a manifest (:func:`resolve_relative`).
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

SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
MISSING = ("NoSuchKey", "404", "NotFound")
DENIED = ("403", "AccessDenied", "Forbidden")
_CONFLICT = ("PreconditionFailed", "412", "ConditionalRequestConflict", "409") + MISSING

log = logging.getLogger(__name__)


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
    return os.fsdecode(urllib.parse.unquote_to_bytes(uri[len("file://"):])) if uri.startswith("file://") else uri


def resolve_relative(uri: str, base_uri: str) -> str:
    """``uri`` as written in a file at ``base_uri`` (a manifest): a relative local path is taken from the folder
    of a local ``base_uri``; an absolute path or anything with a scheme (also a malformed one such as ``s3:/x``,
    which the fetch then reports as ``invalid_uri``) is kept as written."""
    if not uri or os.path.isabs(uri) or SCHEME.match(uri) or is_s3(base_uri):
        return uri
    return os.path.join(os.path.dirname(os.path.abspath(os.path.expanduser(path_of(base_uri)))), uri)


_O_DIR = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC


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
            fd, old = os.open(part, _O_DIR, dir_fd=fd), fd
            os.close(old)
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
        fd = open_file(path_of(uri), os.O_PATH | os.O_CLOEXEC)
    except Exception:  # noqa: BLE001 - missing or unreadable
        return None
    try:
        return etag_of(os.fstat(fd))
    finally:
        os.close(fd)


@lru_cache(maxsize=8)
def client(cfg=None):
    """A boto3 S3 client for ``cfg`` (a frozen :class:`pipeline.config.S3Config`; cached per process and settings;
    adaptive retries)."""
    import boto3
    from botocore.config import Config

    from pipeline.config import S3Config

    cfg = cfg or S3Config()
    conf = Config(retries={"max_attempts": cfg.max_attempts, "mode": "adaptive"}, connect_timeout=cfg.connect_timeout_s,
                  read_timeout=cfg.read_timeout_s, max_pool_connections=32)
    return boto3.session.Session().client("s3", endpoint_url=cfg.endpoint_url, region_name=cfg.region, config=conf)


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
    """The :class:`Location` of ``uri``: ``pyarrow.fs.S3FileSystem`` (the settings of :func:`client`) or the disk."""
    from pyarrow import fs

    if not is_s3(uri):
        local = os.path.abspath(os.path.expanduser(path_of(uri)))
        return Location(fs.LocalFileSystem(), local, local)
    from pipeline.config import S3Config

    c = cfg or S3Config()
    kwargs: dict = {"region": c.region or "us-east-1", "connect_timeout": c.connect_timeout_s,
                    "request_timeout": c.read_timeout_s,
                    "retry_strategy": fs.AwsStandardS3RetryStrategy(max_attempts=c.max_attempts)}
    if c.endpoint_url:
        scheme, _, host = c.endpoint_url.partition("://")
        kwargs.update(endpoint_override=host.rstrip("/"), scheme=scheme, allow_bucket_creation=True)
    bucket, key = split_uri(uri.rstrip("/"))
    return Location(fs.S3FileSystem(**kwargs), f"{bucket}/{key}".rstrip("/"), uri.rstrip("/"))


class Entry(NamedTuple):
    """One listed object: its URI, size in bytes and fingerprint (:func:`etag_of`)."""

    uri: str
    size: int
    etag: str | None


def list_objects(prefix_uri: str, cfg=None, suffixes: list[str] | None = None, folders: bool = False,
                 page_size: int = 1000) -> Iterator[Entry]:
    """Every object under ``prefix_uri`` whose name ends with one of ``suffixes`` (any, when None), in name order.

    S3: ``ListObjectsV2`` pages (sizes and ETags come with the listing; a botocore error propagates). Local: every
    file below the folder (``pyarrow.fs``; a missing folder lists nothing). ``folders=True`` adds folders (S3 folder
    markers, local folders) as URIs ending in ``/``."""
    ends = tuple(s.lower() for s in suffixes) if suffixes else ""
    if is_s3(prefix_uri):
        bucket, prefix = split_uri(prefix_uri)
        pages = client(cfg).get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix,
                                                                      PaginationConfig={"PageSize": page_size})
        for obj in (o for page in pages for o in page.get("Contents", [])):
            key = obj["Key"]
            if (folders or not key.endswith("/")) and key.lower().endswith(ends):
                yield Entry(f"s3://{bucket}/{key}", int(obj.get("Size", 0)), etag_of(s3_etag=obj.get("ETag", "")))
        return
    from pyarrow import fs

    loc = resolve(prefix_uri)
    infos = loc.filesystem.get_file_info(fs.FileSelector(loc.path, recursive=True, allow_not_found=True))
    for info in sorted(infos, key=lambda i: i.path):
        folder = info.type == fs.FileType.Directory
        if (folders or not folder) and info.path.lower().endswith(ends):
            etag = None if folder else f"{int(info.mtime.timestamp())}-{info.size}"
            yield Entry(uri_for(info.path) + ("/" if folder else ""), info.size or 0, etag)


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
    if not is_s3(uri):
        with open(resolve(uri).path, "rb") as f:
            body = f.read()
        return body, hashlib.sha256(body).hexdigest()
    bucket, key = split_uri(uri)
    try:
        resp = client(cfg).get_object(Bucket=bucket, Key=key)
    except Exception as exc:
        if error_code(exc) in MISSING:
            raise FileNotFoundError(uri) from exc
        raise
    return resp["Body"].read(), resp["ETag"]


def _local_tmp(path: str, body: bytes) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.{uuid.uuid4().hex[:8]}.tmp")
    with open(tmp, "wb") as f:
        f.write(body)
        f.flush()
        os.fsync(f.fileno())
    return tmp


def _s3_call(uri: str, cfg, method: str, **kwargs) -> dict | None:
    """A conditional S3 request; None when its condition failed (or the object is gone)."""
    bucket, key = split_uri(uri)
    try:
        return getattr(client(cfg), method)(Bucket=bucket, Key=key, **kwargs)
    except Exception as exc:
        if error_code(exc) in _CONFLICT:
            return None
        raise


def put_if_absent(uri: str, body: bytes, cfg=None) -> str | None:
    """Create the object only if no object has the name: its version when this call created it, else None. Of
    racing callers exactly one wins. S3: ``PutObject`` with ``If-None-Match: *``; locally ``link()`` of a
    finished temp file (fails when the name exists; a reader never sees a partial object)."""
    if is_s3(uri):
        resp = _s3_call(uri, cfg, "put_object", Body=body, IfNoneMatch="*")
        return resp and resp["ETag"]
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
        fcntl.flock(f, fcntl.LOCK_EX)  # released when the file is closed
        yield


def replace_if(uri: str, body: bytes | None, version: str, cfg=None) -> str | None:
    """Replace (``body=None``: delete) the object only if it is still ``version``: the new version (``""`` after
    a delete), or None when the object changed or is gone. S3: ``If-Match`` on the ETag; locally under ``flock``."""
    if is_s3(uri):
        if body is not None:
            resp = _s3_call(uri, cfg, "put_object", Body=body, IfMatch=version)
            return resp and resp["ETag"]
        return None if _s3_call(uri, cfg, "delete_object", IfMatch=version) is None else ""
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


def local_copy(source: str, cache_dir: str, cfg=None) -> str:
    """A local path for ``source``: an ``s3://`` prefix (a model checkpoint) is copied once per node to a folder of
    ``cache_dir`` (``pyarrow.fs.copy_files``, streamed; processes of one node serialise on :func:`local_mutex`, the
    first copies into a temp folder renamed into place, the others find the folder); anything else is returned as
    it is (a local path or a hub id)."""
    import shutil

    from pyarrow import fs

    if not is_s3(source):
        return source
    src = resolve(source, cfg)
    digest = hashlib.sha256(src.uri.encode()).hexdigest()[:16]
    dest = os.path.join(os.path.expanduser(str(cache_dir)), f"{src.uri.rsplit('/', 1)[-1] or 'model'}-{digest}")
    with local_mutex(dest):
        if not os.path.isdir(dest):
            tmp = f"{dest}.{uuid.uuid4().hex[:8]}.tmp"
            try:
                os.makedirs(tmp)
                fs.copy_files(src.path, tmp, source_filesystem=src.filesystem, destination_filesystem=fs.LocalFileSystem())
                if not os.path.isdir(tmp) or not os.listdir(tmp):
                    raise FileNotFoundError(f"no objects under model prefix {source}")
                os.rename(tmp, dest)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            log.info("copied the files of %s to %s", source, dest)
    return dest
