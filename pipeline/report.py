"""The run report: ``_report.html`` (one self-contained page, inline SVG, no script, no external file) and
``_summary.json`` (:meth:`pipeline.summary.Summary.to_dict`), written next to a run's Parquet files.

The page shows videos/s over time per stage (Ray Data's block statistics; without them, e.g. a resumed run with
nothing to do, the rows' ``processed_at``), visual tokens per video before compression, after TTM and attended
after DP, answer lengths per task, error types with counts and example inputs (the summary's), and the one-screen
text summary. Figures come from Arrow compute and numpy histograms; no per-row Python pass. Both names start
with ``_`` so Parquet readers of the folder skip them.
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
W, H, PAD = 640, 220, 44  # chart size and margin (px)
COLOURS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b")
EMPTY_TIMELINE = pa.schema([("stage", pa.string()), ("end_s", pa.float64()), ("rows", pa.int64())]).empty_table()


def _esc(text) -> str:
    return html.escape(str(text), quote=True)


def _nice_max(v: float) -> float:
    if not v or not math.isfinite(v) or v <= 0:
        return 1.0
    step = 10 ** math.floor(math.log10(v))
    return next(m * step for m in (1, 2, 2.5, 5, 10) if m * step >= v)


def _x(v: float, xmax: float) -> float:
    return PAD + (W - 10 - PAD) * v / xmax


def _y(v: float, ymax: float) -> float:
    return H - PAD + 20 - (H - PAD - 4) * v / ymax


def _svg(title: str, xlabel: str, ylabel: str, ymax: float, xmax: float | None, body: list[str]) -> str:
    """Axes, labels, y ticks and grid (x ticks when ``xmax``) around ``body``, as one ``<svg>``."""
    mid = (H + 4) / 2
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H + 30}" role="img" aria-label="{_esc(title)}">',
           f'<text x="{W / 2}" y="14" text-anchor="middle" font-weight="bold">{_esc(title)}</text>',
           f'<line x1="{PAD}" y1="{H - PAD + 20}" x2="{W - 10}" y2="{H - PAD + 20}" stroke="#333"/>',
           f'<line x1="{PAD}" y1="24" x2="{PAD}" y2="{H - PAD + 20}" stroke="#333"/>',
           f'<text x="{W / 2}" y="{H + 22}" text-anchor="middle" font-size="11">{_esc(xlabel)}</text>',
           f'<text x="12" y="{mid}" font-size="11" transform="rotate(-90 12 {mid})" text-anchor="middle">{_esc(ylabel)}</text>']
    for k in range(5):
        fy, y = ymax * k / 4, _y(ymax * k / 4, ymax)
        out.append(f'<text x="{PAD - 4}" y="{y + 4}" text-anchor="end" font-size="10">{fy:g}</text>')
        out.append(f'<line x1="{PAD}" y1="{y}" x2="{W - 10}" y2="{y}" stroke="#eee"/>')
        if xmax:
            out.append(f'<text x="{_x(xmax * k / 4, xmax)}" y="{H - PAD + 34}" text-anchor="middle" '
                       f'font-size="10">{xmax * k / 4:.3g}</text>')
    return "\n".join(out + body + ["</svg>"])


def _no_data(title: str) -> str:
    return f"<p><em>{_esc(title)}: no data.</em></p>"


def line_chart(title: str, series: dict[str, tuple[np.ndarray, np.ndarray]], xlabel: str, ylabel: str) -> str:
    """An SVG line chart; ``series``: name -> (x, y) arrays."""
    series = {k: (x, y) for k, (x, y) in series.items() if len(x)}
    if not series:
        return _no_data(title)
    xmax = _nice_max(max(float(np.max(x)) for x, _ in series.values()))
    ymax = _nice_max(max(float(np.max(y)) for _, y in series.values()))
    body = []
    for i, (name, (xs, ys)) in enumerate(series.items()):
        colour = COLOURS[i % len(COLOURS)]
        pts = " ".join(f"{_x(float(a), xmax):.1f},{_y(float(b), ymax):.1f}" for a, b in zip(xs, ys))
        body.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{pts}"/>')
        body.append(f'<text x="{W - 14}" y="{34 + 14 * i}" text-anchor="end" font-size="11" fill="{colour}">{_esc(name)}</text>')
    return _svg(title, xlabel, ylabel, ymax, xmax, body)


def bar_chart(title: str, labels: list[str], values: list[float], ylabel: str) -> str:
    """An SVG bar chart (one bar per label)."""
    if not labels:
        return _no_data(title)
    ymax, slot, body = _nice_max(max(values)), (W - 10 - PAD) / len(labels), []
    for i, (label, v) in enumerate(zip(labels, values)):
        x, y, mid = PAD + i * slot + slot * 0.15, _y(v, ymax), PAD + i * slot + slot * 0.5
        body.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{slot * 0.7:.1f}" height="{_y(0, ymax) - y:.1f}" '
                    f'fill="{COLOURS[i % len(COLOURS)]}"><title>{_esc(label)}: {v:g}</title></rect>')
        body.append(f'<text x="{mid:.1f}" y="{y - 3:.1f}" text-anchor="middle" font-size="10">{v:,.4g}</text>')
        body.append(f'<text x="{mid:.1f}" y="{H - PAD + 34}" text-anchor="middle" font-size="10">{_esc(label)[:24]}</text>')
    return _svg(title, "", ylabel, ymax, None, body)


def histogram(title: str, series: dict[str, np.ndarray], xlabel: str, bins: int = 20) -> str:
    """Histograms of one or more value sets on shared bins, drawn as step lines (counts)."""
    series = {k: np.asarray(v, dtype=np.float64) for k, v in series.items() if len(v)}
    if not series:
        return _no_data(title)
    lo, hi = min(float(v.min()) for v in series.values()), max(float(v.max()) for v in series.values())
    edges = np.linspace(lo, hi if hi > lo else lo + 1.0, bins + 1)
    steps = {k: (np.repeat(edges, 2)[1:-1], np.repeat(np.histogram(v, edges)[0], 2).astype(np.float64))
             for k, v in series.items()}
    return line_chart(title, steps, xlabel, "count")


def _rate(ends: np.ndarray, weights: np.ndarray | None, hi: float, bins: int) -> tuple[np.ndarray, np.ndarray]:
    """(bin centres, items per second) of items finished at ``ends`` seconds."""
    edges = np.linspace(0.0, hi, bins + 1)
    counts, _ = np.histogram(ends, edges, weights=weights)
    return (edges[:-1] + edges[1:]) / 2, counts / (edges[1] - edges[0])


def throughput(timeline: pa.Table, table: pa.Table, bins: int = 30) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Stage -> (bin centre s, items/s) from the block timeline (Ray Data's operators, ``MapBatches(...)`` stripped; the
    source and the write left out); without one, the videos finished per second from the rows' ``processed_at``
    (each video at its last row)."""
    out = {}
    hi = float(pc.max(timeline.column("end_s")).as_py() or 0.0) or 1.0
    for stage in pc.unique(timeline.column("stage")).to_pylist():
        if not stage.startswith(NOT_STAGES):
            part = timeline.filter(pc.equal(timeline.column("stage"), stage))
            name = stage.removeprefix("MapBatches(").removesuffix(")") if stage.startswith("MapBatches(") else stage
            out[name] = _rate(part.column("end_s").to_numpy(), part.column("rows").to_numpy(), hi, bins)
    if not out and table.num_rows:
        last = table.group_by("video_id").aggregate([("processed_at", "max")]).column("processed_at_max")
        secs = pc.cast(last, pa.timestamp("us", tz="UTC")).cast(pa.int64()).to_numpy(zero_copy_only=False) / 1e6
        secs = secs - secs.min()
        out["videos written"] = _rate(secs, None, max(float(secs.max()), 1.0), bins)
    return out


def render_html(summary, table: pa.Table, timeline: pa.Table) -> str:
    """The report page (see the module docstring)."""
    ok = per_video(table).filter(pc.field("ok"))
    ok_rows = table.filter(pc.field("status") == "ok")
    attended = ok_rows.group_by("video_id").aggregate([("visual_tokens_attended", "mean")]).column(1)
    tokens = histogram("Visual tokens per video (ok videos)", {
        "before compression": ok.column("visual_tokens_full").to_numpy(zero_copy_only=False),
        "after TTM (prefill)": ok.column("visual_tokens_prefill").to_numpy(zero_copy_only=False),
        "attended per decode step (after DP)": pc.drop_null(attended).to_numpy(zero_copy_only=False),
    }, "visual tokens")
    per_ok = max(summary.videos_ok, 1)
    totals = bar_chart("Visual tokens, mean per ok video", ["before", "after TTM", "attended (DP)"], [
        summary.visual_tokens_full / per_ok, summary.visual_tokens_prefill / per_ok,
        summary.visual_tokens_attended_mean or 0.0], "tokens")
    by_task = {task: pc.drop_null(ok_rows.filter(pc.field("task_id") == task).column("output_tokens")).to_numpy()
               for task in pc.unique(ok_rows.column("task_id")).to_pylist()[:6]}
    answers = histogram("Answer lengths (generated tokens per row, by task)", by_task, "generated tokens")
    speed = line_chart("Throughput over time per stage", throughput(timeline, table), "seconds since the run started",
                       "items/s")
    errors = summary.errors
    err_rows = "".join(
        f"<tr><td>{_esc(e['error_type'])}</td><td>{e['videos']}</td><td>{e['rows']}</td><td><ul>"
        + "".join(f"<li><code>{_esc(u)}</code>: {_esc(m)}</li>" for u, m in e["examples"]) + "</ul></td></tr>"
        for e in errors)
    err_table = (f"<table><tr><th>error type</th><th>videos</th><th>rows</th><th>examples</th></tr>{err_rows}</table>"
                 if errors else "<p>No errors.</p>")
    chart = bar_chart("Videos by error type", [e["error_type"] for e in errors], [e["videos"] for e in errors],
                      "videos") if errors else ""
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
    written = []
    try:
        pages = {REPORT_NAME: render_html(summary, table, EMPTY_TIMELINE if timeline is None else timeline),
                 SUMMARY_NAME: json.dumps(summary.to_dict(), indent=2, default=str)}
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
