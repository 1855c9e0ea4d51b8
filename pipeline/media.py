"""What a video file holds, read from its container without decoding a frame (PyAV demux).

Contract::

    probe(source, uri) -> VideoIndex       # raises VideoError with a specific error_type

``source``: a path or a seekable binary file. The probe picks the first real video stream (not an audio file's cover
art) and demuxes its packets (about a millisecond per thousand) into the frame index every backend shares:
``n`` frames, one per packet with data, in presentation order (decord's count too, so ``linspace(0, n-1, F)`` picks
the same frames everywhere); their ``pts`` (sorted ticks; dts or ``index / rate`` where missing); ``timestamps_s``
from 0 whatever the stream's start; ``duration_s``, the end of the last frame on the same clock (never
``frames / fps``; the container's figure is only logged when it disagrees); the keyframes; the colour matrix.

Errors: no video stream (``no_video_stream``), a codec FFmpeg does not know (``unsupported_codec``), no frame
(``too_few_frames``), an MP4/MOV whose sample table lists more frames than the bytes hold (``corrupt_video``).

``pyav_rgb(frame, size)``: the one conversion of a decoded frame to ``uint8 [size, size, 3]`` RGB that the CPU
backends and NVDEC's host frames share (swscale with the frame's own colour tags, then its display rotation).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from fractions import Fraction

import numpy as np

log = logging.getLogger(__name__)


class VideoError(Exception):
    """A per-video failure with an ``error_type`` (see :data:`pipeline.schema.ERROR_TYPES`)."""

    def __init__(self, error_type: str, message: str):
        super().__init__(message)
        self.error_type = error_type
        self.message = message

    def __reduce__(self):  # crosses process boundaries (decoder processes): rebuilt with both arguments
        return type(self), (self.error_type, self.message)


# decord prefixes messages with a time and its build's source path ("[00:28:40] /src/x.cc:61: "); its C++
# assertions read "Check failed: <expression> (-22 vs. 0) <text>"; FFmpeg/PyAV name file objects "[BytesIO]".
_LIB_NOISE = (
    re.compile(r"\[\d\d:\d\d:\d\d\] \S+?:\d+: "),
    re.compile(r"Check failed: .*?\(-?\d+ vs\. -?\d+\) ?"),
    re.compile(r"\S+\.(?:cc|cpp|cxx|h|hpp|c|pyx|py):\d+:?"),
    re.compile(r"Stack trace.*", re.S),
    re.compile(r"\[(?:BytesIO|Errno -?\d+)\]:? ?"),
    re.compile(r": '[^']*'$"),  # PyAV appends the file name (a /proc/self/fd path, or '<none>')
)


def clean_message(text: str, limit: int = 300) -> str:
    """A library's error text without build paths, source lines, assertion expressions or stack traces."""
    for pattern in _LIB_NOISE:
        text = pattern.sub("", text)
    text = " ".join(text.split()).strip(" :;,")
    text = text or "the decoder gave no reason"
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass(frozen=True)
class VideoIndex:
    """The frame index of one video stream (see the module docstring)."""

    codec: str
    stream_index: int  # which stream of the container (``container.streams[i]``)
    pts: np.ndarray  # int64 [n], presentation order, in the stream's time base
    keyframes: np.ndarray  # int64 [k], indices into pts
    timestamps_s: np.ndarray  # float64 [n], from 0
    duration_s: float
    fps: float
    pts_exact: bool = True  # every packet had a pts (else part of ``pts`` comes from dts or is estimated)
    colorspace: int = 2  # FFmpeg's AVColorSpace of the stream (1 BT.709, 5/6 BT.601, 2 unspecified, ...)
    full_range: bool = False  # YUV in full (JPEG) range, else limited (MPEG) range

    @property
    def n(self) -> int:
        return int(self.pts.shape[0])

    def position(self, pts) -> int | None:
        """The frame number of a pts (None when the pts is unknown or not in the index)."""
        if pts is None:
            return None
        i = int(np.searchsorted(self.pts, pts))
        return i if i < self.n and int(self.pts[i]) == pts else None

    @property
    def pts_unique(self) -> bool:
        """Frames can be identified by their pts (all known, no two equal)."""
        return self.pts_exact and bool(np.all(np.diff(self.pts) > 0))


class CannotOpen(Exception):
    """This backend cannot open this file (the next one may); ``no_decoder``: it lacks the codec."""

    def __init__(self, reason: str, no_decoder: bool = False):
        super().__init__(reason)
        self.reason = reason
        self.no_decoder = no_decoder


def _video_stream(container, uri: str):
    streams = [s for s in container.streams.video if not _is_attached_picture(s)]
    if not streams:
        what = "only cover art (an attached picture) and no video stream" if container.streams.video else "no video stream"
        audio = " (an audio file)" if container.streams.audio else ""
        raise VideoError("no_video_stream", f"{uri}: {what}{audio}")
    return streams[0]


def _is_attached_picture(stream) -> bool:
    import av

    return bool(int(stream.disposition) & int(av.stream.Disposition.attached_pic))


def probe(source, uri: str = "<bytes>") -> VideoIndex:
    """The :class:`VideoIndex` of ``source``'s first real video stream; raises :class:`VideoError`."""
    import av

    try:
        container = av.open(source, mode="r")
    except av.error.FFmpegError as exc:
        raise VideoError("corrupt_video", f"{uri}: cannot open the container: {clean_message(str(exc))}") from exc
    try:
        return _index(container, _video_stream(container, uri), uri)
    finally:
        container.close()
        if hasattr(source, "seek"):
            source.seek(0)


def _index(container, stream, uri: str) -> VideoIndex:
    import av

    ctx = stream.codec_context
    codec = ctx.codec.canonical_name if ctx is not None and ctx.codec is not None else None  # "av1", not "libdav1d"
    if codec is None:
        raise VideoError("unsupported_codec", f"{uri}: unsupported codec: FFmpeg does not know this video stream's codec")
    tb = stream.time_base or Fraction(1, 90_000)
    packets = []  # (pts, dts, duration, keyframe) of each packet with data (size 0: the end-of-stream marker)
    try:
        packets += [(p.pts, p.dts, p.duration or 0, p.is_keyframe) for p in container.demux(stream) if p.size]
    except av.error.FFmpegError as exc:  # a damaged container: what was read before it is not trusted either
        raise VideoError("corrupt_video", f"{uri}: cannot read all packets: {clean_message(str(exc))}") from exc
    pts, dts, durs, keys = zip(*packets) if packets else ((), (), (), ())
    n = len(pts)
    if n == 0:
        raise VideoError("too_few_frames", f"{uri}: 0 frames (the video track has no samples)")
    declared = int(stream.frames or 0)
    if declared > n:
        # MP4/MOV count frames in their sample table: fewer packets than samples means bytes are missing. Other
        # containers' counts are header estimates (AVI's can over-report): the packets are the truth there.
        if "mp4" in container.format.name or "mov" in container.format.name:
            raise VideoError("corrupt_video", f"{uri}: truncated: the index lists {declared} frames, the file holds {n}")
        log.info("%s: the header says %d frames, the stream holds %d packets; using the packets", uri, declared, n)
    rate = stream.average_rate or stream.guessed_rate or stream.base_rate
    step = max(1, round(1 / (float(rate or 25) * tb)))  # one frame, in ticks
    ticks, order = _presentation_order(pts, dts, step)
    keyframes = np.flatnonzero(np.asarray(keys, dtype=bool)[order])
    rel = ticks - ticks[0]
    duration = float((int(rel[-1]) + (int(durs[int(order[-1])]) or step)) * tb)
    container_s = float(container.duration) / 1e6 if container.duration else duration
    if abs(container_s - duration) > max(1.0, 0.05 * duration):
        log.info("%s: container says %.3fs, the stream's timestamps %.3fs; using the timestamps", uri, container_s, duration)
    return VideoIndex(
        codec=codec, stream_index=int(stream.index), pts=ticks, timestamps_s=rel.astype(np.float64) * float(tb),
        keyframes=keyframes.astype(np.int64) if keyframes.size else np.zeros(1, dtype=np.int64), duration_s=duration,
        fps=float(rate or 0.0), pts_exact=all(p is not None for p in pts), colorspace=int(ctx.colorspace or 2),
        full_range=int(ctx.color_range or 0) == 2 or str(ctx.pix_fmt or "").startswith("yuvj"),
    )  # fmt: skip


def _presentation_order(pts: list, dts: list, step: int) -> tuple[np.ndarray, np.ndarray]:
    """Presentation times in ticks, sorted (``int64 [n]``), and the packet order that sorts them (stable).

    Missing pts fall back to dts; when most packets have neither (raw elementary streams) the decode order
    is the presentation order, one ``step`` apart; a few holes are placed one ``step`` after their predecessor."""
    times = [p if p is not None else d for p, d in zip(pts, dts)]
    missing = sum(t is None for t in times)
    if missing > len(times) // 2:
        times = [i * step for i in range(len(times))]
    elif missing:
        prev = None
        for i, t in enumerate(times):
            times[i] = t if t is not None else (prev + step if prev is not None else 0)
            prev = times[i]
    arr = np.asarray(times, dtype=np.int64)
    order = np.argsort(arr, kind="stable")
    return arr[order], order


def pyav_rgb(frame, size: int) -> np.ndarray:
    """A PyAV video frame -> ``uint8 [size, size, 3]`` RGB (swscale, the frame's matrix and range), display-rotated."""
    img = frame.reformat(width=size, height=size, format="rgb24").to_ndarray()
    turns = int(round((frame.rotation or 0) / 90)) % 4
    return np.rot90(img, turns) if turns else img
