"""The whole job on one GPU machine: ``python -m jobs.corpus`` (local Ray, decord, Parquet) against the stage alone.

Three modes:

  make-videos      (needs PyAV; run where it is installed) write a few real H.264 clips with moving content,
                   keyframes 10 s apart: a 60 s 720p and a 20 s 1080p clip at 30 fps, ~450 kbit/s (a few MB):
                       python bench/bench_job.py make-videos --out bench/videos
  make-checkpoint  build a random-weight LLaVA-OneVision at real shapes on the GPU and ``save_pretrained`` it
                   (safetensors, tokenizer with chat template, preprocessor config); ``run`` does this in a child
                   process (so the GPU is free again before the job starts) unless the folder already holds one.
  run              the benchmark:
                       python bench/bench_job.py run --shape 7b [--videos 384] [--stage-videos-per-s X]
                       python bench/bench_job.py run --tiny          # CPU smoke run (tiny checkpoint and clips)

``run`` makes ``--videos`` inputs by hard-linking the clips of ``--videos-dir`` round robin under distinct names
(each a different ``video_id``), writes a job YAML that is the job's DEFAULT configuration except what this
machine needs (``input.local_dir``, ``output.path``, ``model.source``, ``stages.gpus_per_actor: 1`` on GPU) and the
realistic task mix of ``bench/bench_stage.py`` (caption + 2 open questions at 128 new tokens + 1 MCQ at 8), and
runs ``python -m jobs.corpus --config job.yaml`` as a subprocess. ``RAY_LOGGING_CONFIG_ENCODING=TEXT`` makes Ray
apply an INFO logging config in its workers, so the actor's "loaded ... in X s" line reaches the job's log.

Reported (table last; JSON + the job's log under ``$OUT``, else the current folder):
  start-up     from the job's log: Ray ready, model load (start, logged duration), first video done
  steady       videos completed per second between the ``--q-lo`` and ``--q-hi`` quantiles of the videos'
               completion times (``processed_at`` of their output rows; rows come back per actor call, so the
               window runs from one completion event to another and counts the videos completed inside it)
  end to end   videos / wall of the subprocess
  vs stage     steady / ``--stage-videos-per-s`` (the stage alone, measured by ``bench/bench_stage.py``)
  decode       CPU share = sum over videos of timings.fetch_s + decode_s over (wall x Ray CPUs), over the
               whole wall and over the processing window (dataset start to last video); decode capacity =
               decode slots (Ray CPUs minus the actors' CPUs, per decode task's CPUs) / mean CPU s per video,
               per clip kind too; host CPU busy (/proc/stat) and GPU utilisation (nvidia-smi) in the window.
Correctness: every video has one ``ok`` row per task (exit status 1 otherwise, after writing the report).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_stage import MIX  # noqa: E402

CLIPS = {"720p_60s": (1280, 720, 60), "1080p_20s": (1920, 1080, 20)}  # name: (width, height, seconds)
FPS, KEYFRAME_S = 30, 10
TINY_CLIPS = {"tiny_10s": (160, 96, 10), "tiny_6s": (224, 128, 6)}
EVENTS = {  # name: pattern of the job's log line that marks it (first match wins)
    "listed": r"pipeline\.sources: input: \d+ videos",
    "ray_ready": r"started a local Ray|connected to Ray at",
    "dataset_start": r"Starting execution of Dataset",
    "loaded": r"\bloaded \S+ on \S+ \(\S+\) in [\d.]+s",
    "engine_ready": r"engine session:",
    "dataset_done": r"execution finished in [\d.]+ seconds",
    "sink_done": r"Data sink Parquet finished",
}


# ------------------------------------------------------------------------------------------------ inputs


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


def make_videos(out: Path, clips: dict, fps: int = FPS, kbps: int = 450, preset: str = "superfast") -> list[Path]:
    """Encode each clip (H.264 in MP4, CABAC and B-frames as usual footage has, keyframes ``KEYFRAME_S`` apart)."""
    from pipeline.samples import make_video

    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, (w, h, seconds) in clips.items():
        path = out / f"clip_{name}.mp4"
        t0 = time.perf_counter()
        data = make_video(num_frames=seconds * fps, width=w, height=h, fps=fps, gop=KEYFRAME_S * fps,
                          frame_fn=scene_frame, options={"preset": preset, "b": f"{kbps}k"})
        path.write_bytes(data)
        paths.append(path)
        print(f"wrote {path} ({w}x{h}, {seconds} s at {fps} fps, keyframe every {KEYFRAME_S} s): "
              f"{len(data) / 1e6:.1f} MB, {len(data) * 8 / seconds / 1e3:.0f} kbit/s, {time.perf_counter() - t0:.0f} s",
              flush=True)
    return paths


def link_inputs(clips: list[Path], folder: Path, n: int) -> dict[str, str]:
    """``n`` inputs under distinct names, hard links (else copies) of ``clips`` round robin; name -> clip kind."""
    folder.mkdir(parents=True, exist_ok=True)
    kinds = {}
    for i in range(n):
        src = clips[i % len(clips)]
        dst = folder / f"v{i:05d}_{src.stem}.mp4"
        try:
            os.link(src, dst)
        except OSError:
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


def ensure_checkpoint(args, work: Path) -> tuple[Path, dict]:
    if args.tiny:
        from dycoke.testing import build_tiny_checkpoint

        t0 = time.perf_counter()
        return build_tiny_checkpoint(work / "tiny_ckpt"), {"built_s": time.perf_counter() - t0}
    path = Path(args.checkpoint or Path(tempfile.gettempdir()) / f"bench_job_ckpt_{args.shape}")
    if (path / ".complete").exists():
        print(f"reusing checkpoint {path}", flush=True)
        return path, {"reused": True}
    shutil.rmtree(path, ignore_errors=True)
    print(f"building {args.shape} checkpoint in {path} (free disk {shutil.disk_usage(path.parent).free / 2**30:.0f} GiB)",
          flush=True)
    t0 = time.perf_counter()
    subprocess.run([sys.executable, __file__, "make-checkpoint", "--shape", args.shape, "--out", str(path)],
                   check=True, cwd=ROOT)
    size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    info = {"built_s": time.perf_counter() - t0, "bytes": size}
    print(f"checkpoint: {size / 2**30:.1f} GiB in {info['built_s']:.0f} s", flush=True)
    return path, info


# ------------------------------------------------------------------------------------------------ the job


class Samplers:
    """Background sampling of host CPU busy time (/proc/stat) and GPU utilisation (nvidia-smi), timestamped."""

    def __init__(self, period: float = 1.0):
        self.cpu: list[tuple[float, int, int]] = []  # (time, busy jiffies, total jiffies)
        self.gpu: list[tuple[float, float, float]] = []  # (time, util %, memory MiB)
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._cpu_loop, args=(period,), daemon=True)]
        self._smi = None
        if shutil.which("nvidia-smi"):
            self._smi = subprocess.Popen(["nvidia-smi", "--query-gpu=utilization.gpu,memory.used",
                                          "--format=csv,noheader,nounits", f"--loop-ms={int(period * 1000)}"],
                                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            self._threads.append(threading.Thread(target=self._gpu_loop, daemon=True))
        for t in self._threads:
            t.start()

    def _cpu_loop(self, period: float) -> None:
        while not self._stop.is_set() and os.path.exists("/proc/stat"):
            with open("/proc/stat") as f:
                v = [int(x) for x in f.readline().split()[1:]]
            self.cpu.append((time.time(), sum(v) - v[3] - v[4], sum(v)))  # idle + iowait are not busy
            self._stop.wait(period)

    def _gpu_loop(self) -> None:
        for line in self._smi.stdout:
            parts = [p.strip() for p in line.split(",")]
            try:  # first GPU only (the job uses one)
                self.gpu.append((time.time(), float(parts[0]), float(parts[1])))
            except (ValueError, IndexError):
                continue

    def stop(self) -> None:
        self._stop.set()
        if self._smi is not None:
            self._smi.terminate()
            self._smi.wait()

    def window(self, t0: float, t1: float) -> dict:
        cpu = [s for s in self.cpu if t0 <= s[0] <= t1]
        busy = (cpu[-1][1] - cpu[0][1]) / max(1, cpu[-1][2] - cpu[0][2]) if len(cpu) >= 2 else None
        gpu = [s for s in self.gpu if t0 <= s[0] <= t1]
        return {"host_cpu_busy": busy, "gpu_util_pct": float(np.mean([g[1] for g in gpu])) if gpu else None,
                "gpu_mem_mib_max": max((g[2] for g in self.gpu), default=None)}


def run_job(cfg_path: Path, log_path: Path, timeout_s: float, extra: list[str]) -> dict:
    """``python -m jobs.corpus --config cfg_path`` with its log streamed (and timestamped) into ``log_path``."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.update(PYTHONUNBUFFERED="1", RAY_LOGGING_CONFIG_ENCODING="TEXT")
    env.setdefault("RAY_AUTH_MODE", "disabled")
    env.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    cmd = [sys.executable, "-m", "jobs.corpus", "--config", str(cfg_path),
           "--summary-json", str(cfg_path.with_name("summary.json")), *extra]
    print("$ " + " ".join(cmd), flush=True)
    lines: list[tuple[float, str]] = []
    t0 = time.time()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            errors="replace", start_new_session=True)

    def pump() -> None:
        with open(log_path, "w") as log:
            for line in proc.stdout:
                lines.append((time.time(), line))
                if "logging_progress" in line:  # Ray Data's periodic progress block: log only
                    log.write(line)
                    continue
                log.write(line)
                short = re.sub(r" job_id=\S+.*$", "", line.rstrip())
                print(f"  [{time.time() - t0:6.1f}s] {short[:300]}", flush=True)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    timed_out = False
    try:
        rc = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        timed_out = True
        print(f"job still running after {timeout_s:.0f} s: interrupting it", flush=True)
        os.killpg(proc.pid, signal.SIGINT)  # lets the driver shut its local Ray down
        try:
            rc = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            rc = proc.wait()
    wall = time.time() - t0
    reader.join(timeout=10)
    return {"t0": t0, "wall_s": wall, "rc": rc, "timed_out": timed_out, "lines": lines}


def parse_events(lines: list[tuple[float, str]], t0: float) -> dict:
    """Seconds from the job's start to each :data:`EVENTS` line (its ``timestamp_ns`` when Ray's TEXT format
    gives one, else the time the line was read), the logged load time, the Ray CPU count, and ``progress``:
    (s, output rows) from Ray Data's periodic progress lines for the model stage (a coarse fallback when the
    job did not finish and left no Parquet)."""
    out: dict = {"progress": []}
    for t_read, line in lines:
        prog = re.search(r"MapBatches\((?:FusedStage|GenerateStage)\): (\d+)/", line)
        if prog:
            out["progress"].append((t_read - t0, int(prog.group(1))))
        for name, pattern in EVENTS.items():
            if name not in out and re.search(pattern, line):
                ns = re.search(r"timestamp_ns=(\d+)", line)
                out[name] = (int(ns.group(1)) / 1e9 if ns else t_read) - t0
                if name == "loaded":
                    out["load_logged_s"] = float(re.search(r" in ([\d.]+)s", line).group(1))
                if name == "ray_ready":
                    cpus = re.search(r"'CPU': ([\d.]+)", line)
                    out["ray_cpus"] = float(cpus.group(1)) if cpus else None
    return out


def steady_rate(done: np.ndarray, q_lo: float, q_hi: float) -> dict:
    """Videos per second between two completion events: ``done`` holds each video's completion time (s)."""
    t = np.sort(done)
    n = len(t)
    a, b = t[int(np.floor(q_lo * (n - 1)))], t[int(np.ceil(q_hi * (n - 1)))]
    events = np.unique(t)
    if b <= a or len(events) < 3:
        return {"videos_per_s": None, "why": f"{len(events)} completion events: too few for a steady window"}
    count = int(np.sum((t > a) & (t <= b)))
    return {"videos_per_s": count / (b - a), "from_s": float(a), "to_s": float(b), "videos": count,
            "completion_events": int(len(events))}


def progress_rate(progress: list[tuple[float, int]], tasks: int, q_lo: float, q_hi: float) -> dict:
    """Fallback steady rate from Ray Data's progress lines (output rows at ~10 s intervals)."""
    pts = [(t, n / tasks) for t, n in progress if n > 0]
    if len(pts) < 3:
        return {"videos_per_s": None, "why": f"{len(pts)} progress samples with rows"}
    last = pts[-1][1]
    inside = [p for p in pts if q_lo * last <= p[1] <= q_hi * last] or pts
    (ta, va), (tb, vb) = inside[0], inside[-1]
    if tb <= ta:
        (ta, va), (tb, vb) = pts[0], pts[-1]
    return {"videos_per_s": (vb - va) / (tb - ta), "from_s": ta, "to_s": tb, "videos": vb - va,
            "source": "Ray Data progress lines (10 s resolution)"}


def startup_figures(events: dict, first_done: float | None) -> dict:
    ev = events.get
    loaded, took = ev("loaded"), ev("load_logged_s")
    return {"listed_s": ev("listed"), "ray_ready_s": ev("ray_ready"),
            "ray_init_s": ev("ray_ready") - ev("listed") if ev("ray_ready") and ev("listed") else None,
            "dataset_start_s": ev("dataset_start"),
            "model_load_start_s": loaded - took if loaded is not None and took is not None else None,
            "model_load_s": took, "model_loaded_s": loaded, "engine_ready_s": ev("engine_ready"),
            "first_video_done_s": first_done, "dataset_done_s": ev("dataset_done"), "sink_done_s": ev("sink_done")}


def analyse(args, job: dict, events: dict, table, kinds: dict, cfg, samplers: Samplers) -> dict:
    """Figures from the job's log events and its output rows (see the module docstring)."""
    t0, wall = job["t0"], job["wall_s"]
    rows = table.to_pylist() if table is not None else []
    tasks = len({r["task_id"] for r in rows}) or args.tasks_per_video
    by_video: dict[str, list[dict]] = {}
    for r in rows:
        by_video.setdefault(r["video_id"], []).append(r)
    bad = [r for r in rows if r["status"] != "ok"]
    done = np.array([max(r["processed_at"].timestamp() for r in rs) - t0 for rs in by_video.values()])
    if len(done):
        steady = steady_rate(done, args.q_lo, args.q_hi) | {"source": "processed_at of the output rows"}
    else:
        steady = progress_rate(events["progress"], tasks, args.q_lo, args.q_hi)
    if steady.get("videos_per_s"):
        steady |= samplers.window(t0 + steady["from_s"], t0 + steady["to_s"])
    per_video = {v: rs[0] for v, rs in by_video.items()}
    dec = {v: (r["timings"]["fetch_s"] or 0.0) + (r["timings"]["decode_s"] or 0.0) for v, r in per_video.items()}
    cpus = events.get("ray_cpus") or os.cpu_count()
    st = cfg.stages
    actors = st.fused_actors if st.resolved_mode == "fused" else st.encode_actors + st.generate_actors
    slots = max(1.0, (cpus - actors * st.actor_num_cpus) // st.decode_num_cpus)
    slots = min(slots, st.decode_max_tasks or slots)
    by_kind: dict[str, list[float]] = {}
    for v, r in per_video.items():
        by_kind.setdefault(kinds.get(Path(r["video_uri"]).name, "?"), []).append(dec[v])
    dec_sum = float(sum(dec.values()))
    window = float(done.max()) - (events.get("dataset_start") or 0.0) if len(done) else None
    mean_dec = dec_sum / len(dec) if dec else None
    decode = {
        "cpu_s_total": dec_sum, "cpu_s_per_video": mean_dec, "ray_cpus": cpus, "decode_slots": slots,
        "share_of_wall": dec_sum / (wall * cpus) if dec else None,
        "share_of_processing": dec_sum / (window * cpus) if dec and window else None,
        "capacity_videos_per_s": slots / mean_dec if mean_dec else None,
        "by_clip": {k: {"videos": len(v), "cpu_s_per_video": float(np.mean(v)),
                        "capacity_videos_per_s": slots / float(np.mean(v))} for k, v in sorted(by_kind.items())},
    }
    first = float(done.min()) if len(done) else None
    res = {"videos": len(by_video), "rows": len(rows), "tasks_per_video": tasks, "error_rows": len(bad),
           "errors": sorted({f"{r['error_type']}: {r['error_message']}" for r in bad})[:5],
           "incomplete_videos": sum(len(rs) != tasks for rs in by_video.values()), "wall_s": wall,
           "end_to_end_videos_per_s": len(by_video) / wall, "startup": startup_figures(events, first),
           "steady": steady, "decode": decode, "host_gpu_whole_job": samplers.window(t0, t0 + wall),
           "output_tokens_per_video": float(np.mean([sum(r["output_tokens"] or 0 for r in rs)
                                                     for rs in by_video.values()])) if rows else None,
           "visual_tokens_prefill": rows[0]["visual_tokens_prefill"] if rows else None}
    if len(done) and done.max() > first:
        res["after_first_videos_per_s"] = int(np.sum(done > first)) / (float(done.max()) - first)
    stage, cap = args.stage_videos_per_s, decode["capacity_videos_per_s"]
    if stage:
        res["stage_videos_per_s"] = stage
        res["ratio_to_stage"] = steady["videos_per_s"] / stage if steady.get("videos_per_s") else None
    if stage and cap:
        res["decode_limit"] = (f"decode-bound: capacity {cap:.2f} videos/s is {cap / stage:.2f}x the stage's {stage:.2f}"
                               if cap < stage else f"decode keeps up: capacity {cap:.2f} videos/s >= stage {stage:.2f}")
    return res


def _f(x, fmt: str = "{:.2f}") -> str:
    return "-" if x is None else fmt.format(x)


def print_table(rep: dict) -> None:
    r, c = rep["result"], rep["config"]
    s, d, y = r["startup"], r["decode"], r["steady"]
    print(f"\nwhole job, {rep['shape']}: {r['videos']} videos x {r['tasks_per_video']} tasks, {c['mode']} mode, "
          f"{c['videos_per_call']} videos/call, {c['calls_in_flight']} calls in flight, engine rows "
          f"{c['engine_rows'] or 'auto'}; {rep.get('gpu') or 'no GPU'}")
    rows = [
        ("Ray ready at s (ray.init took s)", f"{_f(s['ray_ready_s'], '{:.1f}')} ({_f(s['ray_init_s'], '{:.1f}')})"),
        ("model load at s (took s, logged)", f"{_f(s['model_load_start_s'], '{:.1f}')} ({_f(s['model_load_s'], '{:.1f}')})"),
        ("first video done at s", _f(s["first_video_done_s"], "{:.1f}")),
        ("wall s / end to end videos/s", f"{_f(r['wall_s'], '{:.1f}')} / {_f(r['end_to_end_videos_per_s'], '{:.3f}')}"),
        ("STEADY videos/s", _f(y.get("videos_per_s"), "{:.3f}")),
        ("  window s / videos", f"{_f(y.get('from_s'), '{:.1f}')}-{_f(y.get('to_s'), '{:.1f}')} / {_f(y.get('videos'), '{:.0f}')}"
                                + ("" if y.get("source", "").startswith("processed_at") else f"  ({y.get('source') or y.get('why')})")),
        ("videos/s after the first completion", _f(r.get("after_first_videos_per_s"), "{:.3f}")),
        ("stage alone videos/s / steady ratio", f"{_f(r.get('stage_videos_per_s'), '{:.3f}')} / {_f(r.get('ratio_to_stage'))}"),
        ("decode CPU s per video", _f(d["cpu_s_per_video"])
         + "".join(f"  {k} {v['cpu_s_per_video']:.2f}" for k, v in d["by_clip"].items())),
        ("decode CPU share of wall / processing", f"{_f(d['share_of_wall'])} / {_f(d['share_of_processing'])}"),
        ("decode capacity videos/s", f"{_f(d['capacity_videos_per_s'])} ({d['decode_slots']:.0f} slots, {d['ray_cpus']:.0f} CPUs)"
         + "".join(f"  {k} {v['capacity_videos_per_s']:.2f}" for k, v in d["by_clip"].items())),
        ("host CPU busy / GPU util % (steady)", f"{_f(y.get('host_cpu_busy'))} / {_f(y.get('gpu_util_pct'), '{:.0f}')}"),
        ("error rows / incomplete videos", f"{r['error_rows']} / {r['incomplete_videos']}"),
    ]
    if r.get("decode_limit"):
        rows.append(("decode vs stage", r["decode_limit"]))
    for name, value in rows:
        print(f"{name:38} {value}")


def _environment() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    env = {}
    for name in ("torch", "transformers", "ray", "decord", "pyarrow"):
        try:
            env[name] = version(name)
        except PackageNotFoundError:
            env[name] = None
    if shutil.which("nvidia-smi"):
        q = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                           capture_output=True, text=True)
        env["gpu"] = q.stdout.strip().splitlines()[0] if q.returncode == 0 and q.stdout.strip() else None
    return env


def run(args) -> int:
    import pyarrow.parquet as pq
    import yaml

    from pipeline.config import load_config

    start = time.time()
    out_dir = Path(os.environ.get("OUT", "."))
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = "tiny" if args.tiny else args.shape
    work = Path(tempfile.mkdtemp(prefix="bench_job_", dir=args.workdir))
    try:
        ckpt, ckpt_info = ensure_checkpoint(args, work)
        if args.tiny and not args.videos_dir:
            clips = make_videos(work / "clips", TINY_CLIPS, fps=15, kbps=150)
        else:
            clips = sorted(Path(args.videos_dir or ROOT / "bench" / "videos").glob("clip_*.mp4"))
            if not clips:
                raise SystemExit(f"no clip_*.mp4 in {args.videos_dir or 'bench/videos'}: run make-videos first")
        n = args.videos or (16 if args.tiny else 384)
        kinds = link_inputs(clips, work / "inputs", n)
        data = {"input": {"local_dir": str(work / "inputs")}, "output": {"path": str(work / "output")},
                "model": {"source": str(ckpt)}, "tasks": MIX}
        if not args.tiny:
            data["stages"] = {"gpus_per_actor": 1}
        cfg = load_config(data=data, overrides=args.set or None)  # validates, and resolves the stage defaults
        args.tasks_per_video = int(bool(cfg.tasks.caption_prompt)) + len(cfg.tasks.questions) + len(cfg.tasks.mcq)
        cfg_path = work / "job.yaml"
        cfg_path.write_text(yaml.safe_dump(data, sort_keys=False))
        timeout = min(args.job_timeout or float("inf"), args.deadline_s - (time.time() - start) - 20)
        samplers = Samplers()
        job = run_job(cfg_path, out_dir / f"bench_job_{tag}.log", timeout, [a for s in args.set for a in ("--set", s)])
        samplers.stop()
        events = parse_events(job.pop("lines"), job["t0"])
        files = sorted((work / "output").rglob("*.parquet"))
        table = pq.read_table(files, columns=["video_id", "video_uri", "task_id", "status", "error_type",
                                              "error_message", "processed_at", "timings", "output_tokens",
                                              "visual_tokens_prefill"]) if files else None
        st = cfg.stages
        summary = cfg_path.with_name("summary.json")
        rep = {"shape": tag, "args": vars(args), **_environment(), "checkpoint": {"path": str(ckpt), **ckpt_info},
               "clips": [c.name for c in clips], "job_yaml": data, "job_rc": job["rc"], "timed_out": job["timed_out"],
               "config": {"mode": st.resolved_mode, "videos_per_call": st.resolved_fused_batch_size,
                          "calls_in_flight": st.actor_concurrency, "engine_rows": st.engine_max_batch_size,
                          "decode_batch_size": st.decode_batch_size},
               "job_summary": json.loads(summary.read_text()) if summary.exists() else None,
               "progress": events.pop("progress"), "events": events}
        rep["result"] = analyse(args, job, {**events, "progress": rep["progress"]}, table, kinds, cfg, samplers)
        res = rep["result"]
        rep["ok"] = ok = (job["rc"] == 0 and res["videos"] == n and not res["error_rows"]
                          and not res["incomplete_videos"])
        (out_dir / f"bench_job_{tag}.json").write_text(json.dumps(rep, indent=2, default=str))
        print_table(rep)
        print(f"\n{'OK' if ok else 'FAILED'}: job exit {job['rc']}{' (interrupted at the deadline)' if job['timed_out'] else ''}"
              f", {res['videos']} of {n} videos in the output; report {out_dir / f'bench_job_{tag}.json'}, "
              f"job log {out_dir / f'bench_job_{tag}.log'}")
        if res["errors"]:
            print("errors:", *res["errors"], sep="\n  ")
        return 0 if ok else 1
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="mode", required=True)
    mv = sub.add_parser("make-videos", help="write the input clips (needs PyAV)")
    mv.add_argument("--out", default=str(ROOT / "bench" / "videos"))
    mv.add_argument("--fps", type=int, default=FPS)
    mv.add_argument("--kbps", type=int, default=450)
    mc = sub.add_parser("make-checkpoint", help="build and save a random-weight checkpoint (GPU)")
    mc.add_argument("--shape", choices=["7b", "0.5b"], default="7b")
    mc.add_argument("--out", required=True)
    r = sub.add_parser("run", help="run the job and report")
    r.add_argument("--shape", choices=["7b", "0.5b"], default="7b")
    r.add_argument("--tiny", action="store_true", help="CPU smoke run: tiny checkpoint and clips, no GPU (no figures)")
    r.add_argument("--videos", type=int, help="inputs (default 384; 16 with --tiny)")
    r.add_argument("--videos-dir", help="folder of clip_*.mp4 (default bench/videos; --tiny makes its own)")
    r.add_argument("--checkpoint", help="checkpoint folder, reused when complete (default <tmp>/bench_job_ckpt_<shape>)")
    r.add_argument("--stage-videos-per-s", type=float, help="the stage alone (bench/bench_stage.py), for the ratio")
    r.add_argument("--deadline-s", type=float, default=570.0,
                   help="interrupt the job so that this script ends within this many seconds of its start")
    r.add_argument("--job-timeout", type=float, help="also interrupt the job after this many seconds")
    r.add_argument("--q-lo", type=float, default=0.1, help="steady window starts at this quantile of completions")
    r.add_argument("--q-hi", type=float, default=0.9, help="... and ends at this one")
    r.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="job config override (repeatable)")
    r.add_argument("--workdir", help="where the temp inputs and output go (default: the system temp folder)")
    r.add_argument("--keep", action="store_true", help="keep the temp inputs, job YAML and output")
    args = ap.parse_args()
    if args.mode == "make-videos":
        make_videos(Path(args.out), CLIPS, fps=args.fps, kbps=args.kbps)
        return 0
    if args.mode == "make-checkpoint":
        make_checkpoint(args.shape, Path(args.out))
        return 0
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
