"""Figures of ``bench/bench_job.py`` from the job's log, its output rows and host / GPU samples.

Times are seconds from the job's start (the subprocess launch). Sources:
  log events       :data:`EVENTS` lines (Ray's TEXT log format adds ``timestamp_ns``; else the time read)
  progress         Ray Data's periodic progress lines (every ~10 s): rows out of the decode and model stages
  output rows      ``processed_at`` (a row is produced when its actor call returns, so completions come in
                   steps of one call's videos) and ``timings.fetch_s`` / ``decode_s`` per video
  samples          /proc/stat (host CPU busy) and ``nvidia-smi`` (GPU utilisation), once a second
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

import numpy as np

EVENTS = {  # name: pattern of the job's log line that marks it (first match wins)
    "listed": r"pipeline\.sources: input: \d+ videos",
    "ray_ready": r"started a local Ray|connected to Ray at",
    "dataset_start": r"Starting execution of Dataset",
    "loaded": r"\bloaded \S+ on \S+ \(\S+\) in [\d.]+s",
    "engine_ready": r"engine session:",
    "dataset_done": r"execution finished in [\d.]+ seconds",
    "sink_done": r"Data sink \S+ finished",
}
PROGRESS = {"decode": r"MapBatches\(decode_batch\): (\d+)/", "model": r"MapBatches\((?:FusedStage|GenerateStage)\): (\d+)/"}
#: a model actor's decoder (decode.where: actor) after each call: its videos so far by kind (pipeline.actor_decode)
ACTOR_DECODE = r"decoded a call of \d+ rows in [\d.]+s \(videos so far: (\d+) by NVDEC, (\d+) on the CPUs\)"


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


def parse_events(lines: list[tuple[float, str]], t0: float) -> dict:
    """Seconds from the job's start to each :data:`EVENTS` line, the logged load time, the Ray CPU count, and
    ``progress``: {stage: [(s, rows out)]} from Ray Data's progress lines (:data:`PROGRESS`)."""
    out: dict = {"progress": {k: [] for k in PROGRESS}, "actor_decode": []}
    for t_read, line in lines:
        m = re.search(ACTOR_DECODE, line)
        if m:  # (s, actor, videos by NVDEC so far, on its CPUs so far)
            actor, ns = re.search(r"actor_id=(\w+)", line), re.search(r"timestamp_ns=(\d+)", line)
            out["actor_decode"].append(((int(ns.group(1)) / 1e9 if ns else t_read) - t0, actor.group(1) if actor else "",
                                        int(m.group(1)), int(m.group(2))))
        for stage, pattern in PROGRESS.items():
            m = re.search(pattern, line)
            if m:
                out["progress"][stage].append((t_read - t0, int(m.group(1))))
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


def completion_events(done: np.ndarray, gap_s: float = 0.05) -> np.ndarray:
    """Each completion time snapped to the end of its event: the rows of one actor call are produced in one
    loop when the call returns, so times less than ``gap_s`` apart belong to one event."""
    t = np.sort(done)
    ends = np.append(t[:-1][np.diff(t) > gap_s], t[-1])
    return ends[np.searchsorted(ends, t, side="left")]


def steady_rate(done: np.ndarray, q_lo: float, q_hi: float) -> dict:
    """Videos per second between two completion events; ``done`` holds each video's completion time (s).

    The window runs from the completion event at quantile ``q_lo`` to the one at ``q_hi`` and counts the videos
    completed after its start and up to its end, so completions that come in steps (one actor call's videos at
    once) are counted exactly."""
    t = completion_events(done)
    n = len(t)
    a, b = t[int(np.floor(q_lo * (n - 1)))], t[int(np.ceil(q_hi * (n - 1)))]
    events = np.unique(t)
    if b <= a or len(events) < 3:
        return {"videos_per_s": None, "why": f"{len(events)} completion events: too few for a steady window"}
    count = int(np.sum((t > a) & (t <= b)))
    return {"videos_per_s": count / (b - a), "from_s": float(a), "to_s": float(b), "videos": count,
            "completion_events": int(len(events))}


def progress_rate(progress: list[tuple[float, int]], per_video: int, q_lo: float, q_hi: float) -> dict:
    """Fallback steady rate from Ray Data's progress lines (rows at ~10 s intervals), for a job that did not
    finish (its Parquet is written at the end)."""
    pts = [(t, n / per_video) for t, n in progress if n > 0]
    if len(pts) < 2 or pts[-1][0] <= pts[0][0]:
        return {"videos_per_s": None, "why": f"{len(pts)} progress samples with rows out"}
    last = pts[-1][1]
    inside = [p for p in pts if q_lo * last <= p[1] <= q_hi * last]
    if len(inside) < 2 or inside[-1][0] <= inside[0][0]:
        inside = pts
    (ta, va), (tb, vb) = inside[0], inside[-1]
    return {"videos_per_s": (vb - va) / (tb - ta), "from_s": ta, "to_s": tb, "videos": vb - va,
            "source": "Ray Data progress lines (10 s resolution)"}


def count_at(progress: list[tuple[float, int]], t: float) -> float | None:
    """Rows out at time ``t``, interpolated between progress samples (``None`` outside them)."""
    if not progress or not progress[0][0] <= t <= progress[-1][0]:
        return None
    return float(np.interp(t, [s for s, _ in progress], [n for _, n in progress]))


def layout(cfg) -> dict:
    """The stage layout the job resolves from its config (the per-stage sections)."""
    mode = cfg.resolved_mode
    engine = cfg.fused if mode == "fused" else cfg.generate
    actors = lambda s: (s.concurrency[0] if isinstance(s.concurrency, tuple) else s.concurrency) or 1  # noqa: E731
    return {"mode": mode, "videos_per_call": engine.resolved_batch_size,
            "calls_in_flight": engine.max_concurrent_batches, "engine_rows": engine.engine_max_batch_size,
            "decode_batch_size": cfg.decode.batch_size, "decode_num_cpus": cfg.decode.num_cpus,
            "decode_max_tasks": cfg.decode.concurrency, "actor_num_cpus": engine.num_cpus,
            "model_actors": actors(cfg.fused) if mode == "fused" else actors(cfg.encode) + actors(cfg.generate)}


def decode_figures(per_video: dict, kinds: dict, events: dict, lay: dict, wall: float, window: float | None,
                   n_inputs: int) -> dict:
    """Decode's CPU share, its capacity from per-video CPU seconds, and its throughput in the job (progress)."""
    dec = {v: (r["timings"]["fetch_s"] or 0.0) + (r["timings"]["decode_s"] or 0.0) for v, r in per_video.items()}
    cpus = events.get("ray_cpus") or os.cpu_count()
    slots = max(1.0, (cpus - lay["model_actors"] * lay["actor_num_cpus"]) // lay["decode_num_cpus"])
    slots = min(slots, lay["decode_max_tasks"] or slots)
    by_kind: dict[str, list[float]] = {}
    for v, r in per_video.items():
        by_kind.setdefault(kinds.get(Path(r["video_uri"]).name, "?"), []).append(dec[v])
    total = float(sum(dec.values()))
    mean = total / len(dec) if dec else None
    prog = events["progress"]["decode"]
    start = events.get("dataset_start") or 0.0
    finished = next((t for t, n in prog if n >= n_inputs), None)
    upto = next(((t, n) for t, n in prog if n >= n_inputs), prog[-1] if prog else None)  # decode's last sample
    return {
        "cpu_s_total": total, "cpu_s_per_video": mean, "ray_cpus": cpus, "decode_slots": slots,
        "share_of_wall": total / (wall * cpus) if dec else None,
        "share_of_processing": total / (window * cpus) if dec and window else None,
        "capacity_videos_per_s": slots / mean if mean else None,
        "by_clip": {k: {"videos": len(v), "cpu_s_per_video": float(np.mean(v)),
                        "capacity_videos_per_s": slots / float(np.mean(v))} for k, v in sorted(by_kind.items())},
        "all_decoded_by_s": finished,
        "job_videos_per_s": upto[1] / (upto[0] - start) if upto and upto[1] and upto[0] > start else None,
    }


def startup_figures(events: dict, first_done: float | None) -> dict:
    ev = events.get
    loaded, took = ev("loaded"), ev("load_logged_s")
    return {"listed_s": ev("listed"), "ray_ready_s": ev("ray_ready"),
            "ray_init_s": ev("ray_ready") - ev("listed") if ev("ray_ready") and ev("listed") else None,
            "dataset_start_s": ev("dataset_start"),
            "model_load_start_s": loaded - took if loaded is not None and took is not None else None,
            "model_load_s": took, "model_loaded_s": loaded, "engine_ready_s": ev("engine_ready"),
            "first_video_done_s": first_done, "dataset_done_s": ev("dataset_done"), "sink_done_s": ev("sink_done")}


def actor_decode_figures(calls: list[tuple[float, str, int, int]]) -> dict | None:
    """Videos the model actors decoded (``decode.where: actor``), by kind, and their rate from each actor's first
    logged call to the last call logged (the first calls carry the decoder processes' start-up)."""
    if not calls:
        return None
    last: dict[str, tuple] = {}
    first: dict[str, tuple] = {}
    for c in calls:
        first.setdefault(c[1], c)
        last[c[1]] = c
    nvdec, cpu = sum(c[2] for c in last.values()), sum(c[3] for c in last.values())
    after = sum(last[a][2] + last[a][3] - first[a][2] - first[a][3] for a in last)
    span = max(c[0] for c in last.values()) - min(c[0] for c in first.values())
    return {"nvdec": nvdec, "cpu": cpu, "after_first_call_videos_per_s": after / span if span > 0 else None,
            "after_first_call_nvdec_share": (sum(last[a][2] - first[a][2] for a in last) / after) if after else None}


def analyse(rows: list[dict], job: dict, events: dict, kinds: dict, lay: dict, samplers: Samplers, *, n_inputs: int,
            tasks_per_video: int, q_lo: float, q_hi: float, stage_videos_per_s: float | None) -> dict:
    """Every figure of the report (see the module docstring and ``bench/bench_job.py``)."""
    t0, wall = job["t0"], job["wall_s"]
    by_video: dict[str, list[dict]] = {}
    for r in rows:
        by_video.setdefault(r["video_id"], []).append(r)
    bad = [r for r in rows if r["status"] != "ok"]
    done = np.array([max(r["processed_at"].timestamp() for r in rs) - t0 for rs in by_video.values()])
    if len(done):
        steady = steady_rate(done, q_lo, q_hi) | {"source": "processed_at of the output rows"}
    else:
        steady = progress_rate(events["progress"]["model"], tasks_per_video, q_lo, q_hi)
    if steady.get("videos_per_s"):
        steady |= samplers.window(t0 + steady["from_s"], t0 + steady["to_s"])
        for end in ("from_s", "to_s"):  # videos decoded and waiting (or in an actor call) at the window's ends
            decoded = count_at(events["progress"]["decode"], steady[end])  # +- one 10 s progress interval
            finished = int(np.sum(done <= steady[end])) if len(done) else None
            steady[f"decoded_ahead_at_{end[:-2]}"] = max(0.0, decoded - finished) if None not in (decoded, finished) else None
    window = float(done.max()) - (events.get("dataset_start") or 0.0) if len(done) else None
    first = float(done.min()) if len(done) else None
    res = {"videos": len(by_video), "rows": len(rows), "tasks_per_video": tasks_per_video, "error_rows": len(bad),
           "errors": sorted({f"{r['error_type']}: {r['error_message']}" for r in bad})[:5],
           "incomplete_videos": sum(len(rs) != tasks_per_video for rs in by_video.values()), "wall_s": wall,
           "end_to_end_videos_per_s": len(by_video) / wall, "startup": startup_figures(events, first),
           "steady": steady, "host_gpu_whole_job": samplers.window(t0, t0 + wall),
           "decode": decode_figures({v: rs[0] for v, rs in by_video.items()}, kinds, events, lay, wall, window, n_inputs),
           "output_tokens_per_video": float(np.mean([sum(r["output_tokens"] or 0 for r in rs)
                                                     for rs in by_video.values()])) if rows else None,
           "visual_tokens_prefill": rows[0]["visual_tokens_prefill"] if rows else None,
           "actor_decode": actor_decode_figures(events.get("actor_decode", []))}
    if len(done) and done.max() > first:
        res["after_first_videos_per_s"] = int(np.sum(done > first)) / (float(done.max()) - first)
    ready = res["startup"].get("engine_ready_s")
    if len(done) and ready is not None and done.max() > ready:
        # every video over the span from the engine's first session to the last completion: unlike the quantile
        # window, not biased by calls that were in flight (started earlier) when the window opens
        res["engine_span_videos_per_s"] = len(by_video) / (float(done.max()) - ready)
    stage, cap = stage_videos_per_s, res["decode"]["capacity_videos_per_s"]
    if stage:
        res["stage_videos_per_s"] = stage
        res["ratio_to_stage"] = steady["videos_per_s"] / stage if steady.get("videos_per_s") else None
        if res.get("engine_span_videos_per_s"):
            res["engine_span_ratio_to_stage"] = res["engine_span_videos_per_s"] / stage
    if stage and cap:
        res["decode_limit"] = (f"decode-bound: capacity {cap:.2f} videos/s is {cap / stage:.2f}x the stage's {stage:.2f}"
                               if cap < stage else f"decode keeps up: capacity {cap:.2f} videos/s >= stage {stage:.2f}")
    return res
