"""`make demo`: the whole pipeline on generated clips with a tiny random-weight model, on a local Ray.

Writes everything under ./demo_output. Safe to run twice: a re-run resumes its own run (here: nothing left
to do); ``--set output.on_existing=overwrite`` redoes it.
"""

from __future__ import annotations

import sys

from pipeline.cli import parse_config, reported_errors
from pipeline.config import to_yaml
from pipeline.demo import REAL_RUN_HINT, demo_data, prepare
from pipeline.run import run
from pipeline.sink import read_committed


def main(argv: list[str] | None = None) -> int:
    cfg, args = parse_config(argv, "python -m jobs.demo", "Run the pipeline on generated sample clips.",
                             config_required=False, defaults=demo_data())
    if args.print_config:
        print(to_yaml(cfg))
        return 0
    prepare()
    with reported_errors("python -m jobs.demo"):
        result = run(cfg)
    print()
    print(result.summary.render())
    rows = read_committed(result.target, columns=["video_uri", "task_id", "status", "error_type", "choice", "answer"])
    print("\nfirst rows:")
    for r in rows.sort_by([("video_uri", "ascending"), ("task_id", "ascending")]).to_pylist()[:6]:
        name = r["video_uri"].rsplit("/", 1)[-1]
        what = repr((r["answer"] or "")[:40]) if r["status"] == "ok" else f"ERROR {r['error_type']}"
        print(f"  {name:<20} {r['task_id']:<8} {what}" + (f"  choice={r['choice']}" if r["task_id"].startswith("mcq") else ""))
    print(f"\nParquet: {result.target.uri}\n")
    print(REAL_RUN_HINT)
    return 0


if __name__ == "__main__":
    sys.exit(main())
