"""`make demo`: the whole pipeline on generated clips with a tiny random-weight model, on a local Ray.

Writes everything under ./demo_output. Safe to run twice: a re-run resumes its own run (here: nothing left
to do); ``--set output.on_existing=overwrite`` redoes it.
"""

from __future__ import annotations

import sys

from pipeline.cli import job_main
from pipeline.demo import demo_data, run_demo


def main(argv: list[str] | None = None) -> int:
    return job_main(argv, "python -m jobs.demo", "Run the pipeline on generated sample clips.", run_demo,
                    config_required=False, defaults=demo_data())


if __name__ == "__main__":
    sys.exit(main())
