"""The one pipeline configuration: a YAML file plus command-line overrides, validated by pydantic.

Every field carries a description; ``python -m jobs.corpus --help`` prints them all. A bad file fails at
start-up with :class:`ConfigurationError`, whose message names each offending field by its dotted path
(``stages.encode_batch_size: Input should be a valid integer``).

Overrides use the dotted path of a field: ``--set decode.num_frames=16`` or the generated flag
``--decode.num_frames 16``. Values are parsed as YAML scalars (``16`` is an int, ``[a, b]`` a list,
``null`` is None).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dycoke import ConfigError as DyCokeConfigError
from dycoke import DyCokeConfig

#: Decode settings that change how decoding runs but not its rows: not part of the default run_id, so
#: changing them (say, a longer timeout after timeouts) and re-running resumes the same run.
#: decode settings that change how decoding runs, not which frames it produces (``backend``: every backend returns
#: the same frames in exact mode; pixels differ only by the decoder's scaler), so they are not part of the run id
OPERATIONAL_DECODE_FIELDS = ("num_threads", "spool_dir", "in_memory_bytes", "timeout_s", "isolation", "backend")
#: Error types retried when a run is resumed (``output.retry_error_types``): they may not recur.
TRANSIENT_ERROR_TYPES = ("fetch_failed", "decode_timeout", "decoder_crashed", "encode_failed", "generate_failed",
                         "internal")


class ConfigurationError(ValueError):
    """The configuration file or an override is invalid; the message names the field(s)."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


DEFAULT_EXTENSIONS = [".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v"]


class InputConfig(_Section):
    """Where the videos come from: exactly one of ``s3_prefix``, ``manifest`` or ``local_dir``."""

    s3_prefix: str | None = Field(
        None, description="List every object under this S3 prefix (s3://bucket/prefix/) whose name ends with one of `extensions`."
    )
    manifest: str | None = Field(
        None,
        description="A manifest file (local path or s3:// URI; .parquet, .jsonl/.json or .csv) with a `video_uri` "
        "column and optional `video_id` and `questions` (list of strings; a JSON list or '|'-separated in CSV).",
    )
    local_dir: str | None = Field(None, description="A local folder, searched recursively for files with one of `extensions`.")
    extensions: list[str] = Field(
        default_factory=lambda: list(DEFAULT_EXTENSIONS),
        description="File name endings (case-insensitive) a listed object or file must have to count as a video.",
    )
    limit: int | None = Field(None, ge=1, description="Process at most this many videos (after sorting by URI); null for all.")

    @field_validator("extensions")
    @classmethod
    def _normalise_extensions(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("at least one extension is needed")
        return [e.lower() if e.startswith(".") else "." + e.lower() for e in value]

    @field_validator("s3_prefix")
    @classmethod
    def _check_s3(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith("s3://"):
            raise ValueError(f"must start with s3://, got {value!r}")
        return value

    @model_validator(mode="after")
    def _exactly_one(self) -> InputConfig:
        given = [n for n in ("s3_prefix", "manifest", "local_dir") if getattr(self, n)]
        if len(given) != 1:
            raise ValueError(
                "set exactly one of input.s3_prefix, input.manifest, input.local_dir"
                + (f" (got {', '.join(given)})" if given else " (none given)")
            )
        return self


class OutputConfig(_Section):
    """Where and how the Parquet output is written."""

    path: str = Field(
        min_length=1,
        description="Output root, local folder or s3://bucket/prefix. Files go to <path>/<run_id>/part-*.parquet; "
        "a re-run with the same run_id resumes or replaces that folder (see on_existing)."
    )
    on_existing: Literal["resume", "overwrite"] = Field(
        "resume",
        description="When <path>/<run_id>/ already holds rows. resume: keep every video whose rows are all there "
        "(a run killed half way, or a finished one), delete unreadable files and the rows of incomplete videos, "
        "and process only the remaining videos (nothing at all when the run is complete). overwrite: clear the "
        "folder and process every video again.",
    )
    retry_error_types: list[str] = Field(
        default_factory=lambda: list(TRANSIENT_ERROR_TYPES),
        description="When resuming, videos with an error row of one of these types are processed again "
        "(failures that may not recur: network, timeouts, crashes, out of memory); [] keeps every error row.",
    )
    lock: bool = Field(
        True,
        description="Hold a lock object (<path>/_locks/<run_id>.json; nightly: _locks/nightly.json) while the run "
        "plans and writes, so two runs never write the same output at once; a second run fails at start with the "
        "holder's host, pid and start time.",
    )
    lock_stale_s: float = Field(
        900.0,
        ge=5.0,
        description="A lock whose heartbeat (every lock_stale_s/4 seconds) is older than this belongs to a dead run "
        "and is taken over; a holder on the same host whose process is gone is taken over at once.",
    )
    min_rows_per_file: int = Field(20_000, ge=1, description="Small blocks are combined until a file holds at least this many rows (or the data ends).")
    max_rows_per_file: int = Field(200_000, ge=1, description="A file is split once it holds this many rows.")
    row_group_rows: int = Field(10_000, ge=1, description="Rows per Parquet row group (the unit a reader fetches).")
    compression: Literal["zstd", "snappy", "gzip", "none"] = Field("zstd", description="Parquet compression codec.")

    @field_validator("retry_error_types")
    @classmethod
    def _known_error_types(cls, value: list[str]) -> list[str]:
        from pipeline.schema import ERROR_TYPES

        unknown = [v for v in value if v not in ERROR_TYPES]
        if unknown:
            raise ValueError(f"unknown error types {unknown}; known: {', '.join(ERROR_TYPES)}")
        return value

    @model_validator(mode="after")
    def _order(self) -> OutputConfig:
        if self.min_rows_per_file > self.max_rows_per_file:
            raise ValueError("output.min_rows_per_file must be <= output.max_rows_per_file")
        return self


class MCQ(_Section):
    """A multiple-choice question asked about every video; the answer's letter is parsed into `choice`."""

    question: str = Field(description="The question text.")
    options: list[str] = Field(min_length=2, max_length=26, description="The options, labelled A, B, C, ... in the prompt.")
    id: str | None = Field(None, description="A stable task id (default mcq:<index>).")


class TasksConfig(_Section):
    """What is asked about each video. Each task gives one output row per video."""

    caption_prompt: str | None = Field(
        "Describe the video in detail.", description="The captioning prompt (task_id `caption`); null for no caption."
    )
    questions: list[str] = Field(default_factory=list, description="Standard questions asked about every video (task ids qa:0, qa:1, ...).")
    use_manifest_questions: bool = Field(True, description="Also ask the manifest's per-video `questions` (task ids vq:0, vq:1, ...).")
    mcq: list[MCQ] = Field(default_factory=list, description="Multiple-choice questions asked about every video.")
    mcq_instruction: str = Field(
        "Answer with the option's letter from the given choices directly.",
        description="Appended to every multiple-choice prompt after the options.",
    )
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
            raise ValueError(f"task ids must be unique and not 'none' or 'vq:<i>' (per-video questions): {sorted(set(taken))}"
                             "; give the mcq entries distinct ids")
        return self


class ModelConfig(_Section):
    """The video LLM (a LLaVA-OneVision checkpoint in Hugging Face layout)."""

    source: str = Field(
        description="Hub id (llava-hf/llava-onevision-qwen2-7b-ov-hf), local directory, or s3://bucket/prefix/ "
        "copied once per node to `cache_dir`."
    )
    cache_dir: str = Field(
        "~/.cache/dycoke-pipeline/models", description="Per-node cache for s3:// checkpoints (a file lock makes one copy per node)."
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights/activations dtype; auto = bfloat16 on GPU, float32 on CPU."
    )
    device: Literal["auto", "cuda", "cpu"] = Field("auto", description="auto = cuda when the actor has a GPU, else cpu.")
    attn_implementation: Literal["sdpa", "eager", "flash_attention_2"] = Field("sdpa", description="Attention kernel passed to transformers.")
    trust_remote_code: bool = Field(False, description="Allow custom code shipped with the checkpoint.")


class DecodeConfig(_Section):
    """CPU decoding and frame sampling."""

    num_frames: int = Field(32, ge=1, le=1024, description="F, frames sampled per video (uniform: linspace(0, n-1, F)).")
    sampling: Literal["uniform", "keyframe"] = Field(
        "uniform",
        description="uniform: exact frames linspace(0, n-1, F) as the reference. keyframe: APPROXIMATE, each sample "
        "snaps to the nearest keyframe (much cheaper on long-GOP video; duplicates when there are fewer keyframes than F).",
    )
    frame_size: int | None = Field(
        None, ge=8, le=4096, description="Square side frames are resized to while decoding; null = the model's image size."
    )
    min_frames: int = Field(1, ge=1, description="Videos with fewer decodable frames than this become error rows (too_few_frames).")
    max_video_bytes: int = Field(
        4 * 1024**3, ge=1, description="Videos larger than this are not fetched; they become error rows (too_large)."
    )
    in_memory_bytes: int = Field(
        256 * 1024**2,
        ge=1,
        description="Videos up to this size are decoded from memory; larger ones are spooled to a local temp file first (bounded memory).",
    )
    num_threads: int = Field(1, ge=0, description="Decoder threads per video (0 = ffmpeg's choice); 1 with one task per CPU is the most efficient.")
    spool_dir: str | None = Field(None, description="Folder for spooled large videos (default: the system temp folder).")
    timeout_s: float = Field(
        300.0,
        gt=0,
        description="Per-video limit on fetch + decode, in seconds; a video over it becomes an error row (decode_timeout) "
        "and its decoder process is killed. Enforced only with isolation: process.",
    )
    backend: Literal["auto", "decord", "pyav", "nvdec"] = Field(
        "auto",
        description="Decoder for the pixels (frame numbers and timestamps always come from the container's packets). "
        "auto: PyAV (exact frames: seeks per group of targets, skips non-reference frames of H.264/HEVC), and per "
        "video decord when PyAV cannot open the file. decord (returns wrong frames on HEVC and open-GOP H.264 with "
        "B-frames; no AV1) or pyav: only that one. nvdec (GPU nodes, PyNvVideoCodec): NVDEC, and per video the "
        "auto order for what NVDEC cannot decode.",
    )
    isolation: Literal["process", "none"] = Field(
        "process",
        description="process: fetch + decode each video in a long-lived decoder subprocess per decode worker, so a hang "
        "(decode.timeout_s) or a crash (segfault in ffmpeg) becomes an error row (decode_timeout, decoder_crashed) and the "
        "run carries on; frames come back through a pipe (~1 ms per MB of frames, ~13 ms for 32 frames at 384x384). none: in the task's own process, "
        "NOT protected: a hanging video stalls its task forever and a crashing one kills the worker.",
    )


class DyCokeSettings(_Section):
    """Token compression (DESIGN 4: DyCoke; 4.6: HoliTom); mirrors :class:`dycoke.DyCokeConfig`."""

    ttm_enabled: bool = Field(True, description="Temporal token merging before the LLM.")
    prune_ratio_k: float = Field(0.7, ge=0.0, lt=1.0, description="K, fraction of tokens dropped from each pruned frame, in [0, 1).")
    ttm_mode: Literal["reference", "complete"] = Field("reference", description="reference = the paper's code exactly; complete = also prune the last window, raster order.")
    tokens_per_frame: int | None = Field(None, ge=1, description="T, visual tokens per frame after pooling; null = from the model.")
    dp_enabled: bool = Field(True, description="Dynamic KV-cache pruning during decoding.")
    dp_layer: int = Field(3, ge=1, description="L, layer whose attention selects the visual tokens later layers attend to (>= 1).")
    dp_prune_ratio: float = Field(0.7, ge=0.0, lt=1.0, description="P, fraction of candidate visual tokens not attended at a pruning step, in [0, 1).")
    dp_threshold: float = Field(0.9, ge=-1.0, le=1.0, description="Attention-vector cosine similarity at or above which a step attends to the full cache.")
    ttm_method: Literal["dycoke", "holitom"] = Field("dycoke", description="Pre-LLM compressor when ttm_enabled: dycoke = DyCoke TTM (prune_ratio_k, ttm_mode, ~50% of the tokens); holitom = HoliTom (holitom_*, DESIGN 4.6). DP works on top of either.")
    holitom_retain_ratio: float = Field(0.15, gt=0.0, le=1.0, description="HoliTom r, target fraction of visual tokens kept, in (0, 1] (paper: 0.10, 0.15, 0.25).")
    holitom_tau: float = Field(0.8, ge=-1.0, le=1.0, description="HoliTom tau, frame-to-frame cosine above which a position is static (paper: 0.8; 0.65 at r=0.10).")
    holitom_max_window: int = Field(1024, ge=1, description="HoliTom's longest temporal segment, in frames.")
    holitom_k: int = Field(7, ge=1, description="HoliTom DPC-KNN neighbourhood (capped at the number of centres).")
    holitom_beta: float = Field(0.6, ge=0.0, le=1.0, description="HoliTom weight of a cluster centre against the mean of its members.")

    @model_validator(mode="after")
    def _valid(self) -> DyCokeSettings:
        try:
            self.to_dycoke(tokens_per_frame=self.tokens_per_frame or 196)
        except DyCokeConfigError as exc:
            raise ValueError(str(exc)) from exc
        return self

    def to_dycoke(self, tokens_per_frame: int | None = None) -> DyCokeConfig:
        data = self.model_dump()
        data["tokens_per_frame"] = int(tokens_per_frame or self.tokens_per_frame or 196)
        return DyCokeConfig(**data)


class StagesConfig(_Section):
    """Ray Data stage layout: batch sizes, actor counts and resource requests."""

    mode: Literal["auto", "fused", "split"] = Field(
        "auto",
        description="fused: encode+generate in one actor; split: separate encode and generate actor pools; "
        "auto: fused when no GPU is requested or with one generate actor, else split.",
    )
    decode_batch_size: int = Field(4, ge=1, description="Videos per decode task batch.")
    decode_num_cpus: float = Field(1.0, gt=0, description="CPUs reserved per decode task.")
    decode_memory_gb: float = Field(
        2.0, gt=0, description="Memory reserved per decode task (keeps a node from running more decodes than fit, "
        "and keeps decode tasks out of the model actors)."
    )
    decode_max_tasks: int | None = Field(None, ge=1, description="At most this many concurrent decode tasks; null = as many as the CPUs allow.")
    encode_batch_size: int = Field(8, ge=1, description="Videos per encode actor call.")
    encode_actors: int = Field(1, ge=1, description="Encode actors (split mode).")
    generate_batch_size: int | None = Field(
        None, ge=1, description="Videos per generate actor call; null = 32 with a GPU (several calls in flight keep the "
        "engine full), 8 on CPU.")
    generate_actors: int = Field(1, ge=1, description="Generate actors (split mode).")
    fused_batch_size: int | None = Field(
        None, ge=1, description="Videos per fused actor call; null = 32 with a GPU, 4 on CPU.")
    fused_actors: int | None = Field(
        None, ge=1, description="Fused actors (fused mode); null = one per GPU the cluster has at start "
        "(GPUs / gpus_per_actor, at least 1), 1 on CPU.")
    max_actors: int | None = Field(None, ge=1, description="Let each actor pool autoscale up to this many actors; null = fixed size.")
    gpus_per_actor: float = Field(0.0, ge=0, description="GPUs per encode/generate/fused actor (0 runs the model on CPU, for tiny models).")
    actor_num_cpus: float = Field(1.0, gt=0, description="CPUs reserved per model actor (preprocessing, batching).")
    engine_max_batch_size: int | None = Field(
        None, ge=1, description="Sequences (video x task rows) the generation engine decodes together; null = as many "
        "as 60% of the free GPU memory holds in KV cache (at most 256), 16 on CPU.")
    actor_concurrency: int = Field(
        3, ge=1, description="Calls a generate or fused actor works on at once: their tasks join one running engine "
        "(continuous batching), so the GPU does not wait between calls. 1 drains each call before the next.")

    @property
    def gpu(self) -> bool:
        return self.gpus_per_actor > 0

    def resolved_fused_actors(self, cluster_gpus: float) -> int:
        """``fused_actors``, or one actor per ``gpus_per_actor`` of the cluster's GPUs (measured: fused beats a
        split of the same GPUs, see docs/scaling.md)."""
        if self.fused_actors:
            return self.fused_actors
        return max(1, int(cluster_gpus // self.gpus_per_actor)) if self.gpu else 1

    @property
    def resolved_fused_batch_size(self) -> int:
        return self.fused_batch_size or (32 if self.gpu else 4)

    @property
    def resolved_generate_batch_size(self) -> int:
        return self.generate_batch_size or (32 if self.gpu else 8)

    @property
    def resolved_mode(self) -> Literal["fused", "split"]:
        if self.mode != "auto":
            return self.mode
        return "fused" if self.gpus_per_actor == 0 or self.generate_actors == 1 else "split"


class RayConfig(_Section):
    """Where the pipeline runs."""

    address: str | None = Field(
        None, description="Ray cluster address (ray://host:10001 or auto); null = the job's cluster under `ray job submit`, else a local Ray."
    )
    num_cpus: int | None = Field(None, ge=1, description="CPUs of a local Ray (ignored when connecting to a cluster).")
    progress_bars: bool = Field(True, description="Show Ray Data progress bars while running.")


class S3Config(_Section):
    """S3 client settings (pipeline.storage builds every S3 client from them: listing, fetching, manifests,
    model copies, output). Frozen, so it is hashable and is passed to the stages as it is."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    endpoint_url: str | None = Field(
        default_factory=lambda: os.environ.get("AWS_ENDPOINT_URL") or None,
        description="Custom S3 endpoint (MinIO, a local test server); default $AWS_ENDPOINT_URL or AWS.",
    )
    region: str | None = Field(
        default_factory=lambda: os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "us-east-1",
        description="AWS region.",
    )
    max_attempts: int = Field(8, ge=1, le=50, description="boto3 retry attempts (adaptive retry mode).")
    connect_timeout_s: float = Field(10.0, gt=0, description="Connection timeout per request.")
    read_timeout_s: float = Field(60.0, gt=0, description="Read timeout per request.")


class PipelineConfig(_Section):
    """The whole job."""

    run_id: str | None = Field(
        None,
        pattern=r"^[A-Za-z0-9._-]{1,128}$",
        description="Names the output folder; null = a hash of input, tasks, model, decode (except its operational fields: threads, spool, timeout, isolation) and dycoke settings, so an identical re-run finds its own folder (and resumes it, see output.on_existing).",
    )
    input: InputConfig = Field(description="Where the videos come from.")
    output: OutputConfig = Field(description="Where the Parquet goes.")
    tasks: TasksConfig = Field(default_factory=TasksConfig, description="What is asked about each video.")
    model: ModelConfig = Field(description="The video LLM.")
    decode: DecodeConfig = Field(default_factory=DecodeConfig, description="Decoding and sampling.")
    dycoke: DyCokeSettings = Field(default_factory=DyCokeSettings, description="Token compression.")
    stages: StagesConfig = Field(default_factory=StagesConfig, description="Batch sizes, actors, resources.")
    ray: RayConfig = Field(default_factory=RayConfig, description="Ray connection.")
    s3: S3Config = Field(default_factory=S3Config, description="S3 client settings.")

    @field_validator("run_id")
    @classmethod
    def _run_id_is_one_folder(cls, v: str | None) -> str | None:
        if v is not None and set(v) <= {"."}:
            raise ValueError("run_id may not be '.' or '..' (it names one folder under output.path)")
        return v

    @model_validator(mode="after")
    def _some_task(self) -> PipelineConfig:
        t = self.tasks
        if not (t.caption_prompt or t.questions or t.mcq or (t.use_manifest_questions and self.input.manifest)):
            raise ValueError("no tasks: set tasks.caption_prompt, tasks.questions or tasks.mcq (or use a manifest with questions)")
        return self

    def effective_run_id(self) -> str:
        """``run_id`` or a deterministic hash of everything that changes the output rows."""
        if self.run_id:
            return self.run_id
        relevant = self.model_dump(include={"input", "tasks", "model", "decode", "dycoke"})
        relevant["model"].pop("cache_dir", None)
        for name in OPERATIONAL_DECODE_FIELDS:  # how decoding runs, not what it produces
            relevant["decode"].pop(name, None)
        if relevant["dycoke"]["ttm_method"] == "dycoke":  # HoliTom settings unused (and run ids as before they existed)
            for name in [n for n in relevant["dycoke"] if n == "ttm_method" or n.startswith("holitom_")]:
                relevant["dycoke"].pop(name)
        digest = hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:12]
        return f"run-{digest}"


# ------------------------------------------------------------------------------------------------
# Loading, overrides, error messages


def _format_errors(exc: ValidationError, source: str) -> str:
    lines = [f"invalid configuration ({source}):"]
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "<top level>"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown field (check the spelling; see --help for the fields)"
        elif err["type"] == "missing":
            msg = "required field is missing"
        value = err.get("input")
        shown = "" if err["type"] in ("missing", "extra_forbidden") or isinstance(value, dict) else f" (got {value!r})"
        lines.append(f"  {loc}: {msg}{shown}")
    return "\n".join(lines)


def parse_override(item: str) -> tuple[str, Any]:
    """``"a.b=value"`` -> ``("a.b", yaml-parsed value)``."""
    if "=" not in item:
        raise ConfigurationError(f"override {item!r} must look like section.field=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigurationError(f"override {item!r} has no field name")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigurationError(f"override {key}: cannot parse value {raw!r}: {exc}") from exc
    return key, value


def apply_overrides(data: dict, overrides: dict[str, Any]) -> dict:
    """Set dotted keys in a nested dict (creating sections as needed); returns the same dict."""
    for key, value in overrides.items():
        parts = key.split(".")
        node = data
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigurationError(f"override {key}: {part} is not a section")
            node = child
        node[parts[-1]] = value
    return data


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | list[str] | None = None,
                data: dict | None = None) -> PipelineConfig:
    """Build the validated config from ``data`` (built-in defaults, e.g. the demo's), a YAML file on top
    (each top-level section the file sets replaces that section of ``data``) and dotted overrides last.

    Raises :class:`ConfigurationError` naming every bad field.
    """
    source = str(path) if path else "arguments"
    raw: dict = {}
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise ConfigurationError(f"configuration file {p} does not exist")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as exc:
            raise ConfigurationError(f"configuration file {p} is not valid YAML: {exc}") from exc
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigurationError(f"configuration file {p} must hold a mapping of sections, got {type(loaded).__name__}")
        raw = loaded
    if data:
        raw = {**data, **raw}
    if overrides:
        if isinstance(overrides, list):
            overrides = dict(parse_override(o) for o in overrides)
        raw = apply_overrides(raw, overrides)
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigurationError(_format_errors(exc, source)) from None


def field_docs(model: type[BaseModel] = PipelineConfig, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(dotted name, type, default, description) for every leaf field, in declaration order."""
    rows: list[tuple[str, str, str, str]] = []
    for name, info in model.model_fields.items():
        ann = info.annotation
        key = prefix + name
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            rows.extend(field_docs(ann, key + "."))
            continue
        type_name = _type_name(ann)
        if info.is_required():
            default = "REQUIRED"
        elif info.default_factory is not None:
            default = repr(info.default_factory())
        else:
            default = repr(info.default)
        rows.append((key, type_name, default, info.description or ""))
    return rows


def _type_name(ann) -> str:
    import typing

    origin = typing.get_origin(ann)
    if origin is typing.Literal:
        return "one of " + "|".join(str(a) for a in typing.get_args(ann))
    if origin is not None:
        return str(ann).replace("typing.", "").replace("pipeline.config.", "")
    return getattr(ann, "__name__", str(ann))


def to_yaml(cfg: PipelineConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
