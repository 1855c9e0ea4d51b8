"""The Ray Data graph: the ONLY module that imports ``ray.data``.

::

    from_arrow(video list)                                     driver
      -> map_batches(decode.decode_batch) CPU tasks              num_cpus=decode_num_cpus, memory=decode_memory_gb
      -> map_batches(FusedStage)          actor pool             num_gpus=gpus_per_actor       (fused mode;
                                          actor_concurrency calls per actor feed one running engine)
         or map_batches(EncodeStage) -> map_batches(GenerateStage)   two actor pools           (split mode)
      -> write_parquet(<output>/<run_id>/, deterministic names, sized files; OVERWRITE for a fresh run,
                       APPEND with new attempt names when a killed run is resumed)

Decode tasks reserve CPUs and memory; model actors reserve their GPUs plus ``actor_num_cpus``; so
Ray's scheduler (and Ray Data's resource manager, which backpressures decode when the actors fall
behind) keeps decode from starving the GPU stages and vice versa.
"""

from __future__ import annotations

import logging
import math

import pyarrow as pa
import ray
import ray.data
from ray.data import ActorPoolStrategy, TaskPoolStrategy
from ray.data.datasource import FilenameProvider

from pipeline import decode
from pipeline.sink import SinkTarget, filename_for_task, parquet_write_options
from pipeline.stages import EncodeStage, FusedStage, GenerateSettings, GenerateStage, ModelSettings

log = logging.getLogger(__name__)

MAX_SOURCE_BLOCKS = 20_000


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


def _actors(n: int, max_actors: int | None, concurrency: int = 1) -> ActorPoolStrategy:
    """A pool of ``n`` actors (autoscaling to ``max_actors``); ``concurrency > 1`` lets each actor run that many
    calls at once on threads (the engine stages are thread-safe: their calls feed one engine loop)."""
    threads = {"max_concurrent_calls_per_actor": concurrency, "enable_true_multi_threading": True} if concurrency > 1 else {}
    if max_actors and max_actors > n:
        return ActorPoolStrategy(min_size=n, max_size=max_actors, **threads)
    return ActorPoolStrategy(size=n, **threads)


def build(cfg, videos: pa.Table, frame_size: int, model_settings: ModelSettings,
          gen_settings: GenerateSettings) -> ray.data.Dataset:
    """The lazy Dataset from the video list to output rows (nothing runs until it is consumed); ``frame_size``: the
    model's input side (the decode stage resizes to it)."""
    st = cfg.stages
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = cfg.ray.progress_bars
    ctx.enable_operator_progress_bars = cfg.ray.progress_bars

    ds = ray.data.from_arrow(_source_blocks(videos, st.decode_batch_size))
    # The memory request bounds concurrent decodes per node, and it also makes the decode task's resource
    # request differ from the model actors', so Ray Data never fuses decode into a model actor (it fuses a
    # task op into the next actor op when their remote args are identical).
    ds = ds.map_batches(
        decode.decode_batch,
        fn_kwargs=decode.stage_kwargs(cfg, frame_size),
        batch_size=st.decode_batch_size,
        batch_format="pyarrow",
        compute=TaskPoolStrategy(size=st.decode_max_tasks),
        num_cpus=st.decode_num_cpus,
        memory=int(st.decode_memory_gb * 1024**3),
    )
    model_args = {"num_gpus": st.gpus_per_actor, "num_cpus": st.actor_num_cpus, "batch_format": "pyarrow"}
    if st.resolved_mode == "fused":
        gpus = ray.cluster_resources().get("GPU", 0.0)
        if st.gpu and st.fused_actors is None and gpus < st.gpus_per_actor:
            log.warning("the cluster shows no GPU yet (autoscaling?): starting 1 fused actor; set stages.fused_actors")
        ds = ds.map_batches(
            FusedStage,
            fn_constructor_kwargs={"model": model_settings, "settings": gen_settings},
            batch_size=st.resolved_fused_batch_size,
            compute=_actors(st.resolved_fused_actors(gpus), st.max_actors, st.actor_concurrency),
            **model_args,
        )
    else:
        ds = ds.map_batches(
            EncodeStage,
            fn_constructor_kwargs={"model": model_settings, "dycoke_settings": gen_settings.dycoke},
            batch_size=st.encode_batch_size,
            compute=_actors(st.encode_actors, st.max_actors),
            **model_args,
        )
        ds = ds.map_batches(
            GenerateStage,
            fn_constructor_kwargs={"model": model_settings, "settings": gen_settings},
            batch_size=st.resolved_generate_batch_size,
            compute=_actors(st.generate_actors, st.max_actors, st.actor_concurrency),
            **model_args,
        )
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
