"""Fetch a video's bytes (S3 or local); every failure is a :class:`VideoError`.

Contract::

    fetched = fetch(uri, decode_cfg, s3_cfg, etag=None)   # pipeline.config.DecodeConfig / S3Config
    fetched.source()                    # a fresh BytesIO over the bytes, or a path a decoder can open
    fetched.cleanup()                   # always, when done

* ``etag`` (the listing's) is the one reported; only a video listed without one takes it from the GET (S3) or the
  file's ``mtime-size``.
* Memory is bounded: a file larger than ``max_video_bytes`` is never read (``too_large``); one larger than
  ``in_memory_bytes`` is decoded from disk through ``/proc/self/fd/N`` (Linux): a local file's open descriptor, or
  an S3 object's anonymous spool file (``O_TMPFILE``: nothing is left behind however the process dies).
* A local file is opened once, first: one the job may not read is ``access_denied`` (permanent), a missing one
  ``not_found``, an I/O error ``fetch_failed`` (transient). Long paths and ``file://`` URIs of non-UTF-8 names open
  like any other (:mod:`pipeline.storage`).
"""

from __future__ import annotations

import errno
import io
import os
import re
import stat
import tempfile
from dataclasses import dataclass
from typing import IO

from pipeline import storage
from pipeline.media import VideoError


@dataclass
class Fetched:
    """Video bytes in memory (``data``), or an open file (``file``) decoded through its ``/proc/self/fd`` path."""

    size: int
    etag: str | None
    data: bytes | None = None
    file: IO[bytes] | None = None

    def source(self):
        return io.BytesIO(self.data) if self.data is not None else f"/proc/self/fd/{self.file.fileno()}"

    def head(self, n: int = 4096) -> bytes:
        return self.data[:n] if self.data is not None else os.pread(self.file.fileno(), n, 0)

    def cleanup(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


_CREDENTIALS = ("SignatureDoesNotMatch", "InvalidAccessKeyId", "InvalidToken", "ExpiredToken", "TokenRefreshRequired")
_LOCAL = {errno.ENOENT: ("not_found", "file does not exist"), errno.ENOTDIR: ("not_found", "file does not exist"),
          errno.EACCES: ("access_denied", "permission denied: the job may not read this file"),
          errno.EPERM: ("access_denied", "permission denied: the job may not read this file"),
          errno.ELOOP: ("not_found", "a symlink loop, no file"), errno.EISDIR: ("not_found", "not a regular file"),
          errno.ENXIO: ("not_found", "not a regular file"),
          errno.ENAMETOOLONG: ("invalid_uri", "a name in this path is too long")}


def _s3_error(exc: Exception, uri: str) -> VideoError:
    code = storage.error_code(exc)
    if code in storage.MISSING or code == "NoSuchBucket":
        return VideoError("not_found", f"{uri}: object does not exist ({code})")
    if code in storage.DENIED:
        return VideoError("access_denied", f"{uri}: access denied ({code})")
    if code in _CREDENTIALS:  # the credentials themselves are wrong: no object can be read with them
        return VideoError("access_denied", f"{uri}: S3 rejected the credentials ({code}); check the AWS "
                          "credentials of the decode workers")
    return VideoError("fetch_failed", f"{uri}: {type(exc).__name__}: {exc}")


def _local_error(exc: OSError, uri: str) -> VideoError:
    error_type, what = _LOCAL.get(exc.errno, ("fetch_failed", "cannot read the file"))
    return VideoError(error_type, f"{uri}: {what} ({exc.strerror or exc})")


_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:/")


def check_uri(uri) -> None:
    """Raise ``invalid_uri`` for a URI that names no object: ``s3://`` without bucket or key, ``s3:/x``,
    another scheme (``http://``, ``ftp://``), an empty string or a NUL byte."""
    if not isinstance(uri, str) or not uri.strip() or "\x00" in uri:
        raise VideoError("invalid_uri", f"{uri!r}: empty or not a string")
    if storage.is_s3(uri):
        bucket, _, key = uri[len("s3://"):].partition("/")
        if not bucket or not key or key.endswith("/"):
            raise VideoError("invalid_uri", f"{uri}: an s3:// URI needs a bucket and an object key")
    elif _SCHEME.match(uri) and not uri.startswith("file://"):
        raise VideoError("invalid_uri", f"{uri}: unsupported scheme (use s3://, file:// or a path)")


def fetch(uri: str, settings, s3_cfg=None, etag: str | None = None) -> Fetched:
    """Get the video's bytes (or an open file to decode from); raises :class:`VideoError`.

    ``settings``: the decode section (``max_video_bytes``, ``in_memory_bytes``, ``spool_dir``); ``s3_cfg``: the S3
    section (None: defaults); ``etag``: the listing's, when it had one."""
    check_uri(uri)
    fetched = _fetch_s3(uri, settings, s3_cfg) if storage.is_s3(uri) else _fetch_local(uri, settings)
    fetched.etag = etag or fetched.etag
    return fetched


def _fetch_s3(uri: str, settings, s3_cfg) -> Fetched:
    bucket, key = storage.split_uri(uri)
    try:
        resp = storage.client(s3_cfg).get_object(Bucket=bucket, Key=key)
    except Exception as exc:  # botocore ClientError / EndpointConnectionError / ...
        raise _s3_error(exc, uri) from exc
    body, size, etag = resp["Body"], int(resp["ContentLength"]), storage.etag_of(s3_etag=resp.get("ETag", ""))
    try:
        _check_size(uri, size, settings)  # before reading a byte of the body
        if size <= settings.in_memory_bytes:
            data = body.read()
            if len(data) != size:
                raise VideoError("fetch_failed", f"{uri}: got {len(data)} of {size} bytes")
            return Fetched(size=size, etag=etag, data=data)
        spool = tempfile.TemporaryFile(dir=settings.spool_dir)  # O_TMPFILE: no name to leave behind
        try:
            for chunk in body.iter_chunks(8 * 1024 * 1024):
                spool.write(chunk)
            spool.flush()
        except BaseException:
            spool.close()
            raise
        return Fetched(size=size, etag=etag, file=spool)
    except VideoError:
        raise
    except Exception as exc:
        raise _s3_error(exc, uri) from exc
    finally:
        body.close()


def _fetch_local(uri: str, settings) -> Fetched:
    try:
        f = os.fdopen(storage.open_file(storage.path_of(uri)), "rb")
    except OSError as exc:
        raise _local_error(exc, uri) from exc
    try:
        st = os.fstat(f.fileno())
        if not stat.S_ISREG(st.st_mode):
            raise VideoError("not_found", f"{uri}: not a regular file")
        _check_size(uri, st.st_size, settings)
        fetched = Fetched(size=st.st_size, etag=storage.etag_of(st), file=f)
        if st.st_size <= settings.in_memory_bytes:
            try:
                fetched.data = f.read()
            except OSError as exc:
                raise _local_error(exc, uri) from exc
            fetched.cleanup()
        return fetched
    except BaseException:
        f.close()
        raise


def _check_size(uri: str, size: int, settings) -> None:
    if size > settings.max_video_bytes:
        raise VideoError("too_large", f"{uri}: {size} bytes exceeds decode.max_video_bytes={settings.max_video_bytes}")
    if size == 0:
        raise VideoError("not_a_video", f"{uri}: empty file")
