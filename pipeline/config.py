"""The one pipeline configuration: typed sections validated by pydantic, with their defaults in one place.

Every field carries a description; ``python -m jobs.corpus --help`` prints them all (:mod:`pipeline.cli`). A bad
file fails at start-up with :class:`ConfigurationError`, whose message names each offending field by its dotted
path (``fused.batch_size: Input should be a valid integer``). The sections go to the stages as they are.

Renamed fields: a job file (or override) that uses a name of an earlier release still works; the value moves
to its new place (:mod:`pipeline.renames`, the one table of renames) with a warning naming that place.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.renames import apply_renames, leaves, set_dotted
from pipeline.sections import (  # noqa: F401 - the sections are part of this module's interface
    MCQ,
    CompressionConfig,
    ConfigurationError,
    DPConfig,
    DyCokeTTMConfig,
    EncodeConfig,
    FusedConfig,
    GenerateConfig,
    GiB,
    HoliTomConfig,
    ModelConfig,
    RayConfig,
    StageConfig,
    TasksConfig,
)
from pipeline.sections import Section as _Section

#: Decode settings that change how decoding runs but not its rows (``backend``: every backend returns the same
#: frames in exact mode), and the stage's resources: not part of the default run_id, so changing them (say, a
#: longer timeout after timeouts) and re-running resumes the same run.
OPERATIONAL_DECODE_FIELDS = ("num_threads", "spool_dir", "in_memory_bytes", "timeout_s", "isolation", "backend",
                             "where", "actor_threads", "batch_size", "concurrency", "num_cpus", "num_gpus", "memory")
#: Error types retried when a run is resumed (``output.retry_error_types``): they may not recur.
TRANSIENT_ERROR_TYPES = ("fetch_failed", "decode_timeout", "decoder_crashed", "encode_failed", "generate_failed",
                         "internal")


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
        DEFAULT_EXTENSIONS,
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
        description="When <path>/<run_id>/ already holds committed chunks. resume: keep every video with a complete "
        "committed version, delete files no chunk manifest names, and process only the others (nothing when the run "
        "is complete; new rows supersede, nothing committed is rewritten). overwrite: clear the folder, redo all.",
    )
    retry_error_types: list[str] = Field(
        list(TRANSIENT_ERROR_TYPES),
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


class DecodeConfig(StageConfig):
    """The decode stage: CPU tasks that fetch, decode and sample frames, and its resources."""

    batch_size: int = Field(4, ge=1, description="Videos per decode task call.")
    concurrency: int | None = Field(None, ge=1, description="At most this many concurrent decode tasks; null = as many as the CPUs allow.")
    memory: int = Field(2 * GiB, ge=1, description="Memory reserved per decode task, bytes or '2GiB' (bounds concurrent decodes per node and keeps "
                               "decode tasks out of the model actors).")

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
    where: Literal["auto", "stage", "actor"] = Field(
        "auto",
        description="Where frames are decoded. stage: in the decode stage, which ships frames. actor: the decode stage "
        "only fetches the bytes (and checks the container); the model actor (fused, or encode) decodes the sampled frames, "
        "with NVDEC on the GPU where backend allows it, else on its CPUs. auto: actor when the model stage has GPUs and "
        "backend is nvdec, or auto with PyNvVideoCodec installed; else stage.",
    )
    actor_threads: int = Field(4, ge=1, le=64, description="Videos a model actor decodes at once with where: actor "
                               "(one NVDEC session each; an H100/H200 has 7 NVDEC engines).")


def _env_endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL") or None


def _env_region() -> str:
    return os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "us-east-1"


class S3Config(_Section):
    """S3 client settings (pipeline.storage builds every S3 client from them: listing, fetching, manifests,
    model copies, output). Frozen, so it is hashable and is passed to the stages as it is."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    endpoint_url: str | None = Field(default_factory=_env_endpoint, description="Custom S3 endpoint (MinIO, a local "
                                     "test server); default $AWS_ENDPOINT_URL or AWS.")
    region: str | None = Field(default_factory=_env_region, description="AWS region ($AWS_DEFAULT_REGION, $AWS_REGION, us-east-1).")
    max_attempts: int = Field(8, ge=1, le=50, description="boto3 retry attempts (adaptive retry mode).")
    connect_timeout_s: float = Field(10.0, gt=0, description="Connection timeout per request.")
    read_timeout_s: float = Field(60.0, gt=0, description="Read timeout per request.")


class PipelineConfig(_Section):
    """The whole job."""

    run_id: str | None = Field(
        None, pattern=r"^[A-Za-z0-9._-]{1,128}$",
        description="Names the output folder; null = a hash of input, tasks, model, decode (except its operational "
        "fields: threads, spool, timeout, isolation, resources) and compression settings, so an identical re-run finds "
        "its own folder (and resumes it, see output.on_existing).",
    )
    input: InputConfig = Field(description="Where the videos come from.")
    output: OutputConfig = Field(description="Where the Parquet goes.")
    tasks: TasksConfig = Field(TasksConfig(), description="What is asked about each video.")
    model: ModelConfig = Field(description="The video LLM.")
    compression: CompressionConfig = Field(CompressionConfig(), description="Visual-token compression.")
    mode: Literal["auto", "fused", "split"] = Field(
        "auto", description="fused: encode+generate in one actor pool (`fused`); split: `encode` and `generate` pools; "
        "auto: fused unless generate asks for GPUs and more than one actor.")
    decode: DecodeConfig = Field(DecodeConfig(), description="Decoding, sampling and the decode stage's resources.")
    encode: EncodeConfig = Field(EncodeConfig(), description="The encode stage (split mode).")
    generate: GenerateConfig = Field(GenerateConfig(), description="The generate stage (split mode).")
    fused: FusedConfig = Field(FusedConfig(), description="The fused stage (fused mode).")
    ray: RayConfig = Field(RayConfig(), description="Ray connection.")
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

    @property
    def resolved_mode(self) -> Literal["fused", "split"]:
        if self.mode != "auto":
            return self.mode
        g = self.generate
        actors = g.concurrency[0] if isinstance(g.concurrency, tuple) else g.concurrency or 1
        return "split" if g.num_gpus > 0 and actors > 1 else "fused"

    def effective_run_id(self) -> str:
        """``run_id`` or a deterministic hash of everything that changes the output rows (the same as the earlier
        release gave for the same settings)."""
        if self.run_id:
            return self.run_id
        relevant = self.model_dump(include={"input", "tasks", "model", "decode"})
        relevant["model"].pop("cache_dir", None)
        for name in OPERATIONAL_DECODE_FIELDS:  # how decoding runs, not what it produces
            relevant["decode"].pop(name, None)
        relevant["dycoke"] = self.compression.legacy()
        digest = hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:12]
        return f"run-{digest}"


def _format_errors(exc: ValidationError, source: str, moved: dict[str, str]) -> str:
    lines = [f"invalid configuration ({source}):"]
    for err in exc.errors():
        loc = ".".join(str(p) for p in err["loc"]) or "<top level>"
        old = [f" (given as {o})" for n, o in moved.items() if loc == n or loc.startswith(n + ".")]
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown field (check the spelling; see --help for the fields)"
        elif err["type"] == "missing":
            msg = "required field is missing"
        value = err.get("input")
        shown = "" if err["type"] in ("missing", "extra_forbidden") or isinstance(value, dict) else f" (got {value!r})"
        lines.append(f"  {loc}{''.join(old[:1])}: {msg}{shown}")
    return "\n".join(lines)


def parse_override(item: str) -> tuple[str, Any]:
    """``"a.b=value"`` -> ``("a.b", yaml-parsed value)``."""
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigurationError(f"override {item!r} must look like section.field=value")
    try:
        return key.strip(), yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as exc:
        raise ConfigurationError(f"override {key}: cannot parse value {raw!r}: {exc}") from exc


def read_yaml(path: str | Path, moved: dict[str, str] | None = None) -> dict:
    """A job file's sections (a mapping), renamed fields moved to their new places."""
    p = Path(path)
    if not p.is_file():
        raise ConfigurationError(f"configuration file {p} does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigurationError(f"configuration file {p} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigurationError(f"configuration file {p} must hold a mapping of sections, got {type(data).__name__}")
    return apply_renames(data, str(p), moved)


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | list[str] | None = None,
                data: dict | None = None, cli: dict | None = None) -> PipelineConfig:
    """The validated config from, in increasing precedence: ``data`` (built-in defaults, e.g. the demo's), the YAML
    file at ``path`` (each section the file sets replaces that section of ``data``), ``overrides`` (``a.b=value``
    strings or a dotted-key dict) and ``cli`` (nested, as parsed from command-line flags). Renamed fields are moved
    to their new places first, per source. Raises :class:`ConfigurationError` naming every bad field.
    """
    moved: dict[str, str] = {}
    raw = apply_renames(data or {}, "built-in configuration", moved)
    if path is not None:
        raw.update(read_yaml(path, moved))
    if isinstance(overrides, list):
        overrides = dict(parse_override(o) for o in overrides)
    layers = [("--set", {}), ("command line", cli or {})]
    for key, value in (overrides or {}).items():
        set_dotted(layers[0][1], key, value)
    for source, layer in layers:
        for dotted, value in leaves(apply_renames(layer, source, moved)):
            set_dotted(raw, dotted, value)
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigurationError(_format_errors(exc, str(path) if path else "arguments", moved)) from None


def to_yaml(cfg: PipelineConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
