"""Process a video corpus: ``python -m jobs.corpus --config job.yaml [--set field=value ...]``.

Runs on a local Ray by default, on the cluster of ``ray job submit`` (``RAY_ADDRESS``), or on
``--ray.address``. Parse config, build, run; the logic lives in :mod:`pipeline`.
"""

from __future__ import annotations

import sys

from pipeline.cli import job_main


def _run(cfg, _options):
    from pipeline.run import run

    result = run(cfg)
    return result.summary.render(), result.summary.to_dict()


def main(argv: list[str] | None = None) -> int:
    return job_main(argv, "python -m jobs.corpus", "Caption and question every video of a corpus; write Parquet.", _run)


if __name__ == "__main__":
    sys.exit(main())
