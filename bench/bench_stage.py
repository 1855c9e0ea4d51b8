"""The job's GPU stage exactly as the job calls it, at the DEFAULT configuration, against its floor.

Random weights at real LLaVA-OneVision shapes (speed does not depend on weight values), bf16, 32 frames at
384 px per video, DyCoke K=0.7 L=3 P=0.7 (the config defaults). Input: decoded rows as the decode stage
emits them (``pipeline.schema.DECODED_SCHEMA``, frames as bytes). The stage is built from a default
``PipelineConfig`` with one GPU per actor, exactly as ``pipeline.run`` builds it: videos per call
(``fused.batch_size``), calls in flight per actor (``fused.max_concurrent_batches``, one thread each, as
Ray's threaded actor runs them) and engine rows (``fused.engine_max_batch_size``: from free memory).
Generation runs to each task's own limit (random weights practically never emit EOS).

Variants per shape:
  fused_mix            FusedStage, realistic mix: caption + 2 open questions (128 tokens) + 1 MCQ (8)
  fused_caption        FusedStage, caption only (128 tokens)
  fused_mix_drain      as fused_mix with max_concurrent_batches=1 (each call drains before the next)
  split_mix            EncodeStage (tokens packed to bytes) then GenerateStage on its rows, each timed alone:
                       rate of two actors on two GPUs = min of the two; on one GPU = harmonic sum
  mix:<preset>         fused_mix with a compression preset of the evaluation job: off, dycoke-k0.7-p0.7,
                       holitom-r0.10 / holitom-r0.15 / holitom-r0.25; ``methods`` = the method axis (off,
                       DyCoke K=0.7, HoliTom r=0.10 / 0.15 / 0.25)
  <fused variant>+sdpa     ablation: decode steps attend with SDPA instead of the Triton decode kernel
  <fused variant>+unfused  ablation: the vision tower's MLP without the fused GELU epilogue
  <fused variant>+plainllm ablation: the decoder's RMSNorm and SwiGLU without the fused adapters (dycoke.fused)
  <fused variant>+nocascade ablation: decode steps read every row's copy of its video's prefix (no shared reads)
  <fused variant>+rowsN    the engine with N rows instead of the default (``fused.engine_max_batch_size``)

Floor per video (DESIGN 7): vision FLOPs + ONE video prefill + the task suffix prefills at the measured
bf16 matmul rate, plus decode bytes (decoder weights once per engine step, shared by the rows decoding
together; KV read per row and step) at the measured copy bandwidth.

    python bench/bench_stage.py --shape 7b --shape 0.5b      # table on stdout, $OUT/bench_stage_7b_0.5b.json
    python bench/bench_stage.py --shape 7b --variants methods   # mix:off,mix:dycoke-k0.7-p0.7,mix:holitom-r0.10,...
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_engine import build_model, measure_peaks  # noqa: E402
from bench.stage_profile import gap_report, labelled  # noqa: E402
from dycoke.testing import build_tiny_tokenizer  # noqa: E402
from pipeline.config import load_config  # noqa: E402
from pipeline.schema import DECODED_SCHEMA  # noqa: E402
from pipeline.stages import EncodeStage, FusedStage, GenerateStage  # noqa: E402

MIX = {"questions": ["What is the main person doing, and with which objects?",
                     "How does the scene change from the beginning to the end of the clip?"],
       "mcq": [{"question": "Where does the video take place?", "options": ["a kitchen", "a street", "a forest",
                                                                             "an office"]}]}


METHODS = ["mix:off", "mix:dycoke-k0.7-p0.7", "mix:holitom-r0.10", "mix:holitom-r0.15", "mix:holitom-r0.25"]


def job_config(tasks: dict, compression: dict | None = None, **engine):
    """The default job configuration with one GPU per actor (what a user's GPU run starts from); ``compression``:
    fields on top of the defaults (an evaluation preset); ``engine``: fields of the fused and generate sections."""
    stage = {"num_gpus": 1, **engine}
    return load_config(data={"input": {"local_dir": "."}, "output": {"path": "out"}, "model": {"source": "random"},
                             "tasks": tasks, "compression": compression or {}, "fused": stage, "generate": stage,
                             "encode": {"num_gpus": 1}})


def variant_config(variant: str):
    """``fused_mix``, ``fused_caption``, ``fused_mix_drain``, ``split_mix`` at the default compression, or
    ``mix:<preset>`` (the realistic mix, fused, with an evaluation preset of ``pipeline.evaluate.PRESETS``:
    off, dycoke-k0.7-p0.7, holitom-r0.10 / r0.15 / r0.25)."""
    from pipeline.evaluate import PRESETS

    if variant.startswith("mix:"):
        return job_config(MIX, PRESETS[variant[4:]])
    return job_config({} if variant == "fused_caption" else MIX,
                      **({"max_concurrent_batches": 1} if variant.endswith("drain") else {}))


def decoded_rows(n: int, frames: int, size: int = 384, distinct: int = 8) -> list[dict]:
    rng = np.random.default_rng(0)
    pool = [rng.integers(0, 256, (frames, size, size, 3), dtype=np.uint8).tobytes() for _ in range(distinct)]
    rows = [{"video_id": f"v{i:05d}", "video_uri": f"file:///v{i:05d}.mp4", "questions": None, "video_etag": "e",
             "video_bytes": 1, "duration_s": 10.0, "num_frames": frames, "frame_timestamps_s": [0.0] * frames,
             "frames": pool[i % distinct], "frames_shape": [frames, size, size, 3], "fetch_s": 0.0, "decode_s": 0.0,
             "status": "ok", "error_type": None, "error_message": None} for i in range(n)]
    return rows


def batches(rows: list[dict], size: int) -> list[pa.Table]:
    return [pa.Table.from_pylist(rows[i : i + size], schema=DECODED_SCHEMA) for i in range(0, len(rows), size)]


def lm_stats(llm) -> dict:
    lm = llm.language_model
    c = lm.config
    layer_params = sum(p.numel() for p in lm.layers.parameters())
    head_params = llm.lm_head.weight.numel()
    vis = sum(p.numel() for p in llm.model.model.vision_tower.parameters()) + \
        sum(p.numel() for p in llm.model.model.multi_modal_projector.parameters())
    head_dim = c.hidden_size // c.num_attention_heads
    return {"layer_params": layer_params, "head_params": head_params, "vision_params": vis, "layers": c.num_hidden_layers,
            "hidden": c.hidden_size, "kv_bytes_per_token": 2 * c.num_hidden_layers * c.num_key_value_heads * head_dim * 2}


def floor_per_video(st: dict, peaks: dict, frames: int, prefix: int, suffixes: list[int], new_tokens: list[int],
                    rows: int) -> dict:
    """Seconds per video at the speed of light for one video with tasks of ``suffixes`` / ``new_tokens``."""
    attn = lambda q, k: 4 * st["layers"] * st["hidden"] * q * k  # noqa: E731  QK^T + PV
    vision = 2 * st["vision_params"] * frames * 729
    prefill = 2 * st["layer_params"] * prefix + attn(prefix, prefix) / 2
    suffix = sum(2 * st["layer_params"] * s + attn(s, prefix + s) + 2 * st["head_params"] for s in suffixes)
    row_steps = sum(n - 1 for n in new_tokens)
    weights = (st["layer_params"] + st["head_params"]) * 2 * row_steps / rows  # one weight read per engine step
    kv = sum(st["kv_bytes_per_token"] * (prefix + s + n / 2) * (n - 1) for s, n in zip(suffixes, new_tokens))
    flops_s = (vision + prefill + suffix) / peaks["matmul_flops"]
    bytes_s = (weights + kv) / peaks["copy_bytes_per_s"]
    return {"floor_s": flops_s + bytes_s, "vision_s": vision / peaks["matmul_flops"],
            "prefill_s": prefill / peaks["matmul_flops"], "suffix_s": suffix / peaks["matmul_flops"], "decode_s": bytes_s}


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def _peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else float("nan")


def _reset_peak() -> None:
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.empty_cache()


class Timed:
    """Wraps a stage's ``encode_rows`` to add its GPU time to a counter: CUDA events around each call on the
    engine thread's stream, read once at the end (no synchronisation during the run)."""

    def __init__(self, encode):
        self.encode, self.real, self.events = encode, encode.encode_rows, []

    def __call__(self, rows, pack=True):
        if not torch.cuda.is_available():
            return self.real(rows, pack=pack)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = self.real(rows, pack=pack)
        end.record()
        self.events.append((start, end))
        return out

    @property
    def total(self) -> float:
        _sync()
        return sum(s.elapsed_time(e) for s, e in self.events) / 1e3


def run_fused(llm, cfg, rows: list[dict], warm: list[dict], ablations: tuple[str, ...] = (),
              profile: bool = False) -> tuple[dict, list[dict]]:
    from dycoke.fused import adapt_language_model, restore
    from dycoke.vision import fuse_mlp_gelu, unfuse_mlp_gelu

    st = cfg.fused
    stage = FusedStage(cfg, llm=llm)
    if "sdpa" in ablations:
        stage.generate.engine.use_decode_kernel = False  # before the first call builds the session
    if "nocascade" in ablations:
        stage.generate.engine.share_decode_reads = False
    (unfuse_mlp_gelu if "unfused" in ablations else fuse_mlp_gelu)(llm.model.model.vision_tower)
    (restore if "plainllm" in ablations else adapt_language_model)(llm.language_model)
    timer = Timed(stage.encode)
    stage.encode.encode_rows = timer
    size, threads = st.resolved_batch_size, st.max_concurrent_batches
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:  # as Ray's threaded actor runs the calls
        list(pool.map(stage, batches(warm, size)))  # warm-up: session allocation, graph capture
        _sync()
        stage.generate.engine.stats.clear()
        timer.events.clear()
        _reset_peak()
        with contextlib.ExitStack() as stack:
            if profile:  # started on the engine thread: the profiler records the CPU ops of the thread that starts it
                stack.enter_context(labelled())
                prof = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                          torch.profiler.ProfilerActivity.CUDA])
                stage.generate.loop.call(prof.start).result()
                stack.callback(lambda: stage.generate.loop.call(prof.stop).result())
            t0 = time.perf_counter()
            out = [r for t in pool.map(stage, batches(rows, size)) for r in t.to_pylist()]
            wall = time.perf_counter() - t0
    eng = stage.generate.engine
    stage.generate.loop.close()
    return {"wall_s": wall, "videos_per_s": len(rows) / wall, "vision_s": timer.total,
            "prefix_prefill_s": eng.stats["prefix_prefill_s"], "suffix_prefill_s": eng.stats["suffix_prefill_s"],
            "decode_s": eng.stats["decode_s"], "decode_steps": eng.stats["decode_steps"],
            "admissions": eng.stats["admissions"], "prefixes": eng.stats["prefixes"], "rows": eng._session.rows,
            "slots": eng._session.slots, "videos_per_call": size, "calls_in_flight": threads,
            "peak_gib": _peak_gib(), **({"gaps": gap_report(prof)} if profile else {})}, out


def run_split(llm, cfg, rows: list[dict], warm: list[dict]) -> dict:
    e, g = cfg.encode, cfg.generate
    enc = EncodeStage(cfg, llm=llm)
    gen = GenerateStage(cfg, llm=llm)
    enc_batches = [enc(b) for b in batches(warm, e.batch_size)]
    with concurrent.futures.ThreadPoolExecutor(g.max_concurrent_batches) as pool:
        list(pool.map(gen, [t for b in enc_batches for t in batches_of(b.to_pylist(), g.resolved_batch_size)]))
    _sync()
    t0 = time.perf_counter()
    encoded = [r for b in batches(rows, e.batch_size) for r in enc(b).to_pylist()]
    t_enc = time.perf_counter() - t0
    gen.engine.stats.clear()
    t0 = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(g.max_concurrent_batches) as pool:
        list(pool.map(gen, batches_of(encoded, g.resolved_batch_size)))
    t_gen = time.perf_counter() - t0
    gen.loop.close()
    n = len(rows)
    return {"encode_videos_per_s": n / t_enc, "generate_videos_per_s": n / t_gen,
            "videos_per_s": min(n / t_enc, n / t_gen), "one_gpu_videos_per_s": n / (t_enc + t_gen),
            "rows": gen.engine._session.rows, "peak_gib": _peak_gib()}


def batches_of(rows: list[dict], size: int) -> list[pa.Table]:
    from pipeline.schema import ENCODED_SCHEMA

    return [pa.Table.from_pylist(rows[i : i + size], schema=ENCODED_SCHEMA) for i in range(0, len(rows), size)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", action="append", help="7b and/or 0.5b (default both)")
    ap.add_argument("--videos", type=int, default=128)
    ap.add_argument("--frames", type=int, default=32)
    ap.add_argument("--variants", default="fused_mix,fused_caption,fused_mix_drain,split_mix")
    ap.add_argument("--repeat", type=int, default=1, help="run the variant list this many times, interleaved; "
                    "the last table gives each variant's median videos/s")
    ap.add_argument("--profile", action="store_true", help="trace the first fused run (torch.profiler) and report "
                    "where the GPU idles, charged to the host step running then (bench/stage_profile.py); slower")
    ap.add_argument("--tiny", action="store_true", help="CPU smoke run of this script on a tiny checkpoint (no figures)")
    args = ap.parse_args()
    shapes = ["tiny"] if args.tiny else (args.shape or ["7b", "0.5b"])
    variants = [v for name in args.variants.split(",") for v in (METHODS if name == "methods" else [name])]
    out_dir = Path(os.environ.get("OUT", "."))
    if args.tiny:  # nominal peaks: the run checks the script, its figures mean nothing
        peaks, device = {"matmul_flops": 1e12, "copy_bytes_per_s": 1e11}, "cpu"
    else:
        peaks, device = measure_peaks(), torch.cuda.get_device_name()
    print(f"device {device}  matmul {peaks['matmul_flops'] / 1e12:.0f} TFLOP/s  "
          f"copy {peaks['copy_bytes_per_s'] / 1e12:.2f} TB/s", flush=True)
    tokenizer = build_tiny_tokenizer()
    report = {"device": device, "peaks": peaks, "args": vars(args), "results": []}
    for shape in shapes:
        llm = _tiny_llm() if shape == "tiny" else build_model(shape, tokenizer)
        rows = decoded_rows(args.videos, args.frames, llm.image_size)
        st = lm_stats(llm)
        for rep, variant in [(i, v) for i in range(args.repeat) for v in variants]:
            base, *ablations = variant.split("+")
            cfg = variant_config(base)
            for ab in ablations:
                if ab.startswith("rows"):
                    cfg.fused = cfg.fused.model_copy(update={"engine_max_batch_size": int(ab[4:])})
            tasks = {} if base == "fused_caption" else MIX
            warm = rows[: 2 * cfg.fused.resolved_batch_size]
            _reset_peak()
            if variant.startswith("split"):
                r = run_split(llm, cfg, rows, warm)
            else:
                r, out = run_fused(llm, cfg, rows, warm, tuple(ablations), profile=args.profile and rep == 0
                                   and variant == variants[0])
                if "gaps" in r:
                    print("GAPS", json.dumps(r["gaps"], indent=1), flush=True)
                assert len(out) == len(rows) * (1 if tasks == {} else 4) and all(o["status"] == "ok" for o in out), \
                    [o["error_message"] for o in out if o["status"] != "ok"][:3]
                ok = [o for o in out if o["video_id"] == out[0]["video_id"]]
                prefix = ok[0]["prompt_tokens"] - _suffix_len(llm, ok[0]["prompt"])
                fl = floor_per_video(st, peaks, args.frames, prefix, [o["prompt_tokens"] - prefix for o in ok],
                                     [o["output_tokens"] for o in ok], r["rows"])
                r.update(floor=fl, x_floor=(1 / r["videos_per_s"]) / fl["floor_s"],
                         output_tokens=statistics.mean(sum(o["output_tokens"] for o in out if o["video_id"] == v)
                                                       for v in {o["video_id"] for o in out}),
                         visual_tokens=statistics.mean(o["visual_tokens_prefill"] for o in out),
                         attended_fraction=statistics.mean(o["visual_tokens_attended"] / o["visual_tokens_prefill"]
                                                           for o in out if o["visual_tokens_prefill"]),
                         prompt_tokens=[o["prompt_tokens"] for o in ok])
            r.update(shape=shape, variant=variant, repeat=rep)
            report["results"].append(r)
            print(shape, variant, json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}),
                  flush=True)
        del llm
        _reset_peak()
    (out_dir / f"bench_stage_{'_'.join(shapes)}.json").write_text(json.dumps(report, indent=2, default=float))
    print(f"\n{'shape':5} {'variant':22} {'videos/s':>9} {'x floor':>7} {'rows':>5} {'vis tok':>7} {'vision':>7} {'prefill':>8} "
          f"{'suffix':>7} {'decode':>7} {'peak GiB':>8}")
    for r in report["results"]:
        if "floor" in r:
            print(f"{r['shape']:5} {r['variant']:22} {r['videos_per_s']:9.3f} {r['x_floor']:7.2f} {r['rows']:>5} {r['visual_tokens']:7.0f} "
                  f"{r['vision_s']:7.2f} {r['prefix_prefill_s']:8.2f} {r['suffix_prefill_s']:7.2f} {r['decode_s']:7.2f} "
                  f"{r['peak_gib']:8.1f}")
        else:
            print(f"{r['shape']:5} {r['variant']:22} {r['videos_per_s']:9.3f} (encode {r['encode_videos_per_s']:.2f}/s, "
                  f"generate {r['generate_videos_per_s']:.2f}/s, one GPU {r['one_gpu_videos_per_s']:.2f}/s)")

    if args.repeat > 1:
        print(f"\nmedian of {args.repeat} interleaved runs (videos/s, each run's in brackets)")
        for key in dict.fromkeys((r["shape"], r["variant"]) for r in report["results"]):
            runs = [r["videos_per_s"] for r in report["results"] if (r["shape"], r["variant"]) == key]
            print(f"{key[0]:5} {key[1]:30} {statistics.median(runs):7.3f}  [{', '.join(f'{x:.3f}' for x in runs)}]")


def _tiny_llm():
    import tempfile

    from dycoke.llava import VideoLLM
    from dycoke.testing import build_tiny_checkpoint

    return VideoLLM.load(str(build_tiny_checkpoint(Path(tempfile.mkdtemp()) / "tiny")), dtype="float32")


def _suffix_len(llm, prompt: str) -> int:
    ids = llm.prompt_ids(prompt)
    return len(ids) - ids.index(llm.video_token_id) - 1


if __name__ == "__main__":
    main()
