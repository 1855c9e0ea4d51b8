"""The end-of-run summary, computed from the rows actually written (read back from the sink)."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field

import pyarrow as pa

SUMMARY_COLUMNS = ["video_id", "task_id", "status", "error_type", "num_frames", "visual_tokens_full",
                   "visual_tokens_prefill", "visual_tokens_attended", "prompt_tokens", "output_tokens", "timings"]


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
        return "\n".join(lines)


def _sum(values) -> float:
    return float(sum(v for v in values if v is not None))


def summarize(table: pa.Table, *, run_id: str, output_uri: str, wall_s: float, files: int,
              videos_this_run: int | None = None) -> Summary:
    """Aggregate the written rows (columns :data:`SUMMARY_COLUMNS`); ``videos_this_run``: how many of the
    videos this run processed (the rest were complete before it), for the throughput figure."""
    rows = table.to_pylist()
    videos: dict[str, dict] = {}
    for r in rows:
        v = videos.setdefault(r["video_id"], {"ok": True, "first": r, "error_type": None})
        if r["status"] != "ok" and v["ok"]:
            v["ok"], v["error_type"] = False, r["error_type"]
    ok_videos = [v["first"] for v in videos.values() if v["ok"]]
    errors = Counter(v["error_type"] or "unknown" for v in videos.values() if not v["ok"])
    rows_ok = sum(1 for r in rows if r["status"] == "ok")
    attended = [r["visual_tokens_attended"] for r in rows if r["status"] == "ok" and r["visual_tokens_attended"] is not None]

    firsts = [v["first"] for v in videos.values()]
    t = [f["timings"] or {} for f in firsts]
    decoded = [f for f in firsts if (f["timings"] or {}).get("decode_s") is not None]
    stages = [
        StageFigures("decode", len(firsts), "videos", _sum(x.get("fetch_s") for x in t) + _sum(x.get("decode_s") for x in t)),
        StageFigures("encode", len(decoded), "videos", _sum(x.get("encode_s") for x in t)),
        StageFigures("generate", rows_ok, "tasks", _sum((r["timings"] or {}).get("generate_s") for r in rows)),
    ]
    return Summary(
        run_id=run_id,
        output_uri=output_uri,
        wall_s=wall_s,
        videos=len(videos),
        videos_ok=len(ok_videos),
        videos_error=len(videos) - len(ok_videos),
        rows=len(rows),
        rows_ok=rows_ok,
        rows_error=len(rows) - rows_ok,
        files=files,
        errors_by_type=dict(errors),
        visual_tokens_full=int(_sum(f["visual_tokens_full"] for f in ok_videos)),
        visual_tokens_prefill=int(_sum(f["visual_tokens_prefill"] for f in ok_videos)),
        visual_tokens_attended_mean=(sum(attended) / len(attended)) if attended else None,
        output_tokens=int(_sum(r["output_tokens"] for r in rows)),
        stages=stages,
        videos_this_run=videos_this_run,
    )
