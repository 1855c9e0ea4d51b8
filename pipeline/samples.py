"""Synthetic sample videos (PyAV; a `dev` extra) for the demo, tests and benchmarks.

Frames are a moving gradient plus a moving bar so consecutive frames differ.
"""

from __future__ import annotations

import io
from fractions import Fraction
from pathlib import Path

import numpy as np


def frame_image(i: int, width: int, height: int) -> np.ndarray:
    """An RGB uint8 frame whose content depends on ``i``."""
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :]
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None]
    img = np.empty((height, width, 3), np.uint8)
    img[..., 0] = ((x + 7 * i) % 256).astype(np.uint8)
    img[..., 1] = ((y + 3 * i) % 256).astype(np.uint8)
    img[..., 2] = (i * 37) % 256
    bar = (i * 4) % max(width - 8, 1)
    img[:, bar : bar + 8] = 255
    return img


def make_video(*, num_frames: int = 24, width: int = 64, height: int = 48, fps: int | Fraction = 24,
               codec: str = "libx264", container: str = "mp4", gop: int | None = None,
               options: dict | None = None, frame_fn=frame_image, bit_rate: int | None = None) -> bytes:
    """Encode ``num_frames`` synthetic frames; return the container bytes (``bit_rate`` in bit/s, else the codec's
    rate control from ``options``, e.g. ``crf``)."""
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format=container) as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuv420p"
        if bit_rate is not None:
            stream.bit_rate = bit_rate
        opts = {"preset": "ultrafast"} if codec == "libx264" else {}
        opts.update(options or {})
        if gop is not None:
            stream.codec_context.gop_size = gop
            if codec == "libx264":
                params = f"keyint={gop}:min-keyint={gop}:scenecut=0"
                opts["x264-params"] = params + (":" + opts["x264-params"] if "x264-params" in opts else "")
        stream.options = opts
        for i in range(num_frames):
            frame = av.VideoFrame.from_ndarray(frame_fn(i, width, height), format="rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return buf.getvalue()


def write_samples(folder: str | Path) -> list[Path]:
    """A handful of short clips of different sizes and rates (plus one truncated on purpose)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    clips = {
        "street_24fps.mp4": make_video(num_frames=48, width=96, height=64, fps=24),
        "kitchen_30fps.mp4": make_video(num_frames=60, width=80, height=80, fps=30),
        "park_15fps.mp4": make_video(num_frames=30, width=128, height=72, fps=15),
        "dance_25fps.mp4": make_video(num_frames=40, width=64, height=96, fps=25),
    }
    clips["broken_upload.mp4"] = clips["street_24fps.mp4"][: len(clips["street_24fps.mp4"]) // 3]  # the error row
    for name, data in clips.items():
        (folder / name).write_bytes(data)
    return [folder / name for name in clips]
