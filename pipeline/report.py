"""The run report: ``_report.html`` (one self-contained page, hand-made inline SVG, no script, no external file)
and ``_summary.json`` (:meth:`pipeline.summary.Summary.to_dict`), written next to a run's Parquet files.

Contract::

    html = render_html(summary, table, timeline)     # table: SUMMARY_COLUMNS rows; timeline: summary.ray_timeline
    write_report(folder, summary, table, timeline) -> list[str]   # folder: a pipeline.storage.Location; the URIs written

The page shows: videos/s over time per stage (Ray Data's block statistics; without them, e.g. a resumed run with
nothing to do, the written rows' ``processed_at``), visual tokens per video before compression, after TTM and
attended after DP, answer lengths (generated tokens, per task), error types with counts and example inputs, and the
one-screen text summary. Every figure comes from Arrow compute over the columns and numpy histograms; no per-row
Python pass. Both names start with ``_`` so Parquet readers of the folder skip them.
"""

from __future__ import annotations

import html
import json
import logging
import math

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from pipeline.summary import NOT_STAGES, per_video

log = logging.getLogger(__name__)

REPORT_NAME, SUMMARY_NAME = "_report.html", "_summary.json"
EXAMPLES = 3  # example inputs per error type
W, H, PAD = 640, 220, 44  # chart size and margin (px)
COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b")


def _esc(text) -> str:
    return html.escape(str(text), quote=True)


def _nice_max(v: float) -> float:
    if not v or not math.isfinite(v) or v <= 0:
        return 1.0
    step = 10 ** math.floor(math.log10(v))
    return next(m * step for m in (1, 2, 2.5, 5, 10) if m * step >= v)


def _frame(title: str, xlabel: str, ylabel: str, xmax: float, ymax: float) -> list[str]:
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H + 30}" role="img" aria-label="{_esc(title)}">',
           f'<text x="{W / 2}" y="14" text-anchor="middle" font-weight="bold">{_esc(title)}</text>',
           f'<line x1="{PAD}" y1="{H - PAD + 20}" x2="{W - 10}" y2="{H - PAD + 20}" stroke="#333"/>',
           f'<line x1="{PAD}" y1="24" x2="{PAD}" y2="{H - PAD + 20}" stroke="#333"/>',
           f'<text x="{W / 2}" y="{H + 22}" text-anchor="middle" font-size="11">{_esc(xlabel)}</text>',
           f'<text x="12" y="{(H + 4) / 2}" font-size="11" transform="rotate(-90 12 {(H + 4) / 2})" '
           f'text-anchor="middle">{_esc(ylabel)}</text>']
    for k in range(5):
        fy, fx = ymax * k / 4, xmax * k / 4
        y = _y(fy, ymax)
        x = _x(fx, xmax)
        out.append(f'<text x="{PAD - 4}" y="{y + 4}" text-anchor="end" font-size="10">{fy:g}</text>')
        out.append(f'<line x1="{PAD}" y1="{y}" x2="{W - 10}" y2="{y}" stroke="#eee"/>')
        out.append(f'<text x="{x}" y="{H - PAD + 34}" text-anchor="middle" font-size="10">{fx:.3g}</text>')
    return out


def _x(v: float, xmax: float) -> float:
    return PAD + (W - 10 - PAD) * (v / xmax if xmax else 0.0)


def _y(v: float, ymax: float) -> float:
    return H - PAD + 20 - (H - PAD - 4) * (v / ymax if ymax else 0.0)


def line_chart(title: str, series: dict[str, tuple[np.ndarray, np.ndarray]], xlabel: str, ylabel: str) -> str:
    """An SVG line chart; ``series``: name -> (x, y) arrays."""
    if not series:
        return f"<p><em>{_esc(title)}: no data.</em></p>"
    xmax = _nice_max(max(float(np.max(x)) for x, _ in series.values() if len(x)) if any(len(x) for x, _ in series.values()) else 1.0)
    ymax = _nice_max(max(float(np.max(y)) for _, y in series.values() if len(y)) if any(len(y) for _, y in series.values()) else 1.0)
    out = _frame(title, xlabel, ylabel, xmax, ymax)
    for i, (name, (xs, ys)) in enumerate(series.items()):
        colour = COLOURS[i % len(COLOURS)]
        pts = " ".join(f"{_x(float(a), xmax):.1f},{_y(float(b), ymax):.1f}" for a, b in zip(xs, ys))
        out.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{pts}"/>')
        out.append(f'<text x="{W - 14}" y="{34 + 14 * i}" text-anchor="end" font-size="11" fill="{colour}">{_esc(name)}</text>')
    return "\n".join(out + ["</svg>"])


def bar_chart(title: str, labels: list[str], values: list[float], xlabel: str, ylabel: str) -> str:
    """An SVG bar chart (one bar per label)."""
    if not labels:
        return f"<p><em>{_esc(title)}: no data.</em></p>"
    ymax = _nice_max(max(values) if values else 1.0)
    out = _frame(title, xlabel, ylabel, 1.0, ymax)[:7]  # axes and labels; no numeric x ticks
    out += [f'<text x="{PAD - 4}" y="{_y(ymax * k / 4, ymax) + 4}" text-anchor="end" font-size="10">{ymax * k / 4:g}</text>'
            for k in range(5)]
    slot = (W - 10 - PAD) / len(labels)
    for i, (label, v) in enumerate(zip(labels, values)):
        x, y = PAD + i * slot + slot * 0.15, _y(v, ymax)
        out.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{slot * 0.7:.1f}" height="{_y(0, ymax) - y:.1f}" '
                   f'fill="{COLOURS[i % len(COLOURS)]}"><title>{_esc(label)}: {v:g}</title></rect>')
        out.append(f'<text x="{x + slot * 0.35:.1f}" y="{y - 3:.1f}" text-anchor="middle" font-size="10">{v:,.4g}</text>')
        out.append(f'<text x="{x + slot * 0.35:.1f}" y="{H - PAD + 34}" text-anchor="middle" font-size="10">{_esc(label)[:24]}</text>')
    return "\n".join(out + ["</svg>"])


def histogram(title: str, series: dict[str, np.ndarray], xlabel: str, bins: int = 20) -> str:
    """Histograms of one or more value sets on shared bins, drawn as step lines (counts)."""
    series = {k: np.asarray(v, dtype=np.float64) for k, v in series.items() if len(v)}
    if not series:
        return f"<p><em>{_esc(title)}: no data.</em></p>"
    lo = min(float(v.min()) for v in series.values())
    hi = max(float(v.max()) for v in series.values())
    edges = np.linspace(lo, hi if hi > lo else lo + 1.0, bins + 1)
    steps = {}
    for name, v in series.items():
        counts, _ = np.histogram(v, edges)
        steps[name] = (np.repeat(edges, 2)[1:-1], np.repeat(counts, 2).astype(np.float64))
    return line_chart(title, {k: (x, y) for k, (x, y) in steps.items()}, xlabel, "count")


# ------------------------------------------------------------------------------------------------ figures


def throughput(timeline: pa.Table, table: pa.Table, bins: int = 30) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Stage -> (bin centre s, items/s) from the block timeline (Ray Data's operators, ``MapBatches(...)`` stripped; the
    source and the write left out); without one, the videos finished per second from the rows' ``processed_at``
    (each video at its last row)."""
    out = {}
    if timeline.num_rows:
        hi = float(pc.max(timeline.column("end_s")).as_py()) or 1.0
        edges = np.linspace(0.0, hi, bins + 1)
        width = edges[1] - edges[0]
        for stage in pc.unique(timeline.column("stage")).to_pylist():
            if stage.startswith(NOT_STAGES):
                continue
            part = timeline.filter(pc.equal(timeline.column("stage"), stage))
            counts, _ = np.histogram(part.column("end_s").to_numpy(), edges, weights=part.column("rows").to_numpy())
            name = stage.removeprefix("MapBatches(").removesuffix(")") if stage.startswith("MapBatches(") else stage
            out[name] = ((edges[:-1] + edges[1:]) / 2, counts / width)
        if out:
            return out
    if table.num_rows and "processed_at" in table.column_names:
        last = table.group_by("video_id").aggregate([("processed_at", "max")]).column("processed_at_max")
        secs = pc.cast(last, pa.timestamp("us", tz="UTC")).cast(pa.int64()).to_numpy(zero_copy_only=False) / 1e6
        secs = secs - secs.min()
        edges = np.linspace(0.0, max(float(secs.max()), 1.0), bins + 1)
        counts, _ = np.histogram(secs, edges)
        out["videos written"] = ((edges[:-1] + edges[1:]) / 2, counts / (edges[1] - edges[0]))
    return out


def error_examples(table: pa.Table, limit: int = EXAMPLES) -> list[dict]:
    """Per error type (most videos first): ``error_type, videos, rows, examples`` (``limit`` of ``(uri, message)``)."""
    errors = table.filter(pc.not_equal(table.column("status"), "ok"))
    if not errors.num_rows:
        return []
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


def render_html(summary, table: pa.Table, timeline: pa.Table) -> str:
    """The report page (see the module docstring)."""
    videos = per_video(table)
    ok = videos.filter(videos.column("ok"))
    ok_rows = table.filter(pc.equal(table.column("status"), "ok"))
    attended = ok_rows.group_by("video_id").aggregate([("visual_tokens_attended", "mean")])
    tokens = histogram("Visual tokens per video (ok videos)", {
        "before compression": ok.column("visual_tokens_full").to_numpy(zero_copy_only=False),
        "after TTM (prefill)": ok.column("visual_tokens_prefill").to_numpy(zero_copy_only=False),
        "attended per decode step (after DP)": pc.drop_null(attended.column(1)).to_numpy(zero_copy_only=False),
    }, "visual tokens")
    totals = bar_chart("Visual tokens, mean per ok video", ["before", "after TTM", "attended (DP)"], [
        float(pc.mean(ok.column("visual_tokens_full")).as_py() or 0), float(pc.mean(ok.column("visual_tokens_prefill")).as_py() or 0),
        float(pc.mean(attended.column(1)).as_py() or 0)], "", "tokens")
    by_task = {}
    for task in pc.unique(ok_rows.column("task_id")).to_pylist()[:6]:
        lengths = ok_rows.filter(pc.equal(ok_rows.column("task_id"), task)).column("output_tokens")
        by_task[task] = pc.drop_null(lengths).to_numpy(zero_copy_only=False)
    answers = histogram("Answer lengths (generated tokens per row, by task)", by_task, "generated tokens")
    series = throughput(timeline, table)
    speed = line_chart("Throughput over time per stage", series, "seconds since the run started", "items/s")
    errors = error_examples(table)
    err_rows = "".join(
        f"<tr><td>{_esc(e['error_type'])}</td><td>{e['videos']}</td><td>{e['rows']}</td><td><ul>"
        + "".join(f"<li><code>{_esc(u)}</code>: {_esc(m)}</li>" for u, m in e["examples"]) + "</ul></td></tr>"
        for e in errors)
    err_table = (f"<table><tr><th>error type</th><th>videos</th><th>rows</th><th>examples</th></tr>{err_rows}</table>"
                 if errors else "<p>No errors.</p>")
    chart = bar_chart("Videos by error type", [e["error_type"] for e in errors], [e["videos"] for e in errors],
                      "", "videos") if errors else ""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>run {_esc(summary.run_id)}</title>
<style>body{{font-family:sans-serif;max-width:1360px;margin:1em auto}}svg{{margin:6px;border:1px solid #ddd}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:3px 6px;text-align:left;vertical-align:top}}
pre{{background:#f6f6f6;padding:8px}}</style></head><body>
<h1>Run {_esc(summary.run_id)}</h1>
<p>{summary.videos} videos ({summary.videos_ok} ok, {summary.videos_error} error), {summary.rows} rows, {summary.files} files
in <code>{_esc(summary.output_uri)}</code>; {summary.videos_per_s:.2f} videos/s end to end over {summary.wall_s:.1f} s.</p>
<h2>Throughput</h2>{speed}
<h2>Visual tokens</h2>{tokens}{totals}
<h2>Answers</h2>{answers}
<h2>Errors</h2>{chart}{err_table}
<h2>Summary</h2><pre>{_esc(summary.render())}</pre>
</body></html>
"""


def write_report(folder, summary, table: pa.Table, timeline: pa.Table | None = None) -> list[str]:
    """Write ``_report.html`` and ``_summary.json`` into ``folder`` (a :class:`pipeline.storage.Location`: the run
    folder, S3 or local); returns their URIs. ``table``: the run's committed rows (:func:`pipeline.sink.read_committed`).
    A failure is logged, never raised: the run's rows are already committed."""
    timeline = timeline if timeline is not None else pa.table({"stage": pa.array([], pa.string()),
                                                               "end_s": pa.array([], pa.float64()),
                                                               "rows": pa.array([], pa.int64())})
    written = []
    try:
        pages = {REPORT_NAME: render_html(summary, table, timeline),
                 SUMMARY_NAME: json.dumps({**summary.to_dict(), "errors": error_examples(table)}, indent=2, default=str)}
        if folder.local:
            folder.filesystem.create_dir(folder.path, recursive=True)  # S3 has no folders to make
        for name, text in pages.items():
            page = folder.child(name)
            with folder.filesystem.open_output_stream(page.path) as f:
                f.write(text.encode())
            written.append(page.uri)
        log.info("run report: %s", written[0])
    except Exception as exc:  # noqa: BLE001 - the report is a view of committed output; never fail the run for it
        log.warning("could not write the run report to %s: %s: %s", folder.uri, type(exc).__name__, exc)
    return written
