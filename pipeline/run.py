"""Run a configured job end to end: connect Ray, list videos, plan (resume), build the graph, write, summarise."""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass

import pyarrow.compute as pc

from pipeline import sink, storage
from pipeline.config import ConfigurationError, PipelineConfig
from pipeline.lock import RunLock, pid_alive
from pipeline.report import write_report
from pipeline.sources import ListingReport, SourceError, list_videos
from pipeline.summary import SUMMARY_COLUMNS, Summary, ray_stages, ray_timeline, summarize
from pipeline.tasks import expected_task_ids

log = logging.getLogger(__name__)

#: the longest temp folder a local Ray's sockets fit under: AF_UNIX paths are at most 107 bytes and Ray adds
#: "/ray-XXXXXXXX/session_<date>_<time>_<usec>_<pid>/sockets/plasma_store" (up to 77)
RAY_TEMP_MAX = 30
_OWNER = ".pipeline-owner"  # "<pid> <host>" of the job whose local Ray uses the folder


@dataclass
class RunResult:
    summary: Summary
    target: storage.Location  #: the run folder


def local_ray_temp_dir() -> str:
    """A fresh folder of the job's own for a local Ray's session files and sockets, under ``$RAY_TMPDIR`` or the
    system temp folder when its path is short enough, else under ``/tmp``; raises :class:`ConfigurationError` when
    none is. Folders of earlier jobs on this host whose process is gone (SIGKILLed: no exit handler) are removed."""
    tried = list(dict.fromkeys(b for b in (os.environ.get("RAY_TMPDIR"), tempfile.gettempdir(), "/tmp") if b))
    for base in tried:
        if len(base) <= RAY_TEMP_MAX and os.path.isdir(base) and os.access(base, os.W_OK | os.X_OK):
            _remove_stale_ray_temp_dirs(base)
            path = tempfile.mkdtemp(prefix="ray-", dir=base)
            with open(os.path.join(path, _OWNER), "w") as f:
                f.write(f"{os.getpid()} {socket.gethostname()}\n")
            return path
    raise ConfigurationError(
        f"cannot start a local Ray: its sockets need a writable temp folder with a path of at most {RAY_TEMP_MAX} "
        f"characters (AF_UNIX paths are limited to 107 bytes), and {' and '.join(repr(t) for t in tried)} are too long "
        "or not writable; set TMPDIR to a short folder (e.g. TMPDIR=/tmp), or connect to a cluster (ray.address)")


def _remove_stale_ray_temp_dirs(base: str) -> None:
    """Only folders carrying the owner file, of a process that is gone, on this host."""
    try:
        entries = [e for e in os.scandir(base) if e.name.startswith("ray-") and e.is_dir(follow_symlinks=False)]
    except OSError:
        return
    for entry in entries:
        try:
            with open(os.path.join(entry.path, _OWNER)) as f:
                pid, host = f.read().split()[:2]
            if host != socket.gethostname() or pid_alive(int(pid)):
                continue
        except (OSError, ValueError):
            continue  # not a job's folder, or one being created
        log.info("removing %s: the local Ray temp folder of job process %s, which is gone", entry.path, pid)
        shutil.rmtree(entry.path, ignore_errors=True)


def _stop_local_ray(temp_dir: str) -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()
    shutil.rmtree(temp_dir, ignore_errors=True)


def init_ray(cfg: PipelineConfig) -> None:
    """Connect to ``ray.address`` / the ``ray job submit`` cluster, else start a local Ray (once) in a short temp
    folder of the job's own (:func:`local_ray_temp_dir`), shut down and removed when the process exits."""
    import ray

    if ray.is_initialized():
        return
    if cfg.ray.address is not None or os.environ.get("RAY_ADDRESS"):
        ray.init(address=cfg.ray.address, log_to_driver=True)
        log.info("connected to Ray at %s: %s", cfg.ray.address or os.environ["RAY_ADDRESS"], ray.cluster_resources())
        return
    temp_dir = local_ray_temp_dir()
    try:
        ray.init(num_cpus=cfg.ray.num_cpus, include_dashboard=False, log_to_driver=True, _temp_dir=temp_dir)
    except BaseException:
        _stop_local_ray(temp_dir)
        raise
    atexit.register(_stop_local_ray, temp_dir)
    log.info("started a local Ray (temp folder %s): %s", temp_dir, ray.cluster_resources())


def model_image_size(cfg: PipelineConfig) -> int:
    """The model's square input side: ``decode.frame_size`` when set, else the checkpoint's preprocessor config
    read by the one reader the model stages use (:meth:`dycoke.llava.PixelSpec.from_checkpoint`; for an ``s3://``
    checkpoint, on copies of just its preprocessor files). Called once per run, after the resume check."""
    if cfg.decode.frame_size:
        return int(cfg.decode.frame_size)
    from dycoke.llava import PixelSpec

    source = cfg.model.source
    try:
        if not storage.is_s3(source):
            return PixelSpec.from_checkpoint(source).size
        with tempfile.TemporaryDirectory() as tmp:
            for name in ("video_preprocessor_config.json", "preprocessor_config.json"):
                with contextlib.suppress(FileNotFoundError):  # the reader tries the other
                    body = storage.read_bytes(source.rstrip("/") + "/" + name, cfg.s3)
                    with open(os.path.join(tmp, name), "wb") as f:
                        f.write(body)
            return PixelSpec.from_checkpoint(tmp).size
    except Exception as exc:  # noqa: BLE001 - reported as a configuration problem
        raise ConfigurationError(f"model.source {source!r}: cannot read the model's image size ({type(exc).__name__}: "
                                 f"{exc}); check the path or set decode.frame_size") from exc


def output_lock(cfg: PipelineConfig, name: str):
    """The run lock ``<output.path>/_locks/<name>.json`` (:mod:`pipeline.lock`), or a no-op when
    ``output.lock`` is off. Raises :class:`pipeline.lock.LockHeld` on entry when another run holds it."""
    if not cfg.output.lock:
        return contextlib.nullcontext()
    return RunLock.for_output(cfg.output.path, name, cfg.s3, cfg.output.lock_stale_s, cfg.effective_run_id())


def run(cfg: PipelineConfig) -> RunResult:
    """Execute the job described by ``cfg``; returns the summary of what is committed in its run folder.

    ``output.on_existing: resume`` (the default): a run folder holding committed chunks is resumed
    (:func:`pipeline.sink.plan_resume`); when every video is complete nothing runs (Ray is not even started).
    ``overwrite``: the folder is cleared and every video processed."""
    run_id, t0, listing = cfg.effective_run_id(), time.perf_counter(), ListingReport()
    videos = list_videos(cfg.input, cfg.s3, listing)
    if videos.num_rows == 0:
        where = cfg.input.s3_prefix or cfg.input.manifest or cfg.input.local_dir
        raise SourceError(f"no videos found in {where} (extensions {cfg.input.extensions})")
    target = storage.resolve(sink.run_uri(cfg.output.path, run_id), cfg.s3)
    with output_lock(cfg, run_id):
        attempt, todo = 0, videos
        if cfg.output.on_existing == "overwrite":
            sink.clear(target)
        else:
            plan = sink.plan_resume(target, videos, expected_task_ids(cfg.tasks, videos),
                                    cfg.output.retry_error_types, cfg.s3)
            attempt, todo = plan.attempt, plan.todo
            if plan.resuming:
                log.info("resuming run %s: %d of %d videos already complete, %d to do (attempt %d; %d chunks "
                         "committed, %d uncommitted files deleted)", run_id, plan.done, plan.total, todo.num_rows,
                         plan.attempt, plan.chunks, len(plan.removed))
            if plan.retried:
                log.info("retrying %d videos whose rows hold a transient error (output.retry_error_types=%s)",
                         plan.retried, ",".join(cfg.output.retry_error_types))
        if todo.num_rows:
            result = execute(cfg, todo, target, run_id, t0=t0, attempt=attempt)
        else:
            log.info("run %s is complete: nothing to do", run_id)
            result = RunResult(_summary(target, cfg, run_id, time.perf_counter() - t0, 0)[0], target)
    _with_listing(result.summary, listing)
    return result


def _with_listing(summary: Summary, listing: ListingReport) -> Summary:
    summary.not_listed = dict(listing.skipped)
    summary.not_listed_examples = {k: list(v) for k, v in listing.examples.items()}
    return summary


def _summary(target: storage.Location, cfg, run_id: str, wall_s: float, videos_this_run: int, ray=None):
    """The summary of every committed row of the run folder, and those rows (:data:`SUMMARY_COLUMNS`, one version
    per video)."""
    state = sink.committed(target, cfg.s3)
    written = sink.read_committed(target, SUMMARY_COLUMNS, s3_cfg=cfg.s3, state=state)
    return summarize(written, run_id=run_id, output_uri=target.uri, wall_s=wall_s, files=len(state.file_paths()),
                     videos_this_run=videos_this_run, ray=ray), written


def execute(cfg: PipelineConfig, videos, target: storage.Location, run_id: str, *, frame_size: int | None = None,
            t0: float | None = None, attempt: int = 0) -> RunResult:
    """Process exactly the rows of ``videos`` (:data:`pipeline.schema.VIDEO_SCHEMA`) into the run folder ``target``,
    committing chunks numbered ``attempt`` (:mod:`pipeline.sink`); the summary covers every committed row of the
    folder. Used by :func:`run` and by jobs that pick their own video list and folder (nightly, evaluation)."""
    from pipeline import graph

    t0 = time.perf_counter() if t0 is None else t0
    frame_size = frame_size or model_image_size(cfg)
    init_ray(cfg)
    log.info("run %s: %d videos -> %s (%s mode, %d frames at %dpx)", run_id, videos.num_rows, target.uri,
             cfg.resolved_mode, cfg.decode.num_frames, frame_size)
    if cfg.effective_run_id() != run_id:  # the stages write cfg's run id into the rows
        cfg = cfg.model_copy(update={"run_id": run_id})
    ds = graph.build(cfg, videos, frame_size)
    chunks = graph.write(ds, sink.ChunkWriter(target.uri, attempt, cfg.output, cfg.s3))
    log.info("run %s: %d chunks committed", run_id, len(chunks))
    summary, written = _summary(target, cfg, run_id, time.perf_counter() - t0, videos.num_rows, ray=ray_stages(ds))
    missing = videos.num_rows - pc.sum(pc.is_in(videos.column("video_id"), value_set=written.column("video_id"))).as_py()
    if missing:
        log.error("%d input videos have no committed row", missing)
    write_report(target, summary, written, ray_timeline(ds))
    return RunResult(summary=summary, target=target)
