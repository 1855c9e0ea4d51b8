"""Entry points: `python -m jobs.corpus --config <file>` and `python -m jobs.demo`."""
