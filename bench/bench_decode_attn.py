"""Decode-step attention at the engine's 7B shape: SDPA backends vs the split-K Triton kernel.

One layer's attention of a decode step: ``rows`` queries, 28 query heads over 4 KV heads (G = 7), head
dim 128, a slot cache of ``slots`` positions, each row reading its first ``length`` slots (about 3,200 for a
32-frame video with DyCoke) under an additive mask (padding and DyCoke's pruned positions at -inf).
Checks every variant against fp32 math, times each as a replayed CUDA graph (CUDA events, median of 20), and reports the achieved
bandwidth over the bytes a row must read (its K and V up to its length) against the measured copy rate.

The cascade section: the same 256 rows as the tasks of videos (groups of 4, 3, 3, 1 rows: the realistic mix
after its short MCQ rows are refilled), each group's ~3,160-slot prefix shared and 30-160 own slots per row;
``split`` reads every row's copy, ``cascade_*`` reads a group's prefix once
(:func:`dycoke.decode_attention.cascade_attention`); bandwidth there is over the bytes the cascade must read.

    python bench/bench_decode_attn.py       # table on stdout, $OUT/bench_decode_attn.json
    python bench/bench_decode_attn.py --cascade-only
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.bench_engine import measure_peaks  # noqa: E402
from bench.bench_vision import timed  # noqa: E402
from dycoke.decode_attention import cascade_attention, decode_attention, share_groups  # noqa: E402


def measure(rows, peaks, g, kv_heads, groups, dim, slots) -> list[dict]:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    rows_out = []
    q = torch.randn(rows, kv_heads, groups, dim, device="cuda", generator=g, dtype=torch.bfloat16)
    k = torch.randn(rows, kv_heads, slots, dim, device="cuda", generator=g, dtype=torch.bfloat16)
    v = torch.randn(rows, kv_heads, slots, dim, device="cuda", generator=g, dtype=torch.bfloat16)
    lengths = torch.randint(3100, 3300, (rows,), device="cuda", generator=g)
    valid = torch.arange(slots, device="cuda") < lengths[:, None]
    keep = valid & (torch.rand(rows, slots, device="cuda", generator=g) > 0.5)
    bias = torch.zeros(rows, 1, 1, slots, device="cuda", dtype=torch.bfloat16)
    bias.masked_fill_(~keep[:, None, None, :], float("-inf"))
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=bias.float(), scale=dim**-0.5)
    need = float(lengths.sum()) * kv_heads * dim * 2 * 2  # K and V bytes up to each row's length
    variants = {
        "sdpa_default": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=dim**-0.5),
        "sdpa_efficient": lambda: _with(sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION),
                                        lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=dim**-0.5)),
        "sdpa_cudnn": lambda: _with(sdpa_kernel(SDPBackend.CUDNN_ATTENTION),
                                    lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=dim**-0.5)),
    }
    variants["triton_auto"] = lambda: decode_attention(q, k, v, bias, lengths, dim**-0.5)
    for splits in (1, 2, 4):
        for bn, warps, stages in ((64, 4, 2), (64, 4, 3), (128, 4, 2), (128, 8, 3), (32, 4, 3)):
            variants[f"tr_s{splits}_b{bn}w{warps}s{stages}"] = (
                lambda s=splits, b=bn, w=warps, st=stages: decode_attention(
                    q, k, v, bias, lengths, dim**-0.5, splits=s, block_n=b, num_warps=w, num_stages=st))
    for name, fn in variants.items():
        if rows == 64 and name.startswith("tr_"):
            continue
        try:
            err = (fn().float() - ref).abs().max().item()
            ms = timed(_graphed(fn), reps=20)  # replayed as the engine's captured step runs it
        except RuntimeError as exc:
            print(rows, name, "failed:", str(exc)[:160], flush=True)
            continue
        r = {"rows": rows, "variant": name, "ms": ms, "max_err": err,
             "bw_fraction": need / (ms / 1e3) / peaks["copy_bytes_per_s"]}
        rows_out.append(r)
        print(r, flush=True)
    return rows_out


def measure_cascade(peaks, g, kv_heads, groups, dim, slots, rows=256) -> list[dict]:
    sizes = [4, 3, 3, 1] * (rows // 11) + [1] * (rows % 11)
    group = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes)).cuda()
    shared = torch.randint(3140, 3180, (len(sizes),), device="cuda", generator=g)[group]
    lengths = shared + torch.randint(30, 160, (rows,), device="cuda", generator=g)
    members = share_groups(group, 4)
    q = torch.randn(rows, kv_heads, groups, dim, device="cuda", generator=g, dtype=torch.bfloat16)
    k = torch.randn(rows, kv_heads, slots, dim, device="cuda", generator=g, dtype=torch.bfloat16)
    v = torch.randn(rows, kv_heads, slots, dim, device="cuda", generator=g, dtype=torch.bfloat16)
    lead = members[:, 0] >= 0
    for r in (~lead).nonzero().flatten().tolist():  # members hold their leader's prefix (setup only)
        src = int((members == r).nonzero()[0, 0])
        k[r, :, : shared[r]] = k[src, :, : shared[r]]
        v[r, :, : shared[r]] = v[src, :, : shared[r]]
    valid = torch.arange(slots, device="cuda") < lengths[:, None]
    bias = torch.zeros(rows, 1, 1, slots, device="cuda", dtype=torch.bfloat16)
    bias.masked_fill_(~valid[:, None, None, :], float("-inf"))
    ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=bias.float(), scale=dim**-0.5)
    own = float((lengths - shared).sum() + shared[lead].sum())
    per_slot = kv_heads * dim * 2 * 2
    variants = {"split": (lambda: decode_attention(q, k, v, bias, lengths, dim**-0.5), float(lengths.sum()))}
    for splits in (1, 2, 3, 4, 8):
        for bn, warps, stages in ((64, 4, 2), (64, 4, 3), (32, 4, 3), (128, 8, 3)):
            variants[f"cascade_s{splits}_b{bn}w{warps}s{stages}"] = (
                lambda s=splits, b=bn, w=warps, st=stages: cascade_attention(
                    q, k, v, bias, lengths, shared, members, dim**-0.5, splits=s, block_n=b, num_warps=w,
                    num_stages=st), own)
    variants["cascade_auto"] = (lambda: cascade_attention(q, k, v, bias, lengths, shared, members, dim**-0.5), own)
    out = []
    for name, (fn, need) in variants.items():
        try:
            err = (fn().float() - ref).abs().max().item()
            ms = timed(_graphed(fn), reps=20)
        except RuntimeError as exc:
            print("cascade", name, "failed:", str(exc)[:160], flush=True)
            continue
        r = {"rows": rows, "variant": name, "ms": ms, "max_err": err,
             "bw_fraction": need * per_slot / (ms / 1e3) / peaks["copy_bytes_per_s"]}
        out.append(r)
        print(r, flush=True)
    return out


def main() -> None:
    peaks = measure_peaks()
    kv_heads, groups, dim, slots = 4, 7, 128, 3328
    g = torch.Generator(device="cuda").manual_seed(0)
    rows_out = []
    if "--cascade-only" not in sys.argv:
        for rows in (64, 256):
            rows_out += measure(rows, peaks, g, kv_heads, groups, dim, slots)
    rows_out += measure_cascade(peaks, g, kv_heads, groups, dim, slots)
    out = Path(os.environ.get("OUT", ".")) / "bench_decode_attn.json"
    out.write_text(json.dumps({"device": torch.cuda.get_device_name(), "peaks": peaks, "rows": rows_out}, indent=2))
    print(f"\n{'rows':>5} {'variant':20} {'ms/layer':>9} {'of copy BW':>10} {'max err':>8}")
    for r in rows_out:
        print(f"{r['rows']:>5} {r['variant']:20} {r['ms']:9.3f} {r['bw_fraction']:10.2f} {r['max_err']:8.1e}")


def _graphed(fn):
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def _with(ctx, fn):
    with ctx:
        return fn()


if __name__ == "__main__":
    main()
