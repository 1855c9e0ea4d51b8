"""Process a video corpus: ``python -m jobs.corpus --config job.yaml [--set field=value ...]``, on a local Ray,
the cluster of ``ray job submit`` (``RAY_ADDRESS``) or ``--ray.address``. The logic lives in :mod:`pipeline`."""

from __future__ import annotations

from pipeline.cli import job_main


def _run(cfg, _options):
    from pipeline.run import run

    summary = run(cfg).summary
    return summary.render(), summary.to_dict()


def main(argv: list[str] | None = None) -> int:
    return job_main(argv, "python -m jobs.corpus", "Caption and question every video of a corpus; write Parquet.", _run)


if __name__ == "__main__":
    raise SystemExit(main())
