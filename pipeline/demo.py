"""The demo's embedded configuration and its inputs: sample clips and a tiny random-weight checkpoint."""

from __future__ import annotations

import logging
from pathlib import Path

import yaml

log = logging.getLogger(__name__)

DEMO_ROOT = Path("demo_output")

# The embedded default: local clips in, local Parquet out, the tiny model on CPU, fused stage.
DEMO_CONFIG = """\
run_id: demo
input:
  local_dir: demo_output/videos          # for a real corpus:  s3_prefix: s3://my-bucket/videos/
output:
  path: demo_output/parquet              # or s3://my-bucket/video-index/
model:
  source: demo_output/tiny-llava         # for a real model:   llava-hf/llava-onevision-qwen2-7b-ov-hf
  dtype: float32
  device: cpu
decode:
  num_frames: 8
tasks:
  caption_prompt: Describe the video in detail.
  questions: ["What is moving in the video?"]
  mcq:
    - question: What does the video show?
      options: [a street, a kitchen, a park, a dance]
  max_new_tokens: 16
  mcq_max_new_tokens: 4
stages:
  mode: fused
  fused_batch_size: 2
  decode_batch_size: 2
  decode_num_cpus: 0.5
  decode_memory_gb: 0.25
  actor_num_cpus: 1
ray:
  num_cpus: 2
  progress_bars: false
"""

REAL_RUN_HINT = """\
The tiny model has random weights: its text is meaningless (the point is the plumbing).
For a real run change the model line, and the input line for your bucket:
    model:  {source: llava-hf/llava-onevision-qwen2-7b-ov-hf}     # hub id, local dir or s3:// prefix
    input:  {s3_prefix: s3://my-bucket/videos/}
and run:  python -m jobs.corpus --config job.yaml   (or: ray job submit --working-dir . -- python -m jobs.corpus --config job.yaml)"""


def demo_data() -> dict:
    return yaml.safe_load(DEMO_CONFIG)


def prepare(root: Path = DEMO_ROOT) -> None:
    """Write the sample clips and the tiny checkpoint under ``root`` (kept when already there)."""
    from dycoke.testing import build_tiny_checkpoint
    from pipeline.samples import write_samples

    videos = root / "videos"
    if not videos.is_dir() or not any(videos.iterdir()):
        paths = write_samples(videos)
        log.info("wrote %d sample clips (one truncated on purpose) to %s", len(paths), videos)
    build_tiny_checkpoint(root / "tiny-llava")
