"""Decode stage (CPU): fetch a video, sample F frames, resize while decoding, emit uint8 frames.

Every failure becomes an error row (``status="error"`` with an ``error_type`` from
:data:`pipeline.schema.ERROR_TYPES`) and the batch carries on. Memory is bounded: a file larger than
``max_video_bytes`` is never fetched; one larger than ``in_memory_bytes`` is decoded from disk
(:mod:`pipeline.fetch`); frames are resized inside the decoder, so a 4K stream never materialises
full-size RGB frames.

Per video: :func:`pipeline.media.probe` reads the container's packets (no decoding) and gives the frame
count, every frame's presentation time (from 0) and the duration (end of the last frame), so metadata is
the stream's own whatever backend makes the pixels; :func:`pipeline.backends.decode_frames` then decodes
the sampled frames with ``decode.backend`` (``auto``: PyAV, and decord for a file PyAV cannot open).

Sampling (``decode.sampling``):

* ``uniform`` (default, exact): frame indices ``linspace(0, n-1, F)`` truncated to int, as the reference.
* ``keyframe`` (APPROXIMATE, cheap): each uniform target snaps to its nearest keyframe, and only
  keyframes are decoded (one seek + one intra frame each). With fewer keyframes than F, frames repeat.

Isolation (``decode.isolation``): with ``process`` (the config default) :class:`DecodeStage` hands each
video to a long-lived decoder subprocess (:mod:`pipeline.decode_worker`), so a video that hangs the
decoder becomes a ``decode_timeout`` row after ``decode.timeout_s`` and one that crashes it (segfault)
a ``decoder_crashed`` row. ``none`` decodes in the calling process, unprotected. A
:class:`DecodeSettings` built directly (tests, benchmarks, library use) defaults to ``none``, so that
in-process mocks (moto's ``mock_aws``, botocore ``Stubber``, monkeypatched clients) keep working;
:meth:`DecodeSettings.from_config`, which the pipeline uses, takes the config's value.
"""

from __future__ import annotations

import importlib
import io
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pyarrow as pa

from pipeline.backends import BACKENDS, decode_frames
from pipeline.config import S3Config
from pipeline.fetch import Fetched, check_uri, fetch
from pipeline.media import VideoError, VideoIndex, probe
from pipeline.schema import DECODED_SCHEMA, STATUS_ERROR, STATUS_OK

__all__ = ["DecodeSettings", "DecodeStage", "Decoded", "Fetched", "VideoError", "check_uri", "decode_video", "fetch",
           "frames_from_row", "keyframe_indices", "looks_like_media", "sample_indices"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DecodeSettings:
    """Picklable decode settings (the decode section of the config plus the resolved frame size)."""

    num_frames: int = 32
    frame_size: int = 384
    sampling: str = "uniform"
    min_frames: int = 1
    max_video_bytes: int = 4 * 1024**3
    in_memory_bytes: int = 256 * 1024**2
    num_threads: int = 1
    spool_dir: str | None = None
    s3: S3Config | None = None
    timeout_s: float = 300.0
    #: "process": decode in a decoder subprocess (hang/crash -> error row); "none": in-process, unprotected.
    #: The dataclass default is "none" (see the module docstring); the pipeline config's default is "process".
    isolation: Literal["process", "none"] = "none"
    #: ``module:function`` with :func:`decode_video`'s signature. A test hook (a decoder that really crashes or
    #: hangs); deliberately not a config field, so a configuration file cannot choose code to run.
    decoder: str = "pipeline.decode:decode_video"
    #: decode.backend: which decoder makes the pixels ("auto": PyAV, then decord when PyAV cannot open a file)
    backend: str = "auto"

    @classmethod
    def from_config(cls, decode_cfg, frame_size: int, s3_cfg) -> DecodeSettings:
        return cls(
            num_frames=decode_cfg.num_frames,
            frame_size=int(decode_cfg.frame_size or frame_size),
            sampling=decode_cfg.sampling,
            min_frames=decode_cfg.min_frames,
            max_video_bytes=decode_cfg.max_video_bytes,
            in_memory_bytes=decode_cfg.in_memory_bytes,
            num_threads=decode_cfg.num_threads,
            spool_dir=decode_cfg.spool_dir,
            s3=s3_cfg,
            timeout_s=float(decode_cfg.timeout_s),
            isolation=decode_cfg.isolation,
            backend=decode_cfg.backend,
        )


# ------------------------------------------------------------------------------------------------ decode

_SIGNATURES = (
    (4, b"ftyp"),  # MP4 / MOV / 3GP
    (4, b"moov"), (4, b"mdat"), (4, b"free"), (4, b"wide"), (4, b"skip"),  # QuickTime without ftyp
    (0, b"\x1a\x45\xdf\xa3"),  # Matroska / WebM
    (0, b"RIFF"),  # AVI
    (0, b"FLV"),
    (0, b"OggS"),
    (0, b"\x00\x00\x01\xba"), (0, b"\x00\x00\x01\xb3"),  # MPEG-PS / ES
    (0, b"\x30\x26\xb2\x75"),  # ASF / WMV
    (0, b"ID3"), (0, b"fLaC"),  # audio (MP3 with ID3 tags, FLAC): media, even if without video
    (0, b"\x00\x00\x00\x01"), (0, b"\x00\x00\x01"),  # raw H.264 / H.265 Annex B
)  # fmt: skip


def looks_like_media(head: bytes) -> bool:
    """True when the first bytes carry a known container signature (or an MPEG-TS sync byte)."""
    if len(head) >= 189 and head[0] == 0x47 and head[188] == 0x47:
        return True
    if head[:1] == b"\x47" and len(head) < 189:
        return True
    return any(head[off : off + len(sig)] == sig for off, sig in _SIGNATURES)


def sample_indices(n: int, num_frames: int) -> np.ndarray:
    """``linspace(0, n-1, F)`` truncated to int (the reference's uniform sampling); repeats when n < F."""
    return np.linspace(0, n - 1, num_frames, dtype=int)


def keyframe_indices(targets: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Each target snapped to its nearest keyframe index (ties go to the earlier keyframe)."""
    keys = np.asarray(sorted(set(int(k) for k in keys)) or [0])
    pos = np.searchsorted(keys, targets)
    lo = keys[np.clip(pos - 1, 0, len(keys) - 1)]
    hi = keys[np.clip(pos, 0, len(keys) - 1)]
    return np.where(np.abs(targets - lo) <= np.abs(hi - targets), lo, hi)


@dataclass
class Decoded:
    frames: np.ndarray  # [F, S, S, 3] uint8
    timestamps: list[float]
    duration_s: float | None
    total_frames: int


def looks_like_text(head: bytes) -> bool:
    """No NUL byte in the first bytes: text, not a media file (every container header has NULs early)."""
    return len(head) > 0 and b"\x00" not in head


def _probe(source, uri: str, head: bytes) -> VideoIndex:
    """The frame index (:func:`pipeline.media.probe`), after the cheap checks on the first bytes."""
    if looks_like_text(head):
        # a decoder may echo the whole input to stderr when it fails to open it; never hand it text.
        raise VideoError("not_a_video", f"{uri}: text, not a media file (first bytes {head[:8]!r})")
    try:
        return probe(source, uri)
    except VideoError as exc:
        if head and not looks_like_media(head):  # FFmpeg guesses formats from random bytes too
            raise VideoError("not_a_video", f"{uri}: not a known media container (first bytes {head[:8]!r})") from exc
        raise


def decode_video(source, settings: DecodeSettings, uri: str = "<bytes>", head: bytes = b"") -> Decoded:
    """Probe, sample and read frames; raises :class:`VideoError`.

    Frame numbers, timestamps and the duration come from the container's own packet timestamps
    (:func:`pipeline.media.probe`); the backends (:func:`pipeline.backends.decode_frames`) only produce pixels."""
    if not head and isinstance(source, io.BytesIO):
        head = source.getvalue()[:4096]
    index = _probe(source, uri, head)
    n = index.n
    if n < max(1, settings.min_frames):
        raise VideoError("too_few_frames", f"{uri}: {n} frames, decode.min_frames={settings.min_frames}")
    targets = sample_indices(n, settings.num_frames)
    indices = keyframe_indices(targets, index.keyframes) if settings.sampling == "keyframe" else targets
    try:
        frames, _backend = decode_frames(source, index, indices, settings.frame_size, uri,
                                         backends=backend_order(settings.backend), num_threads=settings.num_threads)
    except VideoError as exc:
        if not exc.message.startswith(uri):
            exc = VideoError(exc.error_type, f"{uri}: {exc.message}")
        raise exc from None
    if frames.shape[0] != settings.num_frames or frames.dtype != np.uint8:
        raise VideoError("decode_failed", f"{uri}: decoder returned {frames.shape} {frames.dtype}")
    timestamps = [round(float(s), 6) for s in index.timestamps_s[indices]]
    return Decoded(frames=np.ascontiguousarray(frames), timestamps=timestamps, duration_s=index.duration_s, total_frames=n)


def backend_order(backend: str) -> tuple[str, ...]:
    """``decode.backend`` -> the backends to try in order (``auto``: :data:`pipeline.backends.BACKENDS`)."""
    if backend == "nvdec":  # a GPU node: the CPU backends take what NVDEC cannot (codec, profile, no GPU)
        return ("nvdec", *BACKENDS)
    return BACKENDS if backend == "auto" else (backend,)


# ------------------------------------------------------------------------------------------------ stage


def _rows(batch) -> list[dict]:
    """The rows of a batch as dicts; binary columns (frames, visual tokens) of a ``pyarrow.Table`` come as
    zero-copy ``pyarrow.Buffer`` slices of the table instead of per-row ``bytes`` copies (a 32-video batch
    holds ~450 MB of frames: copying it would hold the GIL while the engine thread wants to launch work)."""
    if isinstance(batch, pa.Table):
        return _table_rows(batch)
    if isinstance(batch, Mapping):
        keys = list(batch)
        n = len(batch[keys[0]]) if keys else 0
        return [{k: batch[k][i] for k in keys} for i in range(n)]
    return list(batch)


def _table_rows(batch: pa.Table) -> list[dict]:
    binary = [f.name for f in batch.schema if pa.types.is_binary(f.type) or pa.types.is_large_binary(f.type)]
    rows = batch.drop_columns(binary).to_pylist()
    for name in binary:
        i = 0
        for chunk in batch.column(name).chunks:
            offsets = np.frombuffer(chunk.buffers()[1], dtype=np.int64 if pa.types.is_large_binary(chunk.type) else np.int32)
            offsets = offsets[chunk.offset : chunk.offset + len(chunk) + 1]
            data = chunk.buffers()[2] or pa.py_buffer(b"")  # no data buffer when every value is empty
            nulls = chunk.is_null().to_numpy(zero_copy_only=False)
            for k in range(len(chunk)):
                rows[i][name] = None if nulls[k] else data.slice(int(offsets[k]), int(offsets[k + 1] - offsets[k]))
                i += 1
    return rows


def resolve_decoder(path: str):
    """``"module:function"`` -> the function (:attr:`DecodeSettings.decoder`)."""
    module, sep, name = path.partition(":")
    if not sep or not module or not name:
        raise ValueError(f"decoder must look like 'module:function', got {path!r}")
    return getattr(importlib.import_module(module), name)


class DecodeStage:
    """``video rows -> decoded rows`` (one out per one in). Plain callable; Ray-free.

    Input columns: ``video_id, video_uri, questions``. Output: :data:`pipeline.schema.DECODED_SCHEMA`
    (adds frames as raw bytes + ``frames_shape``, timestamps, sizes, timings, status and errors).

    With ``settings.isolation == "process"`` every video goes through this process's shared decoder
    subprocess for these settings (:func:`pipeline.decode_worker.shared_decoder`, started on first use and
    reused by later stages and batches); :meth:`decode_in_process` is the unprotected in-process path.
    """

    input_columns = ("video_id", "video_uri", "questions")
    output_columns = tuple(DECODED_SCHEMA.names)

    def __init__(self, settings: DecodeSettings, quiet: bool = True):
        self.settings = settings
        self._decode = resolve_decoder(settings.decoder) if settings.isolation == "none" else None
        if quiet and settings.isolation == "none":
            # ffmpeg's own messages for broken files; each failure is reported in its row instead
            import decord

            decord.logging.set_level(decord.logging.QUIET)

    def decode_one(self, row: Mapping[str, Any]) -> dict:
        """Fetch and decode one video; always returns a row (an error row for any failure)."""
        if self.settings.isolation == "process":
            from pipeline.decode_worker import shared_decoder

            return shared_decoder(self.settings).decode_one(row)
        return self.decode_in_process(row)

    def decode_in_process(self, row: Mapping[str, Any]) -> dict:
        """:meth:`decode_one` in this process: no timeout, and a decoder crash takes the process down."""
        if self._decode is None:
            self._decode = resolve_decoder(self.settings.decoder)
        uri = row["video_uri"]
        out: dict[str, Any] = {"video_id": row["video_id"], "video_uri": uri, "questions": _list(row.get("questions"))}
        t0 = time.perf_counter()
        fetched: Fetched | None = None
        try:
            fetched = fetch(uri, self.settings)
            out.update(video_bytes=fetched.size, video_etag=fetched.etag)
            t1 = time.perf_counter()
            out["fetch_s"] = t1 - t0
            dec = self._decode(fetched.source(), self.settings, uri, fetched.head())
            out.update(
                frames=dec.frames.tobytes(), frames_shape=list(dec.frames.shape), num_frames=int(dec.frames.shape[0]),
                frame_timestamps_s=dec.timestamps, duration_s=dec.duration_s, decode_s=time.perf_counter() - t1,
                status=STATUS_OK,
            )
        except VideoError as exc:
            out.update(status=STATUS_ERROR, error_type=exc.error_type, error_message=exc.message)
            log.warning("video %s: %s: %s", row["video_id"], exc.error_type, exc.message)
        except Exception as exc:  # noqa: BLE001 - any other failure must still become a row
            out.update(status=STATUS_ERROR, error_type="internal", error_message=f"{type(exc).__name__}: {exc}")
            log.exception("video %s: unexpected decode failure", row["video_id"])
        finally:
            if fetched is not None:
                fetched.cleanup()
        out.setdefault("fetch_s", time.perf_counter() - t0)
        return out

    def __call__(self, batch) -> pa.Table:
        return pa.Table.from_pylist([self.decode_one(r) for r in _rows(batch)], schema=DECODED_SCHEMA)


def _list(value) -> list | None:
    if value is None:
        return None
    return [str(v) for v in list(value)]


def frames_from_row(row: Mapping[str, Any]) -> np.ndarray:
    """The ``[F, S, S, 3]`` uint8 frames of a decoded row (a view on its bytes)."""
    shape = tuple(int(s) for s in row["frames_shape"])
    return np.frombuffer(row["frames"], dtype=np.uint8).reshape(shape)
