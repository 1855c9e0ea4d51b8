"""Decoding: a video's bytes to sampled frames. A pure function, no I/O of its own and no process handling.

Contract::

    decoded = decode_video(source, cfg, uri="<bytes>", head=b"")    # raises VideoError
    index, indices = plan(source, cfg, uri, head)                   # the same without the pixels

* ``source``: a path or a seekable binary file; ``cfg``: a :class:`pipeline.config.DecodeConfig` with ``frame_size``
  set; ``head``: the file's first bytes, for the cheap "is this media at all" checks.
* :class:`Decoded`: ``frames`` ``uint8 [F, S, S, 3]`` (F = ``cfg.num_frames``, S = ``cfg.frame_size``; numpy, or a
  CUDA tensor from NVDEC), the sampled frames' presentation times (s, from 0), the duration and the frame count.

Metadata always comes from the container (:func:`pipeline.media.probe`), pixels from
:func:`pipeline.backends.decode_frames` with ``cfg.backend``. Sampling (``cfg.sampling``): ``uniform`` (exact,
default): frames ``linspace(0, n-1, F)`` truncated to int, as the reference; ``keyframe`` (APPROXIMATE, cheap): each
uniform target snaps to its nearest keyframe and only keyframes are decoded (repeats when there are fewer than F).
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.backends import BACKENDS, decode_frames
from pipeline.media import VideoError, VideoIndex, probe

__all__ = ["Decoded", "VideoError", "backend_order", "decode_video", "keyframe_indices", "looks_like_media",
           "looks_like_text", "plan", "sample_indices"]

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


def looks_like_text(head: bytes) -> bool:
    """No NUL byte in the first bytes: text, not a media file (every container header has NULs early)."""
    return len(head) > 0 and b"\x00" not in head


def sample_indices(n: int, num_frames: int) -> np.ndarray:
    """``linspace(0, n-1, F)`` truncated to int (the reference's uniform sampling); repeats when n < F."""
    return np.linspace(0, n - 1, num_frames, dtype=int)


def keyframe_indices(targets: np.ndarray, keys: np.ndarray) -> np.ndarray:
    """Each target snapped to its nearest keyframe index (ties go to the earlier keyframe)."""
    keys = np.unique(np.asarray(keys, dtype=np.int64)) if len(keys) else np.zeros(1, dtype=np.int64)
    pos = np.searchsorted(keys, targets)
    lo = keys[np.clip(pos - 1, 0, len(keys) - 1)]
    hi = keys[np.clip(pos, 0, len(keys) - 1)]
    return np.where(np.abs(targets - lo) <= np.abs(hi - targets), lo, hi)


def backend_order(backend: str) -> tuple[str, ...]:
    """``decode.backend`` -> the backends to try in order (``auto``: :data:`pipeline.backends.BACKENDS`)."""
    if backend == "nvdec":  # a GPU node: the CPU backends take what NVDEC cannot (codec, profile, no GPU)
        return ("nvdec", *BACKENDS)
    return BACKENDS if backend == "auto" else (backend,)


@dataclass
class Decoded:
    frames: Any  # uint8 [F, S, S, 3]: numpy, or a CUDA tensor from NVDEC
    timestamps: list[float]
    duration_s: float | None
    total_frames: int


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


def plan(source, cfg, uri: str = "<bytes>", head: bytes = b"") -> tuple[VideoIndex, np.ndarray]:
    """The video's frame index and the frame numbers to decode (probe and sampling, no pixels); raises
    :class:`VideoError`."""
    if not head and isinstance(source, io.BytesIO):
        head = source.getvalue()[:4096]
    index = _probe(source, uri, head)
    if index.n < max(1, cfg.min_frames):
        raise VideoError("too_few_frames", f"{uri}: {index.n} frames, decode.min_frames={cfg.min_frames}")
    targets = sample_indices(index.n, cfg.num_frames)
    return index, keyframe_indices(targets, index.keyframes) if cfg.sampling == "keyframe" else targets


def decode_video(source, cfg, uri: str = "<bytes>", head: bytes = b"", backends=None) -> Decoded:
    """Probe, sample and read frames (see the module docstring); raises :class:`VideoError`. ``backends``: the
    order to try (default :func:`backend_order` of ``cfg.backend``)."""
    if not cfg.frame_size:
        raise ValueError("decode.frame_size is not set: the run fills it from the model's preprocessor config")
    index, indices = plan(source, cfg, uri, head)
    try:
        frames, _backend = decode_frames(source, index, indices, int(cfg.frame_size), uri,
                                         backends=backends or backend_order(cfg.backend), num_threads=cfg.num_threads)
    except VideoError as exc:
        if not exc.message.startswith(uri):
            exc = VideoError(exc.error_type, f"{uri}: {exc.message}")
        raise exc from None
    if frames.shape[0] != cfg.num_frames:
        raise VideoError("decode_failed", f"{uri}: decoder returned {tuple(frames.shape)}")
    timestamps = [round(float(s), 6) for s in index.timestamps_s[indices]]
    return Decoded(frames=frames, timestamps=timestamps, duration_s=index.duration_s, total_frames=index.n)
