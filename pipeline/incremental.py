"""Incremental (nightly) indexing: process only new or changed videos, commit each run atomically.

Layout under ``output.path`` (local folder or ``s3://bucket/prefix``)::

    date=YYYY-MM-DD/run=<run_id>/part-NNNNN-N.parquet     the rows (OUTPUT_SCHEMA, one row per video x task)
    date=YYYY-MM-DD/run=<run_id>/_manifest.json           the COMMIT MARKER, written last

A run is *committed* exactly when its ``_manifest.json`` exists. The manifest records the run id, the
inputs it processed (``video_id``, ``video_uri``, ``etag`` at listing time: the S3 ETag or
``<int mtime>-<size>`` for local files), the task ids, the configuration, row counts and the code
version. It is written after every Parquet file of the run (locally via a temporary name and a rename;
on S3 an object upload is visible whole or not at all), so a run killed half way leaves a run folder *without* a manifest.

State = the union of the committed manifests: a video is *done* when some committed manifest holds
its ``(video_uri, etag)``. A run processes every listed video that is not done (new, changed, or lost
by a killed run), so no ``(video_uri, etag, task_id)`` row is ever committed twice. Run folders without
a manifest are deleted at the start of the next run. Only one nightly run is active per output: each
holds the lock ``_locks/nightly.json`` (:mod:`pipeline.lock`) from planning to commit, so a cron run that
starts while last night's is still going fails at once (exit 75 from ``jobs.nightly``) instead of
processing the same videos twice; a run whose lock was taken over (it stalled past
``output.lock_stale_s``) does not commit.
A changed video gets new rows (new etag) in a later run; its older rows stay, use
:func:`read_committed` with ``latest=True`` to get one version per video.

Readers must not glob the folder blindly (an uncommitted folder may exist while a run is going or
after a crash). Read only committed runs with::

    from pipeline.incremental import committed_files, read_committed
    table = read_committed("s3://bucket/index/", columns=[...], latest=True)     # pyarrow Table
    files = committed_files("s3://bucket/index/")   # -> (filesystem, [file paths]) for any other reader

``pyarrow.dataset.dataset(files, filesystem=fs, partitioning="hive", partition_base_dir=root)`` adds
the ``date`` and ``run`` partition columns. (pyarrow ignores ``_manifest.json`` itself: files starting
with ``_`` or ``.`` are skipped by dataset discovery.)

Task sets: the state key is the video, not the (video, task) pair; when ``tasks`` change, the new
tasks are not back-filled for videos already done (start a new output path, or re-run with a
different output). The manifest records the task ids so this can be checked.
"""

from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
from pyarrow import fs

from pipeline import localfs, s3, sink
from pipeline.schema import VIDEO_SCHEMA
from pipeline.sources import list_videos, video_id_for
from pipeline.tasks import global_tasks

log = logging.getLogger(__name__)

MANIFEST_NAME = "_manifest.json"
MANIFEST_VERSION = 1
#: The lock a nightly run holds on its output root (``<output.path>/_locks/nightly.json``).
NIGHTLY_LOCK = "nightly"
#: Test hook: seconds to sleep after the data is written and before the commit marker.
PAUSE_ENV = "DYCOKE_NIGHTLY_PAUSE_BEFORE_COMMIT_S"


# ------------------------------------------------------------------------------------------------ paths


@dataclass(frozen=True)
class Root:
    """The output root as a pyarrow filesystem + path (no scheme) + display URI."""

    filesystem: object
    path: str
    uri: str

    @classmethod
    def of(cls, output: str, settings: s3.S3Settings | None = None) -> Root:
        settings = settings or s3.S3Settings()
        if s3.is_s3(output):
            bucket, key = s3.split_uri(output)
            return cls(s3.pyarrow_filesystem(settings), f"{bucket}/{key}".rstrip("/"), output.rstrip("/"))
        local = os.path.abspath(os.path.expanduser(output))
        return cls(fs.LocalFileSystem(), local, local)


def run_folder(date: str, run_id: str) -> str:
    return f"date={date}/run={run_id}"


def _all_infos(root: Root) -> list[fs.FileInfo]:
    try:
        infos = root.filesystem.get_file_info(fs.FileSelector(root.path, recursive=True, allow_not_found=True))
    except FileNotFoundError:
        return []
    return [i for i in infos if i.type in (fs.FileType.File, fs.FileType.Directory)]


def _run_dirs(root: Root) -> dict[str, list[fs.FileInfo]]:
    """Every ``date=*/run=*`` folder (relative path) -> its files (``[]`` for an empty folder: the write
    creates the folder, on S3 an empty ``run=.../`` marker object, before its first Parquet file)."""
    out: dict[str, list[fs.FileInfo]] = {}
    prefix = root.path.rstrip("/") + "/"
    for info in _all_infos(root):
        rel = info.path[len(prefix):] if info.path.startswith(prefix) else info.path
        parts = rel.rstrip("/").split("/")
        if len(parts) < 2 or not parts[0].startswith("date=") or not parts[1].startswith("run="):
            continue
        files = out.setdefault(f"{parts[0]}/{parts[1]}", [])
        if len(parts) == 3 and info.type == fs.FileType.File:
            files.append(info)
    return out


# ------------------------------------------------------------------------------------------------ state


@dataclass
class State:
    """What the committed runs hold, and the uncommitted run folders found."""

    manifests: list[dict] = field(default_factory=list)
    committed_dirs: list[str] = field(default_factory=list)
    uncommitted_dirs: list[str] = field(default_factory=list)

    def done(self) -> dict[tuple[str, str | None], str]:
        """``(video_uri, etag)`` -> the run that committed it."""
        out: dict[tuple[str, str | None], str] = {}
        for m in self.manifests:
            for v in m["inputs"]:
                out[(v["video_uri"], v["etag"])] = m["run_id"]
        return out

    def latest_run_per_uri(self) -> dict[str, str]:
        """``video_uri`` -> the last committed run that processed it (manifests sorted by run id = time)."""
        out: dict[str, str] = {}
        for m in sorted(self.manifests, key=lambda m: m["run_id"]):
            for v in m["inputs"]:
                out[v["video_uri"]] = m["run_id"]
        return out


def load_state(root: Root) -> State:
    state = State()
    for rel, files in sorted(_run_dirs(root).items()):
        marker = [f for f in files if f.base_name == MANIFEST_NAME]
        if not marker:
            state.uncommitted_dirs.append(rel)
            continue
        with root.filesystem.open_input_stream(marker[0].path) as f:
            state.manifests.append(json.loads(f.read().decode("utf-8")))
        state.committed_dirs.append(rel)
    return state


def committed_files(output: str, settings: s3.S3Settings | None = None) -> tuple[object, list[str]]:
    """``(filesystem, sorted Parquet paths of committed runs only)`` under ``output``."""
    root = Root.of(output, settings)
    files: list[str] = []
    for _rel, infos in sorted(_run_dirs(root).items()):
        if any(i.base_name == MANIFEST_NAME for i in infos):
            files += [i.path for i in infos if i.base_name.endswith(".parquet") and not i.base_name.startswith(("_", "."))]
    return root.filesystem, sorted(files)


def read_committed(output: str, columns: list[str] | None = None, *, latest: bool = False,
                   settings: s3.S3Settings | None = None) -> pa.Table:
    """All rows of the committed runs (``latest=True``: only each video's last committed version)."""
    import pyarrow.parquet as pq

    from pipeline.schema import OUTPUT_SCHEMA

    filesystem, files = committed_files(output, settings)
    cols = None if columns is None else list(dict.fromkeys(list(columns) + (["video_uri", "run_id"] if latest else [])))
    if not files:
        table = OUTPUT_SCHEMA.empty_table()
        return table if cols is None else table.select(cols)
    table = pa.concat_tables([pq.read_table(f, filesystem=filesystem, columns=cols) for f in files])
    if latest:
        last = load_state(Root.of(output, settings)).latest_run_per_uri()
        keep = [last.get(u) == r for u, r in zip(table.column("video_uri").to_pylist(), table.column("run_id").to_pylist())]
        table = table.filter(pa.array(keep, pa.bool_()))
        if columns is not None:
            table = table.select(list(columns))
    return table


# ------------------------------------------------------------------------------------------------ inputs


def _local_etag(uri: str) -> str | None:
    path = localfs.path_of(uri)  # file:// URIs of non-UTF-8 names
    try:
        st = os.stat(path)
    except OSError:
        try:  # a path longer than PATH_MAX
            fd = localfs.open_file(path, getattr(os, "O_PATH", os.O_RDONLY) | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            st = os.fstat(fd)
        finally:
            os.close(fd)
    return f"{int(st.st_mtime)}-{st.st_size}"  # the same fingerprint the decode stage writes to video_etag


def list_inputs(input_cfg, settings: s3.S3Settings, report: localfs.ListingReport | None = None) -> pa.Table:
    """The input videos with their current ``etag`` (S3 ETag from the listing, or mtime-size locally); what a local
    listing could not list is counted in ``report``."""
    if input_cfg.s3_prefix:
        bucket, prefix = s3.split_uri(input_cfg.s3_prefix)
        rows = []
        for page in s3.client(settings).get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                key = obj["Key"]
                if key.endswith("/") or not key.lower().endswith(tuple(input_cfg.extensions)):
                    continue
                uri = f"s3://{bucket}/{key}"
                rows.append({"video_id": video_id_for(uri), "video_uri": uri, "questions": None,
                             "etag": str(obj.get("ETag", "")).strip('"') or None})
        rows.sort(key=lambda r: r["video_uri"])
        if input_cfg.limit is not None:
            rows = rows[: input_cfg.limit]
        return pa.Table.from_pylist(rows, schema=VIDEO_SCHEMA.append(pa.field("etag", pa.string())))
    videos = list_videos(input_cfg, settings, report)
    etags = []
    for uri in videos.column("video_uri").to_pylist():
        if s3.is_s3(uri):
            bucket, key = s3.split_uri(uri)
            try:
                etags.append(str(s3.client(settings).head_object(Bucket=bucket, Key=key)["ETag"]).strip('"'))
            except Exception:  # noqa: BLE001 - missing/unreadable: the decode stage reports it as an error row
                etags.append(None)
        else:
            etags.append(_local_etag(uri))
    return videos.append_column("etag", pa.array(etags, pa.string()))


# ------------------------------------------------------------------------------------------------ the run


def code_version() -> str:
    """``git describe`` of the source tree when it is a checkout, else the installed package version."""
    here = Path(__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--tags"], cwd=here, capture_output=True,
                             text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            return "git:" + out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        from importlib.metadata import version

        return "package:" + version("dycoke-pipeline")
    except Exception:  # noqa: BLE001
        return "unknown"


def new_run_id(now: _dt.datetime) -> str:
    return now.strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]


@dataclass
class NightlyResult:
    run_id: str | None
    listed: int
    pending: int
    new: int
    changed: int
    removed_uncommitted: list[str]
    summary: object | None = None  # pipeline.summary.Summary when something ran
    manifest_uri: str | None = None
    not_listed: dict = field(default_factory=dict)  # reason -> count (pipeline.localfs.ListingReport)

    def render(self) -> str:
        head = (f"nightly: {self.listed} videos listed, {self.pending} to process "
                f"({self.new} new, {self.changed} changed or not committed before)")
        if self.removed_uncommitted:
            head += f"; removed {len(self.removed_uncommitted)} uncommitted run folder(s)"
        if self.not_listed:
            head += "; not listed: " + ", ".join(f"{k} {v}" for k, v in sorted(self.not_listed.items()))
        if not self.pending:
            return head + "\nnothing new: no run was started"
        return head + "\n" + self.summary.render() + f"\ncommitted: {self.manifest_uri}"


def _write_manifest(root: Root, rel_dir: str, manifest: dict) -> str:
    data = json.dumps(manifest, indent=1, sort_keys=True, default=str).encode("utf-8")
    final = f"{root.path}/{rel_dir}/{MANIFEST_NAME}"
    if isinstance(root.filesystem, fs.LocalFileSystem):
        tmp = final + f".tmp-{uuid.uuid4().hex[:6]}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)  # atomic on one filesystem
    else:
        with root.filesystem.open_output_stream(final) as f:  # one PUT: visible whole or not at all
            f.write(data)
    return f"{root.uri}/{rel_dir}/{MANIFEST_NAME}"


def run_nightly(cfg, now: _dt.datetime | None = None) -> NightlyResult:
    """List, diff against the committed state, process what is missing, commit. See the module doc."""
    from pipeline.run import output_lock

    now = now or _dt.datetime.now(_dt.timezone.utc)
    settings = s3.S3Settings.from_config(cfg.s3)
    # one nightly per output at a time: two would both process the same new videos (see pipeline.lock)
    with output_lock(cfg, NIGHTLY_LOCK, settings) as lock:
        return _run_nightly_locked(cfg, now, settings, lock)


def _run_nightly_locked(cfg, now: _dt.datetime, settings: s3.S3Settings, lock) -> NightlyResult:
    from pipeline.run import execute

    root = Root.of(cfg.output.path, settings)
    state = load_state(root)
    for rel in state.uncommitted_dirs:
        log.warning("deleting uncommitted run folder %s/%s (a run that did not finish)", root.uri, rel)
        root.filesystem.delete_dir(f"{root.path}/{rel}")

    listing = localfs.ListingReport()
    inputs = list_inputs(cfg.input, settings, listing)
    done = state.done()
    known_uris = {uri for uri, _ in done}
    pending_idx, new, changed = [], 0, 0
    for i, (uri, etag) in enumerate(zip(inputs.column("video_uri").to_pylist(), inputs.column("etag").to_pylist())):
        if (uri, etag) in done:
            continue
        pending_idx.append(i)
        if uri in known_uris:
            changed += 1
        else:
            new += 1
    result = NightlyResult(None, inputs.num_rows, len(pending_idx), new, changed, list(state.uncommitted_dirs),
                           not_listed=dict(listing.skipped))
    if not pending_idx:
        log.info("nothing new under %s: %d videos all committed", cfg.output.path, inputs.num_rows)
        return result

    pending = inputs.take(pa.array(pending_idx, pa.int64()))
    run_id = new_run_id(now)
    rel_dir = run_folder(now.strftime("%Y-%m-%d"), run_id)
    target = sink.SinkTarget(root.filesystem, f"{root.path}/{rel_dir}", f"{root.uri}/{rel_dir}")
    t0 = time.perf_counter()
    run_cfg = cfg.model_copy(update={"run_id": run_id})
    res = execute(run_cfg, pending.select(VIDEO_SCHEMA.names), target, run_id, t0=t0)

    pause = float(os.environ.get(PAUSE_ENV, "0") or 0)
    if pause > 0:
        log.warning("%s=%s: data written, sleeping before the commit marker", PAUSE_ENV, pause)
        print(f"DATA WRITTEN {target.uri}", flush=True)
        time.sleep(pause)

    s = res.summary
    manifest = {
        "manifest_version": MANIFEST_VERSION,
        "run_id": run_id,
        "date": now.strftime("%Y-%m-%d"),
        "started_at": now.isoformat(),
        "committed_at": _dt.datetime.now(_dt.timezone.utc).isoformat(),
        "code_version": code_version(),
        "inputs": [{"video_id": r["video_id"], "video_uri": r["video_uri"], "etag": r["etag"]}
                   for r in pending.select(["video_id", "video_uri", "etag"]).to_pylist()],
        "tasks": [t.task_id for t in global_tasks(cfg.tasks)] + (["vq:*"] if cfg.tasks.use_manifest_questions and cfg.input.manifest else []),
        "counts": {"videos": s.videos, "videos_ok": s.videos_ok, "videos_error": s.videos_error,
                   "rows": s.rows, "rows_ok": s.rows_ok, "rows_error": s.rows_error, "files": s.files,
                   "new": new, "changed": changed},
        "files": [p.rsplit("/", 1)[-1] for p in sink.list_files(target)],
        "config": cfg.model_dump(mode="json"),
    }
    result.run_id = run_id
    result.summary = s
    if lock is not None:
        lock.check()  # never commit a run whose lock another nightly took over
    result.manifest_uri = _write_manifest(root, rel_dir, manifest)
    return result
