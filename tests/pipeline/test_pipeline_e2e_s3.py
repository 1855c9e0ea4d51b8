"""End to end on a local Ray against a real S3 API (moto's server): manifest in, Parquet out, read back."""

from __future__ import annotations

import json
from collections import Counter

import pyarrow.parquet as pq
import pytest
from pyarrow import fs

from pipeline import sink
from pipeline.config import load_config
from pipeline.run import run
from pipeline.schema import OUTPUT_SCHEMA
from pipeline.tasks import video_tasks
from tests.pipeline.s3server import boto_client, fake_aws_env, moto_server, upload_dir

pytestmark = pytest.mark.slow

BUCKET = "corpus"
BAD = {"truncated.mp4": "corrupt_video", "not_a_video.mp4": "not_a_video", "missing.mp4": "not_found",
       "audio_only.mp4": "no_video_stream"}


@pytest.fixture(scope="module")
def s3_ray(tiny_model, sample_videos):
    """moto server + bucket (videos, manifest, model) + a local Ray started after the fake credentials."""
    import ray

    with fake_aws_env(), moto_server() as endpoint:
        s3 = boto_client(endpoint)
        s3.create_bucket(Bucket=BUCKET)
        for name, data in sample_videos.items():
            s3.put_object(Bucket=BUCKET, Key=f"videos/{name}", Body=data)
        s3.put_object(Bucket=BUCKET, Key="videos/readme.txt", Body=b"not listed: wrong extension")
        upload_dir(s3, tiny_model, BUCKET, "models/tiny-llava")
        names = sorted(sample_videos) + ["missing.mp4"]
        lines = []
        for i, name in enumerate(names):
            row = {"video_uri": f"s3://{BUCKET}/videos/{name}"}
            if i % 3 == 0:
                row["video_id"] = f"vid-{i:03d}"
            if i % 2 == 0:
                row["questions"] = [f"Question {i} about {name}?"]
            lines.append(json.dumps(row))
        s3.put_object(Bucket=BUCKET, Key="manifests/all.jsonl", Body="\n".join(lines).encode())
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            yield endpoint
        finally:
            ray.shutdown()


def _cfg(endpoint: str, tmp_path, **sections):
    data = {
        "input": {"manifest": f"s3://{BUCKET}/manifests/all.jsonl"},
        "output": {"path": f"s3://{BUCKET}/out", "min_rows_per_file": 8},  # several chunks
        "model": {"source": f"s3://{BUCKET}/models/tiny-llava/", "cache_dir": str(tmp_path / "cache")},
        "decode": {"num_frames": 8},
        "tasks": {"questions": ["What moves?"], "max_new_tokens": 6, "mcq_max_new_tokens": 3,
                  "mcq": [{"question": "What is shown?", "options": ["bars", "cats", "cars"]}]},
        "stages": {"decode_num_cpus": 0.5, "actor_num_cpus": 0.5, "decode_memory_gb": 0.25,
                   "fused_batch_size": 3, "decode_batch_size": 2},
        "ray": {"progress_bars": False},
        "s3": {"endpoint_url": endpoint},
    }
    for k, v in sections.items():
        data.setdefault(k, {}).update(v)
    return load_config(data=data)


def _read_back(endpoint: str, uri: str):
    host = endpoint.split("://", 1)[1]
    s3fs = fs.S3FileSystem(endpoint_override=host, scheme="http", region="us-east-1")
    path = uri[len("s3://"):]
    files = sorted(i.path for i in s3fs.get_file_info(fs.FileSelector(path)) if i.path.endswith(".parquet"))
    tables = [pq.read_table(f, filesystem=s3fs) for f in files]
    return files, tables


def test_manifest_to_s3_parquet(s3_ray, tmp_path):
    endpoint = s3_ray
    cfg = _cfg(endpoint, tmp_path)
    result = run(cfg)
    files, tables = _read_back(endpoint, result.target.uri)
    assert files and all(f.split("/")[-1].startswith("part-") for f in files)
    for t in tables:
        assert t.schema.equals(OUTPUT_SCHEMA, check_metadata=False), t.schema
    rows = [r for t in tables for r in t.to_pylist()]

    # exactly one row per (video, task)
    keys = Counter((r["video_id"], r["task_id"]) for r in rows)
    assert max(keys.values()) == 1
    by_uri = {}
    for r in rows:
        by_uri.setdefault(r["video_uri"].rsplit("/", 1)[-1], []).append(r)
    assert len(by_uri) == 12  # 11 objects + one listed in the manifest but missing
    for name, vrows in by_uri.items():
        expected = {t.task_id for t in video_tasks(cfg.tasks, None)}
        got = {r["task_id"] for r in vrows}
        assert expected <= got and all(t in expected or t.startswith("vq:") for t in got), (name, got)
        assert len({r["video_id"] for r in vrows}) == 1
        if name in BAD:
            assert {r["status"] for r in vrows} == {"error"}, name
            assert {r["error_type"] for r in vrows} == {BAD[name]}, (name, vrows[0]["error_message"])
            assert all(r["error_message"] for r in vrows)
        else:
            for r in vrows:
                assert r["status"] == "ok", (name, r["error_type"], r["error_message"])
                assert r["num_frames"] == 8 and len(r["frame_timestamps_s"]) == 8
                assert r["frame_timestamps_s"] == sorted(r["frame_timestamps_s"])
                assert r["visual_tokens_full"] == 8 * 4 and 0 < r["visual_tokens_prefill"] < 32
                assert r["video_bytes"] > 0 and r["video_etag"] and r["duration_s"] > 0
                assert r["output_tokens"] >= 1 and r["prompt_tokens"] > r["visual_tokens_prefill"]
                assert r["model_id"] == cfg.model.source
                assert json.loads(r["compression"])["method"] == "dycoke" and json.loads(r["compression"])["dycoke"]["k"] == 0.7
                assert r["timings"]["decode_s"] > 0 and r["timings"]["encode_s"] > 0
                if r["task_type"] == "mcq":
                    assert r["choice"] in (None, "A", "B", "C")
    # manifest ids kept, others hashed; per-video questions became vq: tasks
    ids = {r["video_id"] for r in rows}
    assert "vid-000" in ids and any(len(i) == 16 for i in ids)
    assert any(r["task_id"] == "vq:0" for r in rows)
    assert result.summary.videos == 12 and result.summary.videos_error == len(BAD)
    assert result.summary.rows == len(rows)

    # a re-run with the same config finds its run complete: nothing is processed, no file is added
    result2 = run(cfg)
    files2, tables2 = _read_back(endpoint, result2.target.uri)
    assert result2.target.uri == result.target.uri
    assert files2 == files
    assert sum(t.num_rows for t in tables2) == len(rows) == result2.summary.rows
    assert result2.summary.videos == 12

    # a write task that died after writing its file and before its commit: the file was never committed; the
    # re-run deletes it and redoes exactly that chunk's videos as attempt-1 chunks (the commit manifest is an S3
    # PutObject with If-None-Match: *); no committed file is touched
    client = boto_client(endpoint)
    prefix = result.target.uri[len(f"s3://{BUCKET}/"):]
    commits = sorted(o["Key"] for o in client.list_objects_v2(Bucket=BUCKET, Prefix=f"{prefix}/{sink.COMMITS}/")["Contents"])
    assert len(commits) >= 2
    lost = json.loads(client.get_object(Bucket=BUCKET, Key=commits[0])["Body"].read())
    client.delete_object(Bucket=BUCKET, Key=commits[0])
    lost_files = {f"{BUCKET}/{prefix}/{f['name']}" for f in lost["files"]}
    victims = {r["video_id"] for f, t in zip(files, tables) if f in lost_files for r in t.to_pylist()}
    assert victims and len(victims) < 12
    result3 = run(cfg)
    files3, tables3 = _read_back(endpoint, result3.target.uri)
    new_files = sorted(set(files3) - set(files))
    assert not lost_files & set(files3) and set(files) - lost_files <= set(files3)
    assert new_files and all(sink.attempt_of(f) == 1 for f in new_files)
    assert {r["video_id"] for f, t in zip(files3, tables3) if f in new_files for r in t.to_pylist()} == victims
    keys3 = Counter((r["video_id"], r["task_id"]) for t in tables3 for r in t.to_pylist())
    assert keys3 == keys and result3.summary.rows == len(rows)

    # output.on_existing=overwrite redoes everything: the folder is replaced, not added to
    first_done = max(r["processed_at"] for t in tables3 for r in t.to_pylist())
    result4 = run(_cfg(endpoint, tmp_path, output={"on_existing": "overwrite"}))
    files4, tables4 = _read_back(endpoint, result4.target.uri)
    assert result4.target.uri == result.target.uri and all(sink.attempt_of(f) == 0 for f in files4)
    rows4 = [r for t in tables4 for r in t.to_pylist()]
    assert Counter((r["video_id"], r["task_id"]) for r in rows4) == keys
    assert min(r["processed_at"] for r in rows4) > first_done


def test_s3_prefix_split_mode(s3_ray, tmp_path):
    endpoint = s3_ray
    cfg = _cfg(endpoint, tmp_path, input={"manifest": None, "s3_prefix": f"s3://{BUCKET}/videos/"},
               stages={"mode": "split", "encode_batch_size": 4, "generate_batch_size": 4},
               tasks={"mcq": [], "questions": []})
    result = run(cfg)
    _, tables = _read_back(endpoint, result.target.uri)
    rows = [r for t in tables for r in t.to_pylist()]
    names = {r["video_uri"].rsplit("/", 1)[-1] for r in rows}
    assert "readme.txt" not in names and len(names) == 11  # every .mp4 object, nothing else
    assert all(r["task_id"] == "caption" for r in rows) and len(rows) == 11
    errors = {r["video_uri"].rsplit("/", 1)[-1]: r["error_type"] for r in rows if r["status"] == "error"}
    assert errors == {k: v for k, v in BAD.items() if k != "missing.mp4"}
