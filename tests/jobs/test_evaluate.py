"""Evaluation job: manifest parsing, scoring arithmetic, and one run per setting with the tiny model."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest

from jobs import evaluate as evaluate_job
from pipeline.config import S3Config
from pipeline.evaluate import Item, load_items, render, score
from pipeline.samples import make_video
from pipeline.sources import SourceError


def _items():
    opts = ("red", "green", "blue")
    return [Item("v1", "/v1.mp4", "vq:0", "q", opts, "A"), Item("v1", "/v1.mp4", "vq:1", "q", opts, "B"),
            Item("v2", "/v2.mp4", "vq:0", "q", opts, "C"), Item("v3", "/v3.mp4", "vq:0", "q", opts, "A")]


def test_score_arithmetic():
    rows = [
        {"video_id": "v1", "task_id": "vq:0", "answer": "A.", "status": "ok", "visual_tokens_prefill": 10, "visual_tokens_attended": 4.0},
        {"video_id": "v1", "task_id": "vq:1", "answer": "The answer is C", "status": "ok", "visual_tokens_prefill": 10, "visual_tokens_attended": 2.0},
        {"video_id": "v2", "task_id": "vq:0", "answer": "blue", "status": "ok", "visual_tokens_prefill": 20, "visual_tokens_attended": None},
        {"video_id": "v3", "task_id": "vq:0", "answer": None, "status": "error", "visual_tokens_prefill": None, "visual_tokens_attended": None},
    ]
    r = score("x", _items(), rows, wall_s=2.0)
    assert (r["videos"], r["questions"], r["answered"], r["parsed"], r["correct"]) == (3, 4, 3, 3, 2)
    assert r["accuracy"] == 0.5 and r["videos_per_s"] == 1.5 and r["questions_per_s"] == 2.0
    assert r["mean_visual_tokens_prefill"] == pytest.approx(40 / 3) and r["mean_visual_tokens_attended"] == 3.0
    unparsable = score("y", _items()[:1], [{**rows[0], "answer": "no idea"}], wall_s=1.0)
    assert (unparsable["parsed"], unparsable["correct"], unparsable["accuracy"]) == (0, 0, 0.0)


def test_load_items_numbers_questions_per_video(tmp_path):
    m = tmp_path / "eval.jsonl"
    rows = [{"video_uri": "a.mp4", "question": "q1", "options": ["x", "y"], "answer": "b"},
            {"video_uri": "a.mp4", "question": "q2", "options": ["x", "y"], "answer": "A"},
            {"video_uri": "b.mp4", "video_id": "B", "question": "q3", "options": "x|y|z", "answer": "C"}]
    m.write_text("\n".join(json.dumps(r) for r in rows))
    items = load_items(str(m), S3Config())
    assert [(i.task_id, i.answer) for i in items] == [("vq:0", "B"), ("vq:1", "A"), ("vq:0", "C")]
    assert items[0].video_uri == str(tmp_path / "a.mp4") and items[2].video_id == "B" and len(items[2].options) == 3
    m.write_text(json.dumps({**rows[0], "answer": "D"}))
    with pytest.raises(SourceError, match="option letters"):
        load_items(str(m), S3Config())


@pytest.mark.slow
def test_evaluate_job_two_settings(tmp_path, tiny_model, capsys):
    for name, n in (("a.mp4", 6), ("b.mp4", 8)):
        (tmp_path / name).write_bytes(make_video(num_frames=n, width=32, height=32, fps=8))
    rows = [{"video_uri": "a.mp4", "question": "Color?", "options": ["red", "green"], "answer": "A"},
            {"video_uri": "a.mp4", "question": "Shape?", "options": ["bar", "dot", "box"], "answer": "C"},
            {"video_uri": "b.mp4", "question": "Moving?", "options": ["yes", "no"], "answer": "B"},
            {"video_uri": "missing.mp4", "question": "Any?", "options": ["yes", "no"], "answer": "A"}]
    (tmp_path / "eval.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    cfg = tmp_path / "eval.yaml"
    cfg.write_text(f"""
input: {{manifest: {tmp_path / 'eval.jsonl'}}}
output: {{path: {tmp_path / 'out'}}}
model: {{source: {tiny_model}}}
tasks: {{mcq_max_new_tokens: 2}}
decode: {{num_frames: 4, num_cpus: 0.5, memory: 0.25GiB}}
fused: {{num_cpus: 0.5, batch_size: 4}}
ray: {{num_cpus: 2, progress_bars: false}}
""")
    import ray

    try:
        assert evaluate_job.main(["--config", str(cfg), "--settings", "off,dycoke-k0.7-p0.7,holitom-r0.25"]) == 0
    finally:
        ray.shutdown()
    table = pq.read_table(tmp_path / "out" / "accuracy.parquet").to_pylist()
    assert [r["setting"] for r in table] == ["off", "dycoke-k0.7-p0.7", "holitom-r0.25"]
    for r in table:
        assert (r["videos"], r["questions"], r["answered"]) == (3, 4, 3)  # the missing video: error rows
        assert r["accuracy"] == r["correct"] / 4 and 0 <= r["correct"] <= r["parsed"] <= 3
    assert table[0]["mean_visual_tokens_prefill"] > table[1]["mean_visual_tokens_prefill"]  # TTM compresses
    assert table[0]["mean_visual_tokens_prefill"] > table[2]["mean_visual_tokens_prefill"]  # so does HoliTom
    assert json.loads(table[2]["compression"])["method"] == "holitom" and json.loads(table[0]["compression"])["method"] == "none"
    out = capsys.readouterr().out
    assert "accuracy" in out and "dycoke-k0.7-p0.7" in out
    assert render(pq.read_table(tmp_path / "out" / "accuracy.parquet")).count("\n") == 4
