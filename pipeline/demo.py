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
tasks:
  caption_prompt: Describe the video in detail.
  questions: ["What is moving in the video?"]
  mcq:
    - question: What does the video show?
      options: [a street, a kitchen, a park, a dance]
  max_new_tokens: 16
  mcq_max_new_tokens: 4
decode:
  num_frames: 8
  batch_size: 2                          # the decode stage: videos per task, and its resources
  num_cpus: 0.5
  memory: 0.25GiB
mode: fused                              # encode + generate in one actor (split: separate pools)
fused:
  batch_size: 2                          # videos per actor call
  num_cpus: 1
  num_gpus: 0                            # 1 on a GPU machine
compression:
  method: dycoke                         # or holitom (about 15% of the tokens) or none
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


def run_demo(cfg, _options=None) -> tuple[str, dict]:
    """Prepare the inputs, run the job, and describe what it wrote: the summary, a few rows, how to go real."""
    from pipeline.run import run
    from pipeline.sink import read_committed

    prepare()
    result = run(cfg)
    lines = ["", result.summary.render()]
    rows = read_committed(result.target, columns=["video_uri", "task_id", "status", "error_type", "choice", "answer"],
                          s3_cfg=cfg.s3)
    lines.append("\nfirst rows:")
    for r in rows.sort_by([("video_uri", "ascending"), ("task_id", "ascending")]).to_pylist()[:6]:
        name = r["video_uri"].rsplit("/", 1)[-1]
        what = repr((r["answer"] or "")[:40]) if r["status"] == "ok" else f"ERROR {r['error_type']}"
        lines.append(f"  {name:<20} {r['task_id']:<8} {what}" + (f"  choice={r['choice']}" if r["task_id"].startswith("mcq") else ""))
    lines += [f"\nParquet: {result.target.uri}\n", REAL_RUN_HINT]
    return "\n".join(lines), result.summary.to_dict()


def prepare(root: Path = DEMO_ROOT) -> None:
    """Write the sample clips and the tiny checkpoint under ``root`` (kept when already there)."""
    from dycoke.testing import build_tiny_checkpoint
    from pipeline.samples import write_samples

    videos = root / "videos"
    if not videos.is_dir() or not any(videos.iterdir()):
        paths = write_samples(videos)
        log.info("wrote %d sample clips (one truncated on purpose) to %s", len(paths), videos)
    build_tiny_checkpoint(root / "tiny-llava")
