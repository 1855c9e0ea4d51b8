"""Vision-stage benchmark: SigLIP-so400m/14 at 384 px + projector + 2x2 pooling (LLaVA-OneVision), 32 frames.

Times ``VideoLLM.video_features`` on random weights and random pixels for several video batch sizes and
settings, prints the top CUDA kernels of one call, and compares with the FLOP floor
(tokens x 2 x params + attention) over a measured bf16 matmul rate.

    python bench/bench_vision.py        # prints a table, writes $OUT/bench_vision.json
"""

from __future__ import annotations

import json
import os
import statistics
import sys
from contextlib import nullcontext
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


def main() -> None:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    peaks = measure_peaks()
    llm = build_model("0.5b", build_tiny_tokenizer())
    vt = llm.model.model.vision_tower
    params = model_stats(llm)["vision_params"]
    frames = 32
    tokens = frames * 729
    c = vt.config
    flops = 2 * params * tokens + 4 * c.num_hidden_layers * frames * 729**2 * c.hidden_size
    floor_ms = flops / peaks["matmul_flops"] * 1e3
    g = torch.Generator(device="cuda").manual_seed(0)
    rows = []
    with torch.inference_mode():
        for vb in (1, 4, 8):
            pix = torch.randn(vb, frames, 3, 384, 384, device="cuda", generator=g).to(torch.bfloat16)
            for name, ctx in (("default", nullcontext), ("flash_only", lambda: sdpa_kernel(SDPBackend.FLASH_ATTENTION)),
                              ("cudnn_attn", lambda: sdpa_kernel(SDPBackend.CUDNN_ATTENTION))):
                try:
                    with ctx():
                        ms = timed(lambda pix=pix: llm.video_features(pix)) / vb
                except RuntimeError as exc:
                    print(name, vb, "failed:", str(exc)[:120])
                    continue
                rows.append({"videos": vb, "variant": name, "ms_per_video": ms, "x_floor": ms / floor_ms})
                print(rows[-1], flush=True)
        pix = torch.randn(4, frames, 3, 384, 384, device="cuda", generator=g).to(torch.bfloat16)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            llm.video_features(pix)
            torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=70)
    print(table)
    out = Path(os.environ.get("OUT", ".")) / "bench_vision.json"
    out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "floor_ms_per_video": floor_ms,
                               "peaks": peaks, "rows": rows, "profile": table}, indent=2))
    print(f"\nfloor {floor_ms:.1f} ms/video (32 frames)")
    print(f"{'videos':>6} {'variant':12} {'ms/video':>9} {'x floor':>7}")
    for r in rows:
        print(f"{r['videos']:>6} {r['variant']:12} {r['ms_per_video']:9.1f} {r['x_floor']:7.2f}")


if __name__ == "__main__":
    main()
