"""The small job configuration the nightly tests share (local folders or S3)."""

from __future__ import annotations


def job_data(input_section: dict, output_path: str, model_source: str, **extra) -> dict:
    """A config dict: 4 frames, a caption and one two-option MCQ, tiny batches for 2 CPUs."""
    data = {
        "input": input_section,
        "output": {"path": output_path},
        "model": {"source": model_source},
        "decode": {"num_frames": 4},
        "tasks": {"caption_prompt": "Describe.", "max_new_tokens": 3, "mcq_max_new_tokens": 2,
                  "mcq": [{"question": "Shown?", "options": ["bars", "cats"]}]},
        "stages": {"decode_num_cpus": 0.5, "actor_num_cpus": 0.5, "decode_memory_gb": 0.25,
                   "fused_batch_size": 4, "decode_batch_size": 2},
        "ray": {"progress_bars": False},
    }
    data.update(extra)
    return data
