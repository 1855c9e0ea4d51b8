"""Parquet sink: where a run's files go, their deterministic names, and reading a run back.

Layout: ``<output.path>/<run_id>/part-<task:05d>-<i>.parquet``. The run folder is cleared when the
write starts (Ray Data ``SaveMode.OVERWRITE``), so a re-run of the same ``run_id`` replaces its files
instead of adding duplicates. Files are sized by ``output.min_rows_per_file`` / ``max_rows_per_file``
(small blocks are combined, not written one tiny file each) with ``output.row_group_rows`` rows per
row group, ZSTD-compressed by default, and carry exactly :data:`pipeline.schema.OUTPUT_SCHEMA`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import pyarrow as pa

from pipeline import s3
from pipeline.schema import OUTPUT_SCHEMA

log = logging.getLogger(__name__)

FILE_PREFIX = "part"


@dataclass(frozen=True)
class SinkTarget:
    """A resolved output folder: pyarrow filesystem + path within it (no scheme) + display URI."""

    filesystem: object
    path: str
    uri: str


def run_uri(output_path: str, run_id: str) -> str:
    """``<output_path>/<run_id>``; ``run_id`` must be one plain folder name, so a run never writes
    (or, with OVERWRITE, clears) anything outside the configured output prefix."""
    if not run_id or "/" in run_id or "\\" in run_id or set(run_id) <= {"."}:
        raise ValueError(f"run_id {run_id!r} must be one folder name (no '/', not '.' or '..')")
    return output_path.rstrip("/") + "/" + run_id


def resolve(output_path: str, run_id: str, settings: s3.S3Settings) -> SinkTarget:
    """Filesystem and folder for a run (S3 through pyarrow with the same endpoint as boto3, or local)."""
    uri = run_uri(output_path, run_id)
    if s3.is_s3(uri):
        bucket, key = s3.split_uri(uri)
        return SinkTarget(s3.pyarrow_filesystem(settings), f"{bucket}/{key}".rstrip("/"), uri)
    import os

    from pyarrow import fs

    local = os.path.abspath(os.path.expanduser(uri))
    return SinkTarget(fs.LocalFileSystem(), local, local)


def parquet_write_options(output_cfg) -> dict:
    """Keyword arguments for the Parquet writer (schema, row groups, compression)."""
    return {
        "schema": OUTPUT_SCHEMA,
        "row_group_size": output_cfg.row_group_rows,
        "compression": None if output_cfg.compression == "none" else output_cfg.compression,
    }


def filename_for_task(task_index: int) -> str:
    """The deterministic file name template of one write task (``{i}`` numbers the files it writes)."""
    return f"{FILE_PREFIX}-{task_index:05d}-{{i}}.parquet"


def list_files(target: SinkTarget) -> list[str]:
    from pyarrow import fs

    try:
        infos = target.filesystem.get_file_info(fs.FileSelector(target.path, recursive=False))
    except FileNotFoundError:
        return []
    return sorted(i.path for i in infos if i.type == fs.FileType.File and i.path.endswith(".parquet"))


def read_run(target: SinkTarget, columns: list[str] | None = None) -> pa.Table:
    """All rows of a run (optionally only ``columns``), with the declared schema."""
    import pyarrow.parquet as pq

    files = list_files(target)
    if not files:
        return OUTPUT_SCHEMA.empty_table() if columns is None else OUTPUT_SCHEMA.empty_table().select(columns)
    tables = [pq.read_table(f, filesystem=target.filesystem, columns=columns) for f in files]
    return pa.concat_tables(tables)
