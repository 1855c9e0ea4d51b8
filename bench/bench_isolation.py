"""Decoder isolation: what the per-video process costs, measured on frame transport (issue 12, deliverable 4).

Each video is fetched (a local file) and decoded to the default frame shape, 32 frames of 384x384x3 uint8
(14.2 MB per video), through each isolation mechanism the checked-out tree offers:

* ``none``      in the calling process (the floor: no isolation);
* ``pebble``    a pebble ``ProcessPool`` worker per decode process, timeout per video (``pipeline.decode``, this tree);
* ``protocol``  the project's earlier hand-written subprocess protocol (``pipeline.decode_worker``; only in a checkout
                that still has it: run this script with ``PYTHONPATH`` pointing at such a checkout).

Small generated clips keep the decode itself cheap, so the difference between the rows is the transport: the request,
the frames pickled (pebble) or written raw (protocol) through a pipe, and the answer read back. Reported per mode:
videos/s (wall), CPU-seconds per video (this process plus its decoder worker), and the overhead over ``none``.
Every mode's frames are checked equal to ``none``'s first.

    python bench/bench_isolation.py                         # this tree: none, pebble
    cd /tmp && PYTHONPATH=<checkout with pipeline/decode_worker.py> python <this script> --modes none,protocol

Writes JSON to ``--out`` (default ``$OUT/bench_isolation.json`` when ``$OUT`` is set, else
demo_output/bench/isolation.json).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

if not os.environ.get("PYTHONPATH"):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _children_cpu() -> float:
    import psutil

    total = 0.0
    for child in psutil.Process().children(recursive=True):
        try:
            t = child.cpu_times()
            total += t.user + t.system
        except psutil.NoSuchProcess:
            continue
    return total


def _cpu() -> float:
    t = os.times()
    return t.user + t.system + _children_cpu()


def _decoder(mode: str, frames: int, size: int):
    """``(decode_one(row) -> row, close())`` for a mode."""
    import pipeline.decode

    if hasattr(pipeline.decode, "DecodeSettings"):  # the earlier tree (with pipeline/decode_worker.py)
        from pipeline.decode_worker import IsolatedDecoder

        from pipeline.decode import DecodeSettings, DecodeStage

        if mode == "none":
            stage = DecodeStage(DecodeSettings(num_frames=frames, frame_size=size, isolation="none"))
            return stage.decode_one, lambda: None
        if mode == "protocol":
            dec = IsolatedDecoder(DecodeSettings(num_frames=frames, frame_size=size, isolation="process"))
            return dec.decode_one, dec.close
        raise SystemExit(f"mode {mode} is not in this checkout (it has pipeline.decode_worker)")
    from pipeline.config import DecodeConfig
    from pipeline.decode import DecodeStage, close_pool

    if mode in ("none", "pebble"):
        stage = DecodeStage(DecodeConfig(num_frames=frames, frame_size=size,
                                         isolation="none" if mode == "none" else "process"))
        return stage.decode_one, close_pool
    raise SystemExit(f"mode {mode} is not in this checkout (no pipeline.decode_worker)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modes", default="none,pebble")
    ap.add_argument("--videos", type=int, default=40)
    ap.add_argument("--frames", type=int, default=32)
    ap.add_argument("--size", type=int, default=384)
    ap.add_argument("--repeats", type=int, default=3, help="rounds; each round runs every mode once (best kept)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from pipeline.samples import make_video

    tmp = Path(tempfile.mkdtemp(prefix="bench-iso-"))
    rows = []
    for i in range(args.videos):
        path = tmp / f"v{i}.mp4"
        path.write_bytes(make_video(num_frames=16 + i % 8, width=64, height=48))
        rows.append({"video_id": f"v{i}", "video_uri": str(path), "questions": None})
    modes = args.modes.split(",")
    decoders = {m: _decoder(m, args.frames, args.size) for m in modes}
    reference = {}
    for m, (one, _close) in decoders.items():  # warm up (worker start-up is once per process) and check frames
        out = [one(r) for r in rows[:3]]
        assert all(o["status"] == "ok" for o in out), out
        reference.setdefault("frames", [bytes(o["frames"]) for o in out])
        assert [bytes(o["frames"]) for o in out] == reference["frames"], f"{m}: frames differ"
    best: dict[str, dict] = {}
    try:
        for _ in range(args.repeats):
            for m, (one, _close) in decoders.items():
                c0, t0 = _cpu(), time.perf_counter()
                for r in rows:
                    assert one(r)["status"] == "ok"
                wall, cpu = time.perf_counter() - t0, _cpu() - c0
                fig = {"videos_per_s": args.videos / wall, "cpu_s_per_video": cpu / args.videos,
                       "wall_ms_per_video": 1000 * wall / args.videos}
                if m not in best or fig["wall_ms_per_video"] < best[m]["wall_ms_per_video"]:
                    best[m] = fig
    finally:
        for _one, close in decoders.values():
            close()
    base = best.get("none")
    print(f"{args.videos} videos, {args.frames} frames of {args.size}x{args.size}x3 uint8 "
          f"({args.frames * args.size * args.size * 3 / 1e6:.1f} MB) each; best of {args.repeats} rounds")
    print(f"{'mode':<10}{'videos/s':>10}{'ms/video':>10}{'CPU-s/video':>13}{'+ms vs none':>13}{'+CPU-ms':>9}")
    for m, f in best.items():
        extra = f["wall_ms_per_video"] - base["wall_ms_per_video"] if base else float("nan")
        extra_cpu = 1000 * (f["cpu_s_per_video"] - base["cpu_s_per_video"]) if base else float("nan")
        f.update(overhead_ms=extra, overhead_cpu_ms=extra_cpu)
        print(f"{m:<10}{f['videos_per_s']:>10.2f}{f['wall_ms_per_video']:>10.1f}{f['cpu_s_per_video']:>13.4f}"
              f"{extra:>13.1f}{extra_cpu:>9.1f}")
    out = args.out or (os.path.join(os.environ["OUT"], "bench_isolation.json") if os.environ.get("OUT")
                       else "demo_output/bench/isolation.json")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(json.dumps({"args": vars(args), "results": best}, indent=2))


if __name__ == "__main__":
    main()
