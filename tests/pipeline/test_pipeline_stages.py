"""Encode / generate / fused stages as plain callables with the tiny checkpoint (no Ray)."""

from __future__ import annotations

import pytest

from pipeline.config import MCQ, DecodeConfig, DyCokeSettings, TasksConfig
from pipeline.decode import DecodeStage
from pipeline.schema import ENCODED_SCHEMA, OUTPUT_SCHEMA
from pipeline.stages import (
    EncodeStage,
    FusedStage,
    GenerateSettings,
    GenerateStage,
    ModelSettings,
    load_llm,
    pack_visual,
    unpack_visual,
)

NAMES = ["short_24fps.mp4", "long_10fps.mp4", "not_a_video.mp4", "wide_25fps.mp4"]


@pytest.fixture(scope="module")
def llm(tiny_model):
    return load_llm(ModelSettings(source=tiny_model, dtype="float32", device="cpu"))


@pytest.fixture(scope="module")
def decoded(video_dir):
    rows = [{"video_id": n, "video_uri": str(video_dir / n), "questions": ["Why?"] if i == 0 else None}
            for i, n in enumerate(NAMES)]
    return DecodeStage(DecodeConfig(num_frames=8, frame_size=56, isolation="none"))(rows)


def _gen_settings(**tasks) -> GenerateSettings:
    base = {"questions": ["What moves?"], "max_new_tokens": 5, "mcq_max_new_tokens": 3,
            "mcq": [MCQ(question="Which?", options=["bars", "cats"])]}
    base.update(tasks)
    return GenerateSettings(run_id="test-run", tasks=TasksConfig(**base), dycoke=DyCokeSettings())


def test_encode_stage(tiny_model, llm, decoded):
    stage = EncodeStage(ModelSettings(source=tiny_model), DyCokeSettings(), llm=llm)
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
    vis = llm.encode([torch.from_numpy(frames_from_row(row).copy())], DyCokeSettings().to_dycoke(4))[0]
    back = unpack_visual(pack_visual(vis))
    assert torch.equal(back.tokens, vis.tokens) and back.num_kept == vis.num_kept


def test_generate_and_fused_agree(tiny_model, llm, decoded):
    ms = ModelSettings(source=tiny_model)
    gs = _gen_settings()
    encoded = EncodeStage(ms, gs.dycoke, llm=llm)(decoded)
    split = GenerateStage(ms, gs, llm=llm)(encoded)
    fused = FusedStage(ms, gs, llm=llm)(decoded)
    assert split.schema.equals(OUTPUT_SCHEMA) and fused.schema.equals(OUTPUT_SCHEMA)
    rows = split.to_pylist()
    # 4 videos x (caption, qa:0, mcq:0) + one manifest question on the first video
    assert len(rows) == 13
    keys = [(r["video_id"], r["task_id"]) for r in rows]
    assert len(set(keys)) == len(keys) and ("short_24fps.mp4", "vq:0") in keys
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
    ms = ModelSettings(source=tiny_model)
    gs = _gen_settings(max_new_tokens=100_000, questions=[], mcq=[])
    rows = FusedStage(ms, gs, llm=llm)(decoded.slice(1, 1)).to_pylist()
    assert len(rows) == 1 and rows[0]["status"] == "error" and rows[0]["error_type"] == "prompt_too_long"
    assert "context" in rows[0]["error_message"]


def test_engine_failure_is_isolated_per_video(tiny_model, llm, decoded, monkeypatch):
    ms = ModelSettings(source=tiny_model)
    stage = FusedStage(ms, _gen_settings(questions=[], mcq=[]), llm=llm)
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
    stage = EncodeStage(ModelSettings(source=tiny_model), DyCokeSettings(), llm=llm)
    real = stage._encode

    def flaky(frames):
        if len(frames) > 1:
            raise RuntimeError("out of memory")
        return real(frames)

    monkeypatch.setattr(stage, "_encode", flaky)
    rows = stage(decoded).to_pylist()
    assert [r["status"] for r in rows] == ["ok", "ok", "error", "ok"]  # batch failed, per-video retry succeeded


def test_no_tasks_gives_one_error_row(tiny_model, llm, decoded):
    gs = GenerateSettings(run_id="r", tasks=TasksConfig(caption_prompt=None), dycoke=DyCokeSettings())
    rows = FusedStage(ModelSettings(source=tiny_model), gs, llm=llm)(decoded.slice(1, 1)).to_pylist()
    assert len(rows) == 1 and rows[0]["error_type"] == "no_tasks" and rows[0]["task_id"] == "none"
    # a video that failed to decode keeps its own error (retryable or not), even when no task applies
    rows = FusedStage(ModelSettings(source=tiny_model), gs, llm=llm)(decoded.slice(2, 1)).to_pylist()
    assert len(rows) == 1 and rows[0]["error_type"] == "not_a_video" and rows[0]["task_id"] == "none"


def test_fused_stage_keeps_visual_tokens_in_the_actor(tiny_model, llm, decoded, monkeypatch):
    """Fused: encode and generate share the actor, so the tokens are never packed to bytes and back."""
    from pipeline import stages

    def no_round_trip(*args, **kwargs):
        raise AssertionError("fused stage must not pack or unpack visual tokens")

    monkeypatch.setattr(stages, "pack_visual", no_round_trip)
    monkeypatch.setattr(stages, "unpack_visual", no_round_trip)
    rows = FusedStage(ModelSettings(source=tiny_model), _gen_settings(), llm=llm)(decoded).to_pylist()
    good = [r for r in rows if r["video_id"] != "not_a_video.mp4"]
    assert {r["video_id"] for r in good} == set(NAMES) - {"not_a_video.mp4"} and {r["status"] for r in good} == {"ok"}


def test_stages_declare_columns():
    assert set(EncodeStage.output_columns) == set(ENCODED_SCHEMA.names)
    assert set(GenerateStage.output_columns) == set(OUTPUT_SCHEMA.names)
    assert FusedStage.input_columns == EncodeStage.input_columns


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
