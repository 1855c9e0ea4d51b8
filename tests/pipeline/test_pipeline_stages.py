"""Encode / generate / fused stages as plain callables with the tiny checkpoint (no Ray)."""

from __future__ import annotations

import pytest

from pipeline.config import DecodeConfig, PipelineConfig
from pipeline.decode import DecodeStage
from pipeline.schema import ENCODED_SCHEMA, OUTPUT_SCHEMA
from pipeline.stages import (
    EncodeStage,
    FusedStage,
    GenerateStage,
    StageInputError,
    load_llm,
    pack_visual,
    unpack_visual,
)

NAMES = ["short_24fps.mp4", "long_10fps.mp4", "not_a_video.mp4", "wide_25fps.mp4"]


def job(tiny_model, compression: dict | None = None, **tasks) -> PipelineConfig:
    """The job config the stages get, with the test's tasks (``tasks``) and compression fields."""
    return PipelineConfig(run_id="test-run", input={"local_dir": "v"}, output={"path": "o"},
                          model={"source": tiny_model, "dtype": "float32", "device": "cpu"}, tasks=tasks,
                          compression=compression or {})


@pytest.fixture(scope="module")
def llm(tiny_model):
    return load_llm(job(tiny_model))


@pytest.fixture(scope="module")
def decoded(video_dir):
    rows = [{"video_id": n, "video_uri": str(video_dir / n), "questions": ["Why?"] if i == 0 else None}
            for i, n in enumerate(NAMES)]
    return DecodeStage(DecodeConfig(num_frames=8, frame_size=56, isolation="none"))(rows)


def _job(tiny_model, compression: dict | None = None, **tasks) -> PipelineConfig:
    base = {"questions": ["What moves?"], "max_new_tokens": 5, "mcq_max_new_tokens": 3,
            "mcq": [{"question": "Which?", "options": ["bars", "cats"]}]}
    return job(tiny_model, compression, **{**base, **tasks})


def test_encode_stage(tiny_model, llm, decoded):
    stage = EncodeStage(job(tiny_model), llm=llm)
    out = stage(decoded)
    assert out.schema.equals(ENCODED_SCHEMA) and "frames" not in out.column_names
    rows = out.to_pylist()
    assert [r["status"] for r in rows] == ["ok", "ok", "error", "ok"]
    ok = rows[0]
    assert ok["visual_tokens_full"] == 8 * 4 and ok["visual_tokens_prefill"] == 17  # TTM K=0.7, T=4, F=8
    vis = unpack_visual(ok["visual"])
    assert tuple(vis.tokens.shape) == (18, llm.hidden_size)  # kept tokens + newline
    assert rows[2]["visual"] is None and rows[2]["error_type"] == "not_a_video"
    assert len(ok["visual"]) < len(decoded.column("frames")[0].as_py())  # tokens ship smaller than frames


def test_pack_roundtrip(llm, decoded):
    import torch

    from pipeline.decode import frames_from_row

    row = decoded.to_pylist()[0]
    vis = llm.encode([torch.from_numpy(frames_from_row(row).copy())], job("m").compression.to_dycoke(4))[0]
    back = unpack_visual(pack_visual(vis))
    assert torch.equal(back.tokens, vis.tokens) and back.num_kept == vis.num_kept


def test_generate_and_fused_agree(tiny_model, llm, decoded):
    cfg = _job(tiny_model)
    encoded = EncodeStage(cfg, llm=llm)(decoded)
    split = GenerateStage(cfg, llm=llm)(encoded)
    fused = FusedStage(cfg, llm=llm)(decoded)
    assert split.schema.equals(OUTPUT_SCHEMA) and fused.schema.equals(OUTPUT_SCHEMA)
    rows = split.to_pylist()
    # 4 videos x (caption, qa:0, mcq:0) + one manifest question on the first video
    assert len(rows) == 13
    keys = [(r["video_id"], r["task_id"]) for r in rows]
    assert len(set(keys)) == len(keys) and ("short_24fps.mp4", "vq:0") in keys
    # the driver's expectation (what resume counts as a complete video) is what the stage wrote: one function
    from pipeline.tasks import expected_task_ids

    expected = dict(zip(decoded.column("video_id").to_pylist(), expected_task_ids(cfg.tasks, decoded), strict=True))
    assert sorted(keys) == sorted((v, t) for v, ids in expected.items() for t in ids)
    bad = [r for r in rows if r["video_id"] == "not_a_video.mp4"]
    assert len(bad) == 3 and all(r["status"] == "error" and r["error_type"] == "not_a_video" for r in bad)
    good = [r for r in rows if r["status"] == "ok"]
    for r in good:
        assert r["answer"] is not None and 1 <= r["output_tokens"] <= 5
        assert r["run_id"] == "test-run" and r["model_id"] == tiny_model
        assert r["visual_tokens_prefill"] == 17 and r["visual_tokens_attended"] > 0
        assert r["timings"]["prefill_s"] > 0 and r["timings"]["generate_s"] > 0
        if r["task_type"] == "mcq":
            assert r["output_tokens"] <= 3 and r["choice"] in (None, "A", "B")
            assert "A. bars" in r["prompt"] and "B. cats" in r["prompt"]
    by_key = {(r["video_id"], r["task_id"]): r["answer"] for r in fused.to_pylist()}
    assert all(by_key[(r["video_id"], r["task_id"])] == r["answer"] for r in rows)  # greedy: same text


def test_prompt_too_long_is_an_error_row(tiny_model, llm, decoded):
    cfg = _job(tiny_model, max_new_tokens=100_000, questions=[], mcq=[])
    rows = FusedStage(cfg, llm=llm)(decoded.slice(1, 1)).to_pylist()
    assert len(rows) == 1 and rows[0]["status"] == "error" and rows[0]["error_type"] == "prompt_too_long"
    assert "context" in rows[0]["error_message"]


def test_engine_failure_is_isolated_per_video(tiny_model, llm, decoded, monkeypatch):
    stage = FusedStage(_job(tiny_model, questions=[], mcq=[]), llm=llm)
    real = stage.generate.engine.add

    def flaky(requests):
        if any(r.request_id.startswith("long_10fps") for r in requests):
            raise RuntimeError("device fell over")
        return real(requests)

    monkeypatch.setattr(stage.generate.engine, "add", flaky)
    rows = {r["video_id"]: r for r in stage(decoded).to_pylist()}
    assert rows["long_10fps.mp4"]["error_type"] == "generate_failed"
    assert "device fell over" in rows["long_10fps.mp4"]["error_message"]
    assert rows["short_24fps.mp4"]["status"] == "ok" and rows["wide_25fps.mp4"]["status"] == "ok"


def test_encode_failure_is_isolated(tiny_model, llm, decoded, monkeypatch):
    stage = EncodeStage(job(tiny_model), llm=llm)
    real = stage._encode

    def flaky(frames):
        if len(frames) > 1:
            raise RuntimeError("out of memory")
        return real(frames)

    monkeypatch.setattr(stage, "_encode", flaky)
    rows = stage(decoded).to_pylist()
    assert [r["status"] for r in rows] == ["ok", "ok", "error", "ok"]  # batch failed, per-video retry succeeded


def test_no_tasks_gives_one_error_row(tiny_model, llm, decoded):
    cfg = PipelineConfig(input={"manifest": "m.jsonl"}, output={"path": "o"}, model={"source": tiny_model},
                         tasks={"caption_prompt": None})
    rows = FusedStage(cfg, llm=llm)(decoded.slice(1, 1)).to_pylist()
    assert len(rows) == 1 and rows[0]["error_type"] == "no_tasks" and rows[0]["task_id"] == "none"
    # a video that failed to decode keeps its own error (retryable or not), even when no task applies
    rows = FusedStage(cfg, llm=llm)(decoded.slice(2, 1)).to_pylist()
    assert len(rows) == 1 and rows[0]["error_type"] == "not_a_video" and rows[0]["task_id"] == "none"


def test_fused_stage_keeps_visual_tokens_in_the_actor(tiny_model, llm, decoded, monkeypatch):
    """Fused: encode and generate share the actor, so the tokens are never packed to bytes and back."""
    from pipeline import stages

    def no_round_trip(*args, **kwargs):
        raise AssertionError("fused stage must not pack or unpack visual tokens")

    monkeypatch.setattr(stages, "pack_visual", no_round_trip)
    monkeypatch.setattr(stages, "unpack_visual", no_round_trip)
    rows = FusedStage(_job(tiny_model), llm=llm)(decoded).to_pylist()
    good = [r for r in rows if r["video_id"] != "not_a_video.mp4"]
    assert {r["video_id"] for r in good} == set(NAMES) - {"not_a_video.mp4"} and {r["status"] for r in good} == {"ok"}


@pytest.mark.parametrize("share", [1.0, 0.5])
def test_model_actors_decode_what_the_stage_only_fetched(tiny_model, llm, decoded, video_dir, share):
    """``decode.where: actor``: the decode stage ships bytes and the encode / fused actor decodes them (PyAV here; the
    same path takes NVDEC on a GPU node): the same rows as when the decode stage ships frames. With
    ``decode.actor_share: 0.5`` the stage decodes the videos outside the share itself (here 1 of the 3 videos is in
    it), and the batch mixes both kinds of row."""
    decode = DecodeConfig(num_frames=8, frame_size=56, isolation="none", where="actor", actor_share=share)
    fetched = DecodeStage(decode)([{"video_id": n, "video_uri": str(video_dir / n), "questions": ["Why?"] if i == 0 else None}
                                   for i, n in enumerate(NAMES)])
    shipped = 3 if share == 1.0 else 1  # not_a_video.mp4 is an error row either way
    assert fetched.column("data").null_count == len(NAMES) - shipped
    assert fetched.column("frames").null_count == shipped + 1
    cfg = _job(tiny_model)
    in_actor = cfg.model_copy(update={"decode": decode})
    want, got = (EncodeStage(c, llm=llm)(b).to_pylist() for c, b in ((cfg, decoded), (in_actor, fetched)))
    for w, g in zip(want, got):
        assert {k: g[k] for k in ("status", "error_type", "num_frames", "frame_timestamps_s", "duration_s")} == \
            {k: w[k] for k in ("status", "error_type", "num_frames", "frame_timestamps_s", "duration_s")}
        if w["status"] == "ok":
            assert g["decode_s"] > 0 and unpack_visual(g["visual"]).tokens.equal(unpack_visual(w["visual"]).tokens)
    want, got = (FusedStage(c, llm=llm)(b).to_pylist() for c, b in ((cfg, decoded), (in_actor, fetched)))
    keep = ("video_id", "task_id", "status", "error_type", "answer", "num_frames", "frame_timestamps_s")
    assert [{k: r[k] for k in keep} for r in got] == [{k: r[k] for k in keep} for r in want]


def test_model_actor_starts_its_decoders_before_its_model_loads(tiny_model, llm, monkeypatch):
    """``decode.where: actor`` with the frame size the run read: the actor's decoder (and its processes) exists before
    the model is loaded, in both model stages, so the decoders start meanwhile; without a frame size it is made from
    the model's, after the load."""
    from pipeline import actor_decode, stages

    seen = []
    monkeypatch.setattr(stages, "load_llm", lambda cfg, section=None: seen.append(dict(built)) or llm)
    monkeypatch.setattr(actor_decode, "ActorDecoder", lambda decode, size: built.setdefault("decoder", size))
    cfg = _job(tiny_model).model_copy(update={"decode": DecodeConfig(where="actor")})
    for stage, frame_size, before in ((stages.EncodeStage, 56, {"decoder": 56}), (stages.FusedStage, 56, {"decoder": 56}),
                                      (stages.EncodeStage, None, {})):
        built = {}
        made = stage(cfg, frame_size=frame_size)
        assert seen.pop(0) == before and built == {"decoder": frame_size or llm.image_size}
        assert (made.encode if stage is stages.FusedStage else made).decoder == built["decoder"]
    assert not seen  # one load per stage


def test_stages_declare_columns():
    assert set(EncodeStage.output_columns) == set(ENCODED_SCHEMA.names)
    assert set(GenerateStage.output_columns) == set(OUTPUT_SCHEMA.names)
    assert set(FusedStage.input_columns) == set(EncodeStage.input_columns) | set(GenerateStage.input_columns) - {"visual"}


@pytest.mark.parametrize("method, ttm", [("dycoke", {"k": 0.5}), ("holitom", {"retain_ratio": 0.25, "tau": 0.65}),
                                         ("none", {})])
def test_compression_method_is_recorded_in_the_output(tiny_model, llm, decoded, method, ttm):
    """The chosen method and its exact settings (plus DP's and T) land in every row's ``compression`` column, and
    the method shapes the visual span (none: all F x T tokens; dycoke: K's count; holitom: fewer)."""
    import json

    compression = {"method": method, **({method: ttm} if ttm else {}), "dp": {"enabled": method != "none"}}
    rows = FusedStage(_job(tiny_model, compression, questions=[], mcq=[]), llm=llm)(decoded.take([1, 3])).to_pylist()
    assert [r["status"] for r in rows] == ["ok", "ok"]
    for r in rows:
        recorded = json.loads(r["compression"])
        assert recorded["method"] == method and recorded["tokens_per_frame"] == 4
        assert recorded["dp"]["enabled"] is (method != "none")
        if ttm:
            assert {k: recorded[method][k] for k in ttm} == ttm and set(recorded) == {"method", method, "dp", "tokens_per_frame"}
        else:
            assert set(recorded) == {"method", "dp", "tokens_per_frame"}
    full = rows[0]["visual_tokens_full"]
    assert full == 8 * 4
    prefill = rows[0]["visual_tokens_prefill"]
    # F=8, T=4, reference TTM: frames 0, 4, 6 whole, the other five keep int((1 - K) * T) = 2 tokens at K=0.5
    assert {"none": prefill == full, "dycoke": prefill == 3 * 4 + 5 * 2, "holitom": prefill < full}[method], prefill


def test_stage_checks_its_input_columns_on_the_first_batch(tiny_model, llm, decoded):
    stage = FusedStage(_job(tiny_model), llm=llm)
    with pytest.raises(StageInputError, match=r"FusedStage: input batch lacks column\(s\) frames, frames_shape"):
        stage(decoded.drop_columns(["frames", "frames_shape"]))
    generate = GenerateStage(_job(tiny_model), llm=llm)
    with pytest.raises(StageInputError, match="GenerateStage: input batch lacks column.*visual"):
        generate(decoded)  # decoded rows straight into generate: no visual tokens
    assert len(stage(decoded.slice(0, 1))) == 4  # a well-formed batch passes the check (3 tasks + its own question)


def test_stage_bench_runs_on_cpu(tmp_path):
    """bench/bench_stage.py's CPU path (tiny checkpoint), so the stage benchmark cannot rot: every variant kind
    runs the stage as the job calls it and reports its phases, its floor and one ok row per (video, task)."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    subprocess.run([sys.executable, "bench/bench_stage.py", "--tiny", "--videos", "4", "--frames", "4",
                    "--variants", "fused_mix,mix:holitom-r0.15,split_mix"], cwd=root, check=True, timeout=600,
                   env={**os.environ, "OUT": str(tmp_path)}, capture_output=True)
    results = {r["variant"]: r for r in json.loads((tmp_path / "bench_stage_tiny.json").read_text())["results"]}
    assert set(results) == {"fused_mix", "mix:holitom-r0.15", "split_mix"}
    mix = results["fused_mix"]
    assert mix["videos_per_s"] > 0 and mix["x_floor"] > 0 and mix["prefixes"] == 4 and mix["rows"] == 16
    assert len(mix["prompt_tokens"]) == 4  # four tasks, one prefix each video
    assert results["mix:holitom-r0.15"]["visual_tokens"] < mix["visual_tokens"]
    assert results["split_mix"]["encode_videos_per_s"] > 0 and results["split_mix"]["generate_videos_per_s"] > 0
