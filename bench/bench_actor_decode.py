"""Decoding inside a model actor (``decode.where: actor``): videos/s per decoder mix, and what it does to a thread that
launches GPU work in the same process (the engine thread of a fused actor) or keeps the GPU busy.

For each variant an :class:`pipeline.actor_decode.ActorDecoder` decodes ``--videos`` copies of ``--clip`` (the decode
stage's fetched rows, as the actor gets them) in calls of ``--per-call`` videos from ``--calls`` threads at once, as
the fused actor's calls in flight do. Meanwhile a *launcher* thread repeats a step, then a synchronisation; its rate
during decoding over its rate alone is reported (1.0: undisturbed). ``--probe launch`` (default): ``--launch-ops`` tiny
matmuls, the shape of the engine's decode loop: says how much the decoders hold the GIL. ``--probe gemm``: large bf16
matmuls that fill the GPU, the shape of prefill: says what the decoders' own GPU work (and, for NVDEC processes, the
GPU's switching between their CUDA contexts and the actor's) costs the model. Variants (``--variants``):

* ``nvdecN``: N NVDEC sessions, each a process (the actor's way), no CPU workers (``backend: nvdec``); skipped
  without NVDEC; ``nvdectN``: the same as threads of this process (the way before, frames stay on the GPU);
  ``nvdecgN``: processes that convert the targets on the GPU and send the RGB frames (the way two sessions ago);
* ``cpuM``: M CPU decoder processes (``backend: pyav``, isolated as in the job);
* ``nvdecN+cpuM``: both, from one queue (the job's default with ``backend: nvdec`` is ``nvdec4+cpu8``).

Reported per variant: videos/s over the whole run and in its steady window (from the 10% to the 90% video done;
every decoder process has decoded a warm-up video before the timing starts), seconds to the first call's last video,
videos by kind, the launcher's relative rate over the whole run and in the steady window (without a GPU it runs plain
Python work instead),
this process's CPU seconds per video without the launcher's (the CPU workers' processes are not counted). Prints a table, writes ``$OUT/bench_actor_decode.json``.

    python bench/bench_job.py make-videos --kbps 4000 --only 720p_60s --gop-s 2 --out v2     # a clip (PyAV)
    python bench/bench_actor_decode.py --clip v2/clip_720p_60s.mp4 --variants nvdec4,cpu8,nvdec4+cpu8,nvdec7
    python bench/bench_actor_decode.py --clip v2/clip_720p_60s.mp4 --variants nvdect7,nvdec7,nvdec7+cpu8 --probe gemm
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import re
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline import decode  # noqa: E402
from pipeline.actor_decode import ActorDecoder  # noqa: E402
from pipeline.config import DecodeConfig  # noqa: E402
from pipeline.nvdec import available as nvdec_available  # noqa: E402


class Launcher:
    """A thread that repeats ``ops`` tiny matmuls and a synchronisation; ``rate()`` is its steps per second."""

    def __init__(self, ops: int, probe: str = "launch"):
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        n, dtype = (8192, torch.bfloat16) if probe == "gemm" and self.device.type == "cuda" else (64, torch.float32)
        self.x = torch.randn(n, n, device=self.device, dtype=dtype) / n ** 0.5
        self.ops, self.steps, self.stop = ops, 0, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            if self.device.type == "cuda":
                y = self.x
                for _ in range(self.ops):
                    y = y @ self.x
                torch.cuda.synchronize()
            else:  # no GPU: plain Python work (a BLAS pool's spinning threads would blur the CPU accounting)
                sum(range(self.ops * 200))
            self.steps += 1

    @property
    def cpu_s(self) -> float:
        """This thread's CPU seconds so far (left out of the decoders' share)."""
        return time.clock_gettime(time.pthread_getcpuclockid(self.thread.ident))

    def rate(self, seconds: float) -> float:
        s0, t0 = self.steps, time.perf_counter()
        time.sleep(seconds)
        return (self.steps - s0) / (time.perf_counter() - t0)

    def close(self) -> None:
        self.stop.set()
        self.thread.join()


def parse(variant: str) -> tuple[int, int, str]:
    """``(sessions, CPU workers, session kind)``: kind ``p`` processes, ``t`` threads, ``g`` processes converting on
    the GPU."""
    m = re.fullmatch(r"(?:nvdec([tg]?)(\d+))?\+?(?:cpu(\d+))?", variant)
    if not m or not (m.group(2) or m.group(3)):
        raise SystemExit(f"bad variant {variant!r}: nvdecN, nvdectN, nvdecgN, cpuM or nvdecN+cpuM")
    return int(m.group(2) or 0), int(m.group(3) or 0), m.group(1) or "p"


def run_variant(row: dict, variant: str, args, launcher: Launcher, alone: float) -> dict:
    sessions, workers, kind = parse(variant)
    cfg = DecodeConfig(num_frames=args.frames, frame_size=args.size, where="actor",
                       backend="nvdec" if sessions else "pyav", actor_threads=max(1, sessions),
                       actor_cpu_workers=workers)
    actor = ActorDecoder(cfg, args.size, threads=kind == "t", session_backend="nvdec" if kind == "g" else "nvdec_host")
    # one video per session and worker, so every decoder process has started (imports, CUDA context) before timing
    actor([dict(row, video_id=f"warm{i}") for i in range(max(1, sessions) + workers)])
    actor.counts.update(nvdec=0, cpu=0)
    calls = [[dict(row, video_id=f"v{c}-{i}") for i in range(args.per_call)]
             for c in range(-(-args.videos // args.per_call))]
    done: list[float] = []
    finished: list[tuple[float, int]] = []  # (seconds, launcher steps) as each video is done
    cpu0, t0 = time.process_time() - launcher.cpu_s, time.perf_counter()
    s0 = launcher.steps
    decode_one = actor.decode_one

    def timed(r):
        out = decode_one(r)
        finished.append((time.perf_counter() - t0, launcher.steps))
        return out

    actor.decode_one = timed

    def one(call):
        out = actor(call)
        done.append(time.perf_counter() - t0)
        return out

    with concurrent.futures.ThreadPoolExecutor(args.calls) as pool:
        rows = [r for out in pool.map(one, calls) for r in out]
    wall = time.perf_counter() - t0
    during = (launcher.steps - s0) / wall
    cpu = time.process_time() - launcher.cpu_s - cpu0
    actor.close()
    bad = [r.get("error_message") for r in rows if r["status"] != "ok"]
    finished.sort()
    lo, hi = finished[len(finished) // 10], finished[len(finished) * 9 // 10]  # the steady window: 10%-90% done
    span = hi[0] - lo[0]
    steady = (len(finished) * 9 // 10 - len(finished) // 10) / span if span > 0 else None
    return {"variant": variant, "videos": len(rows), "errors": len(bad), "first_error": bad[:1],
            "videos_per_s": len(rows) / wall, "steady_videos_per_s": steady, "first_call_s": min(done),
            "by_kind": dict(actor.counts), "launcher_relative": during / alone if alone else None,
            "launcher_relative_steady": (hi[1] - lo[1]) / span / alone if alone and span > 0 else None,
            "cpu_s_per_video": cpu / len(rows)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--clip", required=True)
    ap.add_argument("--variants", default="nvdec4,cpu8,nvdec4+cpu8")
    ap.add_argument("--videos", type=int, default=96)
    ap.add_argument("--per-call", type=int, default=32)
    ap.add_argument("--calls", type=int, default=3, help="calls in flight at once (fused.max_concurrent_batches)")
    ap.add_argument("--frames", type=int, default=32)
    ap.add_argument("--size", type=int, default=384)
    ap.add_argument("--launch-ops", type=int, default=50)
    ap.add_argument("--probe", choices=["launch", "gemm"], default="launch", help="the launcher's step (docstring)")
    args = ap.parse_args()
    data = Path(args.clip).read_bytes()
    fetch = decode.DecodeStage(DecodeConfig(num_frames=args.frames, frame_size=args.size, where="actor",
                                            isolation="none"))
    row = fetch([{"video_id": "clip", "video_uri": str(Path(args.clip).resolve()), "questions": None}]).to_pylist()[0]
    assert row["status"] == "ok" and row["data"] is not None, row.get("error_message")
    print(f"clip {args.clip}: {len(data) / 1e6:.1f} MB; NVDEC {'usable' if nvdec_available() else 'not usable'}",
          flush=True)
    launcher = Launcher(args.launch_ops if args.probe == "launch" else 4, args.probe)
    results = []
    try:
        for variant in args.variants.split(","):
            if parse(variant)[0] and not nvdec_available():
                print(f"{variant}: skipped (no NVDEC here)", flush=True)
                continue
            alone = launcher.rate(2.0)
            results.append({**run_variant(row, variant, args, launcher, alone), "launcher_alone": alone,
                            "probe": args.probe})
            print(json.dumps(results[-1]), flush=True)
    finally:
        launcher.close()
        decode.close_pool()
    out = Path(os.environ.get("OUT", ".")) / f"bench_actor_decode_{args.probe}.json"
    out.write_text(json.dumps({"clip": args.clip, "args": vars(args), "results": results}, indent=2))
    print(f"\n{'variant':16} {'videos/s':>9} {'steady':>7} {'1st call s':>10} {'nvdec/cpu':>10} {'launcher':>9} "
          f"{'steady':>7} {'CPU s/video':>11}")
    for r in results:
        kinds = f"{r['by_kind']['nvdec']}/{r['by_kind']['cpu']}"
        print(f"{r['variant']:16} {r['videos_per_s']:9.2f} {r['steady_videos_per_s'] or 0:7.2f} {r['first_call_s']:10.1f} "
              f"{kinds:>10} {r['launcher_relative']:9.2f} {r['launcher_relative_steady'] or 0:7.2f} "
              f"{r['cpu_s_per_video']:11.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
