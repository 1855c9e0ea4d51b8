"""Where the fused stage's GPU waits: kernel-timeline gaps attributed to what the host was doing (bench only).

:func:`labelled` wraps the engine's and the stage's host-side steps in ``torch.profiler.record_function`` ranges
(monkeypatched on the classes for one run, nothing in the library changes). :func:`gap_report` merges the CUDA
kernel intervals of a ``torch.profiler`` trace, finds the idle gaps, and charges each gap to the innermost labelled
range and the innermost CPU op that were running when the GPU went idle.
"""

from __future__ import annotations

import bisect
import collections
import contextlib
import functools

import torch

#: (module, owner, attribute) of the host-side steps to label
TARGETS = (
    ("dycoke.engine", "Engine", "add"), ("dycoke.engine", "Engine", "_admit"), ("dycoke.engine", "Engine", "_harvest"),
    ("dycoke.engine", "Engine", "_maybe_compact"), ("dycoke.engine", "Engine", "step"),
    ("dycoke.engine", None, "prefix_forward"), ("dycoke.engine", None, "suffix_forward"),
    ("dycoke.engine", None, "start_rows"), ("dycoke.llava", "VideoLLM", "encode"),
    ("dycoke.serving", "EngineLoop", "_resolve"), ("pipeline.stages", "GenerateStage", "generate_rows"),
)


@contextlib.contextmanager
def labelled():
    """Label :data:`TARGETS` for the duration of the block."""
    import importlib

    saved = []
    for mod_name, owner_name, attr in TARGETS:
        owner = importlib.import_module(mod_name)
        owner = getattr(owner, owner_name) if owner_name else owner
        fn = getattr(owner, attr)
        name = f"{owner_name or mod_name.split('.')[-1]}.{attr}"

        def wrap(fn=fn, name=name):
            @functools.wraps(fn)
            def inner(*args, **kwargs):
                with torch.profiler.record_function(name):
                    return fn(*args, **kwargs)
            return inner

        saved.append((owner, attr, fn))
        setattr(owner, attr, wrap())
    try:
        yield
    finally:
        for owner, attr, fn in saved:
            setattr(owner, attr, fn)


def gap_report(prof, min_gap_us: float = 50.0, top: int = 12) -> dict:
    """GPU busy and idle time over the trace, and the idle time charged to labels and to CPU ops (ms)."""
    from torch.autograd import DeviceType

    events = list(prof.events())
    kernels = sorted((e.time_range.start, e.time_range.end) for e in events if e.device_type == DeviceType.CUDA)
    merged: list[list[float]] = []
    for s, e in kernels:
        if merged and s <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], e)
        else:
            merged.append([s, e])
    gaps = [(a[1], b[0]) for a, b in zip(merged, merged[1:]) if b[0] - a[1] >= min_gap_us]
    labels = [(e.time_range.start, e.time_range.end, e.name) for e in events
              if e.device_type == DeviceType.CPU and "." in e.name and not e.name.startswith(("aten::", "cuda"))]
    ops = [(e.time_range.start, e.time_range.end, e.name) for e in events
           if e.device_type == DeviceType.CPU and (e.name.startswith(("aten::", "cuda")))]
    by_label, by_op = collections.Counter(), collections.Counter()

    def innermost(ranges, starts, t):  # the most recently started range still open at t (ranges nest)
        i = bisect.bisect_right(starts, t) - 1
        for j in range(i, max(-1, i - 5000), -1):
            if ranges[j][1] >= t:
                return ranges[j][2]
        return "(none)"

    labels.sort()
    ops.sort()
    label_starts, op_starts = [r[0] for r in labels], [r[0] for r in ops]
    for s, e in gaps:
        t = s + 1.0  # just after the GPU went idle
        by_label[innermost(labels, label_starts, t)] += (e - s) / 1e3
        by_op[innermost(ops, op_starts, t)] += (e - s) / 1e3
    span = (merged[-1][1] - merged[0][0]) / 1e3 if merged else 0.0
    busy = sum(e - s for s, e in merged) / 1e3
    return {"span_ms": span, "busy_ms": busy, "idle_ms": span - busy, "gaps": len(gaps),
            "idle_in_gaps_ms": sum(e - s for s, e in gaps) / 1e3,
            "by_label_ms": dict(by_label.most_common(top)), "by_cpu_op_ms": dict(by_op.most_common(top))}
