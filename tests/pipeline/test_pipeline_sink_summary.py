"""The output protocol (chunks committed by a manifest, one reader), storage locations and conditional
writes, the S3 model cache, and the summary."""

from __future__ import annotations

import os

import pyarrow.parquet as pq

from pipeline import sink, storage
from pipeline.config import OutputConfig, S3Config
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


def test_locations_and_one_relative_path_rule(tmp_path):
    t = storage.resolve(sink.run_uri("out/", "run-1"), S3Config())
    assert t.uri.endswith("out/run-1") and t.path == t.uri and t.local
    t = storage.resolve(sink.run_uri("s3://bkt/out", "run-1"), S3Config(endpoint_url="http://127.0.0.1:9"))
    assert t.path == "bkt/out/run-1" and t.uri == "s3://bkt/out/run-1" and not t.local
    assert t.child("x.json").uri == "s3://bkt/out/run-1/x.json"
    m = str(tmp_path / "m" / "list.jsonl")
    assert storage.resolve_relative("a/v.mp4", m) == str(tmp_path / "m" / "a" / "v.mp4")
    for kept in ("/abs/v.mp4", "s3://b/k.mp4", "s3:/b/k", "http://h/v.mp4", "file:///x%20y.mp4", ""):
        assert storage.resolve_relative(kept, m) == kept
    assert storage.resolve_relative("v.mp4", "s3://b/m/list.jsonl") == "v.mp4"  # kept: fetch says invalid_uri


def _commit(folder, attempt: int, task: int, table, max_rows: int = 100) -> dict:
    output = OutputConfig(path=str(folder), min_rows_per_file=1, max_rows_per_file=max_rows)
    return sink.ChunkWriter(str(folder), attempt, output).write([table], task)


def test_chunks_are_visible_only_once_committed(tmp_path):
    folder = tmp_path / "r"
    assert sink.read_committed(str(folder)).num_rows == 0
    table = rows_to_table(_rows())
    # a write task killed before its commit: files without a manifest are never read
    folder.mkdir()
    pq.write_table(table, folder / "part-000-00009-dead-0.parquet")
    m = _commit(folder, 0, 1, table, max_rows=3)
    assert [f["rows"] for f in m["files"]] == [3, 1] and m["rows"] == 4 and m["videos"] == 2
    assert (folder / sink.COMMITS / "000-00001.json").exists()
    got = sink.read_committed(str(folder))
    assert got.num_rows == 4 and got.schema.equals(OUTPUT_SCHEMA, check_metadata=False)
    _fs, files = sink.committed_files(str(folder))
    assert sorted(p.rsplit("/", 1)[-1] for p in files) == sorted(f["name"] for f in m["files"])


def test_a_retried_write_task_commits_once(tmp_path):
    """A write task retried after its first try committed: the retry's files are dropped, the commit stands."""
    folder = tmp_path / "r"
    table = rows_to_table(_rows())
    first = _commit(folder, 0, 3, table)
    again = _commit(folder, 0, 3, table)
    assert again == first
    assert sorted(p.name for p in folder.glob("*.parquet")) == [f["name"] for f in first["files"]]
    assert sink.read_committed(str(folder)).num_rows == 4


def test_newest_attempt_of_a_video_supersedes_older_ones(tmp_path):
    folder = tmp_path / "r"
    rows = _rows()  # a: ok x2, b: not_found x2
    _commit(folder, 0, 0, rows_to_table(rows))
    fixed = [dict(r, status="ok", error_type=None, answer="now ok") for r in rows[2:]]
    _commit(folder, 1, 0, rows_to_table(fixed))
    latest = sink.read_committed(str(folder), ["video_id", "task_id", "status"])
    assert sorted(zip(*(latest.column(c).to_pylist() for c in ("video_id", "task_id", "status")))) == [
        ("a", "caption", "ok"), ("a", "qa:0", "ok"), ("b", "caption", "ok"), ("b", "qa:0", "ok")]
    assert sink.read_committed(str(folder), ["video_id"], latest=False).num_rows == 6  # history


def test_summary_of_committed_rows(tmp_path):
    folder = tmp_path / "r"
    _commit(folder, 0, 0, rows_to_table(_rows()))
    table = sink.read_committed(str(folder), columns=SUMMARY_COLUMNS)
    s = summarize(table, run_id="r", output_uri=str(folder), wall_s=2.0, files=len(sink.committed_files(str(folder))[1]))
    assert (s.videos, s.videos_ok, s.videos_error, s.rows, s.rows_ok, s.rows_error, s.files) == (2, 1, 1, 4, 2, 2, 1)
    assert s.errors_by_type == {"not_found": 1}
    assert (s.visual_tokens_full, s.visual_tokens_prefill) == (128, 62) and s.output_tokens == 8
    decode, encode, generate = s.stages
    assert decode.busy_s == 2.1 and encode.busy_s == 0.25 and generate.busy_s == 1.0 and generate.items == 2
    text = s.render()
    assert "ok 1   error 1" in text and "2.06x fewer" in text and len(text.splitlines()) < 25
    assert s.to_dict()["compression_ratio"] > 2
    assert s.videos_per_s == 1.0 and "1.00 videos/s" in text and "resumed" not in text


def test_conditional_writes_local(tmp_path):
    uri = str(tmp_path / "d" / "x.json")
    v1 = storage.put_if_absent(uri, b"1")
    assert v1 and storage.put_if_absent(uri, b"2") is None and storage.read_bytes(uri) == b"1"
    v2 = storage.replace_if(uri, b"3", v1)
    assert v2 and storage.replace_if(uri, b"4", v1) is None and storage.read_versioned(uri) == (b"3", v2)
    assert storage.replace_if(uri, None, v1) is None and storage.replace_if(uri, None, v2) == ""
    assert storage.read_versioned(uri) is None
    assert not [p for p in (tmp_path / "d").iterdir() if p.name.endswith(".tmp")]


def test_resumed_summary_counts_only_this_runs_videos(tmp_path):
    """A resumed run's throughput is the videos it processed over its own wall time."""
    table = rows_to_table(_rows()).select(SUMMARY_COLUMNS)
    s = summarize(table, run_id="r", output_uri="o", wall_s=2.0, files=1, videos_this_run=1)
    assert s.videos == 2 and s.videos_per_s == 0.5
    assert "resumed: 1 videos were already complete, 1 processed by this run" in s.render()
    assert summarize(table, run_id="r", output_uri="o", wall_s=2.0, files=1, videos_this_run=0).videos_per_s == 0.0


def test_model_cache_copies_once(tmp_path, monkeypatch):
    from pyarrow import fs

    calls = []

    def fake_copy(src, dest, **_kw):
        calls.append(src)
        os.makedirs(dest, exist_ok=True)
        with open(os.path.join(dest, "config.json"), "w") as f:
            f.write("{}")

    monkeypatch.setattr(fs, "copy_files", fake_copy)
    cfg = S3Config(endpoint_url="http://127.0.0.1:9")
    a = storage.local_copy("s3://bkt/models/m/", tmp_path, cfg)
    b = storage.local_copy("s3://bkt/models/m/", tmp_path, cfg)
    assert a == b and calls == ["bkt/models/m"] and os.path.exists(os.path.join(a, "config.json"))
    assert storage.local_copy("org/model", tmp_path, cfg) == "org/model"
