"""CPU decode benchmark: sampled frames per second per core, 32 frames from 720p H.264 clips.

Compares, on 10 s and 60 s clips (long GOP: one keyframe every 10 s):

* ``plain``          ``VideoReader(bytes).get_batch(indices)`` at native size (the usual way)
* ``resize``         the same with decode-time resizing (decord ``width``/``height``)
* ``pipeline``       what :mod:`pipeline.decode` does: decode-time resize + one forward pass
                     (skip to each target, convert only targets), exact ``linspace`` frames
* ``keyframe``       APPROXIMATE: each target snaps to the nearest keyframe; only keyframes decoded

"Per core" = sampled frames / CPU seconds of this process (decoder threads included), with one decoder
thread, so it does not depend on how many cores the machine has. Each method runs ``--repeats`` times
per clip; the best run is reported. Prints a table and writes JSON.

    python bench/bench_decode.py [--out demo_output/bench/decode.json] [--frames 32] [--size 384]
"""

from __future__ import annotations

import argparse
import io
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.decode import DecodeSettings, decode_video, sample_indices  # noqa: E402
from pipeline.samples import make_video  # noqa: E402

W, H, FPS, GOP = 1280, 720, 30, 300


def _texture(width: int, height: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (height // 8 + 2, width // 8 + 2, 3), dtype=np.uint8)
    return np.repeat(np.repeat(small, 8, axis=0), 8, axis=1)


_TEX = None


def _frame(i: int, width: int, height: int) -> np.ndarray:
    """Camera-pan-like content: a blocky texture moving 2 px/frame plus fine noise (gives B/P work)."""
    global _TEX
    if _TEX is None or _TEX.shape[1] < width + 1000:
        _TEX = _texture(width + 1200, height + 16)
    x = (2 * i) % 1000
    img = _TEX[:height, x : x + width].copy()
    noise = np.random.default_rng(i).integers(0, 12, (height, width, 1), dtype=np.uint8)
    return img + noise


def make_clip(seconds: int, cache: Path) -> bytes:
    path = cache / f"bench_720p_{seconds}s_gop{GOP}.mp4"
    if path.exists():
        return path.read_bytes()
    t0 = time.perf_counter()
    data = make_video(num_frames=seconds * FPS, width=W, height=H, fps=FPS, gop=GOP, frame_fn=_frame,
                      options={"preset": "veryfast", "crf": "23"})
    cache.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    print(f"encoded {path.name}: {len(data) / 1e6:.1f} MB in {time.perf_counter() - t0:.1f}s", file=sys.stderr)
    return data


def plain(data: bytes, frames: int, size: int) -> np.ndarray:
    import decord

    vr = decord.VideoReader(io.BytesIO(data), num_threads=1)
    return vr.get_batch(sample_indices(len(vr), frames)).asnumpy()


def resize(data: bytes, frames: int, size: int) -> np.ndarray:
    import decord

    vr = decord.VideoReader(io.BytesIO(data), width=size, height=size, num_threads=1)
    return vr.get_batch(sample_indices(len(vr), frames)).asnumpy()


def pipeline_uniform(data: bytes, frames: int, size: int) -> np.ndarray:
    return decode_video(io.BytesIO(data), DecodeSettings(num_frames=frames, frame_size=size, num_threads=1)).frames


def pipeline_keyframe(data: bytes, frames: int, size: int) -> np.ndarray:
    s = DecodeSettings(num_frames=frames, frame_size=size, num_threads=1, sampling="keyframe")
    return decode_video(io.BytesIO(data), s).frames


METHODS = {"plain": plain, "resize": resize, "pipeline": pipeline_uniform, "keyframe (approx.)": pipeline_keyframe}


def measure(fn, data: bytes, frames: int, size: int, repeats: int) -> dict:
    best = None
    for _ in range(repeats):
        c0, w0 = time.process_time(), time.perf_counter()
        out = fn(data, frames, size)
        cpu, wall = time.process_time() - c0, time.perf_counter() - w0
        assert out.shape[0] == frames
        if best is None or cpu < best["cpu_s"]:
            best = {"cpu_s": cpu, "wall_s": wall, "shape": list(out.shape)}
    best["frames_per_cpu_s"] = frames / best["cpu_s"]
    best["frames_per_wall_s"] = frames / best["wall_s"]
    return best


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--frames", type=int, default=32)
    ap.add_argument("--size", type=int, default=384, help="decode-time resize side (the model input)")
    ap.add_argument("--seconds", type=int, nargs="+", default=[10, 60])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cache", default="demo_output/bench/clips")
    ap.add_argument("--out", default="demo_output/bench/decode.json")
    args = ap.parse_args(argv)
    import decord

    decord.logging.set_level(decord.logging.QUIET)
    results = []
    for seconds in args.seconds:
        data = make_clip(seconds, Path(args.cache))
        base = None
        for name, fn in METHODS.items():
            r = measure(fn, data, args.frames, args.size, args.repeats)
            r.update(clip=f"{seconds}s", method=name, approximate=name.startswith("keyframe"))
            base = base or r["frames_per_cpu_s"]
            r["speedup_vs_plain"] = r["frames_per_cpu_s"] / base
            results.append(r)
    print(f"\nCPU decode, {args.frames} sampled frames from 720p H.264 ({FPS} fps, keyframe every {GOP // FPS} s), "
          f"resize to {args.size}, 1 decoder thread")
    print(f"{'clip':<6}{'method':<20}{'frames/s/core':>14}{'cpu s':>8}{'wall s':>8}{'vs plain':>10}")
    for r in results:
        print(f"{r['clip']:<6}{r['method']:<20}{r['frames_per_cpu_s']:>14.1f}{r['cpu_s']:>8.2f}{r['wall_s']:>8.2f}"
              f"{r['speedup_vs_plain']:>9.2f}x")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"frames": args.frames, "size": args.size, "source": f"{W}x{H} h264 {FPS}fps gop {GOP}",
            "machine": platform.processor() or platform.machine(), "python": platform.python_version()}
    out.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
