"""Accuracy and throughput per compression setting on a multiple-choice benchmark.

``python -m jobs.evaluate --config eval.yaml [--settings off,dycoke-k0.7-p0.7]``; ``input.manifest`` is the
evaluation manifest (video_uri, question, options, answer). Logic in :mod:`pipeline.evaluate`.
"""

from __future__ import annotations

import sys

from pydantic import Field, field_validator

from pipeline.cli import JobOptions, job_main
from pipeline.evaluate import PRESETS


class EvaluateOptions(JobOptions):
    settings: str | None = Field(None, description=f"Comma-separated settings to run (default all: {','.join(PRESETS)}).")

    @field_validator("settings")
    @classmethod
    def _known(cls, value: str | None) -> str | None:
        unknown = [s for s in (value or "").split(",") if s and s not in PRESETS]
        if unknown:
            raise ValueError(f"unknown settings {unknown}; choose from {','.join(PRESETS)}")
        return value


def _run(cfg, options: EvaluateOptions):
    from pipeline.evaluate import evaluate, render

    table = evaluate(cfg, [s for s in (options.settings or "").split(",") if s] or None)
    return f"{render(table)}\n\ntable: {cfg.output.path.rstrip('/')}/accuracy.parquet", None


def main(argv: list[str] | None = None) -> int:
    return job_main(argv, "python -m jobs.evaluate", "Accuracy and throughput per compression setting.", _run,
                    options=EvaluateOptions)


if __name__ == "__main__":
    sys.exit(main())
