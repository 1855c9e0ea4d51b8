"""LLM-stage benchmark: HF ``generate`` (batch 1, no compression) vs our engine, with and without DyCoke.

Random weights at real LLaVA-OneVision shapes (speed does not depend on weight values), bf16, 32 frames
per video at 384 px, a ~30-token question, exactly ``--new-tokens`` generated tokens (EOS ignored).
Timed region: preprocessed pixels already on the GPU -> generated ids (vision tower, TTM, prefill, decode).

Variants:
  (a) hf_generate_b1   : ``model.generate`` batch 1, no compression (the reference's way); measured on
                          ``--hf-videos`` videos and reported per video
  (b) engine_off       : our engine, no compression, best batch size of ``--batches``
  (c) engine_dycoke    : our engine, DyCoke K=0.7 L=3 P=0.7, best batch size
  (d) engine_dycoke_b1 : as (c) at batch 1

Speed-of-light floor per run: (vision + prefill FLOPs) / measured bf16 matmul rate + decode bytes
(weights once per step + KV cache read per step) / measured copy bandwidth.

    python bench/bench_engine.py --shape 7b --shape 0.5b        # prints a table, writes $OUT/bench_engine.json
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dycoke import DyCokeConfig  # noqa: E402
from dycoke.engine import Engine, GenerationSettings, Request  # noqa: E402
from dycoke.llava import PixelSpec, VideoLLM  # noqa: E402
from dycoke.testing import build_tiny_tokenizer  # noqa: E402

SHAPES = {
    "7b": dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
               num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
    "0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                 num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
}
SIGLIP = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=26, num_attention_heads=16,
              image_size=384, patch_size=14, vision_use_head=False)
QUESTION = ("Watch the clip carefully and describe what the main person does, which objects they use, "
            "and how the scene changes from start to end.")


def build_model(shape: str, tokenizer) -> VideoLLM:
    from transformers import (
        LlavaOnevisionConfig,
        LlavaOnevisionForConditionalGeneration,
        Qwen2Config,
        SiglipVisionConfig,
    )

    text = Qwen2Config(max_position_embeddings=32768, rope_theta=1e6, **SHAPES[shape],
                       eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"), pad_token_id=tokenizer.pad_token_id)
    cfg = LlavaOnevisionConfig(vision_config=SiglipVisionConfig(**SIGLIP).to_dict(), text_config=text.to_dict(),
                               video_token_index=tokenizer.convert_tokens_to_ids("<video>"),
                               image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                               vision_feature_select_strategy="full", vision_feature_layer=-1,
                               tie_word_embeddings=SHAPES[shape]["tie_word_embeddings"])
    cfg.text_config._attn_implementation = "sdpa"
    cfg.vision_config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlavaOnevisionForConditionalGeneration._from_config(cfg, dtype=torch.bfloat16, attn_implementation="sdpa")
    model.eval()
    return VideoLLM(model, tokenizer, PixelSpec(384, (0.5,) * 3, (0.5,) * 3), f"random-llava-ov-{shape}")


def measure_peaks() -> dict:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    src = torch.randn(1 << 30, device="cuda", dtype=torch.bfloat16)  # 2 GiB
    dst = torch.empty_like(src)
    for _ in range(3):
        a @ b
        dst.copy_(src)
    ms_mm, ms_cp = [], []
    for _ in range(10):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record(); a @ b; e.record(); torch.cuda.synchronize(); ms_mm.append(s.elapsed_time(e))  # noqa: E702
        s.record(); dst.copy_(src); e.record(); torch.cuda.synchronize(); ms_cp.append(s.elapsed_time(e))  # noqa: E702
    flops = 2 * 8192**3 / (statistics.median(ms_mm) / 1e3)
    bw = 2 * src.numel() * 2 / (statistics.median(ms_cp) / 1e3)
    del a, b, src, dst
    torch.cuda.empty_cache()
    return {"matmul_flops": flops, "copy_bytes_per_s": bw}


def model_stats(llm: VideoLLM) -> dict:
    lm = llm.language_model
    c = lm.config
    head_dim = c.hidden_size // c.num_attention_heads
    lm_params = sum(p.numel() for p in lm.parameters()) + (0 if c.tie_word_embeddings else llm.lm_head.weight.numel())
    vis_params = sum(p.numel() for p in llm.model.model.vision_tower.parameters()) + \
        sum(p.numel() for p in llm.model.model.multi_modal_projector.parameters())
    return {"lm_params": lm_params, "vision_params": vis_params, "layers": c.num_hidden_layers,
            "hidden": c.hidden_size, "kv_bytes_per_token": 2 * c.num_hidden_layers * c.num_key_value_heads * head_dim * 2}


def floor_seconds(st: dict, peaks: dict, videos: int, frames: int, prompt_len: int, new_tokens: int, batch: int) -> float:
    """Speed-of-light time for ``videos`` videos decoded ``batch`` at a time."""
    vis_tokens = frames * 729
    vision = 2 * st["vision_params"] * vis_tokens
    prefill = 2 * st["lm_params"] * prompt_len + 2 * st["layers"] * st["hidden"] * prompt_len**2  # QK^T + PV, causal
    steps = new_tokens - 1
    n_batches = -(-videos // batch)
    weight_bytes = st["lm_params"] * 2
    kv_read = st["kv_bytes_per_token"] * (prompt_len + new_tokens / 2) * videos
    decode_bytes = n_batches * steps * weight_bytes + steps * kv_read
    return videos * (vision + prefill) / peaks["matmul_flops"] + decode_bytes / peaks["copy_bytes_per_s"]


def run_hf(llm: VideoLLM, pixels: torch.Tensor, n_videos: int, new_tokens: int) -> dict:
    ids = llm.prompt_ids(QUESTION)
    p = ids.index(llm.video_token_id)
    expanded = ids[:p] + [llm.video_token_id] * (pixels.shape[1] * llm.tokens_per_frame + 1) + ids[p + 1 :]
    inp = torch.tensor([expanded], device="cuda")
    att = torch.ones_like(inp)
    kw = dict(input_ids=inp, attention_mask=att, do_sample=False, pad_token_id=llm.tokenizer.pad_token_id)
    with torch.inference_mode():
        llm.model.generate(pixel_values_videos=pixels[:1], max_new_tokens=4, min_new_tokens=4, **kw)  # warm-up
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        ttft, total = [], []
        for i in range(n_videos):
            pv = pixels[i % pixels.shape[0]][None]
            t0 = time.perf_counter()
            llm.model.generate(pixel_values_videos=pv, max_new_tokens=1, min_new_tokens=1, **kw)
            torch.cuda.synchronize()
            ttft.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            out = llm.model.generate(pixel_values_videos=pv, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kw)
            torch.cuda.synchronize()
            total.append(time.perf_counter() - t0)
            assert out.shape[1] - len(expanded) == new_tokens
    per_video = statistics.median(total)
    return {"videos_per_s": 1 / per_video, "ttft_s": statistics.median(ttft),
            "decode_tok_per_s": (new_tokens - 1) / max(per_video - statistics.median(ttft), 1e-9),
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30, "per_video_s": per_video,
            "prompt_len": len(expanded), "batch": 1, "videos_timed": n_videos}


def run_engine(llm: VideoLLM, cfg: DyCokeConfig, pixels: torch.Tensor, n_videos: int, new_tokens: int,
               batch: int, vision_batch: int = 4) -> dict:
    engine = Engine(llm, cfg, max_batch_size=batch)
    settings = GenerationSettings(max_new_tokens=new_tokens, ignore_eos=True)

    def one_pass(count: int):
        t_start = time.perf_counter()
        vis = []
        for i in range(0, count, vision_batch):
            idx = [(i + j) % pixels.shape[0] for j in range(min(vision_batch, count - i))]
            vis.extend(llm.encode_pixels(pixels[idx], cfg))
        torch.cuda.synchronize()
        t_vis = time.perf_counter() - t_start
        reqs = [Request(f"v{i}", v, QUESTION, settings) for i, v in enumerate(vis)]
        res = engine.generate(reqs)
        torch.cuda.synchronize()
        return time.perf_counter() - t_start, t_vis, res

    with torch.inference_mode():
        one_pass(min(batch, n_videos))  # warm-up + graph capture at this shape
        torch.cuda.synchronize()
        engine.stats.clear()
        torch.cuda.reset_peak_memory_stats()
        wall, t_vis, res = one_pass(n_videos)
    assert all(len(r.token_ids) == new_tokens for r in res), "engine must emit exactly new_tokens"
    prefill = engine.stats["prefix_prefill_s"] + engine.stats["suffix_prefill_s"]
    decode = engine.stats["decode_s"]
    return {"videos_per_s": n_videos / wall, "ttft_s": t_vis / n_videos + statistics.median(r.prefill_s for r in res),
            "decode_tok_per_s": n_videos * (new_tokens - 1) / max(decode, 1e-9),
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30, "wall_s": wall, "vision_s": t_vis,
            "prefill_s": prefill, "decode_s": decode, "prompt_len": res[0].prompt_tokens, "batch": batch,
            "visual_tokens": res[0].visual_tokens, "visual_attended": statistics.mean(r.visual_tokens_attended for r in res),
            "videos_timed": n_videos}


def check_correctness(llm: VideoLLM, pixels: torch.Tensor) -> dict:
    """Engine (no compression, bf16, CUDA graph) vs HF generate on the same video: agreement of greedy tokens."""
    cfg = DyCokeConfig.off()
    with torch.inference_mode():
        vis = llm.encode_pixels(pixels[:1], cfg)
        eng = Engine(llm, cfg, max_batch_size=2).generate([Request("c", vis[0], QUESTION, GenerationSettings(16, ignore_eos=True))])[0]
        ids = llm.prompt_ids(QUESTION)
        p = ids.index(llm.video_token_id)
        expanded = ids[:p] + [llm.video_token_id] * (vis[0].num_full + 1) + ids[p + 1 :]
        inp = torch.tensor([expanded], device="cuda")
        out = llm.model.generate(input_ids=inp, attention_mask=torch.ones_like(inp), pixel_values_videos=pixels[:1],
                                 max_new_tokens=16, min_new_tokens=16, do_sample=False)[0, len(expanded):].tolist()
    agree = 0
    for a, b in zip(eng.token_ids, out):
        if a != b:
            break
        agree += 1
    return {"prefix_agreement_tokens": agree, "of": 16}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", action="append", choices=sorted(SHAPES), help="model shape(s); default 7b and 0.5b")
    ap.add_argument("--videos", type=int, default=128)
    ap.add_argument("--hf-videos", type=int, default=6)
    ap.add_argument("--b1-videos", type=int, default=8)
    ap.add_argument("--frames", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batches", default="64,128", help="engine batch sizes to try (best is reported)")
    args = ap.parse_args()
    shapes = args.shape or ["7b", "0.5b"]
    out_dir = Path(os.environ.get("OUT", "."))
    peaks = measure_peaks()
    print(f"device {torch.cuda.get_device_name()}  matmul {peaks['matmul_flops'] / 1e12:.0f} TFLOP/s  "
          f"copy {peaks['copy_bytes_per_s'] / 1e12:.2f} TB/s", flush=True)
    tokenizer = build_tiny_tokenizer()
    report = {"device": torch.cuda.get_device_name(), "peaks": peaks, "args": vars(args), "shapes": {}}
    rows = []
    for shape in shapes:
        llm = build_model(shape, tokenizer)
        st = model_stats(llm)
        g = torch.Generator(device="cuda").manual_seed(0)
        pixels = torch.randn(8, args.frames, 3, 384, 384, device="cuda", generator=g).clamp_(-1, 1).to(torch.bfloat16)
        res = {"correctness": check_correctness(llm, pixels)} if shape == shapes[0] else {}
        print(shape, "correctness", res.get("correctness"), flush=True)
        res["a_hf_generate_b1"] = run_hf(llm, pixels, args.hf_videos, args.new_tokens)
        print(shape, "a", res["a_hf_generate_b1"], flush=True)
        dyc = DyCokeConfig(prune_ratio_k=0.7, dp_layer=3, dp_prune_ratio=0.7)
        for name, cfg in (("b_engine_off", DyCokeConfig.off()), ("c_engine_dycoke", dyc)):
            best = None
            for bs in [int(x) for x in args.batches.split(",")]:
                try:
                    r = run_engine(llm, cfg, pixels, args.videos, args.new_tokens, bs)
                except torch.cuda.OutOfMemoryError:
                    print(shape, name, f"batch {bs}: out of memory", flush=True)
                    torch.cuda.empty_cache()
                    continue
                print(shape, name, bs, {k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()}, flush=True)
                if best is None or r["videos_per_s"] > best["videos_per_s"]:
                    best = r
                torch.cuda.empty_cache()
            res[name] = best
        res["d_engine_dycoke_b1"] = run_engine(llm, dyc, pixels, args.b1_videos, args.new_tokens, 1, vision_batch=1)
        for key, r in res.items():
            if key == "correctness" or r is None:
                continue
            r["floor_s_per_video"] = floor_seconds(st, peaks, 1 if r["batch"] == 1 else r["videos_timed"], args.frames,
                                                   r["prompt_len"], args.new_tokens, r["batch"]) / (1 if r["batch"] == 1 else r["videos_timed"])
            r["x_floor"] = (1 / r["videos_per_s"]) / r["floor_s_per_video"]
            rows.append((shape, key, r))
        a, b, c, d = (res[k] for k in ("a_hf_generate_b1", "b_engine_off", "c_engine_dycoke", "d_engine_dycoke_b1"))
        res["ratios"] = {"c_over_a": c["videos_per_s"] / a["videos_per_s"], "c_over_b": c["videos_per_s"] / b["videos_per_s"],
                         "d_latency_speedup_vs_a": a["per_video_s"] * d["videos_per_s"],
                         "d_memory_ratio_vs_a": a["peak_gib"] / d["peak_gib"]}
        report["shapes"][shape] = res
        del llm
        torch.cuda.empty_cache()
    (out_dir / "bench_engine.json").write_text(json.dumps(report, indent=2, default=float))
    print(f"\n{'shape':5} {'variant':20} {'batch':>5} {'videos/s':>9} {'TTFT s':>7} {'dec tok/s':>10} {'peak GiB':>8} {'x floor':>7}")
    for shape, key, r in rows:
        print(f"{shape:5} {key:20} {r['batch']:>5} {r['videos_per_s']:9.3f} {r['ttft_s']:7.3f} {r['decode_tok_per_s']:10.0f} "
              f"{r['peak_gib']:8.1f} {r['x_floor']:7.2f}")
    for shape, res in report["shapes"].items():
        print(shape, {k: round(v, 2) for k, v in res["ratios"].items()})


if __name__ == "__main__":
    main()
