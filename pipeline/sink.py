"""Parquet sink: where a run's files go, their names, reading a run back, and resuming a killed run.

Layout: ``<output.path>/<run_id>/part-*.parquet``, one row per (video, task). Files are sized by
``output.min_rows_per_file`` / ``max_rows_per_file`` (small blocks are combined, not written one tiny
file each) with ``output.row_group_rows`` rows per row group, ZSTD-compressed by default, and carry
exactly :data:`pipeline.schema.OUTPUT_SCHEMA`.

File names (see :func:`filename_for_task`; readers take every ``*.parquet`` of the folder):

* ``part-<task:05d>-<i>.parquet``: attempt 0, a fresh run. The folder is cleared when the write starts
  (Ray Data ``SaveMode.OVERWRITE``); used when the folder holds no rows yet, and always with
  ``output.on_existing: overwrite``.
* ``part-<attempt:03d>-<task:05d>-<write uuid>-<i>.parquet``: attempt >= 1, a resumed run adding to the
  folder (``SaveMode.APPEND``). ``attempt`` is one more than the highest attempt already in the folder,
  so a resumed run never overwrites an earlier attempt's file; within one write, a Ray write-task retry
  overwrites its own file (same uuid, same task index) instead of adding a duplicate.
* ``part-<attempt:03d>-rewrite-<k:05d>.parquet``: an earlier file rewritten by :func:`plan_resume`
  without the rows of an incomplete video.

Resume (:func:`plan_resume`, pure pyarrow): a run killed half way leaves complete files, files that
cannot be read (a local file is written in place, so a kill truncates it; on S3 an object appears
only once its upload completes) and videos with only some of their rows. The plan deletes unreadable
files, keeps every video whose rows are exactly its expected task ids once each, removes the rows of
every other listed video (rewriting a file under a new name, then deleting the old one) and returns
the videos still to do. Each step leaves a state the next plan handles, so a kill during planning
is safe too (a file left both rewritten and original makes its videos' rows duplicates, so those
videos are redone).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import pyarrow as pa

from pipeline import s3
from pipeline.schema import OUTPUT_SCHEMA

log = logging.getLogger(__name__)

FILE_PREFIX = "part"
_KEY_COLUMNS = ["video_id", "video_uri", "task_id", "error_type"]


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


def filename_for_task(task_index: int, attempt: int = 0, write_uuid: str | None = None) -> str:
    """The file name template of one write task (``{i}`` numbers the files it writes).

    Attempt 0: ``part-<task:05d>-{i}.parquet``. Attempt >= 1 (a resumed run, appending):
    ``part-<attempt:03d>-<task:05d>-<write_uuid>-{i}.parquet`` (Ray Data requires the write uuid in
    appended names; it is the same for every retry of a write task, so a retry overwrites its own file).
    """
    if attempt == 0:
        return f"{FILE_PREFIX}-{task_index:05d}-{{i}}.parquet"
    if attempt < 0 or not write_uuid:
        raise ValueError(f"attempt {attempt} needs attempt >= 1 and a write uuid")
    return f"{FILE_PREFIX}-{attempt:03d}-{task_index:05d}-{write_uuid}-{{i}}.parquet"


def attempt_of(name: str) -> int:
    """The attempt a file name belongs to: 0 for ``part-<task>-<i>.parquet``, else its first number."""
    base = name.rsplit("/", 1)[-1]
    parts = base[: -len(".parquet")].split("-") if base.endswith(".parquet") else base.split("-")
    if len(parts) >= 4 and parts[0] == FILE_PREFIX and parts[1].isdigit():
        return int(parts[1])
    return 0


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


# ------------------------------------------------------------------------------------------------ resume


@dataclass
class ResumePlan:
    """What :func:`plan_resume` found in a run folder and did to it."""

    todo: pa.Table  #: the rows of the video list still to process (all of them for an empty folder)
    total: int  #: videos in the list
    done: int  #: listed videos whose rows are complete in the folder (kept)
    attempt: int  #: the attempt number the run's writes use (0: nothing kept, write a fresh folder)
    rows_kept: int  #: rows left in the folder (complete listed videos, plus unlisted videos' rows)
    rows_removed: int = 0  #: rows of incomplete (or duplicated) listed videos removed from readable files
    deleted: list[str] = field(default_factory=list)  #: unreadable files deleted
    dropped: list[str] = field(default_factory=list)  #: readable files deleted: all their rows were removed
    rewritten: dict[str, str] = field(default_factory=dict)  #: old file -> the file that replaced it
    unlisted_videos: int = 0  #: videos with rows in the folder that are not in the list (left alone)
    retried: int = 0  #: listed videos redone because they had a row with an error type in ``retry_error_types``

    @property
    def resuming(self) -> bool:
        """True when the folder keeps rows, so the run adds to it (APPEND) instead of replacing it."""
        return self.rows_kept > 0


def _read_keys(target: SinkTarget, path: str) -> pa.Table | None:
    """The key columns of one file, or None when the file cannot be read as Parquet (truncated, empty)."""
    import pyarrow.parquet as pq

    try:
        return pq.read_table(path, filesystem=target.filesystem, columns=_KEY_COLUMNS)
    except pa.ArrowInvalid as exc:  # not Parquet (a kill truncated it); I/O errors propagate, nothing is deleted
        log.warning("deleting unreadable output file %s (%s)", path, exc)
        return None


def plan_resume(target: SinkTarget, videos: pa.Table, expected: Sequence[Iterable[str]],
                write_options: dict | None = None, retry_error_types: Iterable[str] = ()) -> ResumePlan:
    """Prepare ``target`` for resuming a run over ``videos``; return the videos still to process.

    ``videos``: the run's video list (:data:`pipeline.schema.VIDEO_SCHEMA`, ``video_id`` unique).
    ``expected[i]``: the task ids of ``videos`` row ``i`` (one output row each; see
    ``pipeline.run.expected_task_ids``). A listed video is *done* when its rows in the folder have its
    ``video_uri`` and exactly the expected task ids, once each. Afterwards the folder holds the rows of
    done videos only (plus rows of videos not in the list, untouched), each exactly once: unreadable
    files are deleted, and readable files holding rows of other listed videos are rewritten without
    them (new name first, then the old file deleted) or deleted when nothing of them is kept.
    ``write_options``: Parquet writer options for rewritten files (:func:`parquet_write_options`).
    ``retry_error_types``: a video with a row of one of these error types (transient failures such as
    ``fetch_failed``) is not done: its rows are removed and it is processed again.
    """
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    fsys = target.filesystem
    ids = videos.column("video_id").to_pylist()
    uris = dict(zip(ids, videos.column("video_uri").to_pylist()))
    want: dict[str, Counter] = {}
    for vid, tasks in zip(ids, expected):
        want.setdefault(vid, Counter()).update(tasks)

    files = list_files(target)
    readable: dict[str, pa.Table] = {}
    deleted: list[str] = []
    for path in files:
        keys = _read_keys(target, path)
        if keys is None:
            fsys.delete_file(path)
            deleted.append(path)
        else:
            readable[path] = keys

    have: dict[str, Counter] = {}
    wrong_uri: set[str] = set()
    unlisted: set[str] = set()
    retry = set(retry_error_types)
    transient: set[str] = set()
    for keys in readable.values():
        for vid, uri, task, err in zip(keys.column("video_id").to_pylist(), keys.column("video_uri").to_pylist(),
                                       keys.column("task_id").to_pylist(), keys.column("error_type").to_pylist()):
            if vid not in want:
                unlisted.add(vid)
                continue
            have.setdefault(vid, Counter())[task] += 1
            if uri != uris[vid]:
                wrong_uri.add(vid)
            if err in retry:
                transient.add(vid)
    done = {vid for vid, got in have.items() if vid not in wrong_uri and vid not in transient and got == want[vid]}
    redo = set(have) - done  # listed videos with some rows in the folder, but not exactly the expected ones

    attempt = 1 + max((attempt_of(p) for p in files), default=0)
    rewritten: dict[str, str] = {}
    dropped: list[str] = []
    rows_removed = 0
    rows_kept = 0
    redo_arr = pa.array(sorted(redo), pa.string())
    for path, keys in readable.items():
        drop = pc.is_in(keys.column("video_id"), value_set=redo_arr)
        n_drop = pc.sum(drop).as_py() or 0
        if not n_drop:
            rows_kept += keys.num_rows
            continue
        rows_removed += n_drop
        if n_drop == keys.num_rows:
            log.info("deleting %s: only rows of incomplete videos (%d)", path, n_drop)
            fsys.delete_file(path)
            dropped.append(path)
            continue
        table = pq.read_table(path, filesystem=fsys)
        keep = table.filter(pc.invert(pc.is_in(table.column("video_id"), value_set=redo_arr)))
        new = f"{target.path}/{FILE_PREFIX}-{attempt:03d}-rewrite-{len(rewritten):05d}.parquet"
        opts = dict(write_options or {})
        schema = opts.pop("schema", None)
        if schema is not None:
            keep = keep.cast(schema)
        pq.write_table(keep, new, filesystem=fsys, **opts)
        fsys.delete_file(path)
        rewritten[path] = new
        rows_kept += keep.num_rows
        log.info("rewrote %s as %s without %d rows of incomplete videos", path, new, n_drop)

    todo_mask = pa.array([vid not in done for vid in ids], pa.bool_())
    plan = ResumePlan(
        todo=videos.filter(todo_mask), total=videos.num_rows, done=sum(1 for vid in ids if vid in done),
        attempt=attempt if rows_kept else 0, rows_kept=rows_kept, rows_removed=rows_removed, deleted=deleted,
        dropped=dropped, rewritten=rewritten, unlisted_videos=len(unlisted), retried=len(transient),
    )
    if plan.unlisted_videos:
        log.warning("%s holds rows of %d videos that are not in this run's input; they are kept "
                    "(output.on_existing=overwrite clears the folder)", target.uri, plan.unlisted_videos)
    return plan
