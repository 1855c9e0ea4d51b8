"""Batch compaction in the engine: answers of different lengths, compaction off vs on.

Real answers end at different steps (EOS); without compaction a batch keeps decoding every row until its
longest answer ends. This benchmark gives each of ``--videos`` requests its own answer length (drawn once,
seeded: log-normal around ``--median-tokens``, clipped to [8, ``--max-tokens``], EOS ignored so the
lengths are exact) and times the LLM stage (prefill + decode, visual tokens precomputed) of the DyCoke
engine at batch ``--batch`` with ``compact_ratio`` 0 (off) and 0.5.

Correctness on the GPU: greedy tokens of every request, compaction on vs off (bf16: a compacted batch
runs its kernels at other shapes, so near-tied logits of random weights may flip; the share of identical
answers is reported), and the exact answer lengths.

    python bench/bench_compaction.py --shape 7b        # prints a table, writes $OUT/bench_compaction.json
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

from bench.bench_engine import QUESTION, build_model  # noqa: E402
from dycoke import DyCokeConfig  # noqa: E402
from dycoke.engine import Engine, GenerationSettings, Request  # noqa: E402
from dycoke.testing import build_tiny_tokenizer  # noqa: E402


def answer_lengths(n: int, median: int, max_tokens: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    x = torch.exp(torch.randn(n, generator=g) * 0.8) * median
    return [int(v) for v in x.round().clamp(8, max_tokens)]


def run(llm, cfg: DyCokeConfig, vis: list, lengths: list[int], batch: int, compact_ratio: float, repeats: int) -> dict:
    engine = Engine(llm, cfg, max_batch_size=batch, compact_ratio=compact_ratio)
    reqs = [Request(f"v{i}", v, QUESTION, GenerationSettings(max_new_tokens=n, ignore_eos=True))
            for i, (v, n) in enumerate(zip(vis, lengths))]
    with torch.inference_mode():
        engine.generate(reqs[:batch])  # warm-up: graph capture at the full shape
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        walls, decodes = [], []
        for _ in range(repeats):
            before = engine.compactions
            engine.stats.clear()
            t0 = time.perf_counter()
            res = engine.generate(reqs)
            torch.cuda.synchronize()
            walls.append(time.perf_counter() - t0)
            decodes.append(engine.stats["decode_s"])
            compactions = engine.compactions - before
    assert [len(r.token_ids) for r in res] == lengths, "every answer must have its exact length"
    wall = statistics.median(walls)
    tokens = sum(lengths)
    return {"compact_ratio": compact_ratio, "batch": batch, "videos": len(reqs), "wall_s": wall,
            "walls_s": walls, "decode_s": statistics.median(decodes), "videos_per_s": len(reqs) / wall,
            "tok_per_s": tokens / wall, "decode_tok_per_s": tokens / statistics.median(decodes),
            "compactions_per_pass": compactions, "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
            "token_ids": [r.token_ids for r in res]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shape", default="7b")
    ap.add_argument("--videos", type=int, default=128)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--frames", type=int, default=32)
    ap.add_argument("--median-tokens", type=int, default=64)
    ap.add_argument("--max-tokens", type=int, default=256)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    out_dir = Path(os.environ.get("OUT", "."))
    llm = build_model(args.shape, build_tiny_tokenizer())
    cfg = DyCokeConfig(prune_ratio_k=0.7, dp_layer=3, dp_prune_ratio=0.7)
    g = torch.Generator(device="cuda").manual_seed(0)
    pixels = torch.randn(8, args.frames, 3, 384, 384, device="cuda", generator=g).clamp_(-1, 1).to(torch.bfloat16)
    with torch.inference_mode():
        base = llm.encode_pixels(pixels, cfg)
    vis = [base[i % len(base)] for i in range(args.videos)]
    lengths = answer_lengths(args.videos, args.median_tokens, args.max_tokens)
    print(f"device {torch.cuda.get_device_name()}; {args.videos} answers, tokens: median "
          f"{statistics.median(lengths)}, mean {statistics.mean(lengths):.0f}, max {max(lengths)}, total {sum(lengths)}",
          flush=True)
    results = []
    for ratio in (0.0, 0.5):
        r = run(llm, cfg, vis, lengths, args.batch, ratio, args.repeats)
        print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items() if k != "token_ids"}, flush=True)
        results.append(r)
        torch.cuda.empty_cache()
    off, on = results
    same = sum(a == b for a, b in zip(off["token_ids"], on["token_ids"]))
    report = {"device": torch.cuda.get_device_name(), "args": vars(args), "lengths": lengths,
              "identical_answers": same, "of": len(lengths),
              "speedup_wall": off["wall_s"] / on["wall_s"], "speedup_decode": off["decode_s"] / on["decode_s"],
              "runs": [{k: v for k, v in r.items() if k != "token_ids"} for r in results]}
    (out_dir / "bench_compaction.json").write_text(json.dumps(report, indent=2))
    print(f"\n{'compaction':>10} {'batch':>5} {'wall s':>7} {'decode s':>8} {'videos/s':>8} {'tok/s':>7} "
          f"{'compactions':>11} {'peak GiB':>8}")
    for r in results:
        print(f"{r['compact_ratio']:>10} {r['batch']:>5} {r['wall_s']:7.2f} {r['decode_s']:8.2f} {r['videos_per_s']:8.2f} "
              f"{r['tok_per_s']:7.0f} {r['compactions_per_pass']:>11} {r['peak_gib']:8.1f}")
    print(f"speedup: wall {report['speedup_wall']:.2f}x, decode {report['speedup_decode']:.2f}x; "
          f"identical answers {same}/{len(lengths)}")


if __name__ == "__main__":
    main()
