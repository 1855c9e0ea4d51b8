"""Incremental (nightly) indexing: process only new or changed videos; the corpus protocol plus a run manifest.

Layout under ``output.path`` (local folder or ``s3://bucket/prefix``)::

    date=YYYY-MM-DD/run=<run_id>/part-*.parquet, _commits/*.json    the run's chunks (pipeline.sink)
    date=YYYY-MM-DD/run=<run_id>/_manifest.json                       the RUN MANIFEST, created last

A run writes its chunks as a corpus run does and becomes visible when its run manifest is created (if absent)
after every chunk; the manifest records the inputs processed (``video_id``, ``video_uri``, the listing's
``etag``), task ids, configuration, counts and code version. A video is done when a committed run manifest holds
its ``(video_uri, etag)``; a run processes every listed video that is not (new, changed, or lost by a killed
run), so no ``(video_uri, etag, task_id)`` row is committed twice. Run folders without a run manifest are never
read (:func:`pipeline.sink.read_committed`) and are deleted by the next run. One nightly per output at a time:
each holds the lock ``_locks/nightly.json`` from planning to commit, and one whose lock was taken over does not
commit. The state key is the video: when ``tasks`` change, done videos are not back-filled (use a new output path).
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
NIGHTLY_LOCK = "nightly"  #: the lock a nightly run holds: ``<output.path>/_locks/nightly.json``
PAUSE_ENV = "DYCOKE_NIGHTLY_PAUSE_BEFORE_COMMIT_S"  #: test hook: seconds to sleep before the run manifest


@dataclass
class State:
    """The committed run manifests and the uncommitted run folders under an output root."""

    manifests: list[dict] = field(default_factory=list)
    committed_dirs: list[str] = field(default_factory=list)
    uncommitted_dirs: list[str] = field(default_factory=list)


def load_state(root: storage.Location, s3_cfg=None) -> State:
    """Every ``date=*/run=*`` folder under ``root``: committed (it holds a run manifest) or not."""
    found = sink.committed(root, s3_cfg, chunks=False)
    dirs = sorted({"/".join(rel.split("/")[:2]) for rel in found.files if rel.startswith("date=") and "/run=" in rel})
    done = [d for d in dirs if d in found.run_manifests]
    return State([found.run_manifests[d] for d in done], done, [d for d in dirs if d not in found.run_manifests])


def code_version() -> str:
    """``git describe`` of the source tree when it is a checkout, else the installed package version."""
    try:
        out = subprocess.run(["git", "describe", "--always", "--dirty", "--tags"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent.parent, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            return "git:" + out.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    from importlib.metadata import PackageNotFoundError, version

    try:
        return "package:" + version("dycoke-pipeline")
    except PackageNotFoundError:
        return "unknown"


@dataclass
class NightlyResult:
    run_id: str | None
    listed: int
    pending: int
    new: int
    changed: int
    removed_uncommitted: list[str]
    summary: object | None = None  #: pipeline.summary.Summary when something ran
    manifest_uri: str | None = None
    not_listed: dict = field(default_factory=dict)  #: reason -> count (pipeline.sources.ListingReport)

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

    with output_lock(cfg, NIGHTLY_LOCK) as lock:  # two nightlies would both process the same new videos
        return _run_nightly_locked(cfg, now or _dt.datetime.now(_dt.timezone.utc), lock)


def _run_nightly_locked(cfg, now: _dt.datetime, lock) -> NightlyResult:
    from pipeline.run import execute

    root = storage.resolve(cfg.output.path, cfg.s3)
    state = load_state(root, cfg.s3)
    for rel in state.uncommitted_dirs:
        log.warning("deleting uncommitted run folder %s/%s (a run that did not finish)", root.uri, rel)
        root.filesystem.delete_dir(f"{root.path}/{rel}")

    listing = ListingReport()
    inputs = list_videos(cfg.input, cfg.s3, listing, etags=True)
    done = {(v["video_uri"], v["etag"]) for m in state.manifests for v in m["inputs"]}
    known = {uri for uri, _ in done}
    keys = list(zip(inputs.column("video_uri").to_pylist(), inputs.column("video_etag").to_pylist()))
    todo = [i for i, key in enumerate(keys) if key not in done]
    changed = sum(keys[i][0] in known for i in todo)
    pending = inputs.take(pa.array(todo, pa.int64()))
    result = NightlyResult(None, inputs.num_rows, pending.num_rows, pending.num_rows - changed, changed,
                           list(state.uncommitted_dirs), not_listed=dict(listing.skipped))
    if not pending.num_rows:
        log.info("nothing new under %s: %d videos all committed", cfg.output.path, inputs.num_rows)
        return result

    run_id = now.strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]
    target = root.child(f"date={now:%Y-%m-%d}/run={run_id}")
    s = execute(cfg.model_copy(update={"run_id": run_id}), pending, target, run_id, t0=time.perf_counter()).summary
    pause = float(os.environ.get(PAUSE_ENV) or 0)
    if pause > 0:
        log.warning("%s=%s: data committed, sleeping before the run manifest", PAUSE_ENV, pause)
        print(f"DATA WRITTEN {target.uri}", flush=True)
        time.sleep(pause)

    chunks = [m for _, m in sink.committed(target, cfg.s3).chunks]
    manifest = {
        "manifest_version": MANIFEST_VERSION, "run_id": run_id, "date": f"{now:%Y-%m-%d}",
        "started_at": now.isoformat(), "committed_at": _dt.datetime.now(_dt.timezone.utc).isoformat(),
        "code_version": code_version(),
        "inputs": pending.select(["video_id", "video_uri", "video_etag"]).rename_columns(
            ["video_id", "video_uri", "etag"]).to_pylist(),
        "tasks": [t.task_id for t in global_tasks(cfg.tasks)]
        + (["vq:*"] if cfg.tasks.use_manifest_questions and cfg.input.manifest else []),
        "counts": {**{k: getattr(s, k) for k in ("videos", "videos_ok", "videos_error", "rows", "rows_ok",
                                                 "rows_error", "files")}, "new": result.new, "changed": changed},
        "chunks": sorted(m["chunk"] for m in chunks),
        "files": sorted(f["name"] for m in chunks for f in m["files"]),
        "config": cfg.model_dump(mode="json"),
    }  # fmt: skip
    result.run_id, result.summary = run_id, s
    if lock is not None:
        lock.check()  # never commit a run whose lock another nightly took over
    result.manifest_uri = target.child(MANIFEST_NAME).uri
    body = json.dumps(manifest, indent=1, sort_keys=True, default=str).encode()
    if storage.put_if_absent(result.manifest_uri, body, cfg.s3) is None:
        raise RuntimeError(f"{result.manifest_uri} exists already: run ids must be unique")
    return result
