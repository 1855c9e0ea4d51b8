"""Accuracy and throughput per compression setting on a multiple-choice benchmark:
``python -m jobs.evaluate --config eval.yaml [--settings off,dycoke-k0.7-p0.7]``, ``input.manifest`` being the
evaluation manifest (video_uri, question, options, answer). The logic lives in :mod:`pipeline.evaluate`."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from pipeline.cli import JobOptions, job_main
from pipeline.evaluate import PRESETS


class EvaluateOptions(JobOptions):
    settings: list[Literal[tuple(PRESETS)]] | None = Field(None, description="Settings to run, comma-separated (default all).")


def _run(cfg, options: EvaluateOptions):
    from pipeline.evaluate import evaluate, render

    table = evaluate(cfg, options.settings)
    return f"{render(table)}\n\ntable: {cfg.output.path.rstrip('/')}/accuracy.parquet", None


def main(argv: list[str] | None = None) -> int:
    return job_main(argv, "python -m jobs.evaluate", "Accuracy and throughput per compression setting.", _run,
                    options=EvaluateOptions)


if __name__ == "__main__":
    raise SystemExit(main())
