"""Reliability: every bad input gives an ok row or an error row with a precise error_type (decode stage as a
plain callable, no Ray), and the security guarantees (docs/reliability.md lists what each test shows)."""

from __future__ import annotations

import io

import numpy as np
import pytest

from pipeline import sink
from pipeline.config import ConfigurationError, DecodeConfig, S3Config, load_config
from pipeline.decode import DecodeStage, close_pool, frames_from_row
from pipeline.frames import decode_video
from pipeline.schema import ERROR_TYPES
from tests.pipeline.badinputs import LONG_FPS, LONG_SECONDS, VFR_PTS, bad_input_set, make_muxed
from tests.pipeline.videos import write_video

F, S = 8, 32


@pytest.fixture(scope="module")
def bad_inputs():
    return bad_input_set()


@pytest.fixture(scope="module")
def bad_dir(tmp_path_factory, bad_inputs):
    root = tmp_path_factory.mktemp("bad inputs")  # a space in the folder too
    for name, (data, _) in bad_inputs.items():
        write_video(root / name, data)
    return root


def _decode(path, **kw) -> dict:
    settings = DecodeConfig(**{"num_frames": F, "frame_size": S, "isolation": "none", **kw})
    return DecodeStage(settings).decode_one({"video_id": "v", "video_uri": str(path), "questions": None})


def test_every_bad_input_gives_the_expected_row(bad_dir, bad_inputs):
    got = {}
    for name in bad_inputs:
        row = _decode(bad_dir / name)
        got[name] = row["status"] if row["status"] == "ok" else row["error_type"]
        if row["status"] == "ok":
            assert frames_from_row(row).shape == (F, S, S, 3) and row["num_frames"] == F
            stamps = row["frame_timestamps_s"]
            assert len(stamps) == F and stamps == sorted(stamps)
            assert 0 <= stamps[0] and stamps[-1] <= row["duration_s"] < 1e6, (name, stamps, row["duration_s"])
        else:
            assert row["error_type"] in ERROR_TYPES and row.get("frames") is None
            message = row["error_message"]  # no library internals: build paths, source lines, C++ assertions
            assert message and not any(x in message for x in ("/github/", ".cc:", "Check failed", "Traceback")), message
    assert got == {name: expected for name, (_, expected) in bad_inputs.items()}


def test_decoding_in_the_model_actor_gives_the_same_rows(bad_dir, bad_inputs):
    """``decode.where: actor`` (the stage fetches and checks, the actor decodes; on this CPU machine with the PyAV
    backend, the in-actor path NVDEC would take on a GPU node) gives each input the row the stage path gives."""
    from pipeline.actor_decode import ActorDecoder
    from pipeline.decode import FETCHED_SCHEMA

    fetch_only = DecodeStage(DecodeConfig(num_frames=F, frame_size=S, isolation="none", where="actor"))
    actor = ActorDecoder(fetch_only.cfg, S)
    names = sorted(bad_inputs)
    rows = [{"video_id": n, "video_uri": str(bad_dir / n), "questions": None} for n in names]
    fetched = fetch_only(rows)
    assert fetched.schema.equals(FETCHED_SCHEMA)
    shipped = {r["video_id"] for r in fetched.to_pylist() if r["data"] is not None}
    assert "flipped_middle.mp4" in shipped and "uhd_4k.mp4" in shipped  # checked by the stage, decoded by the actor
    assert "text.mp4" not in shipped and "audio_only.mp4" not in shipped  # error rows from the stage's check
    in_actor = actor(fetched.to_pylist())
    for name, want, got in zip(names, (_decode(bad_dir / n) for n in names), in_actor):
        assert (got["status"], got.get("error_type")) == (want["status"], want.get("error_type")), name
        assert got.get("error_message") == want.get("error_message") and got.get("data") is None
        if want["status"] == "ok":
            assert np.array_equal(frames_from_row(got), frames_from_row(want)), name
            for key in ("num_frames", "frame_timestamps_s", "duration_s", "video_bytes", "video_etag"):
                assert got[key] == want[key], (name, key)
    big = DecodeStage(DecodeConfig(num_frames=F, frame_size=S, isolation="none", where="actor", in_memory_bytes=1))
    row = big.decode_one(rows[names.index("five_frames.mp4")])  # too large to ship: decoded by the stage
    assert row["status"] == "ok" and "data" not in row and actor([row]) == [row]


def test_the_stage_decodes_all_but_the_actor_s_share(bad_dir, bad_inputs):
    """``decode.actor_share``: the stage still decodes the videos outside the actor's share, so its CPUs and the
    actor's decoders work at once; the share is chosen by video id, the same on every run, and the rows after the
    actor are the rows of the stage path."""
    from pipeline.actor_decode import ActorDecoder
    from pipeline.decode import in_actor_share

    names = sorted(n for n, (_, expected) in bad_inputs.items() if expected == "ok")
    rows = [{"video_id": n, "video_uri": str(bad_dir / n), "questions": None} for n in names]
    ids = [f"video-{i}" for i in range(2000)]
    assert sum(in_actor_share(i, 0.3) for i in ids) == pytest.approx(600, abs=60)
    assert all(in_actor_share(i, 1.0) for i in ids) and not any(in_actor_share(i, 0.0) for i in ids)
    assert [in_actor_share(i, 0.3) for i in ids] == [in_actor_share(i, 0.3) for i in ids]
    want = {n: frames_from_row(_decode(bad_dir / n)) for n in names}  # the stage path's frames, decoded once
    for share in (0.0, 0.5, 1.0):
        cfg = DecodeConfig(num_frames=F, frame_size=S, isolation="none", where="actor", actor_share=share)
        fetched = DecodeStage(cfg)(rows).to_pylist()
        shipped = [r["video_id"] for r in fetched if r["data"] is not None]
        assert shipped == [n for n in names if in_actor_share(n, share)]
        assert all(r["frames"] is not None for r in fetched if r["data"] is None)
        actor = ActorDecoder(cfg, S)
        try:
            decoded = actor(fetched)
        finally:
            actor.close()
        for name, got in zip(names, decoded):
            assert got["status"] == "ok" and np.array_equal(frames_from_row(got), want[name]), name
    assert 0 < len([n for n in names if in_actor_share(n, 0.5)]) < len(names)  # both kinds ran at 0.5


@pytest.mark.parametrize("n, stamps", [(1, [0] * 8), (3, [0, 0, 0, 0, 1, 1, 1, 2]), (5, [0, 0, 1, 1, 2, 2, 3, 4])])
def test_fewer_frames_than_requested_repeat_frames(bad_dir, n, stamps):
    """F is kept (TTM windows and batch shapes stay uniform); linspace repeats frames and the timestamps say so."""
    name = {1: "one_frame.mp4", 3: "three_frames.mp4", 5: "five_frames.mp4"}[n]
    row = _decode(bad_dir / name)
    assert row["status"] == "ok" and row["num_frames"] == F
    assert row["frame_timestamps_s"] == pytest.approx([s / 24 for s in stamps], abs=1e-4)
    frames = frames_from_row(row)
    assert len({frames[i].tobytes() for i in range(F)}) == n  # exactly n distinct frames


def test_long_video_samples_across_its_whole_length(bad_dir):
    row = _decode(bad_dir / "long_1h_32px.mp4")
    assert row["duration_s"] == pytest.approx(LONG_SECONDS)
    assert row["frame_timestamps_s"][0] == 0 and row["frame_timestamps_s"][-1] == pytest.approx(LONG_SECONDS - 1 / LONG_FPS)


def test_4k_frames_are_resized_inside_the_decoder(bad_dir):
    row = _decode(bad_dir / "uhd_4k.mp4", frame_size=64)
    # 8 frames of 3840x2160 RGB would be 199 MB; the row carries 8 x 64 x 64 x 3 bytes
    assert row["status"] == "ok" and len(row["frames"]) == F * 64 * 64 * 3


def test_variable_frame_rate_keeps_real_timestamps(bad_dir):
    stamps = _decode(bad_dir / "vfr.mp4")["frame_timestamps_s"]
    assert set(stamps) <= {p / 1000 for p in VFR_PTS}  # presentation times, not index / fps
    assert stamps[-1] == pytest.approx(VFR_PTS[-1] / 1000)


def test_rotation_metadata_is_applied():
    """decord honours the display matrix: the frames come out upright (as a player shows them)."""
    plain = decode_video(io.BytesIO(make_muxed(num_frames=4, width=64, height=32)), DecodeConfig(num_frames=2, frame_size=S))
    rot = decode_video(io.BytesIO(make_muxed(num_frames=4, width=64, height=32, rotation=90)), DecodeConfig(num_frames=2, frame_size=S))
    a, b = plain.frames.astype(float), rot.frames.astype(float)
    as_is = np.abs(a - b).mean()
    turned = min(np.abs(np.rot90(a, k, axes=(1, 2)) - b).mean() for k in (1, 3))
    assert turned < as_is / 3, (turned, as_is)


def test_unicode_and_spaces_in_names(bad_dir):
    row = _decode(bad_dir / "spaces and ünïcödé 视频.mp4")
    assert row["status"] == "ok" and row["video_uri"].endswith("视频.mp4")


@pytest.mark.parametrize("uri", ["s3://", "s3://bucket", "s3://bucket/", "s3:/bucket/v.mp4", "ftp://host/v.mp4",
                                 "http://host/v.mp4", "", "a\x00b.mp4"])
def test_malformed_uri_is_invalid_uri(uri):
    row = _decode(uri)
    assert row["status"] == "error" and row["error_type"] == "invalid_uri", row["error_message"]


def test_manifest_keeps_scheme_uris_as_written(tmp_path):
    from pipeline.sources import manifest_source

    (tmp_path / "m.jsonl").write_text('{"video_uri": "s3:/b/v.mp4"}\n{"video_uri": "rel/v.mp4"}\n')
    uris = manifest_source(str(tmp_path / "m.jsonl"), S3Config()).column("video_uri").to_pylist()
    assert uris == ["s3:/b/v.mp4", str(tmp_path / "rel/v.mp4")]


# ------------------------------------------------------------------------------------------------ S3


def test_object_deleted_between_listing_and_download(mocked_s3, bad_inputs):
    from pipeline.config import InputConfig
    from pipeline.sources import list_videos

    for name in ("one_frame.mp4", "five_frames.mp4"):
        mocked_s3.put_object(Bucket="bkt", Key=f"v/{name}", Body=bad_inputs[name][0])
    uris = list_videos(InputConfig(s3_prefix="s3://bkt/v/"), S3Config()).column("video_uri").to_pylist()
    mocked_s3.delete_object(Bucket="bkt", Key="v/one_frame.mp4")
    rows = [_decode(u) for u in uris]
    assert [(r["status"], r.get("error_type")) for r in rows] == [("ok", None), ("error", "not_found")]


def test_access_denied(monkeypatch):
    """A real 403: moto's server with IAM enforcement on (separate process, tests/pipeline/s3auth.py); the
    restricted user may read one video and list its bucket, nothing else. Its credentials come from the
    environment, as in a real run."""
    pytest.importorskip("moto")
    from pipeline import storage
    from pipeline.config import InputConfig
    from pipeline.sources import SourceError, list_videos
    from tests.pipeline.s3auth import BUCKET, FORBIDDEN_KEY, READABLE_KEY, UNLISTABLE_BUCKET, iam_enforcing_s3
    from tests.pipeline.s3server import fake_aws_env

    readable, forbidden = f"s3://{BUCKET}/{READABLE_KEY}", f"s3://{BUCKET}/{FORBIDDEN_KEY}"
    monkeypatch.delenv("AWS_SESSION_TOKEN", raising=False)  # an IAM user's key has none; moto rejects one (InvalidToken)
    monkeypatch.delenv("AWS_PROFILE", raising=False)

    def decode(uri, endpoint, isolation):
        stage = DecodeStage(DecodeConfig(num_frames=4, frame_size=32, isolation=isolation), S3Config(endpoint_url=endpoint))
        return stage.decode_one({"video_id": "v", "video_uri": uri, "questions": None})

    with iam_enforcing_s3() as (endpoint, key_id, secret):
        creds = {"AWS_ACCESS_KEY_ID": key_id, "AWS_SECRET_ACCESS_KEY": secret, "AWS_DEFAULT_REGION": "us-east-1",
                 "AWS_EC2_METADATA_DISABLED": "true"}
        storage.client.cache_clear()
        close_pool()  # the decoder process starts below, inside the environment holding the user's credentials
        try:
            with fake_aws_env(creds):
                # the config default: the decoder subprocess inherits the environment's credentials
                ok, denied = (decode(u, endpoint, "process") for u in (readable, forbidden))
                assert ok["status"] == "ok" and frames_from_row(ok).shape == (4, 32, 32, 3)
                assert denied["status"] == "error" and denied["error_type"] == "access_denied"
                assert forbidden in denied["error_message"] and "AccessDenied" in denied["error_message"]
                assert secret not in denied["error_message"]
                # listing: the user may list BUCKET (the forbidden object is listed, then denied on read), not the other
                listed = list_videos(InputConfig(s3_prefix=f"s3://{BUCKET}/videos/"), S3Config(endpoint_url=endpoint))
                assert listed.column("video_uri").to_pylist() == [forbidden, readable]
                with pytest.raises(SourceError, match=rf"s3://{UNLISTABLE_BUCKET}/videos/: access denied listing") as info:
                    list_videos(InputConfig(s3_prefix=f"s3://{UNLISTABLE_BUCKET}/videos/"), S3Config(endpoint_url=endpoint))
                assert secret not in str(info.value)
            # the signature really is checked: the same key id with a wrong secret reads nothing
            storage.client.cache_clear()
            with fake_aws_env({**creds, "AWS_SECRET_ACCESS_KEY": "not-the-secret"}):
                wrong = decode(readable, endpoint, "none")
            assert wrong["status"] == "error" and wrong["error_type"] == "access_denied"
            assert "SignatureDoesNotMatch" in wrong["error_message"] and readable in wrong["error_message"]
            assert "not-the-secret" not in wrong["error_message"] and secret not in wrong["error_message"]
        finally:
            storage.client.cache_clear()
            close_pool()  # no decoder process keeps the restricted credentials


# ------------------------------------------------------------------------------------------------ prompt too long


def test_engine_context_error_becomes_prompt_too_long():
    from pipeline.stages import generate_error_type

    msg = "prompt of 9000 tokens + 6 new tokens exceeds the model context of 8192"
    assert generate_error_type(msg) == "prompt_too_long" and "prompt_too_long" in ERROR_TYPES
    assert generate_error_type("CUDA out of memory") == "generate_failed"


# ------------------------------------------------------------------------------------------------ security

_BASE = {"input": {"local_dir": "."}, "output": {"path": "out"}, "model": {"source": "m"}}


def test_trust_remote_code_off_by_default_and_passed_through(monkeypatch):
    from pipeline import stages

    cfg = load_config(data=_BASE)
    assert cfg.model.trust_remote_code is False
    seen = {}

    class FakeLLM:
        @staticmethod
        def load(path, **kw):
            seen.update(kw)
            return object()

    import dycoke.llava

    monkeypatch.setattr(dycoke.llava, "VideoLLM", FakeLLM)
    stages.load_llm(cfg)
    assert seen["trust_remote_code"] is False
    on = load_config(data={**_BASE, "model": {"source": "m", "trust_remote_code": True}})
    stages.load_llm(on)
    assert seen["trust_remote_code"] is True


@pytest.mark.parametrize("run_id", ["..", ".", "../x", "a/../../b", "/abs"])
def test_run_id_cannot_leave_the_output_prefix(run_id):
    with pytest.raises(ConfigurationError, match="run_id"):
        load_config(data={**_BASE, "run_id": run_id})
    with pytest.raises(ValueError, match="one folder name"):
        sink.run_uri("s3://b/out", run_id)


def test_sink_target_stays_under_output_path(tmp_path):
    from pipeline import storage

    target = storage.resolve(sink.run_uri(str(tmp_path / "out"), "run-1"))
    assert target.path == str(tmp_path / "out" / "run-1")
    for bad in ("..", "../escape", "a/b", "a\\b", "."):
        with pytest.raises(ValueError, match="one folder name"):
            sink.run_uri(str(tmp_path / "out"), bad)


def test_config_cannot_execute_code(tmp_path):
    marker = tmp_path / "pwned"
    bad = tmp_path / "job.yaml"
    bad.write_text(f"run_id: !!python/object/apply:os.system ['touch {marker}']\n"
                   "input: {local_dir: .}\noutput: {path: out}\nmodel: {source: m}\n")
    with pytest.raises(ConfigurationError, match="not valid YAML") as info:
        load_config(bad)
    assert "python/object" in str(info.value)
    assert not marker.exists()
    with pytest.raises(ConfigurationError):
        load_config(data=_BASE, overrides=["run_id=!!python/object/apply:os.getcwd []"])
