"""Sink naming and read-back, S3 model cache, and the summary."""

from __future__ import annotations

import pyarrow.parquet as pq

from pipeline import s3, sink
from pipeline.schema import OUTPUT_SCHEMA, output_row, rows_to_table
from pipeline.summary import SUMMARY_COLUMNS, summarize
from pipeline.tasks import Task


def _rows():
    caption, qa = Task("caption", "caption", "Describe.", 8), Task("qa:0", "qa", "Why?", 8)
    ok = {"video_id": "a", "video_uri": "a.mp4", "status": "ok", "visual_tokens_full": 128, "visual_tokens_prefill": 62,
          "fetch_s": 0.5, "decode_s": 1.5, "encode_s": 0.25}
    bad = {"video_id": "b", "video_uri": "b.mp4", "status": "error", "error_type": "not_found", "error_message": "gone",
           "fetch_s": 0.1}
    rows = [output_row(ok, t, run_id="r", compression="{}", output_tokens=4, visual_tokens_attended=20.0,
                       timings={"generate_s": 0.5}) for t in (caption, qa)]
    rows += [output_row(bad, t, run_id="r", compression="{}") for t in (caption, qa)]
    return rows


def test_file_names_are_deterministic():
    assert sink.filename_for_task(3) == "part-00003-{i}.parquet"
    t = sink.resolve("out/", "run-1", s3.S3Settings())
    assert t.uri.endswith("out/run-1") and t.path == t.uri
    t = sink.resolve("s3://bkt/out", "run-1", s3.S3Settings(endpoint_url="http://127.0.0.1:9"))
    assert t.path == "bkt/out/run-1" and t.uri == "s3://bkt/out/run-1"


def test_read_run_and_summary(tmp_path):
    target = sink.resolve(str(tmp_path), "r", s3.S3Settings())
    assert sink.read_run(target).num_rows == 0
    (tmp_path / "r").mkdir()
    pq.write_table(rows_to_table(_rows()), tmp_path / "r" / "part-00000-0.parquet")
    table = sink.read_run(target, columns=SUMMARY_COLUMNS)
    s = summarize(table, run_id="r", output_uri=target.uri, wall_s=2.0, files=len(sink.list_files(target)))
    assert (s.videos, s.videos_ok, s.videos_error, s.rows, s.rows_ok, s.rows_error, s.files) == (2, 1, 1, 4, 2, 2, 1)
    assert s.errors_by_type == {"not_found": 1}
    assert (s.visual_tokens_full, s.visual_tokens_prefill) == (128, 62) and s.output_tokens == 8
    decode, encode, generate = s.stages
    assert decode.busy_s == 2.1 and encode.busy_s == 0.25 and generate.busy_s == 1.0 and generate.items == 2
    text = s.render()
    assert "ok 1   error 1" in text and "2.06x fewer" in text and len(text.splitlines()) < 25
    assert s.to_dict()["compression_ratio"] > 2
    assert sink.read_run(target).schema.equals(OUTPUT_SCHEMA, check_metadata=False)
    assert s.videos_per_s == 1.0 and "1.00 videos/s" in text and "resumed" not in text


def test_resumed_summary_counts_only_this_runs_videos(tmp_path):
    """A resumed run's throughput is the videos it processed over its own wall time."""
    table = rows_to_table(_rows()).select(SUMMARY_COLUMNS)
    s = summarize(table, run_id="r", output_uri="o", wall_s=2.0, files=1, videos_this_run=1)
    assert s.videos == 2 and s.videos_per_s == 0.5
    assert "resumed: 1 videos were already complete, 1 processed by this run" in s.render()
    assert summarize(table, run_id="r", output_uri="o", wall_s=2.0, files=1, videos_this_run=0).videos_per_s == 0.0


def test_model_cache_copies_once(tmp_path, monkeypatch):
    calls = []

    def fake_download(uri, dest, settings):
        calls.append(uri)
        (dest / "config.json").write_text("{}")
        return 1

    monkeypatch.setattr(s3, "download_prefix", fake_download)
    a = s3.ensure_local_model("s3://bkt/models/m/", tmp_path, s3.S3Settings())
    b = s3.ensure_local_model("s3://bkt/models/m/", tmp_path, s3.S3Settings())
    assert a == b and calls == ["s3://bkt/models/m/"] and (tmp_path / a / "config.json").exists()
    assert s3.ensure_local_model("org/model", tmp_path, s3.S3Settings()) == "org/model"
