"""The run lock: one run per output at a time, local and on S3 (moto's server), stale locks, take-over."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from pipeline import storage
from pipeline.config import S3Config
from pipeline.lock import LockHeld, LockLost, RunLock
from tests.pipeline.s3server import boto_client, fake_aws_env, moto_server


def _holder_body(**kw) -> bytes:
    body = {"token": "other", "run_id": "r0", "host": "elsewhere", "pid": 1, "started_at": "2026-01-01T00:00:00+00:00",
            "heartbeat_at": time.time(), "stale_after_s": 900}
    body.update(kw)
    return json.dumps(body).encode()


def test_second_run_is_refused_with_the_holder_named(tmp_path):
    first = RunLock.for_output(str(tmp_path), "run-a", S3Config(), run_id="run-a").acquire()
    with pytest.raises(LockHeld) as exc:
        RunLock.for_output(str(tmp_path), "run-a", S3Config()).acquire()
    msg = str(exc.value)
    assert f"pid {os.getpid()}" in msg and socket.gethostname() in msg and "run run-a" in msg
    assert "output.lock_stale_s" in msg and str(tmp_path / "_locks" / "run-a.json") in msg
    # another name is another lock
    RunLock.for_output(str(tmp_path), "run-b", S3Config()).acquire().release()
    first.release()
    assert not (tmp_path / "_locks" / "run-a.json").exists()
    with RunLock.for_output(str(tmp_path), "run-a", S3Config()):
        assert (tmp_path / "_locks" / "run-a.json").exists()


def test_lock_names_cannot_leave_the_lock_folder(tmp_path):
    for bad in ("", "..", "a/b", "..\\x"):
        with pytest.raises(ValueError):
            RunLock.for_output(str(tmp_path), bad, S3Config())


def test_stale_heartbeat_is_taken_over(tmp_path):
    path = tmp_path / "_locks" / "n.json"
    path.parent.mkdir()
    path.write_bytes(_holder_body(heartbeat_at=time.time() - 120))
    lock = RunLock.for_output(str(tmp_path), "n", S3Config(), stale_after_s=60).acquire()
    assert lock.took_over["token"] == "other"
    assert json.loads(path.read_bytes())["token"] == lock.token
    lock.release()


def test_fresh_lock_of_another_host_is_respected(tmp_path):
    path = tmp_path / "_locks" / "n.json"
    path.parent.mkdir()
    path.write_bytes(_holder_body(heartbeat_at=time.time() - 30))
    with pytest.raises(LockHeld, match="host elsewhere pid 1"):
        RunLock.for_output(str(tmp_path), "n", S3Config(), stale_after_s=60).acquire()


def test_dead_process_on_this_host_is_taken_over_at_once(tmp_path):
    """A driver killed and re-run on the same node does not wait for the heartbeat to expire."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    path = tmp_path / "_locks" / "n.json"
    path.parent.mkdir()
    path.write_bytes(_holder_body(host=socket.gethostname(), pid=proc.pid))
    lock = RunLock.for_output(str(tmp_path), "n", S3Config()).acquire()
    assert lock.took_over["pid"] == proc.pid
    lock.release()


def test_unreadable_lock_is_stale(tmp_path):
    path = tmp_path / "_locks" / "n.json"
    path.parent.mkdir()
    path.write_bytes(b'{"token": "half-writ')
    RunLock.for_output(str(tmp_path), "n", S3Config()).acquire().release()


def test_heartbeat_keeps_a_long_run_alive(tmp_path):
    lock = RunLock.for_output(str(tmp_path), "n", S3Config(), stale_after_s=0.4).acquire()
    try:
        time.sleep(1.5)  # several times stale_after_s: only the heartbeat keeps it fresh
        with pytest.raises(LockHeld):
            RunLock.for_output(str(tmp_path), "n", S3Config(), stale_after_s=0.4).acquire()
        lock.check()
    finally:
        lock.release()


def test_a_lock_taken_over_is_lost_and_not_committed(tmp_path):
    lock = RunLock.for_output(str(tmp_path), "n", S3Config()).acquire()
    (tmp_path / "_locks" / "n.json").write_bytes(_holder_body())  # another run decided we were dead
    with pytest.raises(LockLost, match="host elsewhere"):
        lock.check()
    with pytest.raises(LockLost):
        lock.release()
    assert json.loads((tmp_path / "_locks" / "n.json").read_bytes())["token"] == "other"  # theirs, untouched


def _race(make_lock, contenders: int = 8) -> list:
    """``contenders`` threads call ``make_lock().acquire()`` at once; returns what each got."""
    barrier = threading.Barrier(contenders)
    results: list = []

    def contender():
        lock = make_lock()
        barrier.wait()
        try:
            results.append(lock.acquire())
        except LockHeld as exc:
            results.append(exc)

    threads = [threading.Thread(target=contender) for _ in range(contenders)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_simultaneous_take_over_of_a_stale_lock_has_one_winner(tmp_path):
    """Runs re-started together after a crash all see the same stale lock; exactly one takes it over."""
    path = tmp_path / "_locks" / "n.json"
    path.parent.mkdir()
    for _ in range(3):
        path.write_bytes(_holder_body(heartbeat_at=time.time() - 3600))
        results = _race(lambda: RunLock.for_output(str(tmp_path), "n", S3Config(), stale_after_s=60))
        winners = [r for r in results if isinstance(r, RunLock)]
        assert len(winners) == 1 and winners[0].took_over["token"] == "other"
        assert json.loads(path.read_bytes())["token"] == winners[0].token
        winners[0].release()
        assert not path.exists()


def test_lock_on_s3_is_exclusive_under_a_race():
    """S3 conditional create (If-None-Match: *): of eight runs starting at once exactly one gets the lock; the
    same for eight runs taking over one stale lock (If-Match on its ETag)."""
    with fake_aws_env(), moto_server() as endpoint:
        boto_client(endpoint).create_bucket(Bucket="locks")
        settings = S3Config(endpoint_url=endpoint)
        storage.client.cache_clear()
        try:
            for _ in range(3):
                results = _race(lambda: RunLock.for_output("s3://locks/index", "nightly", settings))
                winners = [r for r in results if isinstance(r, RunLock)]
                assert len(winners) == 1 and sum(isinstance(r, LockHeld) for r in results) == 7
                body = json.loads(boto_client(endpoint).get_object(Bucket="locks", Key="index/_locks/nightly.json")["Body"].read())
                assert body["token"] == winners[0].token
                winners[0].release()
                assert "Contents" not in boto_client(endpoint).list_objects_v2(Bucket="locks", Prefix="index/_locks/")
            # a stale lock taken over by eight runs at once (conditional PutObject on its ETag): one winner
            client = boto_client(endpoint)
            for _ in range(3):
                client.put_object(Bucket="locks", Key="index/_locks/nightly.json",
                                  Body=_holder_body(heartbeat_at=time.time() - 3600))
                results = _race(lambda: RunLock.for_output("s3://locks/index", "nightly", settings, stale_after_s=60))
                winners = [r for r in results if isinstance(r, RunLock)]
                assert len(winners) == 1 and winners[0].took_over["token"] == "other"
                winners[0].release()
        finally:
            storage.client.cache_clear()


def test_run_refuses_a_locked_output_before_starting_ray(tmp_path, tiny_model, video_dir, monkeypatch):
    import pipeline.run as run_module
    from jobs import corpus
    from pipeline.config import load_config

    data = {"input": {"local_dir": str(video_dir)}, "output": {"path": str(tmp_path / "out")},
            "model": {"source": tiny_model, "device": "cpu"}, "tasks": {"questions": ["Why?"]}}
    cfg = load_config(data=data)

    def no_ray(_cfg):
        raise AssertionError("Ray must not start while the output is locked")

    monkeypatch.setattr(run_module, "init_ray", no_ray)
    held = RunLock.for_output(str(tmp_path / "out"), cfg.effective_run_id(), S3Config()).acquire()
    try:
        with pytest.raises(LockHeld):
            run_module.run(cfg)
        job = tmp_path / "job.yaml"
        job.write_text(json.dumps(data))
        with pytest.raises(SystemExit) as exc:
            corpus.main(["--config", str(job)])
        assert exc.value.code == 75
    finally:
        held.release()
