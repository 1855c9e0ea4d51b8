"""Incremental (nightly) indexing: process only new or changed videos; the corpus protocol plus a run manifest.

Layout under ``output.path`` (local folder or ``s3://bucket/prefix``)::

    date=YYYY-MM-DD/run=<run_id>/part-*.parquet, _commits/*.json    the run's chunks (pipeline.sink)
    date=YYYY-MM-DD/run=<run_id>/_manifest.json                       the RUN MANIFEST, created last

A nightly run writes its chunks exactly as a corpus run does (:mod:`pipeline.sink`); the run becomes visible
when its run manifest is created (:func:`pipeline.storage.put_if_absent`), after every chunk. The manifest
records the run id, the inputs it processed (``video_id``, ``video_uri``, ``etag`` from the listing, see
:func:`pipeline.storage.etag_of`), the task ids, the configuration, row counts and the code version.

State = the committed run manifests: a video is *done* when one of them holds its ``(video_uri, etag)``. A run
processes every listed video that is not done (new, changed, or lost by a killed run), so no
``(video_uri, etag, task_id)`` row is committed twice. Run folders without a run manifest (a run that did not
finish) are never read and are deleted at the start of the next run. One nightly at a time per output: each
holds the lock ``_locks/nightly.json`` (:mod:`pipeline.lock`) from planning to commit (``jobs.nightly`` exits
75 when another holds it), and a run whose lock was taken over does not commit.

Read with the one reader, :func:`pipeline.sink.read_committed` (committed runs only; ``latest=True``: each
video's newest version, ``latest=False``: every committed version), or hand the committed files to any reader::

    from pipeline.sink import committed_files, read_committed
    table = read_committed("s3://bucket/index/", columns=[...])
    fs, files = committed_files("s3://bucket/index/")   # pyarrow.dataset.dataset(files, filesystem=fs,
                                                         #   partitioning="hive", partition_base_dir=...)

Task sets: the state key is the video, not the (video, task) pair; when ``tasks`` change, the new tasks are
not back-filled for videos already done (start a new output path). The manifest records the task ids.
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

from pipeline import sink, storage
from pipeline.sources import ListingReport, list_videos
from pipeline.tasks import global_tasks

log = logging.getLogger(__name__)

MANIFEST_NAME = sink.RUN_MANIFEST
MANIFEST_VERSION = 2
#: The lock a nightly run holds on its output root (``<output.path>/_locks/nightly.json``).
NIGHTLY_LOCK = "nightly"
#: Test hook: seconds to sleep after the data is committed and before the run manifest.
PAUSE_ENV = "DYCOKE_NIGHTLY_PAUSE_BEFORE_COMMIT_S"


def run_folder(date: str, run_id: str) -> str:
    return f"date={date}/run={run_id}"


@dataclass
class State:
    """The committed run manifests and the uncommitted run folders under an output root."""

    manifests: list[dict] = field(default_factory=list)
    committed_dirs: list[str] = field(default_factory=list)
    uncommitted_dirs: list[str] = field(default_factory=list)

    def done(self) -> dict[tuple[str, str | None], str]:
        """``(video_uri, etag)`` -> the run that committed it."""
        return {(v["video_uri"], v["etag"]): m["run_id"] for m in self.manifests for v in m["inputs"]}


def load_state(root: storage.Location, s3_cfg=None) -> State:
    """Every ``date=*/run=*`` folder under ``root``: committed (it holds a run manifest) or not."""
    found = sink.committed(root, s3_cfg, chunks=False)
    dirs = sorted({"/".join(rel.split("/")[:2]) for rel in found.files
                   if rel.startswith("date=") and "/run=" in rel and len(rel.rstrip("/").split("/")) >= 2})
    state = State()
    for rel in dirs:
        if rel in found.run_manifests:
            state.committed_dirs.append(rel)
            state.manifests.append(found.run_manifests[rel])
        else:
            state.uncommitted_dirs.append(rel)
    return state


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
    not_listed: dict = field(default_factory=dict)  # reason -> count (pipeline.sources.ListingReport)

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


def run_nightly(cfg, now: _dt.datetime | None = None) -> NightlyResult:
    """List, diff against the committed state, process what is missing, commit. See the module doc."""
    from pipeline.run import output_lock

    now = now or _dt.datetime.now(_dt.timezone.utc)
    # one nightly per output at a time: two would both process the same new videos (see pipeline.lock)
    with output_lock(cfg, NIGHTLY_LOCK) as lock:
        return _run_nightly_locked(cfg, now, lock)


def _run_nightly_locked(cfg, now: _dt.datetime, lock) -> NightlyResult:
    from pipeline.run import execute

    root = storage.resolve(cfg.output.path, cfg.s3)
    state = load_state(root, cfg.s3)
    for rel in state.uncommitted_dirs:
        log.warning("deleting uncommitted run folder %s/%s (a run that did not finish)", root.uri, rel)
        root.filesystem.delete_dir(f"{root.path}/{rel}")

    listing = ListingReport()
    inputs = list_videos(cfg.input, cfg.s3, listing, etags=True)
    done = state.done()
    known_uris = {uri for uri, _ in done}
    pending_idx, new, changed = [], 0, 0
    for i, key in enumerate(zip(inputs.column("video_uri").to_pylist(), inputs.column("video_etag").to_pylist())):
        if key in done:
            continue
        pending_idx.append(i)
        if key[0] in known_uris:
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
    target = root.child(rel_dir)
    res = execute(cfg.model_copy(update={"run_id": run_id}), pending, target, run_id, t0=time.perf_counter())

    pause = float(os.environ.get(PAUSE_ENV, "0") or 0)
    if pause > 0:
        log.warning("%s=%s: data committed, sleeping before the run manifest", PAUSE_ENV, pause)
        print(f"DATA WRITTEN {target.uri}", flush=True)
        time.sleep(pause)

    s = res.summary
    chunks = sink.committed(target, cfg.s3).chunks
    manifest = {
        "manifest_version": MANIFEST_VERSION,
        "run_id": run_id,
        "date": now.strftime("%Y-%m-%d"),
        "started_at": now.isoformat(),
        "committed_at": _dt.datetime.now(_dt.timezone.utc).isoformat(),
        "code_version": code_version(),
        "inputs": pending.select(["video_id", "video_uri", "video_etag"]).rename_columns(["video_id", "video_uri", "etag"]).to_pylist(),
        "tasks": [t.task_id for t in global_tasks(cfg.tasks)]
        + (["vq:*"] if cfg.tasks.use_manifest_questions and cfg.input.manifest else []),
        "counts": {"videos": s.videos, "videos_ok": s.videos_ok, "videos_error": s.videos_error,
                   "rows": s.rows, "rows_ok": s.rows_ok, "rows_error": s.rows_error, "files": s.files,
                   "new": new, "changed": changed},
        "chunks": sorted(m["chunk"] for _, m in chunks),
        "files": sorted(f["name"] for _, m in chunks for f in m["files"]),
        "config": cfg.model_dump(mode="json"),
    }
    result.run_id, result.summary = run_id, s
    if lock is not None:
        lock.check()  # never commit a run whose lock another nightly took over
    result.manifest_uri = target.child(MANIFEST_NAME).uri
    if storage.put_if_absent(result.manifest_uri, json.dumps(manifest, indent=1, sort_keys=True, default=str).encode(),
                             cfg.s3) is None:
        raise RuntimeError(f"{result.manifest_uri} exists already: run ids must be unique")
    return result
