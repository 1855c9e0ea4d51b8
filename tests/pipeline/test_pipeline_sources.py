"""Sources: local folders, manifests (JSONL, CSV, Parquet, S3) and paginated S3 listing."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline import storage
from pipeline.config import InputConfig, S3Config
from pipeline.sources import SourceError, list_videos, manifest_source, video_id_for

SETTINGS = S3Config()


def _rows(table) -> list[dict]:
    return table.to_pylist()


def test_local_folder(tmp_path):
    (tmp_path / "a").mkdir()
    for name in ["a/x.MP4", "b.mkv", "notes.txt", "c.webm"]:
        (tmp_path / name).write_bytes(b"x")
    table = list_videos(InputConfig(local_dir=str(tmp_path)), SETTINGS)
    uris = table.column("video_uri").to_pylist()
    assert uris == [str(tmp_path / n) for n in ["a/x.MP4", "b.mkv", "c.webm"]]  # sorted, extension filter
    assert table.column("video_id").to_pylist() == [video_id_for(u) for u in uris]
    assert list_videos(InputConfig(local_dir=str(tmp_path), limit=2), SETTINGS).num_rows == 2


def test_video_id_is_stable():
    assert video_id_for("s3://b/v.mp4") == video_id_for("s3://b/v.mp4") != video_id_for("s3://b/w.mp4")
    assert len(video_id_for("x")) == 16


def test_manifest_formats(tmp_path):
    rows = [{"video_uri": "clips/a.mp4", "video_id": "A", "questions": ["why?", "how?"]},
            {"video_uri": "s3://bkt/b.mp4"}]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    (tmp_path / "m.csv").write_text("video_uri,video_id,questions\nclips/a.mp4,A,why?|how?\ns3://bkt/b.mp4,,\n")
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "m.parquet")
    for name in ["m.jsonl", "m.csv", "m.parquet"]:
        out = _rows(manifest_source(str(tmp_path / name), SETTINGS))
        assert out[0] == {"video_id": "A", "video_uri": str(tmp_path / "clips/a.mp4"), "questions": ["why?", "how?"],
                          "video_etag": None}, name
        assert out[1] == {"video_id": video_id_for("s3://bkt/b.mp4"), "video_uri": "s3://bkt/b.mp4", "questions": None,
                          "video_etag": None}, name


def test_bad_manifests(tmp_path):
    (tmp_path / "dup.jsonl").write_text('{"video_uri": "a", "video_id": "x"}\n{"video_uri": "b", "video_id": "x"}\n')
    with pytest.raises(SourceError, match="duplicate video_id"):
        _rows(manifest_source(str(tmp_path / "dup.jsonl"), SETTINGS))
    (tmp_path / "nouri.jsonl").write_text('{"video_id": "x"}\n')
    with pytest.raises(SourceError, match="row 1: missing video_uri"):
        _rows(manifest_source(str(tmp_path / "nouri.jsonl"), SETTINGS))
    (tmp_path / "m.txt").write_text("x")
    with pytest.raises(SourceError, match="unknown format"):
        _rows(manifest_source(str(tmp_path / "m.txt"), SETTINGS))
    with pytest.raises(SourceError, match="does not exist"):
        _rows(manifest_source(str(tmp_path / "absent.jsonl"), SETTINGS))
    with pytest.raises(SourceError, match="is not a folder"):
        list_videos(InputConfig(local_dir=str(tmp_path / "absent")), SETTINGS)


def test_s3_listing_is_paginated_and_filtered(mocked_s3):
    c = mocked_s3
    for i in range(23):
        c.put_object(Bucket="bkt", Key=f"videos/{i:03d}.mp4", Body=b"x")
    c.put_object(Bucket="bkt", Key="videos/skip.json", Body=b"x")
    c.put_object(Bucket="bkt", Key="videos/sub/", Body=b"")
    c.put_object(Bucket="bkt", Key="other/1.mp4", Body=b"x")
    c.put_object(Bucket="bkt", Key="m/list.jsonl", Body=b'{"video_uri": "s3://bkt/videos/000.mp4"}\n')
    entries = list(storage.list_objects("s3://bkt/videos/", SETTINGS, [".mp4"], page_size=5))
    uris = [e.uri for e in entries]
    table = list_videos(InputConfig(s3_prefix="s3://bkt/videos/"), SETTINGS)
    # the listing's ETag is the object's (quotes stripped), read once, with the size
    etag = c.head_object(Bucket="bkt", Key="videos/000.mp4")["ETag"].strip('"')
    assert (entries[0].size, entries[0].etag) == (1, etag)
    assert table.column("video_etag").to_pylist()[0] == etag and table.num_rows == 23  # carried to the decode
    manifest = list_videos(InputConfig(manifest="s3://bkt/m/list.jsonl"), SETTINGS)
    assert uris == [f"s3://bkt/videos/{i:03d}.mp4" for i in range(23)]
    assert table.column("video_uri").to_pylist() == uris
    assert manifest.column("video_uri").to_pylist() == ["s3://bkt/videos/000.mp4"]
