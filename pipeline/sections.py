"""Sections of the job configuration (assembled in :mod:`pipeline.config`): the model stages' batch sizes and
resources (as in ``ray.data.llm``'s stage configs), compression, tasks, model and Ray. Defaults live here only."""

from __future__ import annotations

import json
from typing import Annotated, Any, ClassVar, Literal

import yaml
from pydantic import BaseModel, ByteSize, ConfigDict, Field, field_validator, model_validator

from dycoke import ConfigError as DyCokeConfigError
from dycoke import DyCokeConfig

GiB = 1024**3
Bytes = Annotated[ByteSize, Field(ge=1)]  #: bytes, or a size such as '2GiB' or '0.25GiB'


class ConfigurationError(ValueError):
    """The configuration file or an override is invalid; the message names the field(s)."""


class Section(BaseModel):
    """A config section: unknown fields are errors, assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class StageConfig(Section):
    """One Ray Data stage's batch size and resources."""

    batch_size: int | None = Field(None, ge=1, description="Videos per call (null: see the stage).")
    concurrency: int | tuple[int, int] | None = Field(1, description="Actors in the pool: n, or [min, max] to autoscale.")
    num_cpus: float = Field(1.0, gt=0, description="CPUs reserved per task / actor.")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per task / actor (0 runs the model on CPU, for tiny models).")
    memory: Bytes | None = Field(None, description="Memory reserved per task / actor (bytes or '2GiB'); null = none.")

    @field_validator("concurrency", mode="before")
    @classmethod
    def _pool(cls, v: Any) -> Any:
        """n or [min, max]; a flag gives text and one-element lists ("--fused.concurrency 4" is ["4"])."""
        v = yaml.safe_load(v) if isinstance(v, str) else v
        if isinstance(v, (list, tuple)):
            v = [yaml.safe_load(x) if isinstance(x, str) else x for x in v]
            v = v[0] if len(v) == 1 else tuple(v)

        def actors(n: Any) -> bool:
            return isinstance(n, int) and not isinstance(n, bool) and n >= 1

        if v is None or actors(v) or (isinstance(v, tuple) and len(v) == 2 and all(map(actors, v)) and v[0] <= v[1]):
            return v
        raise ValueError("must be a number of actors >= 1, or [min, max] with 1 <= min <= max")


class DyCokeTTMConfig(Section):
    """DyCoke's temporal token merging (DESIGN 4.2, 4.3): about half of the tokens kept at K=0.7."""

    k: float = Field(0.7, ge=0.0, lt=1.0, description="K, fraction of tokens dropped from each pruned frame.")
    ttm_mode: Literal["reference", "complete"] = Field(
        "reference", description="reference = the paper's code; complete = also prune the last window, raster order.")


class HoliTomConfig(Section):
    """HoliTom's outer stages (DESIGN 4.6): segment, merge static tokens, keep salient dynamic ones."""

    retain_ratio: float = Field(0.15, gt=0.0, le=1.0, description="r, fraction of visual tokens kept (paper: 0.10-0.25).")
    tau: float = Field(0.8, ge=-1.0, le=1.0, description="Frame-to-frame cosine above which a position is static.")
    max_window: int = Field(1024, ge=1, description="Longest temporal segment, in frames.")
    k: int = Field(7, ge=1, description="DPC-KNN neighbourhood (capped at the number of centres).")
    beta: float = Field(0.6, ge=0.0, le=1.0, description="Weight of a cluster centre against the mean of its members.")


class DPConfig(Section):
    """DyCoke's dynamic pruning while decoding (DESIGN 4.4); works on top of any method."""

    enabled: bool = Field(True, description="Dynamic KV-cache pruning during decoding.")
    layer: int = Field(3, ge=1, description="L, layer whose attention selects the visual tokens later layers attend to.")
    prune_ratio: float = Field(0.7, ge=0.0, lt=1.0, description="P, fraction of candidate visual tokens not attended.")
    threshold: float = Field(0.9, ge=-1.0, le=1.0, description="Attention cosine at or above which a step attends to all.")


class CompressionConfig(Section):
    """Visual-token compression: one method before the LLM, DyCoke's decode-time pruning (dp) on top."""

    method: Literal["dycoke", "holitom", "none"] = Field(
        "dycoke", description="dycoke: DyCoke TTM (~50% of the tokens at K=0.7); holitom (~r of them); none.")
    dycoke: DyCokeTTMConfig = Field(DyCokeTTMConfig(), description="Settings of method dycoke.")
    holitom: HoliTomConfig = Field(HoliTomConfig(), description="Settings of method holitom.")
    dp: DPConfig = Field(DPConfig(), description="Decode-time pruning, with any method.")
    tokens_per_frame: int | None = Field(None, ge=1, description="T, visual tokens per frame; null = from the model.")

    @model_validator(mode="after")
    def _valid(self) -> CompressionConfig:
        try:
            self.to_dycoke()
        except DyCokeConfigError as exc:
            raise ValueError(str(exc)) from exc
        return self

    def to_dycoke(self, tokens_per_frame: int | None = None) -> DyCokeConfig:
        """The library's :class:`dycoke.DyCokeConfig` for this section (the one place it is built)."""
        d, h, p = self.dycoke, self.holitom, self.dp
        return DyCokeConfig(
            ttm_enabled=self.method != "none", ttm_method="holitom" if self.method == "holitom" else "dycoke",
            prune_ratio_k=d.k, ttm_mode=d.ttm_mode, tokens_per_frame=int(self.tokens_per_frame or tokens_per_frame or 196),
            dp_enabled=p.enabled, dp_layer=p.layer, dp_prune_ratio=p.prune_ratio, dp_threshold=p.threshold,
            holitom_retain_ratio=h.retain_ratio, holitom_tau=h.tau, holitom_max_window=h.max_window, holitom_k=h.k,
            holitom_beta=h.beta)

    def record(self, tokens_per_frame: int | None = None) -> str:
        """The ``compression`` output column: the method, its settings, dp and T, as compact key-sorted JSON."""
        data = {"method": self.method, "dp": self.dp.model_dump(),
                "tokens_per_frame": self.to_dycoke(tokens_per_frame).tokens_per_frame}
        if self.method != "none":
            data[self.method] = getattr(self, self.method).model_dump()
        return json.dumps(data, sort_keys=True, separators=(",", ":"))

    def legacy(self) -> dict:
        """The earlier release's ``dycoke`` section for these settings (keeps default run ids as they were)."""
        d = self.to_dycoke().to_dict()
        if self.method != "holitom":
            d = {k: v for k, v in d.items() if k != "ttm_method" and not k.startswith("holitom_")}
        return {**d, "tokens_per_frame": self.tokens_per_frame}


class EncodeConfig(StageConfig):
    """The encode stage (split mode): actors running the vision tower and the compression method."""

    batch_size: int = Field(8, ge=1, description="Videos per encode actor call.")


class _EngineStage(StageConfig):
    _cpu_batch: ClassVar[int]
    engine_max_batch_size: int | None = Field(
        None, ge=1, description="Sequences (video x task rows) the engine decodes together; null = as many as 60% of "
        "the free GPU memory holds in KV cache (at most 256), 16 on CPU.")
    max_concurrent_batches: int = Field(
        3, ge=1, description="Calls an actor works on at once, joining one running engine; 1 drains each call first.")

    @property
    def resolved_batch_size(self) -> int:
        return self.batch_size or (32 if self.num_gpus > 0 else self._cpu_batch)


class GenerateConfig(_EngineStage):
    """The generate stage (split mode): actors running the engine on encoded videos; batch_size null = 32 videos
    per call with a GPU, 8 on CPU."""

    _cpu_batch: ClassVar[int] = 8


class FusedConfig(_EngineStage):
    """The fused stage: encode and generate in one actor sharing one loaded model; batch_size null = 32 videos per
    call with a GPU, 4 on CPU."""

    _cpu_batch: ClassVar[int] = 4
    concurrency: int | tuple[int, int] | None = Field(
        None, description="Fused actors: n, or [min, max]; null = one per num_gpus of the cluster's GPUs, 1 on CPU.")

    def resolved_concurrency(self, cluster_gpus: float) -> int | tuple[int, int]:
        """``concurrency``, or one actor per ``num_gpus`` of the cluster's GPUs (fused beats a split of the same
        GPUs, docs/scaling.md)."""
        if self.concurrency:
            return self.concurrency
        return max(1, int(cluster_gpus // self.num_gpus)) if self.num_gpus > 0 else 1


class MCQ(Section):
    """A multiple-choice question asked about every video; the answer's letter is parsed into `choice`."""

    question: str = Field(description="The question text.")
    options: list[str] = Field(min_length=2, max_length=26, description="The options, labelled A, B, C, ...")
    id: str | None = Field(None, description="A stable task id (default mcq:<index>).")


class TasksConfig(Section):
    """What is asked about each video. Each task gives one output row per video."""

    caption_prompt: str | None = Field("Describe the video in detail.", description="Task `caption`; null for none.")
    questions: list[str] = Field([], description="Questions asked about every video (task ids qa:0, qa:1, ...).")
    use_manifest_questions: bool = Field(True, description="Also ask the manifest's per-video `questions` (vq:<i>).")
    mcq: list[MCQ] = Field([], description="Multiple-choice questions asked about every video.")
    mcq_instruction: str = Field("Answer with the option's letter from the given choices directly.",
                                 description="Appended to every multiple-choice prompt after the options.")
    max_new_tokens: int = Field(128, ge=1, description="Generation limit for caption and open questions.")
    mcq_max_new_tokens: int = Field(8, ge=1, description="Generation limit for multiple-choice questions.")
    temperature: float = Field(0.0, ge=0.0, description="Sampling temperature; 0 is greedy (deterministic).")
    top_p: float = Field(1.0, gt=0.0, le=1.0, description="Nucleus sampling threshold (only with temperature > 0).")

    @model_validator(mode="after")
    def _unique_task_ids(self) -> TasksConfig:
        from pipeline.tasks import global_tasks

        ids = [t.task_id for t in global_tasks(self)]
        taken = [i for i in ids if ids.count(i) > 1 or i == "none" or i.startswith("vq:")]
        if taken:
            raise ValueError(f"task ids must be unique and not 'none' or 'vq:<i>' (per-video questions): "
                             f"{sorted(set(taken))}; give the mcq entries distinct ids")
        return self


class ModelConfig(Section):
    """The video LLM (a LLaVA-OneVision checkpoint in Hugging Face layout)."""

    source: str = Field(description="Hub id, local directory, or s3://bucket/prefix/ (copied once per node to cache_dir).")
    cache_dir: str = Field("~/.cache/dycoke-pipeline/models", description="Per-node cache for s3:// checkpoints.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights/activations dtype; auto = bfloat16 on GPU, float32 on CPU.")
    device: Literal["auto", "cuda", "cpu"] = Field("auto", description="auto = cuda when the actor has a GPU, else cpu.")
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = Field("sdpa", description="Attention kernel.")
    trust_remote_code: bool = Field(False, description="Allow custom code shipped with the checkpoint.")


class RayConfig(Section):
    """Where the pipeline runs."""

    address: str | None = Field(None, description="Ray address (ray://host:10001 or auto); null = the job's cluster "
                                "under `ray job submit`, else a local Ray.")
    num_cpus: int | None = Field(None, ge=1, description="CPUs of a local Ray (ignored when connecting to a cluster).")
    progress_bars: bool = Field(True, description="Show Ray Data progress bars while running.")
