"""Nightly incremental indexing: ``python -m jobs.nightly --config job.yaml [--set field=value ...]``: only the
videos new or changed since the last committed run, committed by a run manifest (:mod:`pipeline.incremental`)."""

from __future__ import annotations

from pipeline.cli import job_main


def _run(cfg, _options):
    from pipeline.incremental import run_nightly

    result = run_nightly(cfg)
    return result.render(), None if result.summary is None else {"run_id": result.run_id, **result.summary.to_dict()}


def main(argv: list[str] | None = None) -> int:
    return job_main(argv, "python -m jobs.nightly",
                    "Index only new or changed videos; write a date-partitioned, committed Parquet run.", _run)


if __name__ == "__main__":
    raise SystemExit(main())
