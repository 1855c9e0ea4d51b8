"""The Ray Data graph: the ONLY module that imports ``ray.data``. The graph is data: a list of
:class:`StageSpec` built from the per-stage config sections, applied in one loop of ``map_batches``.

::

    from_arrow(video list)                                     driver
      -> decode_batch       CPU tasks    cfg.decode: batch_size, concurrency (max tasks), num_cpus, memory
      -> FusedStage         actor pool   cfg.fused: batch_size, concurrency (actors), num_gpus, num_cpus;
                                         max_concurrent_batches calls per actor feed one running engine  (fused mode)
         or EncodeStage -> GenerateStage  two actor pools, cfg.encode and cfg.generate                    (split mode)
      -> write_parquet(<output>/<run_id>/, deterministic names, sized files; OVERWRITE for a fresh run,
                       APPEND with new attempt names when a killed run is resumed)

Decode tasks reserve CPUs and memory; model actors reserve their GPUs and CPUs; so Ray's scheduler (and Ray
Data's resource manager, which backpressures decode when the actors fall behind) keeps decode from starving the
GPU stages and vice versa. Each stage checks its input columns on its first batch
(:func:`pipeline.schema.require_columns`).
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
from ray.data import ActorPoolStrategy, TaskPoolStrategy
from ray.data.datasource import FilenameProvider

from pipeline import decode
from pipeline.sink import SinkTarget, filename_for_task, parquet_write_options
from pipeline.stages import EncodeStage, FusedStage, GenerateStage

log = logging.getLogger(__name__)

MAX_SOURCE_BLOCKS = 20_000


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

    @property
    def is_actor(self) -> bool:
        return isinstance(self.fn, type)

    def map_args(self) -> dict:
        s = self.section
        args: dict = {"batch_size": self.batch_size, "batch_format": "pyarrow", "num_cpus": s.num_cpus}
        if s.num_gpus:
            args["num_gpus"] = s.num_gpus
        if s.memory:
            args["memory"] = int(s.memory)
        if not self.is_actor:
            return {**args, "fn_kwargs": self.kwargs, "compute": TaskPoolStrategy(size=self.concurrency)}
        n = self.concurrency or 1
        lo, hi = n if isinstance(n, tuple) else (n, n)
        threads = ({"max_concurrent_calls_per_actor": self.calls_per_actor, "enable_true_multi_threading": True}
                   if self.calls_per_actor > 1 else {})  # the engine stages are thread-safe: calls feed one engine loop
        pool = ActorPoolStrategy(size=lo, **threads) if lo == hi else ActorPoolStrategy(min_size=lo, max_size=hi, **threads)
        return {**args, "fn_constructor_kwargs": self.kwargs, "compute": pool}


def stage_specs(cfg, frame_size: int, cluster_gpus: float = 0.0) -> list[StageSpec]:
    """The stages of ``cfg`` in order: decode (resizing to ``frame_size``, the model's input side), then fused
    (fused mode) or encode and generate (split mode)."""
    # The memory request bounds concurrent decodes per node, and it also makes the decode task's resource
    # request differ from the model actors', so Ray Data never fuses decode into a model actor.
    specs = [StageSpec(decode.decode_batch, cfg.decode, cfg.decode.batch_size, decode.stage_kwargs(cfg, frame_size),
                       cfg.decode.concurrency)]
    if cfg.resolved_mode == "fused":
        f = cfg.fused
        if f.num_gpus and f.concurrency is None and cluster_gpus < f.num_gpus:
            log.warning("the cluster shows no GPU yet (autoscaling?): starting 1 fused actor; set fused.concurrency")
        return specs + [StageSpec(FusedStage, f, f.resolved_batch_size, {"cfg": cfg}, f.resolved_concurrency(cluster_gpus),
                                  f.max_concurrent_batches)]
    e, g = cfg.encode, cfg.generate
    return specs + [StageSpec(EncodeStage, e, e.batch_size, {"cfg": cfg}, e.concurrency),
                    StageSpec(GenerateStage, g, g.resolved_batch_size, {"cfg": cfg}, g.concurrency, g.max_concurrent_batches)]


class RunFilenames(FilenameProvider):
    """File names of one write (:func:`pipeline.sink.filename_for_task`).

    Attempt 0: ``part-<task:05d>-<i>.parquet``, deterministic per run. Attempt >= 1 (resuming):
    ``part-<attempt:03d>-<task:05d>-<write uuid>-<i>.parquet``, never an earlier attempt's name, and
    the same for every retry of one write task (so a retried task overwrites its own file).
    """

    def __init__(self, attempt: int = 0):
        super().__init__(file_format="parquet")
        self.attempt = attempt

    def get_filename_for_task(self, write_uuid: str, task_index: int) -> str:
        return filename_for_task(task_index, self.attempt, write_uuid)


def _source_blocks(videos: pa.Table, rows_per_block: int) -> list[pa.Table]:
    n = videos.num_rows
    rows_per_block = max(rows_per_block, math.ceil(n / MAX_SOURCE_BLOCKS))
    return [videos.slice(i, rows_per_block) for i in range(0, n, rows_per_block)] or [videos]


def build(cfg, videos: pa.Table, frame_size: int) -> ray.data.Dataset:
    """The lazy Dataset from the video list to output rows (nothing runs until it is consumed); ``frame_size``: the
    model's input side (the decode stage resizes to it)."""
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = cfg.ray.progress_bars
    ctx.enable_operator_progress_bars = cfg.ray.progress_bars
    ds = ray.data.from_arrow(_source_blocks(videos, cfg.decode.batch_size))
    for spec in stage_specs(cfg, frame_size, ray.cluster_resources().get("GPU", 0.0)):
        ds = ds.map_batches(spec.fn, **spec.map_args())
    return ds


def write(ds: ray.data.Dataset, cfg, target: SinkTarget, attempt: int = 0) -> None:
    """Execute the graph and write Parquet to ``target``.

    ``attempt=0``: replace the run folder's previous files (``SaveMode.OVERWRITE``). ``attempt >= 1``
    (resuming, see :func:`pipeline.sink.plan_resume`): add files named for this attempt next to the
    folder's files (``SaveMode.APPEND``).
    """
    from ray.data import SaveMode

    out = cfg.output
    ds.write_parquet(
        target.path,
        filesystem=target.filesystem,
        filename_provider=RunFilenames(attempt),
        mode=SaveMode.OVERWRITE if attempt == 0 else SaveMode.APPEND,
        min_rows_per_file=out.min_rows_per_file,
        max_rows_per_file=out.max_rows_per_file,
        **parquet_write_options(out),
    )
