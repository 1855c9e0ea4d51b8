"""Inputs of ``bench/bench_job.py``: generated H.264 clips, the job's input folder, a saved checkpoint.

The clips are real H.264 in MP4 (High profile: CABAC and B-frames, as ordinary footage has), IDR keyframes
``KEYFRAME_S`` apart (``gop_s`` to change it), with a cheap procedural scene that moves (a panning texture and moving
objects), at a low bitrate so the files stay small enough to travel with the working tree. Encoding needs PyAV
(:func:`pipeline.samples.make_video`); everything else needs only the job's own dependencies.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CLIPS = {"720p_60s": (1280, 720, 60), "1080p_20s": (1920, 1080, 20)}  # name: (width, height, seconds)
FPS, KEYFRAME_S = 30, 10
TINY_CLIPS = {"tiny_10s": (160, 96, 10), "tiny_6s": (224, 128, 6)}


def _texture(width: int, height: int, pan: int, cell: int = 24) -> np.ndarray:
    rng = np.random.default_rng(0)
    small = rng.integers(40, 216, ((height + 64) // cell + 2, (width + pan) // cell + 2, 3)).astype(np.uint16)
    big = np.repeat(np.repeat(small, cell, 0), cell, 1)
    h = cell // 2
    return ((big + np.roll(big, h, 0) + np.roll(big, h, 1) + np.roll(big, (h, h), (0, 1))) // 4).astype(np.uint8)


def scene_frame(i: int, width: int, height: int, _cache: dict = {}) -> np.ndarray:  # noqa: B006 - texture cache
    """Frame ``i`` of a cheap procedural scene: a soft blocky texture panning back and forth (camera motion),
    drifting up and down, with three coloured squares moving on Lissajous paths (objects)."""
    pan = 1024
    if (width, height) not in _cache:
        _cache[(width, height)] = _texture(width, height, pan)
    x = (3 * i) % (2 * pan)
    x = x if x < pan else 2 * pan - x
    y = int(32 + 31 * np.sin(i / 50))
    img = _cache[(width, height)][y : y + height, x : x + width].copy()
    for k, color in enumerate(((230, 40, 40), (40, 200, 60), (250, 250, 250))):
        s = height // (6 + 2 * k)
        cx = int((width - s) * (0.5 + 0.45 * np.sin(i / (40 + 13 * k) + k)))
        cy = int((height - s) * (0.5 + 0.45 * np.cos(i / (55 + 7 * k) + 2 * k)))
        img[cy : cy + s, cx : cx + s] = color
    return img


def make_videos(out: Path, clips: dict, fps: int = FPS, kbps: int = 450, preset: str = "superfast",
                gop_s: float = KEYFRAME_S) -> list[Path]:
    """Encode each clip (H.264 in MP4, CABAC and B-frames as usual footage has, IDR keyframes ``gop_s`` apart)."""
    from pipeline.samples import make_video

    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, (w, h, seconds) in clips.items():
        path = out / f"clip_{name}.mp4"
        t0 = time.perf_counter()
        data = make_video(num_frames=seconds * fps, width=w, height=h, fps=fps, gop=max(1, round(gop_s * fps)),
                          frame_fn=scene_frame, options={"preset": preset, "b": f"{kbps}k"})
        path.write_bytes(data)
        paths.append(path)
        print(f"wrote {path} ({w}x{h}, {seconds} s at {fps} fps, keyframe every {gop_s:g} s): "
              f"{len(data) / 1e6:.1f} MB, {len(data) * 8 / seconds / 1e3:.0f} kbit/s, {time.perf_counter() - t0:.0f} s",
              flush=True)
    return paths


def link_inputs(clips: list[Path], folder: Path, n: int) -> dict[str, str]:
    """``n`` inputs in ``folder`` under distinct names (so distinct ``video_id``), copies of ``clips`` round robin
    (links would not do: the local source lists each real file once, and counts a hard link or symlink to a listed
    file as a duplicate). Returns input file name -> clip kind."""
    folder.mkdir(parents=True, exist_ok=True)
    kinds = {}
    for i in range(n):
        src = clips[i % len(clips)]
        dst = folder / f"v{i:05d}_{src.stem}.mp4"
        shutil.copyfile(src, dst)
        kinds[dst.name] = src.stem.removeprefix("clip_")
    return kinds


def make_checkpoint(shape: str, out: Path) -> Path:
    """Random weights at real LLaVA-OneVision shapes on the GPU, saved through ``save_pretrained``."""
    from bench.bench_engine import build_model
    from dycoke.testing import build_tiny_tokenizer, save_checkpoint

    tokenizer = build_tiny_tokenizer()
    llm = build_model(shape, tokenizer)
    spec = llm.pixel_spec
    save_checkpoint(llm.model, tokenizer, out, spec.size, spec.mean, spec.std)
    (out / ".complete").write_text(shape + "\n")
    return out


def ensure_checkpoint(shape: str, path: str | Path | None, script: Path, tiny_dir: Path | None = None) -> tuple[Path, dict]:
    """The checkpoint the job loads: tiny (``tiny_dir``, CPU, built here), else ``shape`` at ``path`` (default
    ``<tmp>/bench_job_ckpt_<shape>``), reused when a previous build completed, else built by ``script
    make-checkpoint`` in a child process, so that this process never holds GPU memory while the job runs."""
    if tiny_dir is not None:
        from dycoke.testing import build_tiny_checkpoint

        t0 = time.perf_counter()
        return build_tiny_checkpoint(tiny_dir), {"built_s": time.perf_counter() - t0}
    path = Path(path or Path(tempfile.gettempdir()) / f"bench_job_ckpt_{shape}")
    if (path / ".complete").exists():
        print(f"reusing checkpoint {path}", flush=True)
        return path, {"reused": True}
    shutil.rmtree(path, ignore_errors=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    print(f"building the {shape} checkpoint in {path} (free disk {shutil.disk_usage(path.parent).free / 2**30:.0f} GiB)",
          flush=True)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, str(script), "make-checkpoint", "--shape", shape, "--out", str(path)], check=True,
                   cwd=script.parents[1])
    size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    info = {"built_s": time.perf_counter() - t0, "bytes": size}
    print(f"checkpoint: {size / 2**30:.1f} GiB in {info['built_s']:.0f} s", flush=True)
    return path, info
