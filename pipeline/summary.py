"""The run's facts, computed once from the committed rows with Arrow compute (no Python pass over rows), plus Ray
Data's own per-operator statistics; they feed the one-screen text (:meth:`Summary.render`), ``_summary.json``
(:meth:`Summary.to_dict`) and the HTML report (:mod:`pipeline.report`).

``summarize(table, ...)``: ``table`` has the columns :data:`SUMMARY_COLUMNS`; a video is ``ok`` when every one of
its rows is; a video with error rows counts under each ``error_type`` they hold.
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
EXAMPLES = 3  #: example inputs per error type


@dataclass
class StageFigures:
    name: str
    items: int
    unit: str
    busy_s: float
    per_worker_s: float  #: items per busy second of one worker


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
    errors_by_type: dict[str, int] = field(default_factory=dict)  #: videos per error type
    errors: list[dict] = field(default_factory=list)  #: :func:`error_examples`
    visual_tokens_full: int = 0
    visual_tokens_prefill: int = 0
    visual_tokens_attended_mean: float | None = None
    output_tokens: int = 0
    stages: list[StageFigures] = field(default_factory=list)
    videos_this_run: int | None = None  #: processed by this run (a resumed run skips complete ones); None = all
    #: what the input listing saw but did not list, by reason (unreadable folders, duplicates, special files)
    not_listed: dict[str, int] = field(default_factory=dict)
    not_listed_examples: dict[str, list[str]] = field(default_factory=dict)
    ray_stages: list[dict] = field(default_factory=list)  #: :func:`ray_stages` of this run; empty when nothing ran

    @property
    def videos_per_s(self) -> float:
        """End-to-end throughput of this run: the videos it processed over its wall time."""
        done = self.videos if self.videos_this_run is None else self.videos_this_run
        return done / self.wall_s if self.wall_s else 0.0

    @property
    def compression_ratio(self) -> float | None:
        return self.visual_tokens_full / self.visual_tokens_prefill if self.visual_tokens_prefill else None

    def to_dict(self) -> dict:
        return {**asdict(self), "compression_ratio": self.compression_ratio, "videos_per_s": self.videos_per_s}

    def render(self) -> str:
        """One screen of text."""
        lines = [
            f"run {self.run_id}  ->  {self.output_uri}  ({self.files} file{'s' if self.files != 1 else ''})",
            f"videos  {self.videos:>8}   ok {self.videos_ok}   error {self.videos_error}",
            f"rows    {self.rows:>8}   ok {self.rows_ok}   error {self.rows_error}",
        ]
        if self.not_listed:
            examples = {k: f" (e.g. {', '.join(v[:2])})" for k, v in self.not_listed_examples.items() if v}
            lines.append("not listed (no rows): " + "; ".join(
                f"{k} {v}{examples.get(k, '')}" for k, v in sorted(self.not_listed.items())))
        if self.errors_by_type:
            lines.append("errors by type (videos): " + ", ".join(f"{k}={v}" for k, v in sorted(self.errors_by_type.items())))
        ratio = self.compression_ratio
        lines.append(f"visual tokens (ok videos): before {self.visual_tokens_full:,}  after TTM "
                     f"{self.visual_tokens_prefill:,}" + (f"  ({ratio:.2f}x fewer)" if ratio else ""))
        if self.visual_tokens_attended_mean is not None:
            lines.append(f"mean visual tokens attended per decode step (after DP): {self.visual_tokens_attended_mean:.1f}")
        lines.append(f"generated tokens: {self.output_tokens:,}")
        if self.videos_this_run is not None and self.videos_this_run < self.videos:
            lines.append(f"resumed: {self.videos - self.videos_this_run} videos were already complete, "
                         f"{self.videos_this_run} processed by this run")
        lines.append(f"wall time {self.wall_s:.1f}s   end to end {self.videos_per_s:.2f} videos/s")
        lines.append(f"{'stage':<10}{'items':>8}  {'busy s':>9}  {'per worker':>16}")
        lines += [f"{s.name:<10}{s.items:>8}  {s.busy_s:>9.2f}  {s.per_worker_s:>9.2f} {s.unit}/s" for s in self.stages]
        for op in [op for op in self.ray_stages if not op["name"].startswith(NOT_STAGES)][:4]:
            lines.append(f"ray data  {op['name'][:40]:<40} {op['rows_out']:>7} rows  {op['rows_per_s']:>8.2f} rows/s")
        return "\n".join(lines)


def _sum(values) -> float:
    return float(pc.sum(values).as_py() or 0.0)


def per_video(table: pa.Table) -> pa.Table:
    """One row per video: ``video_id, ok`` (every row ok), and of its first row ``video_uri, visual_tokens_full,
    visual_tokens_prefill, fetch_s, decode_s, encode_s``."""
    timings = table.column("timings")
    t = table.select(["video_id", "video_uri", "visual_tokens_full", "visual_tokens_prefill"]).append_column(
        "ok", pc.equal(table.column("status"), "ok"))
    for name in ("fetch_s", "decode_s", "encode_s"):
        t = t.append_column(name, pc.struct_field(timings, name))
    firsts = [(c, "first") for c in t.column_names if c not in ("video_id", "ok")]
    videos = t.group_by("video_id", use_threads=False).aggregate([("ok", "min"), *firsts])
    return videos.rename_columns([n.removesuffix("_first").removesuffix("_min") for n in videos.column_names])


def error_examples(table: pa.Table, limit: int = EXAMPLES) -> list[dict]:
    """Per error type (most videos first): ``error_type, videos, rows, examples`` (``limit`` of ``(uri, message)``)."""
    errors = table.filter(pc.not_equal(table.column("status"), "ok"))
    errors = errors.set_column(errors.schema.get_field_index("error_type"), "error_type",
                               pc.fill_null(errors.column("error_type"), "unknown"))
    counts = errors.group_by("error_type").aggregate([("video_id", "count_distinct"), ("video_id", "count")])
    counts = counts.sort_by([("video_id_count_distinct", "descending"), ("error_type", "ascending")])
    out = []
    for kind, videos, rows in zip(*(counts.column(c).to_pylist() for c in ("error_type", "video_id_count_distinct",
                                                                              "video_id_count"))):
        part = errors.filter(pc.equal(errors.column("error_type"), kind)).select(["video_uri", "error_message"])
        part = part.group_by("video_uri", use_threads=False).aggregate([("error_message", "first")]).slice(0, limit)
        out.append({"error_type": kind, "videos": videos, "rows": rows,
                    "examples": list(zip(part.column(0).to_pylist(), part.column(1).to_pylist()))})
    return out


def summarize(table: pa.Table, *, run_id: str, output_uri: str, wall_s: float, files: int,
              videos_this_run: int | None = None, ray: list[dict] | None = None) -> Summary:
    """Aggregate the written rows (columns :data:`SUMMARY_COLUMNS`); ``videos_this_run``: how many of the
    videos this run processed (the rest were complete before it), for the throughput figure; ``ray``: the run's
    :func:`ray_stages`."""
    videos = per_video(table)
    ok_rows = pc.equal(table.column("status"), "ok")
    rows_ok, ok_videos = int(_sum(ok_rows)), videos.filter(videos.column("ok"))
    errors = error_examples(table)
    busy = [("decode", videos.num_rows, "videos", _sum(videos.column("fetch_s")) + _sum(videos.column("decode_s"))),
            ("encode", pc.count(videos.column("decode_s")).as_py(), "videos", _sum(videos.column("encode_s"))),
            ("generate", rows_ok, "tasks", _sum(pc.struct_field(table.column("timings"), "generate_s")))]
    return Summary(
        run_id=run_id, output_uri=output_uri, wall_s=wall_s, videos=videos.num_rows, videos_ok=ok_videos.num_rows,
        videos_error=videos.num_rows - ok_videos.num_rows, rows=table.num_rows, rows_ok=rows_ok, rows_error=table.num_rows - rows_ok,
        files=files, errors_by_type={e["error_type"]: e["videos"] for e in errors}, errors=errors,
        visual_tokens_full=int(_sum(ok_videos.column("visual_tokens_full"))),
        visual_tokens_prefill=int(_sum(ok_videos.column("visual_tokens_prefill"))),
        visual_tokens_attended_mean=pc.mean(table.filter(ok_rows).column("visual_tokens_attended")).as_py(),
        output_tokens=int(_sum(table.column("output_tokens"))), videos_this_run=videos_this_run,
        stages=[StageFigures(n, int(k), u, s, k / s if s > 0 else float("nan")) for n, k, u, s in busy],
        ray_stages=list(ray or []),
    )  # fmt: skip


# ------------------------------------------------------------------------------------------------ Ray Data


def _all_stats(root) -> list:
    """A Dataset's statistics object and its parents' (the stages before the write), first stage first."""
    out, todo = [], [root]
    while todo:
        st = todo.pop()
        out.insert(0, st)
        todo.extend(getattr(st, "parents", None) or [])
    return out


def ray_stages(ds) -> list[dict]:
    """Ray Data's statistics per operator of an executed (written) Dataset: ``name, rows_out, time_total_s,
    rows_per_s, wall_s, cpu_s`` (sums over the operator's tasks). Empty when the Dataset has no statistics."""
    try:
        ops = [op for st in _all_stats(ds.get_stats_summary()) for op in st.operators_stats]
    except Exception as exc:  # noqa: BLE001 - statistics are a report, never a reason to fail a finished run
        log.info("no Ray Data statistics: %s: %s", type(exc).__name__, exc)
        return []
    return [{"name": op.operator_name, "rows_out": int(op.output_num_rows.sum) if op.output_num_rows else 0,
             "time_total_s": float(op.time_total_s or 0.0), "rows_per_s": float(op.num_rows_per_s),
             "wall_s": float(op.wall_time.sum) if op.wall_time else 0.0,
             "cpu_s": float(op.cpu_time.sum) if op.cpu_time else 0.0} for op in ops]


def ray_timeline(ds) -> pa.Table:
    """Every output block of every operator of an executed (written) Dataset: ``stage, end_s, rows`` (``end_s``:
    seconds since the first block of the run started; one node's monotonic clock per block), from Ray Data's block
    execution statistics (kept on the internal dataset its write executed). Empty when the Dataset has none."""
    blocks = []
    try:
        stats = _all_stats((getattr(ds, "_write_ds", None) or ds)._raw_stats())
        blocks = [(name, b) for st in stats for name, bs in (getattr(st, "metadata", None) or {}).items() for b in bs
                  if getattr(b, "exec_stats", None) is not None and b.exec_stats.end_time_s is not None]
    except Exception as exc:  # noqa: BLE001 - statistics are a report, never a reason to fail a finished run
        log.info("no Ray Data block statistics: %s: %s", type(exc).__name__, exc)
    ends = [b.exec_stats.end_time_s for _, b in blocks]
    t0 = min((b.exec_stats.start_time_s if b.exec_stats.start_time_s is not None else e
              for (_, b), e in zip(blocks, ends)), default=0.0)
    return pa.table({"stage": pa.array([n for n, _ in blocks], pa.string()),
                     "end_s": pa.array([e - t0 for e in ends], pa.float64()),
                     "rows": pa.array([int(b.num_rows or 0) for _, b in blocks], pa.int64())})
