"""The output protocol: Parquet committed in chunks, each made visible by a small manifest written last.

Layout of a run folder (``<output.path>/<run_id>/`` for a corpus run, ``date=.../run=.../`` for a nightly run)::

    part-<attempt:03d>-<task:05d>-<nonce>-<i>.parquet     rows (OUTPUT_SCHEMA, one per video x task)
    _commits/<attempt:03d>-<task:05d>.json                 the chunk's manifest: its files and row counts

* **Write** (:class:`ChunkWriter`, once per Ray Data write task): rows go to new files (a random nonce in their
  names), then the manifest is created if absent. A retried write task finds its manifest there: its own files
  are deleted and the first commit stands, so a block is committed exactly once.
* **State**: a run's rows are the files its manifests name (:func:`committed`); :func:`plan_resume` deletes the
  others (a task killed before its commit). Nothing rewrites or deletes a committed file.
* **Versions**: a video's rows are those of the newest attempt that committed rows of it; a resumed run
  (attempt + 1) redoes only videos without a complete committed version.
* **Read**: :func:`read_committed`, for a run folder or a nightly root (whose run folders count only once their
  run manifest ``_manifest.json`` exists, see :mod:`pipeline.incremental`).
"""

from __future__ import annotations

import json
import logging
import uuid
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone

import pyarrow as pa

from pipeline import storage
from pipeline.schema import OUTPUT_SCHEMA

log = logging.getLogger(__name__)

FILE_PREFIX = "part"
COMMITS = "_commits"
RUN_MANIFEST = "_manifest.json"
_KEY_COLUMNS = ["video_id", "video_uri", "task_id", "error_type"]


def run_uri(output_path: str, run_id: str) -> str:
    """``<output_path>/<run_id>``; ``run_id`` must be one plain folder name, so a run never writes (or, with
    ``on_existing: overwrite``, clears) anything outside the configured output prefix."""
    if not run_id or "/" in run_id or "\\" in run_id or set(run_id) <= {"."}:
        raise ValueError(f"run_id {run_id!r} must be one folder name (no '/', not '.' or '..')")
    return output_path.rstrip("/") + "/" + run_id


def chunk_name(attempt: int, task_index: int) -> str:
    return f"{attempt:03d}-{task_index:05d}"


def attempt_of(name: str) -> int | None:
    """The attempt of a data file or manifest name (``part-<attempt>-...`` / ``<attempt>-<task>.json``)."""
    head = name.rsplit("/", 1)[-1].removeprefix(FILE_PREFIX + "-").split("-", 1)[0]
    return int(head) if head.isdigit() else None


@dataclass
class ChunkWriter:
    """Writes and commits one chunk per write task into the run folder ``folder`` (a URI), with the file settings of
    ``output`` (:class:`pipeline.config.OutputConfig`: rows per file and row group, compression). Picklable."""

    folder: str
    attempt: int
    output: object
    s3: object = None  #: pipeline.config.S3Config

    def write(self, tables: Iterable[pa.Table], task_index: int) -> dict | None:
        """Write the rows of one write task (cast to OUTPUT_SCHEMA, order kept) as new files, then commit them;
        returns the committed manifest, None for no rows."""
        import pyarrow.parquet as pq

        tables = [t.select(OUTPUT_SCHEMA.names).cast(OUTPUT_SCHEMA) for t in tables if t.num_rows]
        if not tables:
            return None
        table = pa.concat_tables(tables)
        loc = storage.resolve(self.folder, self.s3)
        if loc.local:
            loc.filesystem.create_dir(loc.path, recursive=True)  # S3 has no folders to make
        name, nonce, files = chunk_name(self.attempt, task_index), uuid.uuid4().hex[:8], []
        step, compression = self.output.max_rows_per_file, self.output.compression
        for i, start in enumerate(range(0, table.num_rows, step)):
            part, fname = table.slice(start, step), f"{FILE_PREFIX}-{name}-{nonce}-{i}.parquet"
            pq.write_table(part, loc.child(fname).path, filesystem=loc.filesystem, row_group_size=self.output.row_group_rows,
                           compression=None if compression == "none" else compression)
            files.append({"name": fname, "rows": part.num_rows})
        manifest = {"chunk": name, "attempt": self.attempt, "files": files, "rows": table.num_rows,
                    "videos": len(table.column("video_id").unique()),
                    "committed_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        commit_uri = f"{loc.uri}/{COMMITS}/{name}.json"
        if storage.put_if_absent(commit_uri, json.dumps(manifest).encode(), self.s3):
            return manifest
        first = storage.read_json(commit_uri, self.s3)
        if first["files"] != files:  # not our own PUT retried after a lost response: a retried write task
            log.warning("chunk %s of %s was already committed (a retried write task); dropping the retry's files",
                        name, loc.uri)
            storage.delete(loc, [f["name"] for f in files])
        return first


@dataclass
class Committed:
    """What a run folder (or a nightly root) holds: committed chunks, and every file found."""

    loc: storage.Location
    chunks: list[tuple[str, dict]] = field(default_factory=list)  #: (folder relative to loc: "" or a run, manifest)
    files: list[str] = field(default_factory=list)  #: every object below loc, relative ("x/" for an empty folder)
    run_manifests: dict[str, dict] = field(default_factory=dict)  #: run folder -> its run manifest

    def file_paths(self) -> list[tuple[tuple[str, int], str]]:
        """``((folder, attempt), relative path)`` of every committed data file, in commit order."""
        return sorted(((folder, m["attempt"]), f"{folder}/{f['name']}" if folder else f["name"])
                      for folder, m in self.chunks for f in m["files"])


def committed(loc: storage.Location, s3_cfg=None, chunks: bool = True) -> Committed:
    """The committed chunks below ``loc``: those directly in it (a run folder), and those of run folders below
    it that hold a run manifest (a nightly root). One listing; manifests read once (chunk manifests only with
    ``chunks``)."""
    prefix = loc.uri.rstrip("/") + "/"
    state = Committed(loc, files=sorted(e.uri[len(prefix):] for e in storage.list_objects(prefix, s3_cfg, folders=True)))
    for rel in state.files:
        if rel.rsplit("/", 1)[-1] == RUN_MANIFEST:
            state.run_manifests[rel[: -len(RUN_MANIFEST)].rstrip("/")] = storage.read_json(prefix + rel, s3_cfg)
    for rel in state.files if chunks else []:
        parts = rel.split("/")
        if len(parts) < 2 or parts[-2] != COMMITS or not parts[-1].endswith(".json") or parts[-1].startswith("."):
            continue
        folder = "/".join(parts[:-2])
        if folder and folder not in state.run_manifests:
            continue  # a run folder whose run is not committed (nightly)
        state.chunks.append((folder, storage.read_json(prefix + rel, s3_cfg)))
    return state


def committed_files(uri: str, s3_cfg=None) -> tuple[object, list[str]]:
    """``(pyarrow filesystem, paths)`` of every committed data file below ``uri`` (every version: see
    :func:`read_committed` for one version per video), for readers such as ``pyarrow.dataset``."""
    state = committed(storage.resolve(uri, s3_cfg), s3_cfg)
    return state.loc.filesystem, [f"{state.loc.path}/{rel}" for _, rel in state.file_paths()]


def read_committed(uri, columns: list[str] | None = None, *, latest: bool = True, s3_cfg=None,
                   state: Committed | None = None) -> pa.Table:
    """Rows of the committed chunks below ``uri`` (a URI or :class:`pipeline.storage.Location`).

    ``latest=True``: each video's rows from the newest attempt (nightly: the newest run) that committed rows of
    it, so exactly one row per (video, task) when that attempt was complete. ``latest=False``: every committed
    version (a nightly's history of changed videos)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    loc = uri if isinstance(uri, storage.Location) else storage.resolve(uri, s3_cfg)
    paths = (state or committed(loc, s3_cfg)).file_paths()
    cols = None if columns is None else list(dict.fromkeys([*columns, *(["video_id"] if latest else [])]))
    if not paths:
        return OUTPUT_SCHEMA.empty_table().select(columns or OUTPUT_SCHEMA.names)
    rank = {key: i for i, key in enumerate(sorted({key for key, _ in paths}))}
    tables = []
    for key, rel in paths:
        t = pq.read_table(f"{loc.path}/{rel}", filesystem=loc.filesystem, columns=cols)
        tables.append(t.append_column("_version", pa.array([rank[key]] * t.num_rows, pa.int32())))
    table = pa.concat_tables(tables)
    if latest:
        newest = table.group_by("video_id").aggregate([("_version", "max")])
        idx = pc.index_in(table.column("video_id"), value_set=newest.column("video_id"))
        table = table.filter(pc.equal(table.column("_version"), pc.take(newest.column("_version_max"), idx)))
    table = table.drop_columns(["_version"])
    return table if columns is None else table.select(columns)


@dataclass
class ResumePlan:
    """What :func:`plan_resume` found in a run folder."""

    todo: pa.Table  #: the video list's rows still to process
    total: int  #: videos in the list
    done: int  #: listed videos with a complete committed version
    attempt: int  #: the attempt number this run's chunks use
    chunks: int  #: committed chunks found
    removed: list[str] = field(default_factory=list)  #: uncommitted files deleted
    unlisted_videos: int = 0  #: videos with committed rows that are not in the list (left alone)
    retried: int = 0  #: listed videos redone because their committed version holds a retried error type

    @property
    def resuming(self) -> bool:
        return self.chunks > 0


def plan_resume(loc: storage.Location, videos: pa.Table, expected: Sequence[Iterable[str]],
                retry_error_types: Iterable[str] = (), s3_cfg=None) -> ResumePlan:
    """Delete what is not committed in the run folder ``loc``; return the videos of ``videos`` still to do.

    ``expected[i]``: the task ids of ``videos`` row ``i`` (:func:`pipeline.tasks.expected_task_ids`). A listed
    video is done when its newest committed version has its ``video_uri`` and exactly the expected task ids once
    each, none with an error type in ``retry_error_types``. Call it holding the run's lock (no writer running)."""
    state = committed(loc, s3_cfg)
    named = {rel for _, rel in state.file_paths()} | {f"{COMMITS}/{m['chunk']}.json" for _, m in state.chunks}
    stray = [rel for rel in state.files if rel not in named and not rel.endswith("/")
             and rel.startswith((FILE_PREFIX + "-", COMMITS + "/"))]
    for rel in stray:
        log.warning("deleting %s/%s: not committed (a write that did not finish)", loc.uri, rel)
    storage.delete(loc, stray)

    ids = videos.column("video_id").to_pylist()
    uris = dict(zip(ids, videos.column("video_uri").to_pylist()))
    want = {vid: Counter(tasks) for vid, tasks in zip(ids, expected)}
    have: dict[str, Counter] = {}
    redo, unlisted, retry, transient = set(), set(), set(retry_error_types), set()
    keys = read_committed(loc, _KEY_COLUMNS, state=state)
    for vid, uri, task, err in zip(*(keys.column(c).to_pylist() for c in _KEY_COLUMNS)):
        if vid not in want:
            unlisted.add(vid)
            continue
        have.setdefault(vid, Counter())[task] += 1
        if uri != uris[vid]:
            redo.add(vid)
        if err in retry:
            transient.add(vid)
    redo |= transient
    done = {vid for vid, got in have.items() if vid not in redo and got == want[vid]}
    attempts = [a for a in map(attempt_of, state.files) if a is not None]
    if unlisted:
        log.warning("%s holds rows of %d videos that are not in this run's input; they are kept "
                    "(output.on_existing=overwrite clears the folder)", loc.uri, len(unlisted))
    return ResumePlan(todo=videos.filter(pa.array([vid not in done for vid in ids], pa.bool_())),
                      total=videos.num_rows, done=len(done), attempt=max(attempts, default=-1) + 1,
                      chunks=len(state.chunks), removed=stray, unlisted_videos=len(unlisted), retried=len(transient))


def clear(loc: storage.Location) -> None:
    """Delete the run folder's contents (``output.on_existing: overwrite``)."""
    loc.filesystem.delete_dir_contents(loc.path, missing_dir_ok=True)
