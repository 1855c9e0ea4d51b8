"""Nightly incremental indexing: ``python -m jobs.nightly --config job.yaml [--set field=value ...]``.

Processes only the videos that are new or changed since the last committed run and commits the run
with a manifest written last (layout and reading rules: :mod:`pipeline.incremental`). Parse config,
build, run; the logic lives in :mod:`pipeline`.
"""

from __future__ import annotations

import json
import sys

from pipeline.cli import parse_config, reported_errors
from pipeline.config import to_yaml
from pipeline.incremental import run_nightly


def main(argv: list[str] | None = None) -> int:
    cfg, args = parse_config(argv, "python -m jobs.nightly",
                             "Index only new or changed videos; write a date-partitioned, committed Parquet run.")
    if args.print_config:
        print(to_yaml(cfg))
        return 0
    with reported_errors("python -m jobs.nightly"):
        result = run_nightly(cfg)
    print(result.render())
    if args.summary_json and result.summary is not None:
        with open(args.summary_json, "w") as f:
            json.dump({"run_id": result.run_id, **result.summary.to_dict()}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
