"""Sources: which videos a run processes (driver side), listed once with their fingerprints.

:func:`list_videos` gives :data:`LISTED_SCHEMA` (``video_id``, ``video_uri``, ``questions``, ``video_etag``): an
``input.s3_prefix`` listed through :func:`pipeline.storage.list_objects` (``ListObjectsV2``: the ETag comes with
the listing), an ``input.local_dir`` walked by :func:`walk` (each real file once, at any depth; what it cannot
list is counted in a :class:`ListingReport`), or a manifest (Parquet / JSONL / CSV). It is the graph's input:
the listing's fingerprint travels with each video (read once; the fetch reports it as the row's ``video_etag``).

``video_id`` is stable: the manifest's value when it has one, else ``sha1(video_uri)[:16]``.
"""

from __future__ import annotations

import csv
import errno
import hashlib
import io
import json
import logging
import os
import stat
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from pipeline import storage
from pipeline.schema import VIDEO_SCHEMA

log = logging.getLogger(__name__)

CHUNK_ROWS = 50_000


class SourceError(ValueError):
    """The input cannot be listed or read at all (bad manifest, empty prefix, missing folder)."""


def video_id_for(uri: str) -> str:
    """The stable id of a video without a manifest id: the first 16 hex digits of sha1(uri)."""
    return hashlib.sha1(uri.encode("utf-8")).hexdigest()[:16]


def _has_ext(name: str, extensions: list[str]) -> bool:
    lowered = name.lower()
    return any(lowered.endswith(ext) for ext in extensions)


def _chunked(rows_iter, chunk: int = CHUNK_ROWS) -> Iterator[pa.Table]:
    buf: list[dict] = []
    for row in rows_iter:
        buf.append(row)
        if len(buf) >= chunk:
            yield pa.Table.from_pylist(buf, schema=LISTED_SCHEMA)
            buf = []
    if buf:
        yield pa.Table.from_pylist(buf, schema=LISTED_SCHEMA)


# ------------------------------------------------------------------------------------------------ listing


_ACCESS_DENIED = ("403", "AccessDenied", "Forbidden")
#: the video list plus each object's fingerprint at listing time (pipeline.storage.etag_of; null when unknown)
LISTED_SCHEMA = VIDEO_SCHEMA.append(pa.field("video_etag", pa.string()))


def list_entries(input_cfg, s3_cfg=None, report: ListingReport | None = None) -> Iterator[storage.Entry]:
    """The objects of ``input.s3_prefix`` or ``input.local_dir`` with a video extension (see :func:`walk` for
    local folders: what it cannot list is counted in ``report`` and logged)."""
    if input_cfg.s3_prefix:
        bucket = storage.split_uri(input_cfg.s3_prefix)[0]
        try:
            yield from storage.list_objects(input_cfg.s3_prefix, s3_cfg, input_cfg.extensions)
        except Exception as exc:  # botocore ClientError; anything but a 403 propagates as it is
            code = storage.error_code(exc)
            if code not in _ACCESS_DENIED:
                raise
            raise SourceError(f"input.s3_prefix {input_cfg.s3_prefix}: access denied listing bucket {bucket!r} "
                              f"({code}): the credentials may not list it (s3:ListBucket)") from exc
        return
    root = Path(input_cfg.local_dir).expanduser()
    if not root.is_dir():
        raise SourceError(f"input.local_dir {input_cfg.local_dir!r} is not a folder")
    report = ListingReport() if report is None else report
    yield from storage.list_objects(os.path.realpath(root), s3_cfg, input_cfg.extensions,
                                    walk=lambda r, _folders: walk(r, input_cfg.extensions, report))
    if report.skipped:
        log.warning("input.local_dir %s: %d files listed; not listed: %s", input_cfg.local_dir, report.listed,
                    "; ".join(report.lines()))


def _listed_rows(entries: Iterator[storage.Entry]) -> Iterator[dict]:
    for e in entries:
        yield {"video_id": video_id_for(e.uri), "video_uri": e.uri, "questions": None, "video_etag": e.etag}


# ------------------------------------------------------------------------------------------------ manifests


def _read_bytes(uri: str, s3_cfg) -> bytes:
    if not storage.is_s3(uri) and not Path(uri).expanduser().is_file():
        raise SourceError(f"manifest {uri} does not exist")
    try:
        return storage.read_bytes(uri, s3_cfg)
    except Exception as exc:  # botocore errors have no common importable base worth depending on
        raise SourceError(f"cannot read manifest {uri}: {exc}") from exc


def _parse_questions(value, where: str) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return None
        if text.startswith("["):
            try:
                parsed = json.loads(text)
            except json.JSONDecodeError as exc:
                raise SourceError(f"{where}: questions is not a JSON list: {exc}") from exc
            value = parsed
        else:
            return [q.strip() for q in text.split("|") if q.strip()]
    if isinstance(value, (list, tuple)):
        return [str(q) for q in value if q is not None and str(q).strip()]
    raise SourceError(f"{where}: questions must be a list of strings, got {type(value).__name__}")


def read_manifest_rows(uri: str, s3_cfg=None) -> list[dict]:
    """Raw manifest rows (dicts) from Parquet, JSONL (or a JSON list) or CSV."""
    data = _read_bytes(uri, s3_cfg)
    lower = uri.lower()
    if lower.endswith(".parquet"):
        import pyarrow.parquet as pq

        return pq.read_table(io.BytesIO(data)).to_pylist()
    if lower.endswith((".jsonl", ".json", ".ndjson")):
        text = data.decode("utf-8")
        if text.lstrip().startswith("["):
            return list(json.loads(text))
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise SourceError(f"manifest {uri} line {n}: not JSON: {exc}") from exc
        return rows
    if lower.endswith(".csv"):
        return list(csv.DictReader(io.StringIO(data.decode("utf-8"))))
    raise SourceError(f"manifest {uri}: unknown format (use .parquet, .jsonl or .csv)")


def manifest_source(uri: str, s3_cfg=None) -> Iterator[pa.Table]:
    """Rows of a manifest; relative local paths are resolved against the manifest's folder
    (:func:`pipeline.storage.resolve_relative`)."""
    raw = read_manifest_rows(uri, s3_cfg)
    seen: set[str] = set()
    rows = []
    for n, r in enumerate(raw, 1):
        if not isinstance(r, dict):
            raise SourceError(f"manifest {uri} row {n}: expected an object, got {type(r).__name__}")
        video_uri = r.get("video_uri")
        if not video_uri or not isinstance(video_uri, str):
            raise SourceError(f"manifest {uri} row {n}: missing video_uri")
        video_uri = storage.resolve_relative(video_uri, uri)
        vid = r.get("video_id")
        vid = str(vid) if vid not in (None, "") else video_id_for(video_uri)
        if vid in seen:
            raise SourceError(f"manifest {uri} row {n}: duplicate video_id {vid!r}")
        seen.add(vid)
        rows.append({"video_id": vid, "video_uri": video_uri, "video_etag": None,
                     "questions": _parse_questions(r.get("questions"), f"manifest {uri} row {n}")})
    yield from _chunked(iter(rows))


# ------------------------------------------------------------------------------------------------ entry


def list_videos(input_cfg, s3_cfg=None, report: ListingReport | None = None, etags: bool = False) -> pa.Table:
    """All videos of the run (:data:`LISTED_SCHEMA`), sorted by URI unless from a manifest, ``input.limit``
    applied. ``video_etag`` comes from the listing; for a manifest's videos (not listed) it is looked up only
    when ``etags`` is set (one ``HeadObject`` / ``stat`` each: the nightly job), else null."""
    if input_cfg.manifest:
        chunks = list(manifest_source(input_cfg.manifest, s3_cfg))
    else:
        chunks = list(_chunked(_listed_rows(list_entries(input_cfg, s3_cfg, report))))
    table = pa.concat_tables(chunks) if chunks else LISTED_SCHEMA.empty_table()
    if not input_cfg.manifest:
        table = table.sort_by("video_uri")
    if input_cfg.limit is not None:
        table = table.slice(0, input_cfg.limit)
    if etags and input_cfg.manifest:
        found = pa.array([storage.stat_etag(u, s3_cfg) for u in table.column("video_uri").to_pylist()], pa.string())
        table = table.set_column(table.schema.get_field_index("video_etag"), "video_etag", found)
    log.info("input: %d videos", table.num_rows)
    return table


# ------------------------------------------------------------------------------------------------ local folders


EXAMPLES = 5  # example paths kept per reason


@dataclass
class ListingReport:
    """What a listing saw but did not list: ``skipped[reason]`` counts, ``examples[reason]`` a few paths."""

    listed: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def skip(self, reason: str, path: str, warn: bool = False, detail: str = "") -> None:
        self.skipped[reason] += 1
        shown = self.examples.setdefault(reason, [])
        if len(shown) < EXAMPLES:
            shown.append(printable(path))
        if warn:
            log.warning("input: %s: %s%s", reason, printable(path), f" ({detail})" if detail else "")

    def lines(self) -> list[str]:
        return [f"{reason}: {n} (e.g. {', '.join(self.examples.get(reason, []))})" for reason, n in sorted(self.skipped.items())]


def printable(path: str) -> str:
    """A path for a log line or a message (undecodable bytes shown as ``\\xNN``)."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def walk(root: str, extensions: list[str], report: ListingReport) -> Iterator[tuple[str, os.stat_result | None]]:
    """``(path, stat)`` of the matching files under ``root`` (``root`` + relative names), each real file once:
    a symlink or hard link to a listed file is a duplicate, symlinked folders are followed without looping, and
    folders are opened with directory descriptors (no ``PATH_MAX`` limit)."""
    exts = tuple(e.lower() for e in extensions)
    seen_dirs: set[tuple[int, int]] = set()
    seen_files: dict[tuple[int, int], str] = {}
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    st = os.fstat(fd)
    seen_dirs.add((st.st_dev, st.st_ino))
    try:
        yield from _walk_dir(fd, root.rstrip("/") or "/", exts, seen_dirs, seen_files, report)
    finally:
        os.close(fd)


def _walk_dir(fd: int, path: str, exts: tuple[str, ...], seen_dirs, seen_files, report: ListingReport) -> Iterator[str]:
    try:
        with os.scandir(fd) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError as exc:
        report.skip(_reason(exc, "folders that could not be read"), path, warn=True, detail=exc.strerror or str(exc))
        return
    for entry in entries:
        full = f"{path}/{entry.name}" if path != "/" else f"/{entry.name}"
        try:
            st = os.stat(entry.name, dir_fd=fd)  # follows symlinks
        except OSError as exc:
            if entry.name.lower().endswith(exts):
                if exc.errno in (errno.EACCES, errno.EPERM):  # listed; reading it is denied -> access_denied row
                    report.listed += 1
                    yield full, None
                else:
                    report.skip("broken symlinks" if entry.is_symlink() else "unreadable entries", full, warn=True,
                                detail=exc.strerror or str(exc))
            continue
        if stat.S_ISDIR(st.st_mode):
            key = (st.st_dev, st.st_ino)
            if key in seen_dirs:
                if entry.is_symlink():
                    report.skip("symlinked folders already listed", full)
                continue
            seen_dirs.add(key)
            try:
                sub = os.open(entry.name, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=fd)
            except OSError as exc:
                report.skip(_reason(exc, "folders that could not be read"), full, warn=True, detail=exc.strerror or str(exc))
                continue
            try:
                yield from _walk_dir(sub, full, exts, seen_dirs, seen_files, report)
            finally:
                os.close(sub)
        elif entry.name.lower().endswith(exts):
            if not stat.S_ISREG(st.st_mode):
                report.skip("not regular files (FIFO, socket, device)", full, warn=True)
                continue
            key = (st.st_dev, st.st_ino)
            if key in seen_files:
                report.skip("duplicates (a symlink or hard link to a listed file)", full)
                log.info("input: %s is the same file as %s; listed once", printable(full), printable(seen_files[key]))
                continue
            seen_files[key] = full
            report.listed += 1
            yield full, st


def _reason(exc: OSError, default: str) -> str:
    if exc.errno in (errno.EACCES, errno.EPERM):
        return "folders not readable (permission denied)"
    return default
