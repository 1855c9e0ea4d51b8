"""The end-of-run summary, computed from the rows actually written (read back from the sink) with Arrow compute
(``pyarrow.compute``, ``Table.group_by``: no Python pass over rows), plus Ray Data's own per-stage statistics
(:func:`ray_stages`) when the run executed a graph.

Contract::

    summarize(table, run_id=..., output_uri=..., wall_s=..., files=..., videos_this_run=None, ray=None) -> Summary
    Summary.render() -> str      # one screen of text
    Summary.to_dict() -> dict    # what ``_summary.json`` holds

``table`` has the columns :data:`SUMMARY_COLUMNS` (any number of rows; a video is ``ok`` when every one of its rows
is, and an errored video counts under the ``error_type`` of its first error row).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field

import pyarrow as pa
import pyarrow.compute as pc

log = logging.getLogger(__name__)

SUMMARY_COLUMNS = ["video_id", "video_uri", "task_id", "status", "error_type", "error_message", "num_frames",
                   "visual_tokens_full", "visual_tokens_prefill", "visual_tokens_attended", "prompt_tokens",
                   "output_tokens", "timings", "processed_at"]
#: Ray Data operators that are not pipeline stages: the source and the sink (whose output rows are files)
NOT_STAGES = ("FromArrow", "Input", "Read", "Write")


@dataclass
class StageFigures:
    name: str
    items: int
    unit: str
    busy_s: float

    @property
    def per_worker_s(self) -> float:
        return self.items / self.busy_s if self.busy_s > 0 else float("nan")


@dataclass
class Summary:
    run_id: str
    output_uri: str
    wall_s: float
    videos: int
    videos_ok: int
    videos_error: int
    rows: int
    rows_ok: int
    rows_error: int
    files: int
    errors_by_type: dict[str, int] = field(default_factory=dict)
    visual_tokens_full: int = 0
    visual_tokens_prefill: int = 0
    visual_tokens_attended_mean: float | None = None
    output_tokens: int = 0
    stages: list[StageFigures] = field(default_factory=list)
    videos_this_run: int | None = None  # processed by this run (a resumed run skips complete ones); None = all
    #: what the input listing saw but did not list, by reason (unreadable folders, duplicates, special files)
    not_listed: dict[str, int] = field(default_factory=dict)
    not_listed_examples: dict[str, list[str]] = field(default_factory=dict)
    #: Ray Data's statistics per operator of this run's graph (:func:`ray_stages`); empty when nothing ran
    ray_stages: list[dict] = field(default_factory=list)

    @property
    def videos_per_s(self) -> float:
        """End-to-end throughput of this run: the videos it processed over its wall time."""
        done = self.videos if self.videos_this_run is None else self.videos_this_run
        return done / self.wall_s if self.wall_s else 0.0

    @property
    def compression_ratio(self) -> float | None:
        if not self.visual_tokens_prefill:
            return None
        return self.visual_tokens_full / self.visual_tokens_prefill

    def to_dict(self) -> dict:
        d = asdict(self)
        d["compression_ratio"] = self.compression_ratio
        d["videos_per_s"] = self.videos_per_s
        for s, fig in zip(d["stages"], self.stages):
            s["per_worker_s"] = fig.per_worker_s
        return d

    def render(self) -> str:
        """One screen of text."""
        lines = [
            f"run {self.run_id}  ->  {self.output_uri}  ({self.files} file{'s' if self.files != 1 else ''})",
            f"videos  {self.videos:>8}   ok {self.videos_ok}   error {self.videos_error}",
            f"rows    {self.rows:>8}   ok {self.rows_ok}   error {self.rows_error}",
        ]
        if self.not_listed:
            lines.append("not listed (no rows): " + "; ".join(
                f"{k} {v}" + (f" (e.g. {', '.join(self.not_listed_examples.get(k, [])[:2])})" if self.not_listed_examples.get(k) else "")
                for k, v in sorted(self.not_listed.items())))
        if self.errors_by_type:
            lines.append("errors by type (videos): " + ", ".join(f"{k}={v}" for k, v in sorted(self.errors_by_type.items())))
        ratio = self.compression_ratio
        lines.append(
            f"visual tokens (ok videos): before {self.visual_tokens_full:,}  after TTM {self.visual_tokens_prefill:,}"
            + (f"  ({ratio:.2f}x fewer)" if ratio else "")
        )
        if self.visual_tokens_attended_mean is not None:
            lines.append(f"mean visual tokens attended per decode step (after DP): {self.visual_tokens_attended_mean:.1f}")
        lines.append(f"generated tokens: {self.output_tokens:,}")
        if self.videos_this_run is not None and self.videos_this_run < self.videos:
            lines.append(f"resumed: {self.videos - self.videos_this_run} videos were already complete, "
                         f"{self.videos_this_run} processed by this run")
        lines.append(f"wall time {self.wall_s:.1f}s   end to end {self.videos_per_s:.2f} videos/s")
        lines.append(f"{'stage':<10}{'items':>8}  {'busy s':>9}  {'per worker':>16}")
        for s in self.stages:
            lines.append(f"{s.name:<10}{s.items:>8}  {s.busy_s:>9.2f}  {s.per_worker_s:>9.2f} {s.unit}/s")
        for op in [op for op in self.ray_stages if not op["name"].startswith(NOT_STAGES)][:4]:
            lines.append(f"ray data  {op['name'][:40]:<40} {op['rows_out']:>7} rows  {op['rows_per_s']:>8.2f} rows/s")
        return "\n".join(lines)


def _sum(values: pa.Array | pa.ChunkedArray) -> float:
    return float(pc.sum(values).as_py() or 0.0)


def per_video(table: pa.Table) -> pa.Table:
    """One row per video: ``video_id, video_uri, ok`` (every row ok), ``error_type`` (of its first error row, null
    when ok), the video-level figures of its first row (``visual_tokens_*``, ``fetch_s``, ``decode_s``, ``encode_s``)."""
    timings = table.column("timings")
    t = table.select(["video_id", "video_uri", "visual_tokens_full", "visual_tokens_prefill"]).append_column(
        "ok", pc.equal(table.column("status"), "ok"))
    for name in ("fetch_s", "decode_s", "encode_s"):
        t = t.append_column(name, pc.struct_field(timings, name))
    firsts = [(c, "first") for c in ("video_uri", "visual_tokens_full", "visual_tokens_prefill", "fetch_s", "decode_s",
                                     "encode_s")]
    videos = t.group_by("video_id", use_threads=False).aggregate([("ok", "min"), *firsts])
    videos = videos.rename_columns([n.removesuffix("_first").removesuffix("_min") for n in videos.column_names])
    errors = table.filter(pc.not_equal(table.column("status"), "ok")).select(["video_id", "error_type"])
    errors = errors.group_by("video_id", use_threads=False).aggregate([("error_type", "first")])
    videos = videos.join(errors.rename_columns(["video_id", "error_type"]), "video_id", join_type="left outer")
    return videos


def summarize(table: pa.Table, *, run_id: str, output_uri: str, wall_s: float, files: int,
              videos_this_run: int | None = None, ray: list[dict] | None = None) -> Summary:
    """Aggregate the written rows (columns :data:`SUMMARY_COLUMNS`); ``videos_this_run``: how many of the
    videos this run processed (the rest were complete before it), for the throughput figure; ``ray``: the run's
    :func:`ray_stages`."""
    videos = per_video(table)
    ok_rows = pc.equal(table.column("status"), "ok")
    rows_ok = int(_sum(pc.cast(ok_rows, pa.int64())))
    ok_videos = videos.filter(videos.column("ok"))
    failed = videos.filter(pc.invert(videos.column("ok")))
    counts = pc.value_counts(pc.fill_null(failed.column("error_type"), "unknown")).to_pylist() if failed.num_rows else []
    attended = pc.mean(table.filter(ok_rows).column("visual_tokens_attended")).as_py()
    generate_s = pc.struct_field(table.column("timings"), "generate_s")
    stages = [
        StageFigures("decode", videos.num_rows, "videos", _sum(videos.column("fetch_s")) + _sum(videos.column("decode_s"))),
        StageFigures("encode", int(pc.count(videos.column("decode_s")).as_py()), "videos", _sum(videos.column("encode_s"))),
        StageFigures("generate", rows_ok, "tasks", _sum(generate_s)),
    ]
    return Summary(
        run_id=run_id, output_uri=output_uri, wall_s=wall_s, videos=videos.num_rows, videos_ok=ok_videos.num_rows,
        videos_error=failed.num_rows, rows=table.num_rows, rows_ok=rows_ok, rows_error=table.num_rows - rows_ok,
        files=files, errors_by_type={c["values"]: c["counts"] for c in counts},
        visual_tokens_full=int(_sum(ok_videos.column("visual_tokens_full"))),
        visual_tokens_prefill=int(_sum(ok_videos.column("visual_tokens_prefill"))),
        visual_tokens_attended_mean=attended, output_tokens=int(_sum(table.column("output_tokens"))),
        stages=stages, videos_this_run=videos_this_run, ray_stages=list(ray or []),
    )  # fmt: skip


# ------------------------------------------------------------------------------------------------ Ray Data


def ray_stages(ds) -> list[dict]:
    """Ray Data's statistics per operator of an executed (written) Dataset: ``name, rows_out, time_total_s,
    rows_per_s, wall_s, cpu_s`` (sums over the operator's tasks). Empty when the Dataset has no statistics."""
    try:
        summary = ds.get_stats_summary()
    except Exception as exc:  # noqa: BLE001 - statistics are a report, never a reason to fail a finished run
        log.info("no Ray Data statistics: %s: %s", type(exc).__name__, exc)
        return []
    ops, todo = [], [summary]
    while todo:  # this dataset's operators, then its parents' (the stages before the write), first stage first
        st = todo.pop()
        ops = list(st.operators_stats) + ops
        todo.extend(st.parents or [])
    out = []
    for op in ops:
        rows = int(op.output_num_rows.sum) if op.output_num_rows else 0
        out.append({"name": op.operator_name, "rows_out": rows, "time_total_s": float(op.time_total_s or 0.0),
                    "rows_per_s": float(op.num_rows_per_s), "wall_s": float(op.wall_time.sum) if op.wall_time else 0.0,
                    "cpu_s": float(op.cpu_time.sum) if op.cpu_time else 0.0})
    return out


def ray_timeline(ds) -> pa.Table:
    """Every output block of every operator of an executed (written) Dataset: ``stage, end_s, rows`` (``end_s``:
    seconds since the first block of the run started; one node's monotonic clock per block), from Ray Data's block
    execution statistics. Empty when the Dataset has none."""
    names, ends, rows = [], [], []
    stats = None
    try:  # the written Dataset's statistics; Ray keeps them on the internal dataset its write executed
        inner = getattr(ds, "_write_ds", None) or ds
        stats = inner._raw_stats()
    except Exception as exc:  # noqa: BLE001 - statistics are a report, never a reason to fail a finished run
        log.info("no Ray Data block statistics: %s: %s", type(exc).__name__, exc)
    starts = []
    todo = [stats] if stats is not None else []
    while todo:
        st = todo.pop()
        todo.extend(getattr(st, "parents", None) or [])
        for name, blocks in (getattr(st, "metadata", None) or {}).items():
            for b in blocks:
                ex = getattr(b, "exec_stats", None)
                if ex is None or ex.end_time_s is None:
                    continue
                names.append(name)
                ends.append(float(ex.end_time_s))
                starts.append(float(ex.start_time_s if ex.start_time_s is not None else ex.end_time_s))
                rows.append(int(b.num_rows or 0))
    t0 = min(starts) if starts else 0.0
    return pa.table({"stage": pa.array(names, pa.string()), "end_s": pa.array([e - t0 for e in ends], pa.float64()),
                     "rows": pa.array(rows, pa.int64())})
