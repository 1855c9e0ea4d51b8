"""The run report (pipeline/report.py, facts from pipeline/summary.py): its figures from rows alone (no Ray), and the report a real tiny CPU run
writes next to its output (plus: the model's frame size is not read before the resume check)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow as pa
import pytest

from pipeline import report, sink, storage
from pipeline.config import load_config
from pipeline.schema import rows_to_table
from pipeline.summary import SUMMARY_COLUMNS, error_examples, summarize
from tests.pipeline.test_pipeline_sink_summary import _rows


def _table() -> pa.Table:
    return rows_to_table(_rows()).select(SUMMARY_COLUMNS)


def test_report_figures_from_rows(tmp_path):
    table = _table()
    timeline = pa.table({"stage": ["MapBatches(decode_batch)", "MapBatches(decode_batch)", "MapBatches(FusedStage)", "Write"],
                         "end_s": [0.5, 1.5, 2.0, 2.1], "rows": [2, 2, 4, 1]})
    series = report.throughput(timeline, table, bins=4)
    assert set(series) == {"decode_batch", "FusedStage"}
    x, per_s = series["decode_batch"]
    assert per_s.sum() * (x[1] - x[0]) == pytest.approx(4)  # every decoded row counted once, as a rate
    fallback = report.throughput(timeline.slice(0, 0), table, bins=4)  # no Ray statistics: the rows' own times
    assert set(fallback) == {"videos written"}
    errors = error_examples(table)
    assert errors == [{"error_type": "not_found", "videos": 1, "rows": 2, "examples": [("b.mp4", "gone")]}]

    summary = summarize(table, run_id="r", output_uri=str(tmp_path), wall_s=2.0, files=1)
    paths = report.write_report(storage.resolve(str(tmp_path / "r")), summary, table, timeline)
    assert [Path(p).name for p in paths] == ["_report.html", "_summary.json"]
    page = (tmp_path / "r" / "_report.html").read_text()
    assert page.count("<svg") >= 5 and "<script" not in page and "http" not in page.replace(
        'xmlns="http://www.w3.org/2000/svg"', "")  # self-contained
    assert "not_found" in page and "b.mp4" in page and "gone" in page and "2.06x fewer" in page
    data = json.loads((tmp_path / "r" / "_summary.json").read_text())
    assert data["videos"] == 2 and data["errors_by_type"] == {"not_found": 1} and data["errors"][0]["videos"] == 1
    assert sink.committed(storage.resolve(str(tmp_path / "r"))).file_paths() == []  # not data files of the run


def test_report_with_no_rows_and_a_failing_filesystem(tmp_path, caplog):
    empty = _table().slice(0, 0)
    summary = summarize(empty, run_id="r", output_uri="o", wall_s=1.0, files=0)
    assert "no data" in report.render_html(summary, empty, empty.select([]).append_column("stage", pa.array([], pa.string())
                                                                                            ).append_column("end_s", pa.array([], pa.float64())
                                                                                            ).append_column("rows", pa.array([], pa.int64())))

    class Broken:
        def create_dir(self, *a, **k):
            raise OSError("read-only")

    assert report.write_report(storage.Location(Broken(), "/x", "/x"), summary, empty) == []  # logged, never raised
    assert "could not write the run report" in caplog.text


@pytest.mark.slow
def test_tiny_cpu_run_writes_the_report(tmp_path, tiny_model, monkeypatch):
    """The real graph on a local Ray (fused, CPU, the tiny checkpoint): 3 videos and one that is not a video. Then the
    same run again: complete, so it answers from its folder without reading the model's frame size (read once per
    run, after the resume check) and without Ray."""
    import ray

    from pipeline import run as run_module
    from pipeline.samples import make_video

    videos = tmp_path / "videos"
    videos.mkdir()
    for i in range(3):
        (videos / f"clip_{i}.mp4").write_bytes(make_video(num_frames=8 + i, width=48, height=48, fps=12))
    (videos / "notes.mp4").write_bytes(b"this is text, not a video\n")
    cfg = load_config(data={
        "input": {"local_dir": str(videos)}, "output": {"path": str(tmp_path / "out")},
        "model": {"source": tiny_model, "dtype": "float32", "device": "cpu"}, "decode": {"num_frames": 4},
        "tasks": {"questions": ["What moves?"], "max_new_tokens": 6},
        "stages": {"mode": "fused", "decode_num_cpus": 0.5, "actor_num_cpus": 0.5, "decode_memory_gb": 0.25,
                   "fused_batch_size": 2, "decode_batch_size": 2},
        "ray": {"progress_bars": False, "num_cpus": 2}})
    try:
        result = run_module.run(cfg)
    finally:
        ray.shutdown()
    folder = Path(result.target.path)
    page = (folder / "_report.html").read_text()
    data = json.loads((folder / "_summary.json").read_text())
    assert data["videos"] == 4 and data["videos_error"] == 1 and data["errors_by_type"] == {"not_a_video": 1}
    assert data["errors"][0]["examples"][0][0].endswith("notes.mp4")
    assert data["ray_stages"] and sum(op["rows_out"] for op in data["ray_stages"]) > 0  # Ray Data's own statistics
    assert re.search(r"<polyline[^>]+points=\"[^\"]+\"", page) and "notes.mp4" in page and "not_a_video" in page
    assert page.count("<svg") >= 5
    assert {"_report.html", "_summary.json"} <= {p.name for p in folder.iterdir()}

    monkeypatch.setattr(run_module, "model_image_size", lambda _cfg: pytest.fail("frame size read for a complete run"))
    monkeypatch.setattr(run_module, "init_ray", lambda _cfg: pytest.fail("Ray started for a complete run"))
    again = run_module.run(cfg)
    assert again.summary.videos == 4 and again.summary.videos_this_run == 0
