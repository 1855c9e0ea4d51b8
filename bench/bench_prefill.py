"""Prefill of one video prompt on the 7B decoder: where the time goes (the engine prefills one sequence
at a time; at batch 128 prefill is ~70% of the LLM stage's wall time, see bench_compaction.py). The
default prompt, 3204 tokens, is what the engine prefills for 32 frames after DyCoke TTM (K=0.7).

Variants (bf16, a DyCoke-compressed prompt of ``--tokens`` tokens, random weights at real shapes):
  engine      : the engine's call (DyCoke attention function registered, writes a SlotKVCache row)
  no_cache    : the same decoder call without a cache (use_cache=False)
  hf_sdpa     : the decoder on a second model instance left on transformers' own sdpa attention
Correctness: last-token logits of the three agree (bf16 tolerance). Then a torch.profiler table of the
engine variant's top CUDA kernels, and the FLOP floor at the measured matmul rate.

    python bench/bench_prefill.py          # prints the table last, writes $OUT/bench_prefill.json
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_engine import build_model, measure_peaks, model_stats  # noqa: E402
from bench.bench_vision import timed  # noqa: E402
from dycoke.attention import install  # noqa: E402
from dycoke.kv_cache import SlotKVCache  # noqa: E402
from dycoke.testing import build_tiny_tokenizer  # noqa: E402


def main() -> None:
    import argparse

    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=3204)
    ap.add_argument("--shape", default="7b")
    args = ap.parse_args()
    out_dir = Path(os.environ.get("OUT", "."))
    peaks = measure_peaks()
    tok = build_tiny_tokenizer()
    llm = build_model(args.shape, tok)
    st = model_stats(llm)
    lm, head = llm.language_model, llm.lm_head
    c = lm.config
    head_dim = c.hidden_size // c.num_attention_heads
    L = args.tokens
    g = torch.Generator(device="cuda").manual_seed(0)
    x = (torch.randn(1, L, c.hidden_size, device="cuda", generator=g) * 0.02).to(torch.bfloat16)
    pos = torch.arange(L, device="cuda")[None]
    cache = SlotKVCache(c.num_hidden_layers, 1, c.num_key_value_heads, L + 64, head_dim, torch.bfloat16, "cuda")

    def run_hf():
        return head(lm(inputs_embeds=x, position_ids=pos, use_cache=False).last_hidden_state[:, -1])

    with torch.inference_mode():
        ref = run_hf().float()
        t_hf = timed(run_hf)
        install(lm)  # from here on the decoder routes attention through dycoke_sdpa (as the engine does)

        def run_engine():
            cache.begin_prefill(0, 64)
            try:
                h = lm(inputs_embeds=x, position_ids=pos, past_key_values=cache,
                       attention_mask={"full_attention": None}, use_cache=True).last_hidden_state
            finally:
                cache.end_prefill()
            return head(h[:, -1])

        def run_no_cache():
            return head(lm(inputs_embeds=x, position_ids=pos, attention_mask={"full_attention": None},
                           use_cache=False).last_hidden_state[:, -1])

        out_engine, out_nc = run_engine().float(), run_no_cache().float()
        t_engine, t_nc = timed(run_engine), timed(run_no_cache)
        err = {"engine_vs_hf": (out_engine - ref).abs().max().item() / ref.abs().max().item(),
               "no_cache_vs_hf": (out_nc - ref).abs().max().item() / ref.abs().max().item()}
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            run_engine()
            torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=70)

    flops = 2 * st["lm_params"] * L + 2 * st["layers"] * st["hidden"] * L * L  # weights + causal QK^T, PV
    floor_ms = flops / peaks["matmul_flops"] * 1e3
    report = {"device": torch.cuda.get_device_name(), "tokens": L, "ms": {"engine": t_engine, "no_cache": t_nc,
              "hf_sdpa": t_hf}, "floor_ms": floor_ms, "rel_err": err, "peaks": peaks}
    (out_dir / "bench_prefill.json").write_text(json.dumps(report, indent=2))
    print(table)
    print(f"device {report['device']}, matmul {peaks['matmul_flops'] / 1e12:.0f} TFLOP/s, prompt {L} tokens, "
          f"rel. err of last-token logits vs hf_sdpa: {err}")
    print(f"{'variant':10} {'ms':>7} {'x floor':>8}")
    for k, v in report["ms"].items():
        print(f"{k:10} {v:7.2f} {v / floor_ms:8.2f}")
    print(f"{'floor':10} {floor_ms:7.2f}")


if __name__ == "__main__":
    main()
