"""The one pipeline configuration: typed sections validated by pydantic, with their defaults in one place.

Every field has a description (``--help`` prints them, :mod:`pipeline.cli`). A bad file fails at start-up with
:class:`ConfigurationError` naming each bad field by its dotted path. The sections go to the stages as they are.
Fields of an earlier release still work, moved to their new place with a warning (:mod:`pipeline.renames`).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.renames import apply_renames, nested, set_dotted
from pipeline.sections import (  # noqa: F401 - the sections are part of this module's interface
    MCQ,
    Bytes,
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
    Section,
    StageConfig,
    TasksConfig,
)

#: Decode fields that change how decoding runs, not its rows (every backend gives the same frames), and the
#: stage's resources: left out of the default run_id, so changing them resumes the same run.
OPERATIONAL_DECODE_FIELDS = ("num_threads", "spool_dir", "in_memory_bytes", "timeout_s", "isolation", "backend",
                             "where", "actor_threads", "actor_cpu_workers", "actor_share",
                             "batch_size", "concurrency", "num_cpus", "num_gpus", "memory")
#: Error types retried when a run is resumed (``output.retry_error_types``): they may not recur.
TRANSIENT_ERROR_TYPES = ("fetch_failed", "decode_timeout", "decoder_crashed", "encode_failed", "generate_failed",
                         "internal")


class InputConfig(Section):
    """Where the videos come from: exactly one of ``s3_prefix``, ``manifest`` or ``local_dir``."""

    s3_prefix: str | None = Field(None, pattern=r"^s3://", description="Every object under this s3://bucket/prefix/ "
                                  "with one of `extensions`.")
    manifest: str | None = Field(
        None, description="A manifest (local or s3://; .parquet, .jsonl/.json or .csv): `video_uri`, optional "
        "`video_id` and `questions` (a list; in CSV a JSON list or '|'-separated).")
    local_dir: str | None = Field(None, description="A local folder, searched recursively for files with one of `extensions`.")
    extensions: list[str] = Field([".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v"], min_length=1,
                                  description="Name endings (case-insensitive) that make a file a video.")
    limit: int | None = Field(None, ge=1, description="Process at most this many videos (sorted by URI); null for all.")

    @field_validator("extensions")
    @classmethod
    def _dotted(cls, value: list[str]) -> list[str]:
        return [e.lower() if e.startswith(".") else "." + e.lower() for e in value]

    @model_validator(mode="after")
    def _exactly_one(self) -> InputConfig:
        given = [n for n in ("s3_prefix", "manifest", "local_dir") if getattr(self, n)]
        if len(given) != 1:
            raise ValueError("set exactly one of input.s3_prefix, input.manifest, input.local_dir "
                             f"({'got ' + ', '.join(given) if given else 'none given'})")
        return self


class OutputConfig(Section):
    """Where and how the Parquet output is written."""

    path: str = Field(min_length=1, description="Output root, local folder or s3://bucket/prefix; files go to "
                      "<path>/<run_id>/.")
    on_existing: Literal["resume", "overwrite"] = Field(
        "resume", description="When <path>/<run_id>/ holds committed chunks. resume: keep complete videos, remove "
        "files no chunk manifest names, process the rest (nothing committed is rewritten). overwrite: redo all.")
    retry_error_types: list[str] = Field(
        list(TRANSIENT_ERROR_TYPES), description="Error types whose videos a resumed run processes again "
        "(failures that may not recur); [] keeps every error row.")
    lock: bool = Field(True, description="Hold a lock (<path>/_locks/) while the run plans and writes, so a second "
                       "run on the same output fails at start naming the holder.")
    lock_stale_s: float = Field(900.0, ge=5.0, description="A lock whose heartbeat is older than this belongs to "
                                "a dead run and is taken over (at once when its process on this host is gone).")
    min_rows_per_file: int = Field(20_000, ge=1, description="Small blocks are combined up to this many rows per file.")
    max_rows_per_file: int = Field(200_000, ge=1, description="A file is split once it holds this many rows.")
    row_group_rows: int = Field(10_000, ge=1, description="Rows per Parquet row group (the unit a reader fetches).")
    compression: Literal["zstd", "snappy", "gzip", "none"] = Field("zstd", description="Parquet compression codec.")

    @field_validator("retry_error_types")
    @classmethod
    def _known_error_types(cls, value: list[str]) -> list[str]:
        from pipeline.schema import ERROR_TYPES

        if unknown := [v for v in value if v not in ERROR_TYPES]:
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
    concurrency: int | None = Field(None, ge=1, description="At most this many decode tasks at once; null = per CPUs.")
    memory: Bytes = Field(2 * GiB, description="Memory reserved per decode task (bytes or '2GiB'): bounds "
                          "concurrent decodes per node and keeps them out of the model actors.")
    num_frames: int = Field(32, ge=1, le=1024, description="F, frames sampled per video (linspace(0, n-1, F)).")
    sampling: Literal["uniform", "keyframe"] = Field(
        "uniform", description="uniform: the exact frames linspace(0, n-1, F). keyframe: APPROXIMATE, each sample "
        "snaps to the nearest keyframe (cheap on long-GOP video).")
    frame_size: int | None = Field(None, ge=8, le=4096, description="Square side frames are resized to; null = the "
                                   "model's image size.")
    min_frames: int = Field(1, ge=1, description="Videos with fewer decodable frames are error rows (too_few_frames).")
    max_video_bytes: int = Field(4 * GiB, ge=1, description="Larger videos are not fetched: error rows (too_large).")
    in_memory_bytes: int = Field(256 * 1024**2, ge=1, description="Videos up to this size are decoded from memory, "
                                 "larger ones from a spooled temp file.")
    num_threads: int = Field(1, ge=0, description="Decoder threads per video (0 = ffmpeg's choice).")
    spool_dir: str | None = Field(None, description="Folder for spooled videos (default: the system temp folder).")
    timeout_s: float = Field(300.0, gt=0, description="Per-video limit on fetch + decode in seconds (isolation: "
                             "process only); a video over it is an error row (decode_timeout).")
    backend: Literal["auto", "decord", "pyav", "nvdec"] = Field(
        "auto", description="Pixel decoder. auto: PyAV (exact frames), decord per video PyAV cannot open. decord "
        "(wrong frames on HEVC and open-GOP H.264 with B-frames) or pyav: only that one. nvdec (GPU nodes): NVDEC, "
        "then auto for what it cannot decode.")
    isolation: Literal["process", "none"] = Field(
        "process", description="process: each video in a decoder subprocess, so a hang or crash is an error row "
        "(decode_timeout, decoder_crashed). none: in the task's process, unprotected.")
    where: Literal["auto", "stage", "actor"] = Field(
        "auto", description="Where frames are decoded. stage: the decode stage ships frames. actor: the decode stage "
        "fetches the bytes (and checks the container), the model actor (fused, or encode) decodes them: NVDEC sessions "
        "where backend allows it, and CPU decoder processes, from one queue. auto: actor when the model stage has GPUs "
        "and backend is nvdec (NVDEC is opt-in); else stage.")
    actor_threads: int = Field(4, ge=1, le=64, description="NVDEC sessions per model actor with where: actor, each "
                               "a decoder process of its own (an H100/H200 has 7 NVDEC engines).")
    actor_cpu_workers: int = Field(8, ge=0, le=256, description="CPU decoder processes per model actor with where: "
                                   "actor, next to its NVDEC sessions (a video goes to a free session first); without "
                                   "NVDEC they decode everything (at least one). Not reserved from Ray: raise the model "
                                   "stage's num_cpus where CPUs are shared.")
    actor_share: float = Field(1.0, ge=0.0, le=1.0, description="With where: actor, the share of the videos the model "
                               "actor decodes (chosen by a hash of video_id, the same on every run); the decode stage "
                               "decodes the others on its CPUs, as with where: stage, so both kinds of decoder work "
                               "at once. 1: the actor decodes every video.")


class S3Config(Section):
    """S3 client settings (pipeline.storage builds every S3 client from them). Frozen: hashable, passed to the
    stages as it is."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    endpoint_url: str | None = Field(default_factory=lambda: os.environ.get("AWS_ENDPOINT_URL") or None,
                                     description="Custom S3 endpoint (MinIO, ...); default $AWS_ENDPOINT_URL or AWS.")
    region: str | None = Field(
        default_factory=lambda: os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION") or "us-east-1",
        description="AWS region ($AWS_DEFAULT_REGION, $AWS_REGION, us-east-1).")
    max_attempts: int = Field(8, ge=1, le=50, description="boto3 retry attempts (adaptive retry mode).")
    connect_timeout_s: float = Field(10.0, gt=0, description="Connection timeout per request.")
    read_timeout_s: float = Field(60.0, gt=0, description="Read timeout per request.")


class PipelineConfig(Section):
    """The whole job."""

    run_id: str | None = Field(
        None, max_length=128, pattern=r"^[A-Za-z0-9._-]*[A-Za-z0-9_-][A-Za-z0-9._-]*$",  # one folder, not . or ..
        description="Names the output folder; null = a hash of the settings that change the rows, so an identical "
        "re-run finds its own folder (and resumes it, see output.on_existing).")
    input: InputConfig = Field(description="Where the videos come from.")
    output: OutputConfig = Field(description="Where the Parquet goes.")
    tasks: TasksConfig = Field(TasksConfig(), description="What is asked about each video.")
    model: ModelConfig = Field(description="The video LLM.")
    compression: CompressionConfig = Field(CompressionConfig(), description="Visual-token compression.")
    mode: Literal["auto", "fused", "split"] = Field(
        "auto", description="fused: one `fused` actor pool; split: `encode` and `generate` pools; auto: fused "
        "unless generate asks for GPUs and more than one actor.")
    decode: DecodeConfig = Field(DecodeConfig(), description="Decoding, sampling and the decode stage's resources.")
    encode: EncodeConfig = Field(EncodeConfig(), description="The encode stage (split mode).")
    generate: GenerateConfig = Field(GenerateConfig(), description="The generate stage (split mode).")
    fused: FusedConfig = Field(FusedConfig(), description="The fused stage (fused mode).")
    ray: RayConfig = Field(RayConfig(), description="Ray connection.")
    s3: S3Config = Field(default_factory=S3Config, description="S3 client settings.")

    @model_validator(mode="after")
    def _some_task(self) -> PipelineConfig:
        t = self.tasks
        if not (t.caption_prompt or t.questions or t.mcq or (t.use_manifest_questions and self.input.manifest)):
            raise ValueError("no tasks: set tasks.caption_prompt, tasks.questions or tasks.mcq (or use a manifest "
                             "with questions)")
        return self

    @property
    def resolved_mode(self) -> Literal["fused", "split"]:
        if self.mode != "auto":
            return self.mode
        g = self.generate
        actors = g.concurrency[0] if isinstance(g.concurrency, tuple) else g.concurrency or 1
        return "split" if g.num_gpus > 0 and actors > 1 else "fused"

    def effective_run_id(self) -> str:
        """``run_id``, or a hash of input, tasks, model, decode (less :data:`OPERATIONAL_DECODE_FIELDS`) and
        compression: the same as the earlier release gave for the same settings."""
        if self.run_id:
            return self.run_id
        relevant = self.model_dump(include={"input", "tasks", "model", "decode"})
        relevant["model"].pop("cache_dir")
        for name in OPERATIONAL_DECODE_FIELDS:
            relevant["decode"].pop(name)
        relevant["dycoke"] = self.compression.legacy()
        digest = hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:12]
        return f"run-{digest}"


def _format_errors(exc: ValidationError, source: str, moved: dict[str, str]) -> str:
    lines = [f"invalid configuration ({source}):"]
    for err in exc.errors():
        loc, kind, value = ".".join(map(str, err["loc"])) or "<top level>", err["type"], err.get("input")
        old = next((f" (given as {o})" for n, o in moved.items() if loc == n or loc.startswith(n + ".")), "")
        msg = {"extra_forbidden": "unknown field (check the spelling; see --help for the fields)",
               "missing": "required field is missing"}.get(kind, err["msg"])
        shown = "" if kind in ("missing", "extra_forbidden") or isinstance(value, dict) else f" (got {value!r})"
        lines.append(f"  {loc}{old}: {msg}{shown}")
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


def read_yaml(path: str | Path) -> dict:
    """A job file's sections (a mapping)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigurationError(f"configuration file {p} does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigurationError(f"configuration file {p} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigurationError(f"configuration file {p} must hold a mapping of sections, got {type(data).__name__}")
    return data


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | list[str] | None = None,
                data: dict | None = None, cli: dict | None = None) -> PipelineConfig:
    """The validated config from, in increasing precedence: ``data`` (built-in defaults, e.g. the demo's), the YAML
    file at ``path`` (each section it sets replaces that section of ``data``), ``overrides`` (``a.b=value`` strings
    or a dotted-key dict) and ``cli`` (nested, from command-line flags); renamed fields are moved first, per
    source. Raises :class:`ConfigurationError` naming every bad field.
    """
    moved: dict[str, str] = {}
    raw = nested(apply_renames(data or {}, "built-in configuration", moved))
    if path is not None:
        raw.update(nested(apply_renames(read_yaml(path), str(path), moved)))
    if isinstance(overrides, list):
        overrides = dict(parse_override(o) for o in overrides)
    for source, layer in (("--set", overrides or {}), ("command line", cli or {})):
        for dotted, value in apply_renames(layer, source, moved).items():
            set_dotted(raw, dotted, value)
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigurationError(_format_errors(exc, str(path) if path else "arguments", moved)) from None


def to_yaml(cfg: PipelineConfig) -> str:
    return yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
