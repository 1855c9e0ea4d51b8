"""Sources: which videos a run processes (driver side), listed once with their fingerprints.

:func:`list_videos` gives :data:`LISTED_SCHEMA`: an ``input.s3_prefix`` (``ListObjectsV2``: the ETag comes with the
listing), an ``input.local_dir`` (:func:`walk`: each real file once, at any depth; what it cannot list is counted in
a :class:`ListingReport`), or a manifest (Parquet / JSONL / CSV). The listing's fingerprint travels with each video
(the fetch reports it as ``video_etag``). ``video_id``: the manifest's value, else ``sha1(video_uri)[:16]``.
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


class SourceError(ValueError):
    """The input cannot be listed or read at all (bad manifest, empty prefix, missing folder)."""


#: the video list plus each object's fingerprint at listing time (pipeline.storage.etag_of; null when unknown)
LISTED_SCHEMA = VIDEO_SCHEMA.append(pa.field("video_etag", pa.string()))


def video_id_for(uri: str) -> str:
    """The stable id of a video without a manifest id: the first 16 hex digits of sha1(uri)."""
    return hashlib.sha1(uri.encode("utf-8")).hexdigest()[:16]


def list_entries(input_cfg, s3_cfg=None, report: ListingReport | None = None) -> Iterator[storage.Entry]:
    """The objects of ``input.s3_prefix`` or ``input.local_dir`` with a video extension (see :func:`walk` for
    local folders: what it cannot list is counted in ``report`` and logged)."""
    if input_cfg.s3_prefix:
        try:
            yield from storage.list_objects(input_cfg.s3_prefix, s3_cfg, input_cfg.extensions)
        except Exception as exc:  # botocore ClientError; anything but a 403 propagates as it is
            if (code := storage.error_code(exc)) not in storage.DENIED:
                raise
            raise SourceError(f"input.s3_prefix {input_cfg.s3_prefix}: access denied listing bucket "
                              f"{storage.split_uri(input_cfg.s3_prefix)[0]!r} ({code}): the credentials may not list "
                              "it (s3:ListBucket)") from exc
        return
    root = Path(input_cfg.local_dir).expanduser()
    if not root.is_dir():
        raise SourceError(f"input.local_dir {input_cfg.local_dir!r} is not a folder")
    report = ListingReport() if report is None else report
    for path, st in walk(os.path.realpath(root), input_cfg.extensions, report):
        yield storage.Entry(storage.uri_for(path), st.st_size if st else 0, storage.etag_of(st))  # st None: unreadable
    if report.skipped:
        log.warning("input.local_dir %s: %d files listed; not listed: %s", input_cfg.local_dir, report.listed,
                    "; ".join(f"{reason}: {n} (e.g. {', '.join(report.examples.get(reason, []))})"
                              for reason, n in sorted(report.skipped.items())))


# ------------------------------------------------------------------------------------------------ manifests


def _parse_questions(value, where: str) -> list[str] | None:
    if isinstance(value, str):
        text = value.strip()
        if not text.startswith("["):
            return [q.strip() for q in text.split("|") if q.strip()] or None
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise SourceError(f"{where}: questions is not a JSON list: {exc}") from exc
    if value is None or isinstance(value, (list, tuple)):
        return None if value is None else [str(q) for q in value if q is not None and str(q).strip()]
    raise SourceError(f"{where}: questions must be a list of strings, got {type(value).__name__}")


def read_manifest_rows(uri: str, s3_cfg=None) -> list[dict]:
    """Raw manifest rows (dicts) from Parquet, JSONL (or a JSON list) or CSV."""
    if not storage.is_s3(uri) and not Path(uri).expanduser().is_file():
        raise SourceError(f"manifest {uri} does not exist")
    try:
        data = storage.read_bytes(uri, s3_cfg)
    except Exception as exc:  # botocore errors have no common importable base worth depending on
        raise SourceError(f"cannot read manifest {uri}: {exc}") from exc
    lower = uri.lower()
    if lower.endswith(".parquet"):
        import pyarrow.parquet as pq

        return pq.read_table(io.BytesIO(data)).to_pylist()
    if lower.endswith(".csv"):
        return list(csv.DictReader(io.StringIO(data.decode("utf-8"))))
    if not lower.endswith((".jsonl", ".json", ".ndjson")):
        raise SourceError(f"manifest {uri}: unknown format (use .parquet, .jsonl or .csv)")
    text = data.decode("utf-8")
    if text.lstrip().startswith("["):
        return list(json.loads(text))
    rows = []
    for n, line in enumerate(text.splitlines(), 1):
        try:
            rows += [json.loads(line)] if line.strip() else []
        except json.JSONDecodeError as exc:
            raise SourceError(f"manifest {uri} line {n}: not JSON: {exc}") from exc
    return rows


def manifest_source(uri: str, s3_cfg=None) -> pa.Table:
    """The videos of a manifest (:data:`LISTED_SCHEMA`, ``video_etag`` null); relative local paths are resolved
    against the manifest's folder (:func:`pipeline.storage.resolve_relative`)."""
    seen: set[str] = set()
    rows = []
    for n, r in enumerate(read_manifest_rows(uri, s3_cfg), 1):
        where = f"manifest {uri} row {n}"
        if not isinstance(r, dict):
            raise SourceError(f"{where}: expected an object, got {type(r).__name__}")
        if not r.get("video_uri") or not isinstance(r["video_uri"], str):
            raise SourceError(f"{where}: missing video_uri")
        video_uri = storage.resolve_relative(r["video_uri"], uri)
        vid = str(r["video_id"]) if r.get("video_id") not in (None, "") else video_id_for(video_uri)
        if vid in seen:
            raise SourceError(f"{where}: duplicate video_id {vid!r}")
        seen.add(vid)
        rows.append({"video_id": vid, "video_uri": video_uri, "video_etag": None,
                     "questions": _parse_questions(r.get("questions"), where)})
    return pa.Table.from_pylist(rows, schema=LISTED_SCHEMA)


# ------------------------------------------------------------------------------------------------ entry


def list_videos(input_cfg, s3_cfg=None, report: ListingReport | None = None, etags: bool = False) -> pa.Table:
    """All videos of the run (:data:`LISTED_SCHEMA`), sorted by URI unless from a manifest, ``input.limit``
    applied. ``video_etag`` comes from the listing; for a manifest's videos (not listed) it is looked up only
    when ``etags`` is set (one ``HeadObject`` / ``stat`` each: the nightly job), else null."""
    if input_cfg.manifest:
        table = manifest_source(input_cfg.manifest, s3_cfg)
    else:
        table = pa.Table.from_pylist([{"video_id": video_id_for(e.uri), "video_uri": e.uri, "questions": None,
                                       "video_etag": e.etag} for e in list_entries(input_cfg, s3_cfg, report)],
                                     schema=LISTED_SCHEMA).sort_by("video_uri")
    if input_cfg.limit is not None:
        table = table.slice(0, input_cfg.limit)
    if etags and input_cfg.manifest:
        found = pa.array([storage.stat_etag(u, s3_cfg) for u in table.column("video_uri").to_pylist()], pa.string())
        table = table.set_column(table.schema.get_field_index("video_etag"), "video_etag", found)
    log.info("input: %d videos", table.num_rows)
    return table


# ------------------------------------------------------------------------------------------------ local folders


@dataclass
class ListingReport:
    """What a listing saw but did not list: ``skipped[reason]`` counts, ``examples[reason]`` a few paths."""

    listed: int = 0
    skipped: Counter = field(default_factory=Counter)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def skip(self, reason: str, path: str, warn: bool = False, detail: str = "") -> None:
        self.skipped[reason] += 1
        shown = self.examples.setdefault(reason, [])
        if len(shown) < 5:
            shown.append(printable(path))
        if warn:
            log.warning("input: %s: %s%s", reason, printable(path), f" ({detail})" if detail else "")


def printable(path: str) -> str:
    """A path for a log line or a message (undecodable bytes shown as ``\\xNN``)."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


def walk(root: str, extensions: list[str], report: ListingReport) -> Iterator[tuple[str, os.stat_result | None]]:
    """``(path, stat)`` of the matching files under ``root`` (``root`` + relative names; stat None: listed but not
    readable), each real file once: a symlink or hard link to a listed file is a duplicate, symlinked folders are
    followed without looping, and folders are opened with directory descriptors (no ``PATH_MAX`` limit)."""
    fd = os.open(root, _DIR_FLAGS)
    st = os.fstat(fd)
    try:
        yield from _walk_dir(fd, root.rstrip("/"), tuple(e.lower() for e in extensions), {(st.st_dev, st.st_ino)}, {},
                             report)
    finally:
        os.close(fd)


def _walk_dir(fd: int, path: str, exts: tuple[str, ...], seen_dirs: set, seen_files: dict, report: ListingReport):
    def unreadable(exc: OSError, where: str, reason: str = "folders that could not be read") -> None:
        denied = exc.errno in (errno.EACCES, errno.EPERM)
        report.skip("folders not readable (permission denied)" if denied else reason, where, warn=True,
                    detail=exc.strerror or str(exc))

    try:
        with os.scandir(fd) as it:
            entries = sorted(it, key=lambda e: e.name)
    except OSError as exc:
        return unreadable(exc, path or "/")
    for entry in entries:
        full, wanted = f"{path}/{entry.name}", entry.name.lower().endswith(exts)
        try:
            st = os.stat(entry.name, dir_fd=fd)  # follows symlinks
        except OSError as exc:
            if wanted and exc.errno in (errno.EACCES, errno.EPERM):  # listed; reading it is denied -> access_denied row
                report.listed += 1
                yield full, None
            elif wanted:
                report.skip("broken symlinks" if entry.is_symlink() else "unreadable entries", full, warn=True,
                            detail=exc.strerror or str(exc))
            continue
        key = (st.st_dev, st.st_ino)
        if stat.S_ISDIR(st.st_mode):
            if key in seen_dirs:
                if entry.is_symlink():
                    report.skip("symlinked folders already listed", full)
                continue
            seen_dirs.add(key)
            try:
                sub = os.open(entry.name, _DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                unreadable(exc, full)
                continue
            try:
                yield from _walk_dir(sub, full, exts, seen_dirs, seen_files, report)
            finally:
                os.close(sub)
        elif not wanted:
            continue
        elif not stat.S_ISREG(st.st_mode):
            report.skip("not regular files (FIFO, socket, device)", full, warn=True)
        elif key in seen_files:
            report.skip("duplicates (a symlink or hard link to a listed file)", full)
            log.info("input: %s is the same file as %s; listed once", printable(full), printable(seen_files[key]))
        else:
            seen_files[key] = full
            report.listed += 1
            yield full, st
