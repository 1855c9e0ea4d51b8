"""Fetch a video's bytes (S3 or local) for the decode stage; every failure is a :class:`VideoError`.

Contract::

    fetched = fetch(uri, decode_cfg, s3_cfg, etag=None)   # pipeline.config.DecodeConfig / S3Config
    fetched.source()                    # a fresh BytesIO over the bytes, or a path a decoder can open
    fetched.cleanup()                   # always, when done

* The ETag is read once, at listing, and carried in the video's row: ``etag`` given, it is the one reported;
  only a video listed without one (a manifest row) takes it from the GET (S3) or the file's ``mtime-size``.

* Memory is bounded: a file larger than ``max_video_bytes`` is never read (``too_large``); one larger than
  ``in_memory_bytes`` is decoded from disk: a local file through its open descriptor
  (``/proc/self/fd/N``), an S3 object from an anonymous spool file (``O_TMPFILE``: it has no name, so
  nothing is left behind however the process dies).
* Local files are opened once, before anything else, and read through that descriptor: a file the job
  may not read is ``access_denied`` (permanent: a re-run does not retry it), a missing one ``not_found``,
  an I/O error ``fetch_failed`` (transient). Paths longer than ``PATH_MAX`` and ``file://`` URIs with
  percent-encoded bytes (non-UTF-8 names) open like any other (:mod:`pipeline.storage`).
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
    """Video bytes in memory (``data``), or an open file (``file``) decoded through ``path``."""

    size: int
    etag: str | None
    data: bytes | None = None
    path: str | None = None
    file: IO[bytes] | None = None

    def source(self):
        return io.BytesIO(self.data) if self.data is not None else self.path

    def head(self, n: int = 4096) -> bytes:
        if self.data is not None:
            return self.data[:n]
        assert self.file is not None
        return os.pread(self.file.fileno(), n, 0)

    def cleanup(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


def _fd_path(f: IO[bytes]) -> str:
    """A path that opens the same file as ``f`` (Linux ``/proc``; elsewhere the file's own name)."""
    if os.path.isdir("/proc/self/fd"):
        return f"/proc/self/fd/{f.fileno()}"
    return f.name  # type: ignore[return-value]


_CREDENTIAL_ERRORS = ("SignatureDoesNotMatch", "InvalidAccessKeyId", "InvalidToken", "ExpiredToken",
                      "TokenRefreshRequired")


def _s3_error(exc: Exception, uri: str) -> VideoError:
    code = storage.error_code(exc)
    if code in ("404", "NoSuchKey", "NotFound", "NoSuchBucket"):
        return VideoError("not_found", f"{uri}: object does not exist ({code})")
    if code in ("403", "AccessDenied", "Forbidden"):
        return VideoError("access_denied", f"{uri}: access denied ({code})")
    if code in _CREDENTIAL_ERRORS:  # the credentials themselves are wrong: no object can be read with them
        return VideoError("access_denied", f"{uri}: S3 rejected the credentials ({code}); check the AWS "
                          "credentials of the decode workers")
    return VideoError("fetch_failed", f"{uri}: {type(exc).__name__}: {exc}")


def _local_error(exc: OSError, uri: str) -> VideoError:
    why = exc.strerror or str(exc)
    if exc.errno in (errno.ENOENT, errno.ENOTDIR):
        return VideoError("not_found", f"{uri}: file does not exist ({why})")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return VideoError("access_denied", f"{uri}: permission denied: the job may not read this file")
    if exc.errno == errno.ELOOP:
        return VideoError("not_found", f"{uri}: a symlink loop, no file ({why})")
    if exc.errno in (errno.EISDIR, errno.ENXIO):
        return VideoError("not_found", f"{uri}: not a regular file ({why})")
    if exc.errno == errno.ENAMETOOLONG:
        return VideoError("invalid_uri", f"{uri}: a name in this path is too long ({why})")
    return VideoError("fetch_failed", f"{uri}: cannot read the file: {why}")


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
        return
    if _SCHEME.match(uri) and not uri.startswith("file://"):
        raise VideoError("invalid_uri", f"{uri}: unsupported scheme (use s3://, file:// or a path)")


def fetch(uri: str, settings, s3_cfg=None, etag: str | None = None) -> Fetched:
    """Get the video's bytes (or an open file to decode from); raises :class:`VideoError`.

    ``settings``: the decode section (``max_video_bytes``, ``in_memory_bytes``, ``spool_dir``); ``s3_cfg``: the S3
    section (None: defaults); ``etag``: the listing's, when it had one."""
    check_uri(uri)
    fetched = _fetch_s3(uri, settings, s3_cfg) if storage.is_s3(uri) else _fetch_local(uri, settings)
    if etag:
        fetched.etag = etag
    return fetched


def _fetch_s3(uri: str, settings, s3_cfg) -> Fetched:
    bucket, key = storage.split_uri(uri)
    try:
        resp = storage.client(s3_cfg).get_object(Bucket=bucket, Key=key)
    except Exception as exc:  # botocore ClientError / EndpointConnectionError / ...
        raise _s3_error(exc, uri) from exc
    body = resp["Body"]
    size = int(resp["ContentLength"])
    etag = storage.etag_of(s3_etag=resp.get("ETag", ""))
    try:
        _check_size(uri, size, settings)  # before reading a byte of the body
        if size <= settings.in_memory_bytes:
            data = body.read()
            if len(data) != size:
                raise VideoError("fetch_failed", f"{uri}: got {len(data)} of {size} bytes")
            return Fetched(size=size, etag=etag, data=data)
        if os.path.isdir("/proc/self/fd"):  # Linux: O_TMPFILE, no name to leave behind; decoded via /proc/self/fd
            spool = tempfile.TemporaryFile(dir=settings.spool_dir)
        else:  # elsewhere a named file, removed on close
            spool = tempfile.NamedTemporaryFile(dir=settings.spool_dir, suffix=os.path.splitext(key)[1])
        try:
            for chunk in body.iter_chunks(8 * 1024 * 1024):
                spool.write(chunk)
            spool.flush()
        except BaseException:
            spool.close()
            raise
        return Fetched(size=size, etag=etag, path=_fd_path(spool), file=spool)
    except VideoError:
        raise
    except Exception as exc:
        raise _s3_error(exc, uri) from exc
    finally:
        body.close()


def _fetch_local(uri: str, settings) -> Fetched:
    path = storage.path_of(uri)
    try:
        fd = storage.open_file(path)
    except OSError as exc:
        raise _local_error(exc, uri) from exc
    f = os.fdopen(fd, "rb")
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise VideoError("not_found", f"{uri}: not a regular file")
        _check_size(uri, st.st_size, settings)
        etag = storage.etag_of(st)
        if st.st_size > settings.in_memory_bytes:
            return Fetched(size=st.st_size, etag=etag, path=_fd_path(f), file=f)
        try:
            data = f.read()
        except OSError as exc:
            raise _local_error(exc, uri) from exc
        f.close()
        return Fetched(size=st.st_size, etag=etag, data=data)
    except BaseException:
        f.close()
        raise


def _check_size(uri: str, size: int, settings) -> None:
    if size > settings.max_video_bytes:
        raise VideoError("too_large", f"{uri}: {size} bytes exceeds decode.max_video_bytes={settings.max_video_bytes}")
    if size == 0:
        raise VideoError("not_a_video", f"{uri}: empty file")
