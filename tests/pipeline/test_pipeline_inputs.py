"""Issue 14: every input a listing can see gets exactly one true row per task. One test (or more) per class of
the issue, each on inputs the test generates; docs/reliability.md section 1d maps classes to tests."""

from __future__ import annotations

import ctypes
import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from pipeline.backends import decode_frames, pyav_sequential_frames
from pipeline.config import TRANSIENT_ERROR_TYPES, DecodeConfig, InputConfig, S3Config
from pipeline.decode import DecodeStage, frames_from_row
from pipeline.frames import decode_video, sample_indices
from pipeline.media import probe
from pipeline.sources import ListingReport, list_videos
from pipeline.storage import path_of, stat_etag
from tests.pipeline import oddities
from tests.pipeline.videos import make_video

ROOT = Path(__file__).resolve().parents[2]
F, S = 8, 32
CLIP = make_video(num_frames=10)


@pytest.fixture(scope="module")
def odd():
    return oddities.oddity_set()


def _decode(uri: str, **kw) -> dict:
    return DecodeStage(DecodeConfig(**{"num_frames": F, "frame_size": S, "isolation": "none", **kw})).decode_one(
        {"video_id": "v", "video_uri": str(uri), "questions": None})


def _list(folder, report: ListingReport | None = None) -> list[str]:
    return list_videos(InputConfig(local_dir=str(folder)), S3Config(), report).column("video_uri").to_pylist()


# ------------------------------------------------------------------------------------------------ 1, 2: names


def test_1_non_utf8_name_is_listed_and_decoded(tmp_path):
    """A Latin-1 name (an old NAS export) no longer kills the listing: its URI is file:// + the percent-encoded
    bytes, which Parquet can store and the decode stage opens again."""
    raw = os.path.join(os.fsencode(tmp_path), b"caf\xe9 \xff.mp4")
    with open(raw, "wb") as f:
        f.write(CLIP)
    (tmp_path / "plain.mp4").write_bytes(CLIP)
    uris = _list(tmp_path)
    assert len(uris) == 2 and str(tmp_path / "plain.mp4") in uris
    (odd_uri,) = [u for u in uris if u.startswith("file://")]
    assert odd_uri.endswith("/caf%E9%20%FF.mp4") and os.fsencode(path_of(odd_uri)) == raw
    row = _decode(odd_uri)
    assert row["status"] == "ok" and frames_from_row(row).shape == (F, S, S, 3)


def _deep_tree(root: Path, levels: int = 20, name_len: int = 240) -> str:
    """A video ``levels`` folders down (``levels * name_len`` characters: beyond PATH_MAX = 4096)."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    path = str(root)
    for i in range(levels):
        name = f"{i:02d}" + "d" * (name_len - 2)
        os.mkdir(name, dir_fd=fd)
        nxt = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
        os.close(fd)
        fd, path = nxt, f"{path}/{name}"
    out = os.open("deep.mp4", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
    os.write(out, CLIP)
    os.close(out)
    os.close(fd)
    return f"{path}/deep.mp4"


def test_2_tree_deeper_than_path_max_is_listed_and_decoded(tmp_path):
    deep = _deep_tree(tmp_path)
    assert len(deep) > os.pathconf("/", "PC_PATH_MAX")
    with pytest.raises(OSError, match="too long"):
        os.stat(deep)  # what broke the listing before
    (tmp_path / "top.mp4").write_bytes(CLIP)
    assert sorted(_list(tmp_path)) == sorted([deep, str(tmp_path / "top.mp4")])
    row = _decode(deep)
    assert row["status"] == "ok" and row["video_etag"] == stat_etag(deep)  # the listing's fingerprint
    assert _decode(deep, in_memory_bytes=100)["status"] == "ok"  # decoded from the open file, not read into memory


# ------------------------------------------------------------------------------------------------ 3: links


def test_3_symlinks_and_hard_links_are_listed_once(tmp_path):
    corpus, outside = tmp_path / "corpus", tmp_path / "outside"
    (corpus / "sub").mkdir(parents=True)
    outside.mkdir()
    (corpus / "a.mp4").write_bytes(CLIP)
    (corpus / "b_link_to_a.mp4").symlink_to(corpus / "a.mp4")
    os.link(corpus / "a.mp4", corpus / "sub" / "hard_link_to_a.mp4")
    (corpus / "sub" / "loop").symlink_to(corpus)  # a folder symlink back up: no endless walk
    (outside / "c.mp4").write_bytes(CLIP)
    (corpus / "linked_folder").symlink_to(outside)  # a symlinked folder elsewhere is followed
    (corpus / "dangling.mp4").symlink_to(tmp_path / "gone.mp4")
    report = ListingReport()
    uris = _list(corpus, report)
    assert uris == [str(corpus / "a.mp4"), str(corpus / "linked_folder" / "c.mp4")]
    assert report.skipped == {"duplicates (a symlink or hard link to a listed file)": 2, "broken symlinks": 1,
                              "symlinked folders already listed": 1}
    assert report.examples["broken symlinks"] == [str(corpus / "dangling.mp4")]


def test_3_summary_counts_what_was_not_listed(tmp_path):
    import pyarrow as pa

    from pipeline.run import _with_listing
    from pipeline.schema import OUTPUT_SCHEMA
    from pipeline.summary import SUMMARY_COLUMNS, summarize

    report = ListingReport()
    report.skip("folders not readable (permission denied)", "/data/private", warn=True)
    report.skip("duplicates (a symlink or hard link to a listed file)", "/data/link.mp4")
    empty = pa.table({c: pa.array([], OUTPUT_SCHEMA.field(c).type) for c in SUMMARY_COLUMNS})
    summary = _with_listing(summarize(empty, run_id="r", output_uri="o", wall_s=1.0, files=0), report)
    assert summary.to_dict()["not_listed"] == {"folders not readable (permission denied)": 1,
                                               "duplicates (a symlink or hard link to a listed file)": 1}
    assert "not listed (no rows): duplicates" in summary.render() and "/data/private" in summary.render()
    from pipeline.incremental import NightlyResult  # the nightly job says it too

    nightly = NightlyResult(None, 3, 0, 0, 0, [], not_listed=dict(report.skipped))
    assert "not listed: duplicates (a symlink or hard link to a listed file) 1, folders not readable" in nightly.render()


# ------------------------------------------------------------------------------------------------ 4, 5: permissions

_DENIED = """
import json, logging, sys
sys.path.insert(0, {root!r})
logging.basicConfig(level=logging.WARNING)
from pipeline.config import InputConfig
from pipeline.config import DecodeConfig, S3Config
from pipeline.decode import DecodeStage, close_pool
from pipeline.sources import ListingReport, list_videos
report = ListingReport()
uris = list_videos(InputConfig(local_dir={corpus!r}), S3Config(), report).column("video_uri").to_pylist()
rows = {{}}
for name, kw in (("small", {{"isolation": "none"}}), ("large", {{"isolation": "none", "in_memory_bytes": 100}}),
                 ("isolated", {{"isolation": "process"}})):
    st = DecodeStage(DecodeConfig(num_frames=4, frame_size=16, **kw))
    rows[name] = st.decode_one({{"video_id": "v", "video_uri": {secret!r}, "questions": None}})
close_pool()
print(json.dumps({{"uris": uris, "skipped": dict(report.skipped), "examples": report.examples,
                  "rows": {{k: [r["status"], r.get("error_type"), r.get("error_message")] for k, r in rows.items()}}}}))
"""


def _without_dac_override() -> None:
    """preexec_fn: drop CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH from the bounding set, so the exec'd process (root
    or not) is subject to file permissions like any user."""
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2):
        if libc.prctl(24, cap, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def _run_denied(corpus: Path, secret: Path) -> tuple[dict, str]:
    root = os.geteuid() == 0
    if root:  # root reads anything through CAP_DAC_OVERRIDE: the check runs in a subprocess without it
        try:
            subprocess.run([sys.executable, "-c", "pass"], preexec_fn=_without_dac_override, check=True, timeout=60)
        except subprocess.SubprocessError as exc:
            pytest.skip(f"running as root and cannot drop CAP_DAC_OVERRIDE here ({exc}): permissions cannot be denied")
    script = textwrap.dedent(_DENIED.format(root=str(ROOT), corpus=str(corpus), secret=str(secret)))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          preexec_fn=_without_dac_override if root else None)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


@pytest.fixture
def denied_corpus(tmp_path):
    corpus = tmp_path / "corpus"
    (corpus / "private").mkdir(parents=True)
    (corpus / "open.mp4").write_bytes(CLIP)
    (corpus / "private" / "hidden.mp4").write_bytes(CLIP)
    secret = corpus / "secret.mp4"
    secret.write_bytes(CLIP)
    os.chmod(corpus / "private", 0)
    os.chmod(secret, 0)
    yield corpus, secret
    os.chmod(corpus / "private", 0o755)
    os.chmod(secret, 0o644)


def test_4_unreadable_folder_is_warned_and_counted_5_unreadable_file_is_access_denied(denied_corpus):
    corpus, secret = denied_corpus
    out, stderr = _run_denied(corpus, secret)
    # 4: the folder's videos cannot be listed: a warning names it, the report counts it; the rest is listed
    assert out["uris"] == [str(corpus / "open.mp4"), str(secret)]
    assert out["skipped"] == {"folders not readable (permission denied)": 1}
    assert out["examples"]["folders not readable (permission denied)"] == [str(corpus / "private")]
    assert f"folders not readable (permission denied): {corpus / 'private'}" in stderr
    # 5: a file the job may not read is access_denied (permanent), small, large (decoded from disk) or isolated
    for name, (status, error_type, message) in out["rows"].items():
        assert (status, error_type) == ("error", "access_denied"), (name, message)
        assert str(secret) in message and "permission denied" in message
    assert "access_denied" not in TRANSIENT_ERROR_TYPES


# ------------------------------------------------------------------------------------------------ 6-9: codecs, streams


def test_6_av1_is_decoded_by_pyav_and_unsupported_codec_names_the_codec(odd, tmp_path):
    data = odd["av1.mp4"][0]
    path = tmp_path / "av1.mp4"
    path.write_bytes(data)
    row = _decode(path)  # decode.backend: auto -> decord cannot, PyAV (dav1d) can
    assert row["status"] == "ok"
    index = probe(io.BytesIO(data))
    reference = pyav_sequential_frames(io.BytesIO(data), index, sample_indices(index.n, F), S)
    assert np.array_equal(frames_from_row(row), reference)
    only_decord = _decode(path, backend="decord")
    assert only_decord["error_type"] == "unsupported_codec" and "unsupported codec av1" in only_decord["error_message"]
    unknown = odd["unknown_codec.mp4"][0]
    (tmp_path / "unknown.mp4").write_bytes(unknown)
    row = _decode(tmp_path / "unknown.mp4")
    assert row["error_type"] == "unsupported_codec" and "unsupported codec" in row["error_message"]
    assert "unsupported_codec" not in TRANSIENT_ERROR_TYPES


def test_7_audio_with_cover_art_is_no_video_stream(odd):
    with pytest.raises(Exception) as info:
        decode_video(io.BytesIO(odd["audio_cover_art.m4a.mp4"][0]), DecodeConfig(num_frames=F, frame_size=S))
    assert info.value.error_type == "no_video_stream" and "cover art" in info.value.message


def test_8_live_webm_without_duration_or_index_decodes(odd):
    data = odd["mediarecorder_live.webm"][0]
    import av

    with av.open(io.BytesIO(data)) as c:  # the file really has no duration and no cues
        assert c.duration is None and c.streams.video[0].frames == 0
    dec = decode_video(io.BytesIO(data), DecodeConfig(num_frames=F, frame_size=S))
    assert dec.total_frames == 20 and dec.timestamps == sorted(dec.timestamps)
    assert dec.duration_s == pytest.approx(20 / 24, abs=0.01)
    index = probe(io.BytesIO(data))
    frames, backend = decode_frames(io.BytesIO(data), index, sample_indices(20, F), S)
    assert backend == "pyav" and np.array_equal(frames, dec.frames)


def test_9_zero_sample_track_is_too_few_frames_without_library_text(odd):
    with pytest.raises(Exception) as info:
        decode_video(io.BytesIO(odd["zero_samples.mp4"][0]), DecodeConfig(num_frames=F, frame_size=S))
    assert info.value.error_type == "too_few_frames" and "0 frames" in info.value.message
    assert "Check failed" not in info.value.message and "avfilter" not in info.value.message


def test_9_library_internals_are_cleaned_from_messages():
    from pipeline.media import clean_message

    raw = ('[00:28:40] /github/workspace/src/video/video_reader.cc:151: Check failed: avfilter_graph_create_filter('
           '&buffersrc_ctx_, buffersrc, "in", args, __null, filter_graph_.get()) >= 0 (-22 vs. 0) Cannot create buffer source')
    assert clean_message(raw) == "Cannot create buffer source"
    assert clean_message("Invalid data found when processing input: '/proc/self/fd/7'") == "Invalid data found when processing input"
    assert clean_message("") == "the decoder gave no reason"


# ------------------------------------------------------------------------------------------------ 10, 11: metadata


def test_10_one_frame_mkv_has_true_timestamps(odd):
    dec = decode_video(io.BytesIO(odd["one_frame.mkv"][0]), DecodeConfig(num_frames=F, frame_size=S))
    assert dec.timestamps == [0.0] * F and 0 < dec.duration_s < 0.1


def test_11_vfr_gaps_duration_comes_from_timestamps(odd):
    dec = decode_video(io.BytesIO(odd["vfr_gaps.mkv"][0]), DecodeConfig(num_frames=F, frame_size=S))
    real = [p / 1000 for p in oddities.VFR_GAP_PTS]
    assert set(dec.timestamps) <= set(real) and dec.timestamps[-1] == pytest.approx(real[-1])
    assert real[-1] <= dec.duration_s < real[-1] + 0.1  # not 10 frames / average fps


def test_11_capture_clock_offset_is_removed(odd):
    dec = decode_video(io.BytesIO(odd["broadcast_capture.ts"][0]), DecodeConfig(num_frames=F, frame_size=S))
    assert dec.timestamps[0] == 0.0 and dec.duration_s == pytest.approx(1.0, abs=0.05)  # 24 frames at 24 fps, from 10 s


# ------------------------------------------------------------------------------------------------ 13: start-up

_LOCAL_RAY = """
import json, logging, sys, tempfile
sys.path.insert(0, {root!r})
from pipeline.config import load_config
from pipeline.run import init_ray
import ray
init_ray(load_config(data={{"input": {{"local_dir": "."}}, "output": {{"path": "out"}}, "model": {{"source": "m"}},
                          "ray": {{"num_cpus": 1}}}}))
print(json.dumps({{"answer": ray.get(ray.remote(lambda: 42).remote()),
                  "temp": ray._private.worker._global_node.get_temp_dir_path()}}), flush=True)
"""


@pytest.mark.slow
def test_13_local_ray_starts_under_a_long_tmpdir_and_leaves_nothing(tmp_path):
    """A TMPDIR of ~100 characters (batch clusters): the local Ray gets a short temp folder of the job's own, which
    is gone after the job exits; nothing is written under TMPDIR either."""
    long_tmp = tmp_path / ("batch-scheduler-job-1234567-array-task-0042-" + "x" * 40)
    long_tmp.mkdir()
    assert len(str(long_tmp)) > 100
    env = {**os.environ, "TMPDIR": str(long_tmp), "RAY_AUTH_MODE": "disabled"}
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_TMPDIR", None)
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(_LOCAL_RAY.format(root=str(ROOT)))], env=env,
                          capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["answer"] == 42 and len(out["temp"]) <= 30 + len("/ray-xxxxxxxx")
    assert not os.path.exists(out["temp"]) and list(long_tmp.iterdir()) == []


def test_13_no_short_temp_folder_is_a_clear_configuration_error(monkeypatch, tmp_path):
    import pipeline.run as run_module
    from pipeline.config import ConfigurationError

    long_tmp = tmp_path / ("y" * 80)
    long_tmp.mkdir()
    monkeypatch.setenv("RAY_TMPDIR", str(long_tmp))
    monkeypatch.setattr(run_module.tempfile, "gettempdir", lambda: str(long_tmp))
    monkeypatch.setattr(run_module.os, "access", lambda path, mode: path != "/tmp" and os.path.exists(path))
    with pytest.raises(ConfigurationError, match="set TMPDIR to a short folder"):
        run_module.local_ray_temp_dir()


def test_13_temp_folders_of_killed_jobs_are_removed_by_the_next_job(monkeypatch):
    """A SIGKILLed job cannot remove its Ray temp folder; the next local job on the host removes folders whose owner
    process is gone, and nothing else (a live job's, another host's, one without the owner file)."""
    import shutil
    import socket
    import tempfile

    import pipeline.run as run_module

    base = tempfile.mkdtemp(prefix="rt-", dir="/tmp")  # short: RAY_TMPDIR is only used when it fits the sockets
    try:
        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
        owners = {"ray-dead": f"{dead.stdout.strip()} {socket.gethostname()}", "ray-live": f"{os.getpid()} {socket.gethostname()}",
                  "ray-elsewhere": f"{dead.stdout.strip()} another-host", "ray-foreign": None}
        for name, owner in owners.items():
            os.makedirs(os.path.join(base, name, "session_x", "sockets"))
            if owner:
                Path(base, name, ".pipeline-owner").write_text(owner)
        monkeypatch.setenv("RAY_TMPDIR", base)
        mine = run_module.local_ray_temp_dir()
        left = sorted(os.listdir(base))
        assert left == sorted(["ray-live", "ray-elsewhere", "ray-foreign", os.path.basename(mine)])
        assert Path(mine, ".pipeline-owner").read_text().split()[0] == str(os.getpid())
    finally:
        shutil.rmtree(base, ignore_errors=True)
