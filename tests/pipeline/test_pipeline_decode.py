"""The decode stage as a plain callable (no Ray): sampling, resizing, and every failure as a row."""

from __future__ import annotations

import io

import numpy as np
import pytest

from pipeline.config import DecodeConfig
from pipeline.decode import DecodeStage, frames_from_row
from pipeline.fetch import fetch
from pipeline.frames import VideoError, decode_video, keyframe_indices, looks_like_media, sample_indices
from pipeline.schema import DECODED_SCHEMA
from tests.pipeline.videos import make_video, write_video

S = 32


def _settings(**kw) -> DecodeConfig:
    base = {"num_frames": 8, "frame_size": S, "isolation": "none"}  # in-process: moto's mock_aws works
    base.update(kw)
    return DecodeConfig(**base)


def _row(path) -> dict:
    return {"video_id": str(path.name), "video_uri": str(path), "questions": None}


def test_sample_indices_match_reference_linspace():
    assert sample_indices(100, 8).tolist() == np.linspace(0, 99, 8, dtype=int).tolist()
    assert sample_indices(5, 8).tolist() == [0, 0, 1, 1, 2, 2, 3, 4]  # short videos repeat frames
    assert sample_indices(1, 3).tolist() == [0, 0, 0]


def test_keyframe_indices_snap_to_nearest():
    keys = np.array([0, 30, 60])
    assert keyframe_indices(np.array([0, 14, 15, 16, 44, 59]), keys).tolist() == [0, 0, 0, 30, 30, 60]


def test_stage_good_videos(video_dir):
    stage = DecodeStage(_settings())
    names = ["short_24fps.mp4", "medium_30fps.mp4", "tall_15fps.mp4", "odd_ntsc.mp4", "mpeg4_12fps.mp4"]
    table = stage([_row(video_dir / n) for n in names])
    assert table.schema.equals(DECODED_SCHEMA)
    for row in table.to_pylist():
        assert row["status"] == "ok", row["error_message"]
        frames = frames_from_row(row)
        assert frames.shape == (8, S, S, 3) and frames.dtype == np.uint8
        assert row["num_frames"] == 8 and len(row["frame_timestamps_s"]) == 8
        assert row["frame_timestamps_s"][0] == 0.0 and row["frame_timestamps_s"] == sorted(row["frame_timestamps_s"])
        assert row["duration_s"] > 0 and row["video_bytes"] > 0 and row["video_etag"]
        assert row["fetch_s"] >= 0 and row["decode_s"] > 0
        assert frames.std() > 0  # real pixels, not a blank buffer


def test_timestamps_follow_fps(video_dir):
    row = DecodeStage(_settings(num_frames=4))([_row(video_dir / "long_10fps.mp4")]).to_pylist()[0]
    # 60 frames at 10 fps: indices 0, 19, 39, 59
    assert row["frame_timestamps_s"] == pytest.approx([0.0, 1.9, 3.9, 5.9], abs=1e-3)
    assert row["duration_s"] == pytest.approx(6.0)


@pytest.mark.parametrize(
    "name, error_type",
    [("truncated.mp4", "corrupt_video"), ("not_a_video.mp4", "not_a_video"), ("audio_only.mp4", "no_video_stream")],
)
def test_bad_files_become_error_rows(video_dir, name, error_type):
    row = DecodeStage(_settings())([_row(video_dir / name)]).to_pylist()[0]
    assert row["status"] == "error" and row["error_type"] == error_type
    assert name in row["error_message"] and row["frames"] is None


def test_missing_file_and_batch_continues(video_dir, tmp_path):
    rows = [_row(tmp_path / "nope.mp4"), _row(video_dir / "short_24fps.mp4")]
    out = DecodeStage(_settings())(rows).to_pylist()
    assert [r["status"] for r in out] == ["error", "ok"]
    assert out[0]["error_type"] == "not_found"


def test_size_cap_is_an_error_row(video_dir):
    row = DecodeStage(_settings(max_video_bytes=1000))([_row(video_dir / "medium_30fps.mp4")]).to_pylist()[0]
    assert row["error_type"] == "too_large" and "max_video_bytes" in row["error_message"]


def test_too_few_frames(tmp_path):
    path = write_video(tmp_path / "five.mp4", make_video(num_frames=5))
    row = DecodeStage(_settings(min_frames=8))([_row(path)]).to_pylist()[0]
    assert row["error_type"] == "too_few_frames"
    ok = DecodeStage(_settings(min_frames=1))([_row(path)]).to_pylist()[0]
    assert ok["status"] == "ok" and ok["num_frames"] == 8  # fewer frames than F: frames repeat


def test_large_files_decode_from_disk(video_dir):
    settings = _settings(in_memory_bytes=100)  # everything counts as "large"
    fetched = fetch(str(video_dir / "medium_30fps.mp4"), settings)
    assert fetched.data is None and fetched.source().startswith("/proc/self/fd/")
    row = DecodeStage(settings)([_row(video_dir / "medium_30fps.mp4")]).to_pylist()[0]
    assert row["status"] == "ok"


def test_4k_stream_is_resized_while_decoding():
    data = make_video(num_frames=3, width=3840, height=2160, fps=30)
    dec = decode_video(io.BytesIO(data), _settings(num_frames=2, frame_size=64))
    assert dec.frames.shape == (2, 64, 64, 3)


def test_keyframe_mode_is_approximate_but_valid(video_dir):
    row = DecodeStage(_settings(sampling="keyframe"))([_row(video_dir / "long_10fps.mp4")]).to_pylist()[0]
    assert row["status"] == "ok" and row["num_frames"] == 8
    assert set(row["frame_timestamps_s"]) <= {0.0, 3.0}  # keyframes every 30 frames at 10 fps


def test_signature_sniffing(sample_videos):
    assert looks_like_media(sample_videos["short_24fps.mp4"][:64])
    assert not looks_like_media(b"hello world, certainly not a video")


def test_video_error_carries_type():
    err = VideoError("not_found", "gone")
    assert err.error_type == "not_found" and str(err) == "gone"


def test_s3_fetch_errors_and_spool(sample_videos, mocked_s3):
    mocked_s3.put_object(Bucket="bkt", Key="v.mp4", Body=sample_videos["short_24fps.mp4"])
    stage = DecodeStage(_settings(in_memory_bytes=100))
    out = stage([{"video_id": "a", "video_uri": "s3://bkt/v.mp4", "questions": None},
                 {"video_id": "b", "video_uri": "s3://bkt/missing.mp4", "questions": None},
                 {"video_id": "c", "video_uri": "s3://no-such-bucket/x.mp4", "questions": None}]).to_pylist()
    assert out[0]["status"] == "ok" and out[0]["video_etag"]
    assert out[1]["error_type"] == "not_found" and out[2]["error_type"] == "not_found"


def test_spooled_object_has_no_name(sample_videos, mocked_s3, tmp_path):
    """A large S3 object is spooled to an anonymous file: while it is decoded the spool folder is empty, so a
    process killed mid-video leaves nothing behind (issue 14, class 12)."""
    mocked_s3.put_object(Bucket="bkt", Key="v.mp4", Body=sample_videos["short_24fps.mp4"])
    settings = _settings(in_memory_bytes=100, spool_dir=str(tmp_path))
    fetched = fetch("s3://bkt/v.mp4", settings)
    try:
        assert fetched.data is None and fetched.size == len(sample_videos["short_24fps.mp4"])
        assert list(tmp_path.iterdir()) == []
        assert decode_video(fetched.source(), settings, "s3://bkt/v.mp4", fetched.head()).frames.shape == (8, S, S, 3)
    finally:
        fetched.cleanup()


@pytest.mark.parametrize("isolation", ["none", "process"])
def test_listing_etag_is_carried_not_read_again(video_dir, isolation):
    """The ETag is taken once, at listing, and carried in the row; a row without one (a manifest) gets the file's."""
    path = video_dir / "short_24fps.mp4"
    stage = DecodeStage(_settings(isolation=isolation))
    listed, bare = stage([{**_row(path), "video_etag": "etag-from-the-listing"}, _row(path)]).to_pylist()
    assert listed["status"] == bare["status"] == "ok"
    assert listed["video_etag"] == "etag-from-the-listing"
    st = path.stat()
    assert bare["video_etag"] == f"{int(st.st_mtime)}-{st.st_size}"


def test_where_decoding_runs_is_resolved_once_for_the_graph(monkeypatch):
    """``decode.where: auto``: in the GPU actor when the model stage has GPUs and ``decode.backend`` is nvdec (opt-in:
    an installed PyNvVideoCodec alone changes nothing), else in the stage; the decode tasks and the model actors get
    the same resolved section."""
    import importlib.util

    from pipeline.config import load_config
    from pipeline.decode import place
    from pipeline.graph import stage_specs

    base = {"input": {"local_dir": "v"}, "output": {"path": "o"}, "model": {"source": "m"}}
    cpu = load_config(data=base)
    assert place(cpu) is cpu and place(load_config(data={**base, "decode": {"backend": "nvdec"}})).decode.where == "auto"
    gpu = {**base, "fused": {"num_gpus": 1}}
    assert place(load_config(data={**gpu, "decode": {"backend": "nvdec"}})).decode.where == "actor"
    assert place(load_config(data={**gpu, "decode": {"backend": "pyav"}})).decode.where == "auto"  # stage
    assert place(load_config(data={**gpu, "decode": {"where": "stage", "backend": "nvdec"}})).decode.where == "stage"
    real = importlib.util.find_spec
    for installed in (False, True):
        monkeypatch.setattr(importlib.util, "find_spec",
                            lambda name, on=installed: (on or None) if name == "PyNvVideoCodec" else real(name))
        assert place(load_config(data=gpu)).decode.where == "auto"  # stage
    split = load_config(data={**base, "mode": "split", "encode": {"num_gpus": 1}, "generate": {"num_gpus": 1},
                              "decode": {"backend": "nvdec"}})
    decode, encode, _ = stage_specs(split, 384, cluster_gpus=2)
    assert decode.kwargs["decode"].where == "actor" and encode.kwargs["cfg"].decode.where == "actor"
    assert decode.kwargs["decode"].frame_size == 384 and encode.kwargs["cfg"].effective_run_id() == split.effective_run_id()
