"""Task expansion, MCQ parsing, and the output schema's row builders."""

from __future__ import annotations

import pyarrow as pa
import pytest

from pipeline.config import MCQ, TasksConfig
from pipeline.schema import (
    ERROR_TYPES,
    OUTPUT_SCHEMA,
    check_table,
    error_output_row,
    output_row,
    rows_to_table,
)
from pipeline.tasks import Task, mcq_prompt, parse_choice, video_tasks

OPTS = ["cooking", "dancing", "driving", "reading"]


@pytest.mark.parametrize(
    "text, expected",
    [
        ("B", "B"), ("B.", "B"), ("(C) driving", "C"), ("D) reading", "D"), ("The answer is A.", "A"),
        ("Answer: (B)", "B"), ("answer is c", None), ("dancing", "B"), ("They are Driving.", "C"),
        ("A person is cooking", "A"), ("E", None), ("", None), (None, None), ("cooking or dancing", None),
        ("A man walks", None),
    ],
)
def test_parse_choice(text, expected):
    assert parse_choice(text, OPTS) == expected


def test_mcq_prompt_format():
    assert mcq_prompt("What?", ["x", "y"], "Pick one.") == "What?\nA. x\nB. y\nPick one."


def test_video_tasks_order_and_ids():
    cfg = TasksConfig(questions=["q1", "q2"], mcq=[MCQ(question="m", options=["a", "b"]),
                                                   MCQ(question="n", options=["a", "b"], id="scene")])
    tasks = video_tasks(cfg, ["extra?", "  "])
    assert [t.task_id for t in tasks] == ["caption", "qa:0", "qa:1", "mcq:0", "scene", "vq:0"]
    assert [t.task_type for t in tasks] == ["caption", "qa", "qa", "mcq", "mcq", "qa"]
    assert tasks[3].options == ("a", "b") and tasks[3].max_new_tokens == cfg.mcq_max_new_tokens
    assert [t.task_id for t in video_tasks(cfg.model_copy(update={"use_manifest_questions": False}), ["x"])][-1] == "scene"


def test_rows_match_schema():
    video = {"video_id": "v", "video_uri": "s3://b/v.mp4", "video_bytes": 10, "num_frames": 4,
             "frame_timestamps_s": [0.0, 0.5], "status": "ok", "fetch_s": 0.1, "decode_s": 0.2, "encode_s": 0.3,
             "visual_tokens_full": 8, "visual_tokens_prefill": 5, "model_id": "m"}
    task = Task("caption", "caption", "Describe.", 8)
    ok = output_row(video, task, run_id="r", compression="{}", answer="hi", prompt_tokens=20, output_tokens=2,
                    timings={"prefill_s": 0.4, "generate_s": 0.5})
    err = error_output_row(video, task, run_id="r", compression="{}", error_type="generate_failed", error_message="x")
    table = rows_to_table([ok, err])
    check_table(table)
    rows = table.to_pylist()
    assert rows[0]["timings"] == {"fetch_s": 0.1, "decode_s": 0.2, "encode_s": 0.3, "prefill_s": 0.4, "generate_s": 0.5}
    assert rows[0]["status"] == "ok" and rows[0]["error_type"] is None
    assert rows[1]["status"] == "error" and rows[1]["error_type"] in ERROR_TYPES
    assert rows[0]["processed_at"].tzinfo is not None


def test_schema_rejects_unknown_columns():
    with pytest.raises(ValueError, match="outside the schema"):
        rows_to_table([{"video_id": "v", "surprise": 1}])
    with pytest.raises(ValueError, match="schema mismatch"):
        check_table(pa.table({"x": [1]}))


def test_schema_has_the_contract_columns():
    assert OUTPUT_SCHEMA.names == [
        "run_id", "video_id", "video_uri", "video_etag", "video_bytes", "duration_s", "num_frames",
        "frame_timestamps_s", "task_id", "task_type", "prompt", "answer", "choice", "visual_tokens_full",
        "visual_tokens_prefill", "visual_tokens_attended", "prompt_tokens", "output_tokens", "model_id",
        "compression", "timings", "status", "error_type", "error_message", "processed_at",
    ]
    assert OUTPUT_SCHEMA.field("timings").type.names == ["fetch_s", "decode_s", "encode_s", "prefill_s", "generate_s"]
