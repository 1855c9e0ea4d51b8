"""Accuracy and throughput per compression setting on a multiple-choice benchmark.

``python -m jobs.evaluate --config eval.yaml [--settings off,dycoke-k0.7-p0.7]``; ``input.manifest`` is the
evaluation manifest (video_uri, question, options, answer). Logic in :mod:`pipeline.evaluate`.
"""

from __future__ import annotations

import sys

from pipeline.cli import parse_config, reported_errors
from pipeline.config import to_yaml
from pipeline.evaluate import PRESETS, evaluate, render


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    settings = None
    if "--settings" in argv:
        i = argv.index("--settings")
        settings = [s for s in argv[i + 1].split(",") if s]
        del argv[i : i + 2]
    cfg, args = parse_config(argv, "python -m jobs.evaluate",
                             f"Accuracy/throughput per setting ({', '.join(PRESETS)}); --settings a,b picks some.")
    if args.print_config:
        print(to_yaml(cfg))
        return 0
    with reported_errors("python -m jobs.evaluate"):
        table = evaluate(cfg, settings)
    print(render(table))
    print(f"\ntable: {cfg.output.path.rstrip('/')}/accuracy.parquet")
    return 0


if __name__ == "__main__":
    sys.exit(main())
