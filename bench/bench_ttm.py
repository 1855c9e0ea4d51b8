#!/usr/bin/env python
"""Benchmark of DyCoke temporal token merging (``dycoke.temporal_merge``).

What it does, in order:

1. Correctness on the benchmark device: for a random fp32 input, the device result's indices equal
   the CPU fp32 result (exactly; if not, every difference must be a near-tie of the similarity,
   checked in float64), and for a random bf16 input the device tokens equal a gather of the input.
   On CUDA it also checks that a warm call makes no host synchronisation.
2. Speed: ``temporal_merge`` on [8, 32, 196, 3584], [1, 32, 196, 3584] and [8, 32, 196, 896] bf16
   (K = 0.7), both modes; CUDA events around each call, warm-up first, median of ``--reps`` calls
   rotating among ``--sets`` random input sets (so repeated calls do not hit L2).
3. A bytes floor per case: input read once + outputs (tokens and int64 index) written once, over
   the device-to-device copy bandwidth measured in the same run (bytes read + bytes written).

Prints a table last and writes JSON to ``--out`` (default ``$OUT/bench_ttm.json``, else
``./bench_ttm.json``). ``--cpu --small`` is a seconds-long smoke run on the CPU.

Usage::

    python bench/bench_ttm.py                # GPU (CUDA), full shapes
    python bench/bench_ttm.py --cpu --small  # smoke check anywhere
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from dycoke.ttm import frame_plan, output_length, temporal_merge  # noqa: E402

VISION_BUDGET_MS = 66.0  # SigLIP on 32 frames, 7B shapes, H100 (DESIGN 7)
K = 0.7
MODES = ("reference", "complete")
FULL_CASES = [(8, 32, 196, 3584), (1, 32, 196, 3584), (8, 32, 196, 896)]
SMALL_CASES = [(2, 8, 16, 32), (1, 8, 16, 32)]


# --------------------------------------------------------------------------------------------------
# Correctness
# --------------------------------------------------------------------------------------------------


def _tie_equivalent(frames: torch.Tensor, want: torch.Tensor, got: torch.Tensor, mode: str, tol: float) -> bool:
    """Whether two index results differ only where the float64 similarities are within ``tol``."""
    b, n_frames, t, _ = frames.shape
    plan = frame_plan(n_frames, mode)
    x = frames.double()
    for row in range(b):
        want_f = want[row] // t
        got_f = got[row] // t
        if not torch.equal(want_f, got_f):
            return False
        for f, ref in enumerate(plan):
            w = want[row][want_f == f] - f * t
            g = got[row][got_f == f] - f * t
            if ref < 0:
                if not torch.equal(w, g):
                    return False
                continue
            sim = torch.nn.functional.cosine_similarity(x[row, f], x[row, ref], dim=-1)
            if mode == "complete":  # raster order: compare the selected sets by their similarities
                if not torch.allclose(sim[w].sort().values, sim[g].sort().values, rtol=0, atol=tol):
                    return False
            elif not torch.allclose(sim[w], sim[g], rtol=0, atol=tol):
                return False
    return True


def check_correctness(device: torch.device, small: bool, seed: int = 0) -> dict[str, Any]:
    """Device result vs CPU fp32 result (indices), bf16 tokens vs gather, and no host syncs (CUDA)."""
    shape = (2, 8, 16, 16) if small else (2, 32, 196, 512)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g)
    report: dict[str, Any] = {"shape": list(shape)}
    ok = True
    for mode in MODES:
        cpu = temporal_merge(x, K, mode)
        dev = temporal_merge(x.to(device), K, mode)
        dev_index = dev.index.cpu()
        exact = torch.equal(dev_index, cpu.index)
        tie_ok = exact or _tie_equivalent(x, cpu.index, dev_index, mode, tol=1e-5)
        tokens_ok = torch.equal(dev.tokens.cpu(), x.flatten(1, 2)[torch.arange(shape[0])[:, None], dev_index])
        length_ok = dev.index.shape[-1] == output_length(shape[1], shape[2], K, mode)
        report[f"fp32_{mode}"] = {
            "index_exact": exact,
            "index_equal_up_to_ties": tie_ok,
            "tokens_equal_gather": tokens_ok,
            "length_ok": length_ok,
        }
        ok &= tie_ok and tokens_ok and length_ok

        xb = torch.randn(*shape, generator=g).to(device=device, dtype=torch.bfloat16)
        res = temporal_merge(xb, K, mode)
        rows = torch.arange(shape[0], device=device)[:, None]
        gather_ok = res.tokens.dtype == torch.bfloat16 and torch.equal(res.tokens, xb.flatten(1, 2)[rows, res.index])
        idx = res.index
        unique_ok = all(int(idx[i].unique().numel()) == idx.shape[-1] for i in range(shape[0]))
        range_ok = bool(((idx >= 0) & (idx < shape[1] * shape[2])).all())
        report[f"bf16_{mode}"] = {"tokens_equal_gather": gather_ok, "index_unique": unique_ok, "index_in_range": range_ok}
        ok &= gather_ok and unique_ok and range_ok

    if device.type == "cuda":
        xb = torch.randn(*shape, generator=g).to(device=device, dtype=torch.bfloat16)
        syncs = {}
        for mode in MODES:
            temporal_merge(xb, K, mode)  # warm: layout cached
            torch.cuda.synchronize(device)
            prev = torch.cuda.get_sync_debug_mode()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # "sync debug mode is a prototype feature"
                torch.cuda.set_sync_debug_mode("error")
            try:
                temporal_merge(xb, K, mode)
                syncs[mode] = 0
            except RuntimeError as exc:  # "called a synchronizing CUDA operation"
                syncs[mode] = 1
                report[f"sync_error_{mode}"] = str(exc).splitlines()[0]
            finally:
                torch.cuda.set_sync_debug_mode(prev)
        report["host_syncs_per_warm_call"] = syncs
        ok &= all(v == 0 for v in syncs.values())
    report["ok"] = bool(ok)
    return report


# --------------------------------------------------------------------------------------------------
# Timing
# --------------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(fn, inputs: list[torch.Tensor], reps: int, warmup: int, device: torch.device) -> dict[str, float]:
    """Per-call times in ms (CUDA events on CUDA, host clock elsewhere) and host wall time per call."""
    for i in range(warmup):
        fn(inputs[i % len(inputs)])
    _sync(device)
    per_call: list[float] = []
    if device.type == "cuda":
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
        t0 = time.perf_counter()
        for i in range(reps):
            starts[i].record()
            fn(inputs[i % len(inputs)])
            ends[i].record()
        torch.cuda.synchronize(device)
        wall = (time.perf_counter() - t0) * 1e3 / reps
        per_call = [s.elapsed_time(e) for s, e in zip(starts, ends)]
    else:
        t0 = time.perf_counter()
        for i in range(reps):
            c0 = time.perf_counter()
            fn(inputs[i % len(inputs)])
            per_call.append((time.perf_counter() - c0) * 1e3)
        wall = (time.perf_counter() - t0) * 1e3 / reps
    per_call.sort()
    return {
        "median_ms": statistics.median(per_call),
        "p10_ms": per_call[int(0.1 * (len(per_call) - 1))],
        "p90_ms": per_call[int(0.9 * (len(per_call) - 1))],
        "wall_ms_per_call": wall,
    }


def copy_bandwidth(device: torch.device, nbytes: int, reps: int) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    n = nbytes // 2
    src = torch.randn(n, device=device).to(torch.bfloat16) if device.type == "cuda" else torch.randn(n).bfloat16()
    dst = torch.empty_like(src)
    res = time_calls(lambda s: dst.copy_(s), [src], reps=reps, warmup=3, device=device)
    return 2 * src.numel() * src.element_size() / (res["median_ms"] * 1e-3)


def bench_case(
    shape: tuple[int, int, int, int], mode: str, dtype: torch.dtype, device: torch.device,
    reps: int, warmup: int, n_sets: int, bandwidth: float, seed: int,
) -> dict[str, Any]:
    b, n_frames, t, d = shape
    g = torch.Generator(device=device).manual_seed(seed) if device.type == "cuda" else torch.Generator().manual_seed(seed)
    inputs = [torch.randn(*shape, generator=g, device=device).to(dtype) for _ in range(n_sets)]
    n_out = output_length(n_frames, t, K, mode)
    timing = time_calls(lambda x: temporal_merge(x, K, mode), inputs, reps, warmup, device)
    elem = torch.empty((), dtype=dtype).element_size()
    bytes_in = b * n_frames * t * d * elem
    bytes_out = b * n_out * d * elem + b * n_out * 8  # tokens + int64 index
    floor_ms = (bytes_in + bytes_out) / bandwidth * 1e3
    del inputs
    return {
        "shape": list(shape),
        "dtype": str(dtype).replace("torch.", ""),
        "mode": mode,
        "k": K,
        "tokens_in": n_frames * t,
        "tokens_out": n_out,
        **timing,
        "bytes_in": bytes_in,
        "bytes_out": bytes_out,
        "floor_ms": floor_ms,
        "ratio_to_floor": timing["median_ms"] / floor_ms,
        "pct_of_vision_budget": 100.0 * timing["median_ms"] / VISION_BUDGET_MS,
    }


# --------------------------------------------------------------------------------------------------
# Entry points
# --------------------------------------------------------------------------------------------------


def default_out() -> Path:
    out = os.environ.get("OUT")
    return Path(out) / "bench_ttm.json" if out else Path("bench_ttm.json")


def run(
    cpu: bool = False, small: bool = False, reps: int = 50, warmup: int = 10, n_sets: int = 3,
    out: str | Path | None = None, seed: int = 0, quiet: bool = False,
) -> dict[str, Any]:
    """Run the whole benchmark; returns (and writes) the JSON report."""
    if not cpu and not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run with --cpu (and --small for a smoke check)")
    device = torch.device("cpu") if cpu else torch.device("cuda", torch.cuda.current_device())
    log = (lambda *a: None) if quiet else (lambda *a: print(*a, flush=True))
    torch.manual_seed(seed)

    info: dict[str, Any] = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "reps": reps,
        "warmup": warmup,
        "input_sets": n_sets,
        "vision_budget_ms": VISION_BUDGET_MS,
    }
    log(f"device: {info['device']}  torch {info['torch']}")

    correctness = check_correctness(device, small, seed=seed)
    log("correctness:", json.dumps(correctness))

    bw_bytes = (8 << 20) if small else (1 << 30)
    bandwidth = copy_bandwidth(device, bw_bytes, reps=max(5, min(reps, 20)))
    info["copy_bandwidth_gb_s"] = bandwidth / 1e9
    log(f"device-to-device copy bandwidth: {bandwidth / 1e9:.1f} GB/s (read + write)")

    cases = SMALL_CASES if small else FULL_CASES
    results = []
    for i, shape in enumerate(cases):
        for mode in MODES:
            r = bench_case(shape, mode, torch.bfloat16, device, reps, warmup, n_sets, bandwidth, seed + i)
            results.append(r)
            log(f"  {shape} {mode}: {r['median_ms']:.3f} ms")

    report = {"info": info, "correctness": correctness, "results": results}
    path = Path(out) if out is not None else default_out()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2))

    lines = [
        "",
        f"TTM (K={K}, bf16) on {info['device']}, median of {reps} calls over {n_sets} input sets; "
        f"copy bw {bandwidth / 1e9:.0f} GB/s",
        f"{'shape':<22} {'mode':<10} {'out tok':>7} {'ms':>8} {'p90 ms':>8} {'wall ms':>8} "
        f"{'floor ms':>8} {'x floor':>7} {'% 66ms':>7}",
    ]
    for r in results:
        lines.append(
            f"{'x'.join(map(str, r['shape'])):<22} {r['mode']:<10} {r['tokens_out']:>7} {r['median_ms']:>8.3f} "
            f"{r['p90_ms']:>8.3f} {r['wall_ms_per_call']:>8.3f} {r['floor_ms']:>8.3f} "
            f"{r['ratio_to_floor']:>7.1f} {r['pct_of_vision_budget']:>7.2f}"
        )
    lines.append(f"correctness: {'OK' if correctness['ok'] else 'FAILED'}   json: {path}")
    log("\n".join(lines))
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cpu", action="store_true", help="run on the CPU (no CUDA needed)")
    ap.add_argument("--small", action="store_true", help="tiny shapes (smoke check)")
    ap.add_argument("--reps", type=int, default=50, help="timed calls per case (median reported)")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--sets", type=int, default=3, help="random input sets rotated between calls")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="JSON path (default $OUT/bench_ttm.json or ./bench_ttm.json)")
    args = ap.parse_args(argv)
    report = run(cpu=args.cpu, small=args.small, reps=args.reps, warmup=args.warmup, n_sets=args.sets,
                 out=args.out, seed=args.seed)
    return 0 if report["correctness"]["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
