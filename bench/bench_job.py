"""The whole job on one GPU machine: ``python -m jobs.corpus`` (local Ray, decord, Parquet) against the stage alone.

Modes:

  make-videos      (needs PyAV: run it where PyAV is installed) write the input clips, real H.264 with moving
                   content and keyframes 10 s apart: 60 s 720p and 20 s 1080p at 30 fps, ~450 kbit/s (4 MB):
                       python bench/bench_job.py make-videos --out bench/videos
                   ``--kbps 4000 --only 720p_60s``: the decode-heavy input of issue 13's bar (30 MB a clip: encode it
                   on the GPU machine rather than carry it); ``--gop-s 2``: keyframes 2 s apart (streaming-like
                   short GOPs, where NVDEC skips the GOPs without a sampled frame)
  make-checkpoint  build a random-weight LLaVA-OneVision at real shapes on the GPU and save it in Hugging Face
                   layout (safetensors, tokenizer with chat template, preprocessor config); ``run`` does this in a
                   child process (the GPU is free again before the job starts) unless the folder holds one.
  run              the benchmark (GPU), or a CPU smoke run of the whole script with ``--tiny``:
                       python bench/bench_job.py run --shape 7b --stage-videos-per-s 5.0
                       python bench/bench_job.py run --tiny

``run`` makes ``--videos`` inputs (default: 150 s of the stage's rate, at least 200; 384 without it) by
copying the clips of ``--videos-dir`` round robin under distinct names (each a different ``video_id``),
writes a job YAML that is the job's DEFAULT configuration except what this machine needs (``input.local_dir``,
``output.path``, ``model.source``, ``num_gpus: 1`` in the encode, generate and fused sections on GPU) plus the realistic task mix of
``bench/bench_stage.py`` (caption + 2 open questions at 128 new tokens + 1 MCQ at 8), and runs
``python -m jobs.corpus --config job.yaml`` as a subprocess (``--set FIELD=VALUE`` passes overrides through).
``RAY_LOGGING_CONFIG_ENCODING=TEXT`` makes Ray apply an INFO logging config in its workers, so the actor's
"loaded ... in X s" line reaches the job's log. The job is interrupted so that the script ends within
``--deadline-s`` (its Parquet is written at the end, so an interrupted job is measured from its progress lines).

Reported (table last; JSON and the job's log under ``$OUT``, else the current folder; :mod:`bench.job_metrics`):
  start-up     Ray ready (and how long ``ray.init`` took), model load (start, logged duration), first video done
  steady       videos completed per second between the ``--q-lo`` and ``--q-hi`` quantiles of the videos'
               completion times (``processed_at`` of their rows); end to end = videos / subprocess wall
               (biased upward when the window spans few actor calls: the calls in flight when it opens started
               earlier); engine span = all videos / (last completion - the engine's first session), not biased so
  vs stage     steady and engine span / ``--stage-videos-per-s`` (the stage alone, ``bench/bench_stage.py``)
  decode       CPU share = sum over videos of ``timings.fetch_s + decode_s`` over (wall x Ray CPUs), and over
               the processing window (dataset start to last video); capacity = decode slots (Ray CPUs minus the
               actors' CPUs) / mean CPU s per video, per clip kind too; in the job: when every video was decoded
               and how many decoded videos were waiting at the steady window's ends (decode runs ahead while the
               model loads: a window fed from that backlog measures the GPU side; a backlog near 0 means decode
               limits); host CPU busy (/proc/stat) and GPU utilisation (nvidia-smi) in the window.
Correctness: every input video has one ``ok`` row per task (exit status 1 otherwise, after the report).
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_stage import MIX  # noqa: E402
from bench.job_inputs import (  # noqa: E402
    CLIPS,
    FPS,
    KEYFRAME_S,
    TINY_CLIPS,
    ensure_checkpoint,
    link_inputs,
    make_checkpoint,
    make_videos,
)
from bench.job_metrics import Samplers, analyse, layout, parse_events  # noqa: E402


def stop_job(proc: subprocess.Popen) -> int:
    """SIGINT to the job's process group (the driver shuts its local Ray down), SIGKILL after 30 s."""
    os.killpg(proc.pid, signal.SIGINT)
    try:
        return proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        return proc.wait()


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
        rc = stop_job(proc)
    except BaseException:  # this script is being stopped (Ctrl-C, SIGTERM): never leave the job holding the GPU
        stop_job(proc)
        raise
    wall = time.time() - t0
    reader.join(timeout=10)
    return {"t0": t0, "wall_s": wall, "rc": rc, "timed_out": timed_out, "lines": lines}


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
        ("videos/s engine ready -> last / vs stage", f"{_f(r.get('engine_span_videos_per_s'), '{:.3f}')} / "
                                                     f"{_f(r.get('engine_span_ratio_to_stage'), '{:.2f}')}"),
        ("stage alone videos/s / steady ratio", f"{_f(r.get('stage_videos_per_s'), '{:.3f}')} / {_f(r.get('ratio_to_stage'))}"),
        ("decode CPU s per video", _f(d["cpu_s_per_video"])
         + "".join(f"  {k} {v['cpu_s_per_video']:.2f}" for k, v in d["by_clip"].items())),
        ("decode CPU share of wall / processing", f"{_f(d['share_of_wall'])} / {_f(d['share_of_processing'])}"),
        ("decode capacity videos/s", f"{_f(d['capacity_videos_per_s'])} ({d['decode_slots']:.0f} slots, {d['ray_cpus']:.0f} CPUs)"
         + "".join(f"  {k} {v['capacity_videos_per_s']:.2f}" for k, v in d["by_clip"].items())),
        ("decode in the job: all done at s / videos/s", f"{_f(d['all_decoded_by_s'], '{:.0f}')} / "
                                                         f"{_f(d['job_videos_per_s'])}  (progress lines, 10 s apart)"),
        ("decoded and waiting at window start / end", f"{_f(y.get('decoded_ahead_at_from'), '{:.0f}')} / "
                                                      f"{_f(y.get('decoded_ahead_at_to'), '{:.0f}')}"),
        ("host CPU busy / GPU util % (steady)", f"{_f(y.get('host_cpu_busy'))} / {_f(y.get('gpu_util_pct'), '{:.0f}')}"),
        ("error rows / incomplete videos", f"{r['error_rows']} / {r['incomplete_videos']}"),
    ]
    if r.get("decode_limit"):
        rows.append(("decode vs stage", r["decode_limit"]))
    if a := r.get("actor_decode"):
        rows.append(("decoded in the actor: NVDEC / its CPUs", f"{a['nvdec']} / {a['cpu']}"))
        rows.append(("  after its first call: videos/s (NVDEC share)", f"{_f(a['after_first_call_videos_per_s'])} "
                                                                          f"({_f(a['after_first_call_nvdec_share'])})"))
    for name, value in rows:
        print(f"{name:44} {value}")


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
    import yaml

    from pipeline.config import load_config
    from pipeline.sink import read_committed

    start = time.time()
    out_dir = Path(os.environ.get("OUT", "."))
    out_dir.mkdir(parents=True, exist_ok=True)
    tag = "tiny" if args.tiny else args.shape
    work = Path(tempfile.mkdtemp(prefix="bench_job_", dir=args.workdir))
    try:
        ckpt, ckpt_info = ensure_checkpoint(args.shape, args.checkpoint, Path(__file__).resolve(),
                                            tiny_dir=work / "tiny_ckpt" if args.tiny else None)
        if args.tiny and not args.videos_dir:
            clips = make_videos(work / "clips", TINY_CLIPS, fps=15, kbps=150)
        else:
            clips = sorted(Path(args.videos_dir or ROOT / "bench" / "videos").glob("clip_*.mp4"))
            if not clips:
                raise SystemExit(f"no clip_*.mp4 in {args.videos_dir or 'bench/videos'}: run make-videos first")
        n = args.videos or (16 if args.tiny else max(200, round(args.stage_videos_per_s * 150))
                            if args.stage_videos_per_s else 384)
        kinds = link_inputs(clips, work / "inputs", n)
        data = {"input": {"local_dir": str(work / "inputs")}, "output": {"path": str(work / "output")},
                "model": {"source": str(ckpt)}, "tasks": MIX}
        if not args.tiny:
            data.update({s: {"num_gpus": 1} for s in ("encode", "generate", "fused")})
        cfg = load_config(data=data, overrides=args.set or None)  # validates, and resolves the stage defaults
        tasks_per_video = int(bool(cfg.tasks.caption_prompt)) + len(cfg.tasks.questions) + len(cfg.tasks.mcq)
        lay = layout(cfg)
        cfg_path = work / "job.yaml"
        cfg_path.write_text(yaml.safe_dump(data, sort_keys=False))
        timeout = min(args.job_timeout or float("inf"), args.deadline_s - (time.time() - start) - 20)
        samplers = Samplers()
        try:
            job = run_job(cfg_path, out_dir / f"bench_job_{tag}.log", timeout, [a for s in args.set for a in ("--set", s)])
        finally:
            samplers.stop()
        events = parse_events(job.pop("lines"), job["t0"])
        runs = sorted(p.parent for p in (work / "output").glob("*/_commits"))  # run folders with committed chunks
        cols = ["video_id", "video_uri", "task_id", "status", "error_type", "error_message", "processed_at", "timings",
                "output_tokens", "visual_tokens_prefill"]
        rows = [r for run in runs for r in read_committed(str(run), cols).to_pylist()]
        summary = cfg_path.with_name("summary.json")
        rep = {"shape": tag, "args": vars(args), **_environment(), "checkpoint": {"path": str(ckpt), **ckpt_info},
               "clips": [c.name for c in clips], "job_yaml": data, "job_rc": job["rc"], "timed_out": job["timed_out"],
               "config": lay, "job_summary": json.loads(summary.read_text()) if summary.exists() else None,
               "events": events, "output_rows": len(rows)}
        report = out_dir / f"bench_job_{tag}.json"
        report.write_text(json.dumps(rep, indent=2, default=str))  # the raw figures, whatever happens next
        rep["result"] = analyse(rows, job, events, kinds, lay, samplers, n_inputs=n, tasks_per_video=tasks_per_video,
                                q_lo=args.q_lo, q_hi=args.q_hi, stage_videos_per_s=args.stage_videos_per_s)
        res = rep["result"]
        rep["ok"] = ok = (job["rc"] == 0 and res["videos"] == n and not res["error_rows"]
                          and not res["incomplete_videos"])
        report.write_text(json.dumps(rep, indent=2, default=str))
        print_table(rep)
        print(f"\n{'OK' if ok else 'FAILED'}: job exit {job['rc']}{' (interrupted at the deadline)' if job['timed_out'] else ''}"
              f", {res['videos']} of {n} videos in the output; report {report}, "
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
    mv.add_argument("--only", action="append", choices=sorted(CLIPS), help="just these clips (repeatable)")
    mv.add_argument("--gop-s", type=float, default=KEYFRAME_S, help="seconds between keyframes (IDR)")
    mc = sub.add_parser("make-checkpoint", help="build and save a random-weight checkpoint (GPU)")
    mc.add_argument("--shape", choices=["7b", "0.5b"], default="7b")
    mc.add_argument("--out", required=True)
    r = sub.add_parser("run", help="run the job and report")
    r.add_argument("--shape", choices=["7b", "0.5b"], default="7b")
    r.add_argument("--tiny", action="store_true", help="CPU smoke run: tiny checkpoint and clips, no GPU (no figures)")
    r.add_argument("--videos", type=int, help="inputs (default 150 s of --stage-videos-per-s, >= 200, else 384; 16 with --tiny)")
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
        make_videos(Path(args.out), {k: v for k, v in CLIPS.items() if not args.only or k in args.only}, fps=args.fps,
                    kbps=args.kbps, gop_s=args.gop_s)
        return 0
    if args.mode == "make-checkpoint":
        make_checkpoint(args.shape, Path(args.out))
        return 0
    signal.signal(signal.SIGTERM, _interrupt)  # a SIGTERM unwinds like Ctrl-C: the job is stopped, temp files go
    return run(args)


def _interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


if __name__ == "__main__":
    sys.exit(main())
