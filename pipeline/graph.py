"""The Ray Data graph, the ONLY module that imports ``ray.data``: a list of :class:`StageSpec` built from the
per-stage config sections, applied in one loop of ``map_batches``::

    from_arrow(video list)                      driver
      -> decode_batch                 CPU tasks   cfg.decode
      -> FusedStage                   actors      cfg.fused (fused mode; max_concurrent_batches calls feed one engine)
         or EncodeStage -> GenerateStage          cfg.encode, cfg.generate (split mode)
      -> CommitSink                   write tasks each commits its rows as one chunk (pipeline.sink)

Decode tasks reserve CPUs and memory and model actors their GPUs and CPUs, so Ray's scheduler and Ray Data's
backpressure keep either side from starving the other. Each stage checks its input columns on its first batch.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import ray
import ray.data
from ray.data import ActorPoolStrategy, Datasink, TaskPoolStrategy
from ray.data.block import BlockAccessor

from pipeline import decode
from pipeline.sink import ChunkWriter
from pipeline.stages import EncodeStage, FusedStage, GenerateStage

log = logging.getLogger(__name__)

MAX_SOURCE_BLOCKS = 20_000  #: the video list is cut into blocks of decode.batch_size rows, at most this many


@dataclass(frozen=True)
class StageSpec:
    """One ``map_batches`` step: the callable (a function for CPU tasks, a class for an actor pool), its arguments,
    its batch size and its resources (a :class:`pipeline.sections.StageConfig`: num_cpus, num_gpus, memory, and
    concurrency = max tasks, or actors / [min, max] actors)."""

    fn: Callable
    section: Any
    batch_size: int
    kwargs: dict = field(default_factory=dict)
    concurrency: int | tuple[int, int] | None = None
    calls_per_actor: int = 1

    def map_args(self) -> dict:
        s = self.section
        args: dict = {"batch_size": self.batch_size, "batch_format": "pyarrow", "num_cpus": s.num_cpus}
        if s.num_gpus:
            args["num_gpus"] = s.num_gpus
        if s.memory:
            args["memory"] = int(s.memory)
        if not isinstance(self.fn, type):  # a function: CPU tasks
            return {**args, "fn_kwargs": self.kwargs, "compute": TaskPoolStrategy(size=self.concurrency)}
        n = self.concurrency or 1
        lo, hi = n if isinstance(n, tuple) else (n, n)
        threads = ({"max_concurrent_calls_per_actor": self.calls_per_actor, "enable_true_multi_threading": True}
                   if self.calls_per_actor > 1 else {})  # the engine stages are thread-safe: calls feed one engine loop
        return {**args, "fn_constructor_kwargs": self.kwargs,
                "compute": ActorPoolStrategy(min_size=lo, max_size=hi, **threads)}


def stage_specs(cfg, frame_size: int, cluster_gpus: float = 0.0) -> list[StageSpec]:
    """The stages of ``cfg`` in order: decode (resizing to ``frame_size``, the model's input side), then fused
    (fused mode) or encode and generate (split mode)."""
    cfg = decode.place(cfg)  # decode.where: auto resolved once, for the decode tasks and the model actors alike
    # The memory request bounds concurrent decodes per node, and it also makes the decode task's resource
    # request differ from the model actors', so Ray Data never fuses decode into a model actor.
    specs = [StageSpec(decode.decode_batch, cfg.decode, cfg.decode.batch_size, decode.stage_kwargs(cfg, frame_size),
                       cfg.decode.concurrency)]
    if cfg.resolved_mode == "fused":
        f = cfg.fused
        if f.num_gpus and f.concurrency is None and cluster_gpus < f.num_gpus:
            log.warning("the cluster shows no GPU yet (autoscaling?): starting 1 fused actor; set fused.concurrency")
        return specs + [StageSpec(FusedStage, f, f.resolved_batch_size, {"cfg": cfg, "frame_size": frame_size},
                                  f.resolved_concurrency(cluster_gpus), f.max_concurrent_batches)]
    e, g = cfg.encode, cfg.generate
    return specs + [StageSpec(EncodeStage, e, e.batch_size, {"cfg": cfg, "frame_size": frame_size}, e.concurrency),
                    StageSpec(GenerateStage, g, g.resolved_batch_size, {"cfg": cfg}, g.concurrency, g.max_concurrent_batches)]


class CommitSink(Datasink):
    """Ray Data's write hooks around :class:`pipeline.sink.ChunkWriter`: one committed chunk per write task."""

    def __init__(self, writer: ChunkWriter):
        self.writer = writer
        self.chunks: list[dict] = []

    def write(self, blocks, ctx) -> dict | None:
        return self.writer.write((BlockAccessor.for_block(b).to_arrow() for b in blocks), ctx.task_idx)

    def on_write_complete(self, write_result) -> None:
        self.chunks = [m for m in write_result.write_returns if m]

    @property
    def min_rows_per_write(self) -> int:
        return self.writer.output.min_rows_per_file


def build(cfg, videos: pa.Table, frame_size: int) -> ray.data.Dataset:
    """The lazy Dataset from the video list to output rows (nothing runs until it is consumed); ``frame_size``: the
    model's input side (the decode stage resizes to it)."""
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = cfg.ray.progress_bars
    ctx.enable_operator_progress_bars = cfg.ray.progress_bars
    step = max(cfg.decode.batch_size, math.ceil(videos.num_rows / MAX_SOURCE_BLOCKS))
    ds = ray.data.from_arrow([videos.slice(i, step) for i in range(0, videos.num_rows, step)] or [videos])
    for spec in stage_specs(cfg, frame_size, ray.cluster_resources().get("GPU", 0.0)):
        ds = ds.map_batches(spec.fn, **spec.map_args())
    return ds


def write(ds: ray.data.Dataset, writer: ChunkWriter) -> list[dict]:
    """Execute the graph; every write task commits its rows as a chunk (:mod:`pipeline.sink`). Returns the
    chunk manifests committed."""
    sink = CommitSink(writer)
    ds.write_datasink(sink)
    return sink.chunks
