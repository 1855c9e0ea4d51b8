"""Generate small test videos with PyAV (no ffmpeg binary needed).

Every helper returns the encoded bytes; :func:`write_video` also writes them to a path. The encoder
itself lives in :mod:`pipeline.samples` (shared with the demo and the benchmark).
"""

from __future__ import annotations

import io
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from pipeline.samples import frame_image, make_video

__all__ = ["frame_image", "make_video", "make_audio_only", "truncate", "NOT_A_VIDEO", "write_video", "sample_set"]


def make_audio_only(seconds: float = 1.0, rate: int = 8000) -> bytes:
    """A valid media file (WAV in a Matroska container would also do) with an audio stream only."""
    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as out:
        stream = out.add_stream("aac", rate=rate)
        samples = int(seconds * rate)
        t = np.arange(samples, dtype=np.float32) / rate
        tone = (0.2 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)[None, :]
        chunk = 1024
        for start in range(0, samples, chunk):
            frame = av.AudioFrame.from_ndarray(tone[:, start : start + chunk].copy(), format="fltp", layout="mono")
            frame.sample_rate = rate
            frame.pts = start
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()


def truncate(data: bytes, fraction: float = 0.4) -> bytes:
    """The first ``fraction`` of the bytes (an upload that stopped half-way)."""
    return data[: max(1, int(len(data) * fraction))]


NOT_A_VIDEO = b"this is a text file that someone named clip.mp4\n" * 20


def write_video(path: str | Path, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def sample_set() -> dict[str, bytes]:
    """Good videos of different lengths, sizes and frame rates plus the bad cases, keyed by file name."""
    good = {
        "short_24fps.mp4": make_video(num_frames=12, width=64, height=48, fps=24),
        "medium_30fps.mp4": make_video(num_frames=45, width=96, height=64, fps=30),
        "long_10fps.mp4": make_video(num_frames=60, width=48, height=48, fps=10, gop=30),
        "wide_25fps.mp4": make_video(num_frames=20, width=128, height=32, fps=25),
        "tall_15fps.mp4": make_video(num_frames=16, width=32, height=80, fps=15),
        "odd_ntsc.mp4": make_video(num_frames=18, width=50, height=38, fps=Fraction(30000, 1001)),
        "mpeg4_12fps.mp4": make_video(num_frames=14, width=64, height=48, fps=12, codec="mpeg4"),
        "large_50fps.mp4": make_video(num_frames=30, width=160, height=120, fps=50),
    }
    bad = {
        "truncated.mp4": truncate(make_video(num_frames=40, width=64, height=48, fps=24)),
        "not_a_video.mp4": NOT_A_VIDEO,
        "audio_only.mp4": make_audio_only(),
    }
    return {**good, **bad}
