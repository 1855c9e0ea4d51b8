"""Resuming a run folder: the planning on hand-made Parquet files, and a driver SIGKILLed mid-run then re-run.

Exactly once: after a resume the run folder holds one row per (video, task) of the input, every video
present. The kill test (marked ``slow``) runs ``python -m jobs.corpus`` in its own session with a local
Ray, kills the whole session once some files are written, checks nothing of it survives, and re-runs.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pytest

from pipeline import sink, storage
from pipeline.config import OutputConfig, S3Config, TasksConfig, load_config
from pipeline.schema import VIDEO_SCHEMA, output_row, rows_to_table
from pipeline.tasks import Task

ROOT = Path(__file__).resolve().parents[2]
TASKS = ["caption", "qa:0"]


def _videos(names: list[str], questions: dict[str, list[str]] | None = None) -> pa.Table:
    questions = questions or {}
    return pa.Table.from_pylist([{"video_id": n, "video_uri": f"/v/{n}.mp4", "questions": questions.get(n)} for n in names],
                                schema=VIDEO_SCHEMA)


def _rows(pairs: list[tuple[str, str]], uri: str | None = None) -> pa.Table:
    rows = []
    for vid, task in pairs:
        video = {"video_id": vid, "video_uri": uri or f"/v/{vid}.mp4", "status": "ok"}
        rows.append(output_row(video, Task(task, "qa", "?", 4), run_id="r", compression="{}", answer=f"{vid} {task}"))
    return rows_to_table(rows)


def _both(*vids: str) -> list[tuple[str, str]]:
    return [(v, t) for v in vids for t in TASKS]


def _commit(target: storage.Location, attempt: int, task: int, table: pa.Table) -> dict:
    return sink.ChunkWriter(target.uri, attempt, OutputConfig(path=target.uri)).write([table], task)


def _keys(target: storage.Location) -> Counter:
    t = sink.read_committed(target, columns=["video_id", "task_id"])
    return Counter(zip(t.column("video_id").to_pylist(), t.column("task_id").to_pylist()))


def _target(tmp_path: Path) -> storage.Location:
    return storage.resolve(sink.run_uri(str(tmp_path / "out"), "r"), S3Config())


def _files(target: storage.Location) -> dict[str, int]:
    return {p.relative_to(target.path).as_posix(): p.stat().st_mtime_ns for p in Path(target.path).rglob("*") if p.is_file()}


def test_chunk_names_and_attempts():
    assert sink.chunk_name(2, 7) == "002-00007"
    assert sink.attempt_of("/x/part-002-00007-ab12cd34-0.parquet") == 2
    assert sink.attempt_of("_commits/011-00003.json") == 11
    assert sink.attempt_of("part-1000-00007-ab12-0.parquet") == 1000
    assert sink.attempt_of("notes.txt") is None


def test_expected_task_ids_match_the_generate_stage():
    from pipeline.run import expected_task_ids

    videos = _videos(["a", "b", "c"], {"a": ["Why?", "", "How?"], "c": []})
    tasks = TasksConfig(questions=["q"], use_manifest_questions=True)
    assert expected_task_ids(tasks, videos) == [["caption", "qa:0", "vq:0", "vq:2"], ["caption", "qa:0"], ["caption", "qa:0"]]
    # no task applies: the generate stage writes one NO_TASK error row ("none")
    none = TasksConfig(caption_prompt=None, use_manifest_questions=True)
    assert expected_task_ids(none, videos) == [["vq:0", "vq:2"], ["none"], ["none"]]
    assert expected_task_ids(none.model_copy(update={"use_manifest_questions": False}), videos) == [["none"]] * 3


def test_plan_keeps_committed_videos_removes_uncommitted_files_rewrites_nothing(tmp_path):
    target = _target(tmp_path)
    folder = Path(target.path)
    _commit(target, 0, 0, _rows(_both("a", "b")))                        # complete
    _commit(target, 0, 1, _rows(_both("c") + [("d", "caption")]))        # d: one of its two rows
    # a write task killed before its commit: a whole file and a truncated one, no manifest
    orphan = sink.ChunkWriter(target.uri, 0, OutputConfig(path=target.uri)).write([_rows([("d", "qa:0"), ("f", "caption")])], 2)
    (folder / sink.COMMITS / "000-00002.json").unlink()
    cut = folder / orphan["files"][0]["name"]
    cut.write_bytes(cut.read_bytes()[: cut.stat().st_size // 2])
    (folder / "part-000-00003-0badf00d-0.parquet").write_bytes(b"")     # created, nothing written yet
    (folder / sink.COMMITS / ".000-00004.json.1234abcd.tmp").write_bytes(b"{")  # a manifest not yet linked
    committed_before = {k: v for k, v in _files(target).items() if k not in (
        orphan["files"][0]["name"], "part-000-00003-0badf00d-0.parquet", f"{sink.COMMITS}/.000-00004.json.1234abcd.tmp")}

    videos = _videos(["a", "b", "c", "d", "e", "f", "g"])
    plan = sink.plan_resume(target, videos, [TASKS] * 7)
    assert plan.resuming and (plan.total, plan.done, plan.attempt, plan.chunks) == (7, 3, 1, 2)
    assert plan.todo.column("video_id").to_pylist() == ["d", "e", "f", "g"]
    assert plan.todo.schema.equals(VIDEO_SCHEMA)
    assert sorted(plan.removed) == sorted([orphan["files"][0]["name"], "part-000-00003-0badf00d-0.parquet",
                                           f"{sink.COMMITS}/.000-00004.json.1234abcd.tmp"])
    assert _files(target) == committed_before  # every committed file untouched: nothing rewritten or deleted
    assert _keys(target) == Counter(_both("a", "b", "c") + [("d", "caption")])

    # the resumed attempt commits d's rows: they supersede d's partial version; e, f, g follow
    _commit(target, plan.attempt, 0, _rows(_both("d", "e")))
    assert _keys(target) == Counter(_both("a", "b", "c", "d", "e"))
    again = sink.plan_resume(target, videos, [TASKS] * 7)
    assert (again.done, again.attempt, again.chunks, again.removed) == (5, 2, 3, [])
    assert again.todo.column("video_id").to_pylist() == ["f", "g"]


def _error_rows(vid: str, error_type: str) -> pa.Table:
    video = {"video_id": vid, "video_uri": f"/v/{vid}.mp4", "status": "error", "error_type": error_type,
             "error_message": "x"}
    return rows_to_table([output_row(video, Task(t, "qa", "?", 4), run_id="r", compression="{}") for t in TASKS])


def test_plan_retries_transient_errors_keeps_permanent_ones(tmp_path):
    """A fetch_failed / decode_timeout video is redone on resume; a corrupt_video one is complete."""
    target = _target(tmp_path)
    _commit(target, 0, 0, pa.concat_tables([
        _rows(_both("ok")), _error_rows("throttled", "fetch_failed"), _error_rows("hung", "decode_timeout"),
        _error_rows("broken", "corrupt_video")]))
    videos = _videos(["ok", "throttled", "hung", "broken"])
    retry = load_config(data=_minimal()).output.retry_error_types
    assert {"fetch_failed", "decode_timeout", "decoder_crashed"} <= set(retry) and "corrupt_video" not in retry

    plan = sink.plan_resume(target, videos, [TASKS] * 4, retry)
    assert (plan.done, plan.retried, plan.attempt) == (2, 2, 1)
    assert plan.todo.column("video_id").to_pylist() == ["throttled", "hung"]
    # the retry's rows supersede the error rows: one row per (video, task), the new ones
    _commit(target, 1, 0, _rows(_both("throttled", "hung")))
    t = sink.read_committed(target, ["video_id", "task_id", "status"])
    assert Counter(zip(t.column("video_id").to_pylist(), t.column("task_id").to_pylist())) == Counter(
        _both("ok", "throttled", "hung", "broken"))
    assert sorted(set(zip(t.column("video_id").to_pylist(), t.column("status").to_pylist()))) == [
        ("broken", "error"), ("hung", "ok"), ("ok", "ok"), ("throttled", "ok")]
    assert sink.plan_resume(target, videos, [TASKS] * 4, retry).done == 4
    # with no retry types every error row is final
    other = storage.resolve(sink.run_uri(str(tmp_path / "out"), "r2"))
    _commit(other, 0, 0, _error_rows("throttled", "fetch_failed"))
    assert sink.plan_resume(other, _videos(["throttled"]), [TASKS], retry_error_types=[]).done == 1


def test_operational_decode_settings_keep_the_run_id():
    """A longer timeout (or other threads, spool folder, isolation) re-runs into the same folder: it resumes."""
    base = load_config(data=_minimal())
    for change in ({"timeout_s": 900}, {"isolation": "none"}, {"num_threads": 4}, {"spool_dir": "/x"},
                   {"in_memory_bytes": 1024}, {"backend": "decord"}):
        other = load_config(data={**_minimal(), "decode": change})
        assert other.effective_run_id() == base.effective_run_id(), change
    assert load_config(data={**_minimal(), "decode": {"num_frames": 16}}).effective_run_id() != base.effective_run_id()
    with pytest.raises(Exception, match="unknown error types"):
        load_config(data={**_minimal(), "output": {"path": "o", "retry_error_types": ["flaky"]}})


def test_plan_redoes_duplicated_wrong_uri_and_extra_task_rows_keeps_unlisted(tmp_path):
    target = _target(tmp_path)
    _commit(target, 0, 0, _rows(_both("a", "b", "c") + _both("x") + [("a", "caption")]))  # a duplicated
    _commit(target, 0, 1, _rows(_both("d"), uri="/elsewhere/d.mp4"))                       # d: another file now
    _commit(target, 0, 2, _rows([("c", "qa:1")]))                                           # c: a task not asked
    videos = _videos(["a", "b", "c", "d"])
    plan = sink.plan_resume(target, videos, [TASKS] * 4)
    assert plan.done == 1 and plan.todo.column("video_id").to_pylist() == ["a", "c", "d"]
    assert plan.unlisted_videos == 1 and plan.attempt == 1
    assert {v for v, _ in _keys(target)} == {"a", "b", "c", "d", "x"}  # x is not in the input: left alone


def test_plan_of_an_empty_or_uncommitted_folder_is_a_fresh_run(tmp_path):
    target = _target(tmp_path)
    videos = _videos(["a", "b"])
    plan = sink.plan_resume(target, videos, [TASKS] * 2)  # the folder does not exist
    assert not plan.resuming and plan.attempt == 0 and plan.todo.num_rows == 2 and plan.done == 0
    Path(target.path).mkdir(parents=True)
    (Path(target.path) / "part-002-00000-ab-0.parquet").write_bytes(b"PAR1 truncated")
    plan = sink.plan_resume(target, videos, [TASKS] * 2)
    # nothing committed; the next attempt's names never meet the ones seen (a late writer of attempt 2)
    assert not plan.resuming and plan.attempt == 3 and plan.removed == ["part-002-00000-ab-0.parquet"]
    assert not list(Path(target.path).glob("*.parquet"))


def _minimal(**output) -> dict:
    return {"input": {"local_dir": "v"}, "output": {"path": "o", **output}, "model": {"source": "m"},
            "tasks": {"questions": ["Why?"]}}


def test_config_on_existing():
    assert load_config(data=_minimal()).output.on_existing == "resume"
    cfg = load_config(data=_minimal(), overrides=["output.on_existing=overwrite"])
    assert cfg.output.on_existing == "overwrite"
    assert cfg.effective_run_id() == load_config(data=_minimal()).effective_run_id()  # same folder either way
    from pipeline.config import ConfigurationError

    with pytest.raises(ConfigurationError, match="output.on_existing"):
        load_config(data=_minimal(on_existing="append"))


def test_rerun_of_a_complete_folder_needs_no_ray(tmp_path, monkeypatch):
    from pipeline import run as run_module

    videos = tmp_path / "videos"
    videos.mkdir()
    for n in ("a", "b"):
        (videos / f"{n}.mp4").write_bytes(b"listed only")
    cfg = load_config(data={**_minimal(), "input": {"local_dir": str(videos)}, "output": {"path": str(tmp_path / "out")},
                            "decode": {"frame_size": 32}})
    target = storage.resolve(sink.run_uri(cfg.output.path, cfg.effective_run_id()))
    listed = run_module.list_videos(cfg.input, S3Config())
    rows = [(vid, t) for vid in listed.column("video_id").to_pylist() for t in TASKS]
    table = _rows(rows)
    uris = dict(zip(listed.column("video_id").to_pylist(), listed.column("video_uri").to_pylist()))
    table = table.set_column(table.schema.get_field_index("video_uri"), "video_uri",
                             pa.array([uris[v] for v, _ in rows], pa.string()))
    _commit(target, 0, 0, table)

    def no_ray(_cfg):
        raise AssertionError("Ray started for a complete run")

    monkeypatch.setattr(run_module, "init_ray", no_ray)
    result = run_module.run(cfg)
    assert (result.summary.videos, result.summary.rows, result.summary.files) == (2, 4, 1)
    assert result.target == target

    # overwrite: the folder is redone (here: the graph would run, so Ray is needed)
    with pytest.raises(AssertionError, match="Ray started"):
        run_module.run(cfg.model_copy(update={"output": cfg.output.model_copy(update={"on_existing": "overwrite"})}))


# ------------------------------------------------------------------------------------------------ kill + resume

N_VIDEOS = 36
KILL_AFTER_ROWS = 12  # of 72: kill once about a sixth of the rows are committed (3 of the ~18 chunks)
RESUMING = re.compile(r"resuming run (\S+): (\d+) of (\d+) videos already complete, (\d+) to do \(attempt (\d+); "
                      r"(\d+) chunks committed, (\d+) uncommitted files deleted\)")


def _job(videos: Path, out: Path, model: str, ray_tmp: str) -> dict:
    return {
        "input": {"local_dir": str(videos)},
        "output": {"path": str(out), "min_rows_per_file": 4, "max_rows_per_file": 6, "row_group_rows": 4},
        "model": {"source": model, "dtype": "float32", "device": "cpu"},
        "decode": {"num_frames": 4},
        "tasks": {"caption_prompt": "Describe.", "max_new_tokens": 3, "mcq_max_new_tokens": 2,
                  "mcq": [{"question": "Shown?", "options": ["bars", "cats"]}]},
        "stages": {"mode": "fused", "decode_num_cpus": 0.5, "actor_num_cpus": 1, "decode_memory_gb": 0.25,
                   "fused_batch_size": 2, "decode_batch_size": 2, "decode_max_tasks": 1},
        "ray": {"num_cpus": 2, "progress_bars": False},
    }


def _session_procs(sid: int, marker: str) -> list:
    """Live processes of the job's session, or whose command line names its Ray temp folder."""
    import psutil

    found = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if p.pid == os.getpid():
                continue
            if os.getsid(p.pid) == sid or marker in " ".join(p.info["cmdline"] or []):
                if p.status() != psutil.STATUS_ZOMBIE:
                    found.append(p)
        except (psutil.Error, ProcessLookupError, PermissionError):
            continue
    return found


def _kill_session(sid: int, marker: str, timeout: float = 20.0) -> list[int]:
    """SIGKILL the process group, then every leftover of the session by pid; returns the leftovers' pids."""
    import psutil

    try:
        os.killpg(sid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    leftovers: list[int] = []
    deadline = time.time() + timeout
    while time.time() < deadline:
        procs = _session_procs(sid, marker)
        if not procs:
            return leftovers
        for p in procs:
            leftovers.append(p.pid)
            try:
                p.kill()
            except psutil.Error:
                pass
        time.sleep(0.2)
    raise AssertionError(f"processes of the killed job survive: {[(p.pid, p.info['cmdline']) for p in _session_procs(sid, marker)]}")


def _run_to_end(cmd: list[str], cwd: Path, env: dict, ray_tmp: str, timeout: float) -> tuple[int, str, str]:
    """Run ``cmd`` in its own session to its end; then make sure nothing of that session is left running."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    finally:
        _kill_session(proc.pid, ray_tmp)
        proc.wait(timeout=30)
    return proc.returncode, stdout, stderr


def _committed_rows(folder: Path) -> int:
    return _scan(folder)[0]


def _scan(folder: Path) -> tuple[int, int]:
    """(rows of committed chunks, uncommitted files: data files no chunk manifest names and manifest temp files)
    of the run folder(s) under ``folder``."""
    rows, named = 0, set()
    for m in folder.glob(f"*/{sink.COMMITS}/*.json"):
        try:
            manifest = json.loads(m.read_text())
        except (OSError, ValueError):  # a manifest is linked whole: never seen half-written
            raise AssertionError(f"unreadable commit manifest {m}") from None
        rows += manifest["rows"]
        named |= {f["name"] for f in manifest["files"]}
    stray = [f for f in folder.glob("*/*.parquet") if f.name not in named]
    return rows, len(stray) + len(list(folder.glob(f"*/{sink.COMMITS}/.*.tmp")))  # + manifests never linked


@pytest.fixture
def ray_tmp():
    """A short temp folder for the jobs' Ray sessions (socket paths must fit in 107 bytes); removed after."""
    import shutil
    import tempfile

    path = tempfile.mkdtemp(prefix="rr-", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_driver_killed_mid_run_then_rerun_resumes_exactly_once(tmp_path, tiny_model, ray_tmp):
    import yaml

    from pipeline.samples import make_video

    videos, out = tmp_path / "videos", tmp_path / "out"
    videos.mkdir()
    for i in range(N_VIDEOS):
        (videos / f"clip{i:03d}.mp4").write_bytes(make_video(num_frames=6 + i % 5, width=32, height=32, fps=8))
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(_job(videos, out, tiny_model, ray_tmp)))
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""), "RAY_ADDRESS": "",
           "RAY_TMPDIR": ray_tmp}
    cmd = [sys.executable, "-m", "jobs.corpus", "--config", str(job), "--summary-json", str(tmp_path / "summary.json")]
    total_rows = N_VIDEOS * 2
    t_start = time.perf_counter()

    # 1. run until some output is on disk, then SIGKILL the driver's whole session (driver + its local Ray)
    log1 = (tmp_path / "run1.log").open("w")
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=log1, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None and _committed_rows(out) < KILL_AFTER_ROWS:
            time.sleep(0.05)
        finished_first = proc.poll() is not None
        rows_at_kill = _committed_rows(out)
        leftovers = _kill_session(proc.pid, ray_tmp)
    finally:
        if proc.poll() is None:
            _kill_session(proc.pid, ray_tmp)
        proc.wait(timeout=30)
        log1.close()
    run1 = (tmp_path / "run1.log").read_text()
    t_killed = time.perf_counter()
    assert not finished_first, "the first run ended before it was killed:\n" + run1[-3000:]
    assert proc.returncode == -signal.SIGKILL
    assert 0 < rows_at_kill < total_rows, (rows_at_kill, run1[-3000:])
    assert not _session_procs(proc.pid, ray_tmp)
    print(f"\nkilled after {t_killed - t_start:.1f}s with {rows_at_kill} committed rows; leftovers killed by pid: {leftovers}")
    files_at_kill = sorted(p.name for p in out.glob("*/*.parquet"))
    rows_after_kill, uncommitted_after_kill = _scan(out)

    # 2. the same command again: resumes, writes the rest under new names
    rc2, out2, err2 = _run_to_end(cmd, tmp_path, env, ray_tmp, timeout=150)
    log2 = out2 + err2
    assert rc2 == 0, log2[-4000:]
    t_end = time.perf_counter()
    m = RESUMING.search(log2)
    assert m, log2[-4000:]
    done, total, todo, attempt, chunks, deleted = (int(g) for g in m.groups()[1:])
    assert total == N_VIDEOS and 0 < done < total and done + todo == total, m.group(0)
    # every committed row belongs to a complete video (a chunk holds whole videos); uncommitted files deleted
    assert attempt == 1 and chunks > 0 and 2 * done == rows_after_kill and deleted == uncommitted_after_kill
    # the killed driver's lock (same host, process gone) is taken over at once
    assert "took over the lock" in log2 and "is gone" in log2, log2[-4000:]
    assert not list((out / "_locks").glob("*.json"))  # released at the end

    # exactly one row per (video, task), every video present
    run_dirs = [d for d in out.iterdir() if d.is_dir() and d.name != "_locks"]
    assert len(run_dirs) == 1
    table = sink.read_committed(str(run_dirs[0]), columns=["video_uri", "task_id", "status"])
    # nothing committed twice: every committed version together holds the same rows
    assert sink.read_committed(str(run_dirs[0]), columns=["video_id"], latest=False).num_rows == total_rows
    keys = Counter(zip(table.column("video_uri").to_pylist(), table.column("task_id").to_pylist()))
    expected = {(str(p.resolve()), t) for p in videos.glob("*.mp4") for t in ("caption", "mcq:0")}
    assert set(keys) == expected and max(keys.values()) == 1 and table.num_rows == total_rows
    assert set(table.column("status").to_pylist()) == {"ok"}
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["videos"] == N_VIDEOS and summary["rows"] == total_rows
    names = sorted(p.name for p in run_dirs[0].glob("*.parquet"))
    assert any(sink.attempt_of(n) == 1 for n in names)  # the resumed attempt's files
    assert all(sink.attempt_of(n) <= 1 for n in names)

    # 3. once complete, a re-run does nothing (no new file, same rows)
    rc3, out3, err3 = _run_to_end(cmd, tmp_path, env, ray_tmp, timeout=60)
    assert rc3 == 0, (out3 + err3)[-3000:]
    assert f"{N_VIDEOS} of {N_VIDEOS} videos already complete, 0 to do" in err3
    assert sorted(p.name for p in run_dirs[0].glob("*.parquet")) == names

    print("RESUME_FIGURES " + json.dumps({
        "videos": N_VIDEOS, "rows_expected": total_rows, "rows_committed_at_kill": rows_at_kill,
        "files_at_kill": len(files_at_kill), "committed_rows_after_kill": rows_after_kill,
        "uncommitted_files_after_kill": uncommitted_after_kill, "leftover_processes_killed_by_pid": len(set(leftovers)),
        "videos_done_before_rerun": done, "chunks_committed_before_rerun": chunks,
        "videos_redone": todo, "rows_after": table.num_rows,
        "rows_lost": len(expected - set(keys)), "rows_duplicated": sum(n - 1 for n in keys.values()),
        "first_run_s": round(t_killed - t_start, 1), "rerun_s": round(t_end - t_killed, 1),
        "complete_rerun_s": round(time.perf_counter() - t_end, 1),
        "files_after": len(names),
    }))
