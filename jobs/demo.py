"""`make demo`: the whole pipeline on generated clips with a tiny random-weight model, on a local Ray.

Writes everything under ./demo_output. A re-run resumes its own run (nothing left to do);
``--set output.on_existing=overwrite`` redoes it. ``--config FILE`` replaces the sections the file sets.
"""

from __future__ import annotations

import logging
from pathlib import Path

import yaml

from pipeline.cli import job_main

log = logging.getLogger("jobs.demo")  # also when run as __main__

# The embedded configuration: local clips in, local Parquet out, the tiny model on CPU, fused stage.
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


def prepare(root: Path = Path("demo_output")) -> None:
    """Write the sample clips and the tiny checkpoint under ``root`` (kept when already there)."""
    from dycoke.testing import build_tiny_checkpoint
    from pipeline.samples import write_samples

    videos = root / "videos"
    if not videos.is_dir() or not any(videos.iterdir()):
        paths = write_samples(videos)
        log.info("wrote %d sample clips (one truncated on purpose) to %s", len(paths), videos)
    build_tiny_checkpoint(root / "tiny-llava")


def run_demo(cfg, _options=None) -> tuple[str, dict]:
    """Prepare the inputs, run the job, and describe what it wrote: the summary, a few rows, how to go real."""
    from pipeline.run import run
    from pipeline.sink import read_committed

    prepare()
    result = run(cfg)
    lines = ["", result.summary.render(), "\nfirst rows:"]
    rows = read_committed(result.target, columns=["video_uri", "task_id", "status", "error_type", "choice", "answer"],
                          s3_cfg=cfg.s3)
    for r in rows.sort_by([("video_uri", "ascending"), ("task_id", "ascending")]).to_pylist()[:6]:
        what = repr((r["answer"] or "")[:40]) if r["status"] == "ok" else f"ERROR {r['error_type']}"
        choice = f"  choice={r['choice']}" if r["task_id"].startswith("mcq") else ""
        lines.append(f"  {r['video_uri'].rsplit('/', 1)[-1]:<20} {r['task_id']:<8} {what}{choice}")
    lines += [f"\nParquet: {result.target.uri}\n", REAL_RUN_HINT]
    return "\n".join(lines), result.summary.to_dict()


def main(argv: list[str] | None = None) -> int:
    return job_main(argv, "python -m jobs.demo", "Run the pipeline on generated sample clips.", run_demo,
                    config_required=False, defaults=yaml.safe_load(DEMO_CONFIG))


if __name__ == "__main__":
    raise SystemExit(main())
