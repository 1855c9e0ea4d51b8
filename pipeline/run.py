"""Run a configured job end to end: connect Ray, list videos, build the graph, write, summarise."""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass

from pipeline import s3, sink
from pipeline.config import ConfigurationError, PipelineConfig
from pipeline.decode import DecodeSettings
from pipeline.sources import SourceError, list_videos
from pipeline.stages import GenerateSettings, ModelSettings
from pipeline.summary import SUMMARY_COLUMNS, Summary, summarize

log = logging.getLogger(__name__)


@dataclass
class RunResult:
    summary: Summary
    target: sink.SinkTarget


def init_ray(cfg: PipelineConfig) -> None:
    """Connect to ``ray.address`` / the ``ray job submit`` cluster, else start a local Ray (once)."""
    import ray

    if ray.is_initialized():
        return
    address = cfg.ray.address
    if address is None and not os.environ.get("RAY_ADDRESS"):
        ray.init(num_cpus=cfg.ray.num_cpus, include_dashboard=False, log_to_driver=True)
        log.info("started a local Ray: %s", ray.cluster_resources())
    else:
        ray.init(address=address, log_to_driver=True)
        log.info("connected to Ray at %s: %s", address or os.environ.get("RAY_ADDRESS"), ray.cluster_resources())


def model_image_size(cfg: PipelineConfig) -> int:
    """The model's square input side, read from its preprocessor config without loading weights."""
    if cfg.decode.frame_size:
        return int(cfg.decode.frame_size)
    source = cfg.model.source
    try:
        if s3.is_s3(source):
            bucket, prefix = s3.split_uri(source.rstrip("/") + "/")
            client = s3.client(s3.S3Settings.from_config(cfg.s3))
            for name in ("video_preprocessor_config.json", "preprocessor_config.json"):
                try:
                    data = json.loads(client.get_object(Bucket=bucket, Key=prefix + name)["Body"].read())
                except Exception as exc:  # noqa: BLE001 - try the next file name
                    if s3.error_code(exc) in ("NoSuchKey", "404"):
                        continue
                    raise
                size = data.get("size", {})
                return int(size.get("height") or size.get("shortest_edge"))
            raise FileNotFoundError(f"no preprocessor config under {source}")
        from dycoke.llava import PixelSpec

        return PixelSpec.from_checkpoint(source).size
    except Exception as exc:  # noqa: BLE001 - reported as a configuration problem
        raise ConfigurationError(
            f"model.source {source!r}: cannot read the model's image size ({type(exc).__name__}: {exc}); "
            "check the path or set decode.frame_size"
        ) from exc


def run(cfg: PipelineConfig) -> RunResult:
    """Execute the job described by ``cfg``; returns the summary of what was written."""
    run_id = cfg.effective_run_id()
    s3_settings = s3.S3Settings.from_config(cfg.s3)
    frame_size = model_image_size(cfg)
    init_ray(cfg)

    t0 = time.perf_counter()
    videos = list_videos(cfg.input, s3_settings)
    if videos.num_rows == 0:
        where = cfg.input.s3_prefix or cfg.input.manifest or cfg.input.local_dir
        raise SourceError(f"no videos found in {where} (extensions {cfg.input.extensions})")
    target = sink.resolve(cfg.output.path, run_id, s3_settings)
    return execute(cfg, videos, target, run_id, frame_size=frame_size, t0=t0)


def execute(cfg: PipelineConfig, videos, target: sink.SinkTarget, run_id: str, *, frame_size: int | None = None,
            t0: float | None = None) -> RunResult:
    """Process exactly the rows of ``videos`` (:data:`pipeline.schema.VIDEO_SCHEMA`) into ``target``.

    Used by :func:`run` and by jobs that pick their own video list and folder (nightly, evaluation).
    """
    from pipeline import graph

    t0 = time.perf_counter() if t0 is None else t0
    frame_size = frame_size or model_image_size(cfg)
    init_ray(cfg)
    log.info("run %s: %d videos -> %s (%s mode, %d frames at %dpx)", run_id, videos.num_rows, target.uri,
             cfg.stages.resolved_mode, cfg.decode.num_frames, frame_size)

    ds = graph.build(
        cfg,
        videos,
        DecodeSettings.from_config(cfg.decode, frame_size, cfg.s3),
        ModelSettings.from_config(cfg),
        GenerateSettings(run_id=run_id, tasks=cfg.tasks, dycoke=cfg.dycoke,
                         engine_max_batch_size=cfg.stages.engine_max_batch_size),
    )
    graph.write(ds, cfg, target)
    wall = time.perf_counter() - t0

    written = sink.read_run(target, columns=SUMMARY_COLUMNS)
    summary = summarize(written, run_id=run_id, output_uri=target.uri, wall_s=wall, files=len(sink.list_files(target)))
    missing = videos.num_rows - summary.videos
    if missing:
        log.error("%d input videos have no output row", missing)
    return RunResult(summary=summary, target=target)
