"""Nightly incremental job on a local folder: only new/changed videos, crash safety, exactly-once rows."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from pipeline import sink, storage
from pipeline.config import load_config
from pipeline.incremental import PAUSE_ENV, load_state, run_nightly
from pipeline.samples import make_video
from pipeline.sink import committed_files, read_committed
from tests.jobs.jobdata import job_data

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def _data(videos: Path, out: Path, model: str) -> dict:
    return job_data({"local_dir": str(videos)}, str(out), model)


def _write(path: Path, n: int) -> None:
    path.write_bytes(make_video(num_frames=n, width=32, height=32, fps=8))


@pytest.fixture(scope="module")
def local_ray():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _keys(output: str) -> Counter:
    t = read_committed(output, columns=["video_uri", "video_etag", "task_id"], latest=False)  # every version
    return Counter(zip(t.column("video_uri").to_pylist(), t.column("video_etag").to_pylist(), t.column("task_id").to_pylist()))


def test_nightly_new_changed_crash_exactly_once(tmp_path, tiny_model, local_ray):
    videos, out = tmp_path / "videos", tmp_path / "index"
    videos.mkdir()
    for i in range(3):
        _write(videos / f"v{i}.mp4", 6 + i)
    cfg = load_config(data=_data(videos, out, tiny_model))

    r1 = run_nightly(cfg)
    assert (r1.listed, r1.pending, r1.new, r1.changed) == (3, 3, 3, 0)
    assert r1.summary.rows == 6 and r1.manifest_uri.endswith("/_manifest.json")
    assert "/date=" in r1.manifest_uri and f"/run={r1.run_id}/" in r1.manifest_uri

    # nothing new: quick, no run
    t0 = time.perf_counter()
    r = run_nightly(cfg)
    assert r.pending == 0 and r.run_id is None and "nothing new" in r.render()
    assert time.perf_counter() - t0 < 5

    # two new videos, one changed (new bytes and size, mtime moved)
    _write(videos / "v3.mp4", 5)
    _write(videos / "v4.mp4", 7)
    _write(videos / "v1.mp4", 11)
    os.utime(videos / "v1.mp4", (time.time() + 5, time.time() + 5))
    r2 = run_nightly(cfg)
    assert (r2.listed, r2.pending, r2.new, r2.changed) == (5, 3, 2, 1)
    processed = {Path(v["video_uri"]).name for v in _manifest_inputs(str(out), r2.run_id)}
    assert processed == {"v1.mp4", "v3.mp4", "v4.mp4"}

    # a run killed after committing its chunks but before its run manifest leaves nothing committed
    _write(videos / "v5.mp4", 6)
    _write(videos / "v6.mp4", 6)
    cfg_file = tmp_path / "job.yaml"
    import yaml

    cfg_file.write_text(yaml.safe_dump({**_data(videos, out, tiny_model), "ray": {"progress_bars": False, "num_cpus": 2}}))
    env = {**os.environ, PAUSE_ENV: "120", "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "RAY_ADDRESS": ""}
    proc = subprocess.Popen([sys.executable, "-m", "jobs.nightly", "--config", str(cfg_file)], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline = time.time() + 180
        seen = ""
        for line in proc.stdout:
            seen += line
            if "DATA WRITTEN" in line or time.time() > deadline:
                break
        assert "DATA WRITTEN" in seen, seen[-3000:]
        os.killpg(proc.pid, signal.SIGKILL)  # the job and the Ray it started (its own session)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    parts = list(out.glob("date=*/run=*/part-*.parquet"))
    markers = list(out.glob("date=*/run=*/_manifest.json"))
    assert len(markers) == 2 and len({p.parent for p in parts}) == 3  # one uncommitted folder with data
    fs_, files = committed_files(str(out))
    assert len(files) == 2  # readers see only committed runs
    assert list(out.glob(f"date=*/run=*/{sink.COMMITS}/*.json"))  # ... though every run folder has chunks
    assert sum(_keys(str(out)).values()) == 6 + 6

    r3 = run_nightly(cfg)
    assert r3.removed_uncommitted and (r3.pending, r3.new, r3.changed) == (2, 2, 0)
    assert len({p.parent for p in out.glob("date=*/run=*/part-*.parquet")}) == 3  # uncommitted folder gone
    keys = _keys(str(out))
    assert all(n == 1 for n in keys.values()), keys
    assert len(keys) == (3 + 3 + 2) * 2
    latest = read_committed(str(out), columns=["video_uri", "task_id"], latest=True)
    assert Counter(zip(latest.column("video_uri").to_pylist(), latest.column("task_id").to_pylist())) == Counter(
        {(str((videos / f"v{i}.mp4").resolve()), t): 1 for i in range(7) for t in ("caption", "mcq:0")})
    assert run_nightly(cfg).pending == 0

    # the committed dataset reads with pyarrow.dataset and hive partitions
    import pyarrow.dataset as pads

    fs_, files = committed_files(str(out))
    ds = pads.dataset(files, filesystem=fs_, partitioning="hive", partition_base_dir=str(out))
    assert ds.count_rows() == 16 and {"date", "run"} <= set(ds.schema.names)


def _manifest_inputs(output: str, run_id: str) -> list[dict]:
    for m in load_state(storage.resolve(output)).manifests:
        if m["run_id"] == run_id:
            assert m["code_version"] != "unknown" and m["counts"]["rows"] == 2 * len(m["inputs"])
            return m["inputs"]
    raise AssertionError(run_id)


def test_overlapping_nightly_is_refused_before_any_work(tmp_path, monkeypatch):
    """A cron run that starts while another nightly holds the output's lock: LockHeld, nothing listed or run."""
    from pipeline import incremental
    from pipeline.config import load_config
    from pipeline.lock import LockHeld, RunLock

    cfg = load_config(data={"input": {"local_dir": str(tmp_path)}, "output": {"path": str(tmp_path / "index")},
                            "model": {"source": "unused"}, "tasks": {"questions": ["Why?"]}})

    def must_not_run(*args, **kwargs):
        raise AssertionError("a refused nightly must not plan")

    monkeypatch.setattr(incremental, "load_state", must_not_run)
    other = RunLock.for_output(cfg.output.path, incremental.NIGHTLY_LOCK, cfg.s3).acquire()
    try:
        with pytest.raises(LockHeld, match="only one run may write this output"):
            incremental.run_nightly(cfg)
    finally:
        other.release()
