"""Reliability end to end: every bad input through a local Ray against moto's S3 server, in ONE run.

Checks one row per (video, task) with the expected status / error_type, that nothing was lost, that no
credential or signed URL reaches the logs, the rows or the Parquet bytes, and that nothing is written
outside ``<output.path>/<run_id>/`` (a video_id containing ``../`` included). The figures this run
produces are the ones quoted in docs/reliability.md.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

import pipeline.run as run_module
from pipeline.config import load_config
from pipeline.tasks import video_tasks
from tests.pipeline.badinputs import bad_input_set
from tests.pipeline.s3server import boto_client, fake_aws_env, moto_server, upload_dir

pytestmark = pytest.mark.slow

BUCKET = "reliability"
# recognisable fake credentials: none of them may appear anywhere in what the run produces
SECRET = "S3CRET-reliability-never-log-7f3a9c"
TOKEN = "T0KEN-reliability-never-log-b81d2e"
ENV = {"AWS_ACCESS_KEY_ID": "AKIARELIABILITY0001", "AWS_SECRET_ACCESS_KEY": SECRET, "AWS_SESSION_TOKEN": TOKEN,
       "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
LONG_QUESTION = " ".join(f"w{i % 97}x{i % 13}" for i in range(6000))  # ~40k characters, far over 8192 tokens

# manifest rows beyond the generated files: (video_uri, expected error_type)
EXTRA = {
    "vanishing.mp4": (f"s3://{BUCKET}/videos/vanishing.mp4", "not_found"),  # deleted after listing
    "no_bucket.mp4": ("s3://reliability-no-such-bucket/v.mp4", "not_found"),  # stands in for a forbidden object
    "malformed_scheme": ("s3:/reliability/videos/one_frame.mp4", "invalid_uri"),
    "malformed_ftp": ("ftp://example.invalid/v.mp4", "invalid_uri"),
    "malformed_no_key": (f"s3://{BUCKET}", "invalid_uri"),
}


@pytest.fixture(scope="module")
def setup(tiny_model):
    import ray

    cases = bad_input_set()
    with fake_aws_env(ENV), moto_server() as endpoint:
        s3 = boto_client(endpoint)
        s3.create_bucket(Bucket=BUCKET)
        for name, (data, _) in cases.items():
            s3.put_object(Bucket=BUCKET, Key=f"videos/{name}", Body=data)
        s3.put_object(Bucket=BUCKET, Key="videos/vanishing.mp4", Body=cases["five_frames.mp4"][0])
        s3.put_object(Bucket=BUCKET, Key="videos/long_prompt.mp4", Body=cases["five_frames.mp4"][0])
        upload_dir(s3, tiny_model, BUCKET, "models/tiny-llava")
        lines = [{"video_uri": f"s3://{BUCKET}/videos/{n}", "video_id": n} for n in cases]
        lines = [dict(r, video_id="../../escape") if r["video_id"].startswith("spaces") else r for r in lines]
        lines += [{"video_uri": uri, "video_id": vid} for vid, (uri, _) in EXTRA.items()]
        lines.append({"video_uri": f"s3://{BUCKET}/videos/long_prompt.mp4", "video_id": "long_prompt",
                      "questions": [LONG_QUESTION]})
        s3.put_object(Bucket=BUCKET, Key="manifests/bad.jsonl", Body="\n".join(json.dumps(r) for r in lines).encode())
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        try:
            yield endpoint, s3, cases
        finally:
            ray.shutdown()


def test_bad_inputs_end_to_end(setup, tmp_path, monkeypatch, caplog, capfd):
    import ray

    endpoint, s3, cases = setup
    real_list = run_module.list_videos

    def list_then_delete(*args, **kwargs):  # the object disappears between listing and download
        table = real_list(*args, **kwargs)
        s3.delete_object(Bucket=BUCKET, Key="videos/vanishing.mp4")
        return table

    monkeypatch.setattr(run_module, "list_videos", list_then_delete)
    cfg = load_config(data={
        "input": {"manifest": f"s3://{BUCKET}/manifests/bad.jsonl"},
        "output": {"path": f"s3://{BUCKET}/out"},
        "model": {"source": f"s3://{BUCKET}/models/tiny-llava/", "cache_dir": str(tmp_path / "cache")},
        "decode": {"num_frames": 8},
        "tasks": {"questions": ["What moves?"], "mcq": [], "max_new_tokens": 4},
        "stages": {"decode_num_cpus": 0.5, "actor_num_cpus": 0.5, "decode_memory_gb": 0.25,
                   "fused_batch_size": 4, "decode_batch_size": 2},
        "ray": {"progress_bars": False},
        "s3": {"endpoint_url": endpoint},
    })
    result = run_module.run(cfg)
    run_id = cfg.effective_run_id()

    # ---- nothing written outside <output>/<run_id>/
    keys = [o["Key"] for p in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET) for o in p.get("Contents", [])]
    outside = [k for k in keys if not k.startswith(("videos/", "models/", "manifests/"))]
    markers = {"out/", f"out/{run_id}/"}  # empty "folder" objects pyarrow's S3 filesystem creates
    reports = {f"out/{run_id}/_report.html", f"out/{run_id}/_summary.json"}  # the run report, next to the rows
    written = [k for k in outside if k not in markers and k not in reports]
    assert written and all(k.startswith((f"out/{run_id}/part-", f"out/{run_id}/_commits/")) for k in written), outside
    assert reports <= set(outside), outside

    blobs = [s3.get_object(Bucket=BUCKET, Key=k)["Body"].read() for k in written]  # data and commit manifests
    report_blobs = [s3.get_object(Bucket=BUCKET, Key=k)["Body"].read() for k in sorted(reports)]
    import io

    rows = [r for k, b in zip(written, blobs) if k.endswith(".parquet") for r in pq.read_table(io.BytesIO(b)).to_pylist()]

    # ---- one row per (video, task); every input video present; expected status / error_type
    expected = {n: exp for n, (_, exp) in cases.items()}
    expected["../../escape"] = expected.pop(next(n for n in cases if n.startswith("spaces")))
    expected.update({vid: exp for vid, (_, exp) in EXTRA.items()})
    expected["long_prompt"] = "ok"
    keys_rt = Counter((r["video_id"], r["task_id"]) for r in rows)
    assert max(keys_rt.values()) == 1
    by_video: dict[str, list[dict]] = {}
    for r in rows:
        by_video.setdefault(r["video_id"], []).append(r)
    assert set(by_video) == set(expected), set(expected) ^ set(by_video)
    base_tasks = {t.task_id for t in video_tasks(cfg.tasks, None)}
    for vid, exp in expected.items():
        vrows = by_video[vid]
        if vid == "long_prompt":
            assert {r["task_id"] for r in vrows} == base_tasks | {"vq:0"}
            status = {r["task_id"]: (r["status"], r["error_type"]) for r in vrows}
            assert status.pop("vq:0") == ("error", "prompt_too_long")
            assert set(status.values()) == {("ok", None)}
            continue
        assert {r["task_id"] for r in vrows} == base_tasks, vid
        got = {r["status"] if r["status"] == "ok" else r["error_type"] for r in vrows}
        assert got == {exp}, (vid, [r["error_message"] for r in vrows])
        for r in vrows:
            if r["status"] == "ok":
                assert r["num_frames"] == 8 and len(r["frame_timestamps_s"]) == 8 and r["output_tokens"] >= 1
    assert result.summary.videos == len(expected) and result.summary.rows == len(rows)

    # ---- no credentials or signed URLs in the rows, the Parquet bytes, or any log
    needles = [SECRET, TOKEN, "X-Amz-Signature", "X-Amz-Credential"]
    text = json.dumps(rows, default=str)
    assert not [n for n in needles if n in text]
    assert not [n for b in blobs + report_blobs for n in needles if n.encode() in b]
    out, err = capfd.readouterr()
    logs = [caplog.text, out, err]
    session = Path(ray._private.worker._global_node.get_session_dir_path())
    log_files = [p for p in (session / "logs").rglob("*") if p.is_file()]
    assert log_files
    logs += [p.read_text(errors="replace") for p in log_files]
    assert any("not_found" in t for t in logs)  # the worker logs were captured (they name the failures)
    leaks = [n for n in needles if any(n in t for t in logs)]
    assert not leaks, leaks

    figures = {"videos": len(expected), "rows": len(rows), "error_videos": sum(1 for e in expected.values() if e != "ok"),
               "error_rows": sum(r["status"] == "error" for r in rows), "rows_lost": 0,
               "error_types": dict(Counter(r["error_type"] for r in rows if r["error_type"])),
               "log_files_scanned": len(log_files) + 3}
    print("RELIABILITY_FIGURES", json.dumps(figures, sort_keys=True))
