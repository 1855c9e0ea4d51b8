"""Process a video corpus: ``python -m jobs.corpus --config job.yaml [--set field=value ...]``.

Runs on a local Ray by default, on the cluster of ``ray job submit`` (``RAY_ADDRESS``), or on
``--ray.address``. Parse config, build, run; the logic lives in :mod:`pipeline`.
"""

from __future__ import annotations

import json
import sys

from pipeline.cli import parse_config, reported_errors
from pipeline.config import to_yaml
from pipeline.run import run


def main(argv: list[str] | None = None) -> int:
    cfg, args = parse_config(argv, "python -m jobs.corpus", "Caption and question every video of a corpus; write Parquet.")
    if args.print_config:
        print(to_yaml(cfg))
        return 0
    with reported_errors("python -m jobs.corpus"):
        result = run(cfg)
    print(result.summary.render())
    if args.summary_json:
        with open(args.summary_json, "w") as f:
            json.dump(result.summary.to_dict(), f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
