"""Nightly incremental job against S3 (moto's server on loopback): S3 ETags, output listed, written,
committed and cleaned up on S3, readers see committed runs only.

Night 1 indexes 3 videos; then 2 objects are added, 1 is overwritten with new bytes (new ETag) and 1 is
PUT again with the same bytes (new LastModified, same ETag); an uncommitted run folder (data, no
``_manifest.json``) is planted. Night 2 processes exactly the 3 new/changed videos and deletes the
planted folder; night 3 finds nothing new and returns without starting a run.
"""

from __future__ import annotations

import datetime as dt
import io
import json
from collections import Counter

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import pipeline.run as run_module
from pipeline import storage
from pipeline.config import load_config
from pipeline.incremental import MANIFEST_NAME, load_state, run_nightly
from pipeline.schema import OUTPUT_SCHEMA
from pipeline.sink import committed_files, read_committed
from tests.jobs.jobdata import job_data
from tests.pipeline.s3server import boto_client, fake_aws_env, moto_server, upload_dir
from tests.pipeline.videos import make_video

pytestmark = pytest.mark.slow

BUCKET = "nightly"
TASKS = ("caption", "mcq:0")
BOGUS = "index/date=2024-05-01/run=bogus"  # an uncommitted run folder: data, no manifest
EMPTY = "index/date=2024-05-01/run=empty/"  # a run killed before its first file: only the folder marker
UNCOMMITTED = ["date=2024-05-01/run=bogus", "date=2024-05-01/run=empty"]


def _video(frames: int) -> bytes:
    return make_video(num_frames=frames, width=32, height=32, fps=8)


@pytest.fixture(scope="module")
def s3_ray(tiny_model):
    import ray

    with fake_aws_env(), moto_server() as endpoint:
        client = boto_client(endpoint)
        client.create_bucket(Bucket=BUCKET)
        upload_dir(client, tiny_model, BUCKET, "models/tiny-llava")
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)  # inherits the fake credentials
        try:
            yield endpoint, client
        finally:
            ray.shutdown()


def _cfg(endpoint: str, cache: str):
    model = {"source": f"s3://{BUCKET}/models/tiny-llava/", "cache_dir": cache}
    return load_config(data=job_data({"s3_prefix": f"s3://{BUCKET}/videos/"}, f"s3://{BUCKET}/index/", "",
                                     model=model, s3={"endpoint_url": endpoint}))


def _put(client, name: str, data: bytes) -> str:
    return client.put_object(Bucket=BUCKET, Key=f"videos/{name}", Body=data)["ETag"].strip('"')


def _keys(client, prefix: str) -> list[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return [o["Key"] for p in pages for o in p.get("Contents", [])]


def _rows(output: str, settings) -> Counter:
    t = read_committed(output, columns=["video_uri", "video_etag", "task_id", "status"], latest=False, s3_cfg=settings)
    assert set(t.column("status").to_pylist()) == {"ok"}
    return Counter(zip(t.column("video_uri").to_pylist(), t.column("video_etag").to_pylist(),
                       t.column("task_id").to_pylist()))


def _inputs(root: storage.Location, run_id: str, settings) -> dict[str, str]:
    for m in load_state(root, settings).manifests:
        if m["run_id"] == run_id:
            assert m["counts"]["rows"] == len(TASKS) * len(m["inputs"]) and m["files"] and m["chunks"]
            return {v["video_uri"]: v["etag"] for v in m["inputs"]}
    raise AssertionError(run_id)


def test_nightly_on_s3(s3_ray, tmp_path, monkeypatch):

    endpoint, client = s3_ray
    cfg = _cfg(endpoint, str(tmp_path / "cache"))
    output = cfg.output.path
    settings = cfg.s3
    root = storage.resolve(output, settings)
    uri = {n: f"s3://{BUCKET}/videos/{n}" for n in ("v0.mp4", "v1.mp4", "v2.mp4", "v3.mp4", "v4.mp4")}

    # ---- night 1: three videos
    etag = {n: _put(client, n, _video(6 + i)) for i, n in enumerate(["v0.mp4", "v1.mp4", "v2.mp4"])}
    client.put_object(Bucket=BUCKET, Key="videos/notes.txt", Body=b"not a video")  # skipped by extension
    r1 = run_nightly(cfg, now=dt.datetime(2024, 5, 1, 2, 0, tzinfo=dt.timezone.utc))
    assert (r1.listed, r1.pending, r1.new, r1.changed, r1.removed_uncommitted) == (3, 3, 3, 0, [])
    assert r1.summary.rows == 6 and r1.summary.rows_error == 0
    assert r1.manifest_uri == f"s3://{BUCKET}/index/date=2024-05-01/run={r1.run_id}/{MANIFEST_NAME}"
    assert _inputs(root, r1.run_id, settings) == {uri[n]: etag[n] for n in etag}  # the S3 ETags, quotes stripped
    assert _rows(output, settings) == Counter({(uri[n], etag[n], t): 1 for n in etag for t in TASKS})

    # ---- between nights: 2 added, 1 overwritten (new ETag), 1 re-PUT with the same bytes (same ETag)
    old_v1 = etag["v1.mp4"]
    etag["v3.mp4"] = _put(client, "v3.mp4", _video(5))
    etag["v4.mp4"] = _put(client, "v4.mp4", _video(7))
    etag["v1.mp4"] = _put(client, "v1.mp4", _video(11))
    assert _put(client, "v0.mp4", _video(6)) == etag["v0.mp4"]
    assert etag["v1.mp4"] != old_v1

    # ---- runs that died before their commit marker: one with a data object, one with only its folder
    ghost = dict(read_committed(output, s3_cfg=settings).slice(0, 1).to_pylist()[0], video_id="ghost",
                 video_uri=f"s3://{BUCKET}/videos/ghost.mp4", run_id="bogus")
    bogus = pa.Table.from_pylist([ghost], schema=OUTPUT_SCHEMA)
    buf = io.BytesIO()
    pq.write_table(bogus, buf)
    client.put_object(Bucket=BUCKET, Key=f"{BOGUS}/part-000-00000-deadbeef-0.parquet", Body=buf.getvalue())
    client.put_object(Bucket=BUCKET, Key=f"{BOGUS}/_commits/000-00000.json", Body=json.dumps(
        {"chunk": "000-00000", "attempt": 0, "rows": 1, "files": [{"name": "part-000-00000-deadbeef-0.parquet", "rows": 1}]}))
    client.put_object(Bucket=BUCKET, Key=EMPTY, Body=b"")
    state = load_state(root, settings)
    assert state.uncommitted_dirs == UNCOMMITTED and len(state.committed_dirs) == 1
    _fs, files = committed_files(output, settings)
    assert files and not [f for f in files if "run=bogus" in f]  # its chunk is committed, its run is not
    assert "ghost" not in str(read_committed(output, s3_cfg=settings).column("video_uri").to_pylist())

    # ---- night 2: exactly v1 (changed), v3, v4 (new); both uncommitted folders are deleted
    r2 = run_nightly(cfg, now=dt.datetime(2024, 5, 2, 2, 0, tzinfo=dt.timezone.utc))
    assert (r2.listed, r2.pending, r2.new, r2.changed) == (5, 3, 2, 1)
    assert r2.removed_uncommitted == UNCOMMITTED
    assert not [k for k in _keys(client, "index/") if "run=bogus" in k or "run=empty" in k]
    assert _inputs(root, r2.run_id, settings) == {uri[n]: etag[n] for n in ("v1.mp4", "v3.mp4", "v4.mp4")}
    assert "/date=2024-05-02/" in r2.manifest_uri

    rows = _rows(output, settings)
    expected = {(uri[n], etag[n], t): 1 for n in etag for t in TASKS}
    expected.update({(uri["v1.mp4"], old_v1, t): 1 for t in TASKS})  # the older version stays committed
    assert rows == Counter(expected)
    latest = read_committed(output, columns=["video_uri", "video_etag", "task_id"], s3_cfg=settings)  # latest
    assert Counter(zip(latest.column("video_uri").to_pylist(), latest.column("video_etag").to_pylist(),
                       latest.column("task_id").to_pylist())) == Counter({(uri[n], etag[n], t): 1 for n in etag for t in TASKS})

    # the committed files read as a hive-partitioned dataset straight from S3
    import pyarrow.dataset as pads

    fs_, files = committed_files(output, settings)
    ds = pads.dataset(files, filesystem=fs_, partitioning="hive", partition_base_dir=root.path)
    assert ds.count_rows() == 12 and {"date", "run"} <= set(ds.schema.names)
    assert set(ds.to_table(columns=["date"]).column("date").to_pylist()) == {"2024-05-01", "2024-05-02"}

    # ---- night 3: nothing new; returns before any Ray work
    def no_run(*_a, **_k):
        raise AssertionError("nothing new must not start a run")

    monkeypatch.setattr(run_module, "execute", no_run)
    monkeypatch.setattr(run_module, "init_ray", no_run)
    before = sorted(_keys(client, "index/date="))
    r3 = run_nightly(cfg, now=dt.datetime(2024, 5, 3, 2, 0, tzinfo=dt.timezone.utc))
    assert (r3.listed, r3.pending, r3.run_id, r3.removed_uncommitted) == (5, 0, None, [])
    assert "nothing new" in r3.render()
    assert sorted(_keys(client, "index/date=")) == before  # no run folder written or deleted
