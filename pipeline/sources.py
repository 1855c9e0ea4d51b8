"""Sources: which videos a run processes (driver side).

Each source yields pyarrow tables of :data:`pipeline.schema.VIDEO_SCHEMA` (``video_id``, ``video_uri``,
``questions``) in chunks, so a prefix of millions of objects never becomes one giant Python list.

``video_id`` is stable: the manifest's value when it has one, else ``sha1(video_uri)[:16]``.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path

import pyarrow as pa

from pipeline import localfs, s3
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


def _table(rows: list[dict]) -> pa.Table:
    return pa.Table.from_pylist(rows, schema=VIDEO_SCHEMA)


def _chunked(rows_iter, chunk: int = CHUNK_ROWS) -> Iterator[pa.Table]:
    buf: list[dict] = []
    for row in rows_iter:
        buf.append(row)
        if len(buf) >= chunk:
            yield _table(buf)
            buf = []
    if buf:
        yield _table(buf)


# ------------------------------------------------------------------------------------------------ S3


_ACCESS_DENIED = ("403", "AccessDenied", "Forbidden")


def iter_s3_uris(prefix_uri: str, extensions: list[str], settings: s3.S3Settings, page_size: int = 1000) -> Iterator[str]:
    """Every ``s3://`` URI under the prefix with a matching extension, in key order (paginated)."""
    bucket, prefix = s3.split_uri(prefix_uri)
    paginator = s3.client(settings).get_paginator("list_objects_v2")
    try:
        for page in paginator.paginate(Bucket=bucket, Prefix=prefix, PaginationConfig={"PageSize": page_size}):
            for obj in page.get("Contents", []):
                key = obj["Key"]
                if not key.endswith("/") and _has_ext(key, extensions):
                    yield f"s3://{bucket}/{key}"
    except Exception as exc:  # botocore ClientError; anything but a 403 propagates as it is
        code = s3.error_code(exc)
        if code not in _ACCESS_DENIED:
            raise
        raise SourceError(f"input.s3_prefix {prefix_uri}: access denied listing bucket {bucket!r} ({code}): "
                          "the credentials may not list it (s3:ListBucket)") from exc


def s3_source(prefix_uri: str, extensions: list[str], settings: s3.S3Settings) -> Iterator[pa.Table]:
    rows = ({"video_id": video_id_for(u), "video_uri": u, "questions": None} for u in iter_s3_uris(prefix_uri, extensions, settings))
    yield from _chunked(rows)


# ------------------------------------------------------------------------------------------------ local


def local_source(folder: str, extensions: list[str], report: localfs.ListingReport | None = None) -> Iterator[pa.Table]:
    """Every matching file under ``folder`` once (see :func:`pipeline.localfs.walk`: symlinks and hard links
    to a listed file are not listed again; unreadable folders are counted in ``report`` and logged)."""
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise SourceError(f"input.local_dir {folder!r} is not a folder")
    report = localfs.ListingReport() if report is None else report
    uris = sorted(localfs.uri_for(p) for p in localfs.walk(os.path.realpath(root), extensions, report))
    if report.skipped:
        log.warning("input.local_dir %s: %d files listed; not listed: %s", folder, report.listed, "; ".join(report.lines()))
    rows = ({"video_id": video_id_for(u), "video_uri": u, "questions": None} for u in uris)
    yield from _chunked(rows)


# ------------------------------------------------------------------------------------------------ manifests


def _read_bytes(uri: str, settings: s3.S3Settings) -> bytes:
    if s3.is_s3(uri):
        bucket, key = s3.split_uri(uri)
        try:
            return s3.client(settings).get_object(Bucket=bucket, Key=key)["Body"].read()
        except Exception as exc:  # botocore errors have no common importable base worth depending on
            raise SourceError(f"cannot read manifest {uri}: {exc}") from exc
    path = Path(uri).expanduser()
    if not path.is_file():
        raise SourceError(f"manifest {uri} does not exist")
    return path.read_bytes()


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


def read_manifest_rows(uri: str, settings: s3.S3Settings) -> list[dict]:
    """Raw manifest rows (dicts) from Parquet, JSONL (or a JSON list) or CSV."""
    data = _read_bytes(uri, settings)
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


def manifest_source(uri: str, settings: s3.S3Settings, base_dir: str | None = None) -> Iterator[pa.Table]:
    """Rows of a manifest; relative local paths are resolved against the manifest's folder."""
    raw = read_manifest_rows(uri, settings)
    if base_dir is None and not s3.is_s3(uri):
        base_dir = str(Path(uri).expanduser().resolve().parent)
    seen: set[str] = set()
    rows = []
    for n, r in enumerate(raw, 1):
        if not isinstance(r, dict):
            raise SourceError(f"manifest {uri} row {n}: expected an object, got {type(r).__name__}")
        video_uri = r.get("video_uri")
        if not video_uri or not isinstance(video_uri, str):
            raise SourceError(f"manifest {uri} row {n}: missing video_uri")
        # relative paths are resolved against the manifest's folder; anything with a scheme ("s3:/x",
        # "http://") is kept as written, so the decode stage reports it as invalid_uri for this row only
        if (not s3.is_s3(video_uri) and base_dir and not os.path.isabs(video_uri)
                and not re.match(r"^[A-Za-z][A-Za-z0-9+.-]*:", video_uri)):
            video_uri = str(Path(base_dir) / video_uri)
        vid = r.get("video_id")
        vid = str(vid) if vid not in (None, "") else video_id_for(video_uri)
        if vid in seen:
            raise SourceError(f"manifest {uri} row {n}: duplicate video_id {vid!r}")
        seen.add(vid)
        rows.append({"video_id": vid, "video_uri": video_uri,
                     "questions": _parse_questions(r.get("questions"), f"manifest {uri} row {n}")})
    yield from _chunked(iter(rows))


# ------------------------------------------------------------------------------------------------ entry


def list_videos(input_cfg, settings: s3.S3Settings, report: localfs.ListingReport | None = None) -> pa.Table:
    """All videos of the run as one table (sorted by URI, ``input.limit`` applied); what a local listing saw
    but could not list is counted in ``report``."""
    if input_cfg.s3_prefix:
        chunks = list(s3_source(input_cfg.s3_prefix, input_cfg.extensions, settings))
    elif input_cfg.manifest:
        chunks = list(manifest_source(input_cfg.manifest, settings))
    else:
        chunks = list(local_source(input_cfg.local_dir, input_cfg.extensions, report))
    table = pa.concat_tables(chunks) if chunks else VIDEO_SCHEMA.empty_table()
    if not input_cfg.manifest:
        table = table.sort_by("video_uri")
    if input_cfg.limit is not None:
        table = table.slice(0, input_cfg.limit)
    log.info("input: %d videos", table.num_rows)
    return table
