"""The bad-input corpus of the reliability suite, generated with PyAV (nothing downloaded).

:func:`bad_input_set` returns ``{file name: (bytes, expectation)}`` where the expectation is ``"ok"`` or
the ``error_type`` the pipeline must report. Sizes are scaled down to keep the suite cheap; each case
says what it stands for.
"""

from __future__ import annotations

import os
import tempfile
from fractions import Fraction

import av
import numpy as np

from pipeline.samples import frame_image, make_video
from tests.pipeline.oddities import oddity_set
from tests.pipeline.videos import NOT_A_VIDEO, make_audio_only, truncate

#: the "long video": one hour at 2 fps and 32x32 (7200 frames, 1.5 MB, ~2 s to encode). Low resolution
#: and frame rate keep it cheap; what it exercises (sampling F frames out of thousands across 120 GOPs,
#: an hour of timestamps) does not depend on either.
LONG_SECONDS, LONG_FPS, LONG_SIDE = 3600, 2, 32


def make_muxed(*, num_frames: int = 24, width: int = 64, height: int = 48, fps: int | Fraction = 24,
               pts: list[int] | None = None, time_base: Fraction | None = None,
               container_options: dict | None = None, rotation: float | None = None, gop: int | None = None) -> bytes:
    """Like :func:`pipeline.samples.make_video` (libx264, mp4) with the knobs the edge cases need.

    ``pts`` (in ``time_base`` units) gives irregular presentation times (variable frame rate);
    ``container_options`` go to the muxer (``{"movflags": "faststart"}``: moov index first);
    ``rotation`` writes a display-matrix side data entry (degrees, counter-clockwise).
    """
    # a real file: faststart rewrites the file after the fact (reads it back), which a BytesIO cannot do
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "v.mp4")
        _mux(path, num_frames, width, height, fps, pts, time_base, container_options, rotation, gop)
        with open(path, "rb") as f:
            return f.read()


def _mux(path, num_frames, width, height, fps, pts, time_base, container_options, rotation, gop) -> None:
    with av.open(path, "w", format="mp4", options=container_options or {}) as out:
        stream = out.add_stream("libx264", rate=fps)
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuv420p"
        stream.options = {"preset": "ultrafast"}
        if gop is not None:
            stream.codec_context.gop_size = gop
        if time_base is not None:
            stream.time_base = time_base
            stream.codec_context.time_base = time_base
        if rotation is not None:
            stream.set_display_rotation(rotation)
        for i in range(num_frames):
            frame = av.VideoFrame.from_ndarray(frame_image(i, width, height), format="rgb24")
            if pts is not None:
                frame.pts = pts[i]
                frame.time_base = time_base
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)


def flip_middle(data: bytes, span: float = 0.2) -> bytes:
    """Invert every byte of the middle ``span`` of the file (bit rot / a damaged transfer)."""
    b = bytearray(data)
    lo, hi = int(len(b) * (0.5 - span / 2)), int(len(b) * (0.5 + span / 2))
    for i in range(lo, hi):
        b[i] ^= 0xFF
    return bytes(b)


def moov_at_start(data: bytes) -> bool:
    return data.find(b"moov") < data.find(b"mdat")


VFR_PTS = [0, 40, 50, 200, 210, 220, 600, 1000, 1010, 1500, 2600, 2640]  # ms: bursts and gaps
VFR_TIME_BASE = Fraction(1, 1000)


def bad_input_set() -> dict[str, tuple[bytes, str]]:
    """Every bad-input case as ``{name: (bytes, expected)}``; expected is "ok" or an error_type."""
    base = make_video(num_frames=40, width=64, height=48, fps=24)  # moov at the end (PyAV's default)
    fast = make_muxed(num_frames=40, container_options={"movflags": "faststart"})
    assert not moov_at_start(base) and moov_at_start(fast)
    rng = np.random.default_rng(0)
    return {
        "empty.mp4": (b"", "not_a_video"),
        "random_bytes.mp4": (rng.integers(0, 256, 20_000, dtype=np.uint8).tobytes(), "not_a_video"),
        "text.mp4": (NOT_A_VIDEO, "not_a_video"),
        "trunc10_moov_end.mp4": (truncate(base, 0.1), "corrupt_video"),
        "trunc90_moov_end.mp4": (truncate(base, 0.9), "corrupt_video"),
        "trunc10_faststart.mp4": (truncate(fast, 0.1), "corrupt_video"),
        "trunc90_faststart.mp4": (truncate(fast, 0.9), "corrupt_video"),  # index intact, tail lost: decord refuses
        "flipped_middle.mp4": (flip_middle(base), "corrupt_video"),  # opens; a sampled frame fails to decode
        "audio_only.mp4": (make_audio_only(), "no_video_stream"),
        "one_frame.mp4": (make_video(num_frames=1), "ok"),
        "three_frames.mp4": (make_video(num_frames=3), "ok"),
        "five_frames.mp4": (make_video(num_frames=5), "ok"),
        "odd_13_frames.mp4": (make_video(num_frames=13, width=34, height=26, fps=7), "ok"),
        "long_1h_32px.mp4": (make_video(num_frames=LONG_SECONDS * LONG_FPS, width=LONG_SIDE, height=LONG_SIDE,
                                           fps=LONG_FPS, gop=60), "ok"),
        "uhd_4k.mp4": (make_video(num_frames=3, width=3840, height=2160, fps=30), "ok"),
        "vfr.mp4": (make_muxed(num_frames=len(VFR_PTS), pts=VFR_PTS, time_base=VFR_TIME_BASE), "ok"),
        "rotated_90.mp4": (make_muxed(num_frames=12, width=64, height=32, rotation=90), "ok"),
        "spaces and ünïcödé 视频.mp4": (make_video(num_frames=10), "ok"),
        **oddity_set(),  # issue 14's classes and further real-world oddities (tests/pipeline/oddities.py)
    }
