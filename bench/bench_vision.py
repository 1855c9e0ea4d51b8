"""Vision-stage benchmark: SigLIP-so400m/14 at 384 px + projector + 2x2 pooling (LLaVA-OneVision), 32 frames.

Times ``VideoLLM.video_features`` on random weights and random pixels for several video batch sizes and
settings, prints the top CUDA kernels of one call, and compares with the FLOP floor
(tokens x 2 x params + attention) over a measured bf16 matmul rate.

    python bench/bench_vision.py        # prints a table and the top kernels, writes $OUT/bench_vision.json
"""

from __future__ import annotations

import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_engine import build_model, measure_peaks, model_stats  # noqa: E402
from dycoke.testing import build_tiny_tokenizer  # noqa: E402


def timed(fn, reps=10, warmup=3):
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        fn()
        e.record()
        torch.cuda.synchronize()
        out.append(s.elapsed_time(e))
    return statistics.median(out)


def profile_table(fn, rows=12) -> str:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="cuda_time_total", row_limit=rows, max_name_column_width=60)


def main() -> None:
    """Variants at 8 videos per call (the fused stage's chunk): ``unfused`` (transformers' modules),
    ``fused_gelu`` (fc1 + GELU in one GEMM only), ``adapted`` (the default, every adapter of
    :mod:`dycoke.vision`: fused GELU, patch embedding as one GEMM, Triton layer norm), ``adapted/<backend>``
    (the same with one SDPA backend forced), ``compiled`` (torch.compile of the encoder on top of ``adapted``).
    Checks every variant against the unfused output."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from dycoke.vision import adapt_vision_tower, fuse_mlp_gelu, restore_vision_tower, unfuse_mlp_gelu

    peaks = measure_peaks()
    llm = build_model("0.5b", build_tiny_tokenizer())
    vt = llm.model.model.vision_tower
    params = model_stats(llm)["vision_params"]
    frames, vb = 32, 8
    tokens = frames * 729
    c = vt.config
    flops = 2 * params * tokens + 4 * c.num_hidden_layers * frames * 729**2 * c.hidden_size
    floor_ms = flops / peaks["matmul_flops"] * 1e3
    g = torch.Generator(device="cuda").manual_seed(0)
    rows, profiles = [], {}
    encoder = getattr(vt, "vision_model", vt).encoder

    def measure(name: str, backend=None) -> None:
        def call(p):
            if backend is None:
                return llm.video_features(p)
            with sdpa_kernel([backend]):
                return llm.video_features(p)
        try:
            got = call(pix[:2]).float()
            ms = timed(lambda: call(pix)) / vb
        except RuntimeError as exc:  # a backend that does not take these shapes is reported, not fatal
            print(name, "failed:", repr(exc)[:200], flush=True)
            return
        err = ((got - ref).norm() / ref.norm()).item()
        rows.append({"variant": name, "ms_per_video": ms, "x_floor": ms / floor_ms, "rel_err": err})
        print(rows[-1], flush=True)
        if name in ("unfused", "adapted"):
            profiles[name] = profile_table(lambda: call(pix[:4]))

    with torch.inference_mode():
        pix = torch.randn(vb, frames, 3, 384, 384, device="cuda", generator=g).to(torch.bfloat16)
        restore_vision_tower(vt)
        unfuse_mlp_gelu(vt)
        ref = llm.video_features(pix[:2]).float()
        measure("unfused")
        fuse_mlp_gelu(vt)
        measure("fused_gelu")
        adapt_vision_tower(vt)
        measure("adapted")
        for backend in (SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION):
            measure(f"adapted/{backend.name.lower()}", backend)
        original = encoder.forward
        try:
            encoder.forward = torch.compile(original, dynamic=False)
            t0 = time.perf_counter()
            llm.video_features(pix)
            print("compile_s", time.perf_counter() - t0, flush=True)
            measure("compiled")
        except Exception as exc:  # noqa: BLE001 - a benchmark variant that cannot compile is reported, not fatal
            print("compiled failed:", repr(exc)[:300])
        finally:
            encoder.forward = original
    for name, table in profiles.items():
        print(f"--- {name}, 4 videos\n{table}")
    out = Path(os.environ.get("OUT", ".")) / "bench_vision.json"
    out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "floor_ms_per_video": floor_ms,
                               "peaks": peaks, "rows": rows, "profiles": profiles}, indent=2))
    print(f"\nfloor {floor_ms:.1f} ms/video (32 frames), {vb} videos per call")
    print(f"{'variant':28} {'ms/video':>9} {'x floor':>7} {'rel err':>8}")
    for r in rows:
        print(f"{r['variant']:28} {r['ms_per_video']:9.1f} {r['x_floor']:7.2f} {r.get('rel_err', 0):8.1e}")


if __name__ == "__main__":
    main()
