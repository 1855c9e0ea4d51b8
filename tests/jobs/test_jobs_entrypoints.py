"""The job entry points: --help, start-up validation, --print-config, and `make demo` run twice."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from jobs import corpus
from pipeline.config import PipelineConfig, field_docs

ROOT = Path(__file__).resolve().parents[2]


def test_help_lists_every_field(capsys):
    with pytest.raises(SystemExit) as exc:
        corpus.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for name, *_ in field_docs(PipelineConfig):
        assert f"  {name}  [" in out, name


def test_bad_config_fails_at_start_up_naming_the_field(tmp_path, capsys):
    cfg = tmp_path / "job.yaml"
    cfg.write_text("input: {local_dir: v}\noutput: {path: o}\nmodel: {source: m}\nstages: {fused_actors: two}\n")
    with pytest.raises(SystemExit) as exc:
        corpus.main(["--config", str(cfg)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "stages.fused_actors" in err and "valid integer" in err


def test_print_config_applies_overrides(tmp_path, capsys):
    cfg = tmp_path / "job.yaml"
    cfg.write_text("input: {local_dir: v}\noutput: {path: o}\nmodel: {source: m}\n")
    assert corpus.main(["--config", str(cfg), "--decode.num_frames", "16", "--set", "stages.mode=split",
                        "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["decode"]["num_frames"] == 16 and printed["stages"]["mode"] == "split"


@pytest.mark.slow
def test_demo_runs_twice(tmp_path):
    """Run again, the demo finds its run complete (nothing redone, nothing added); overwrite redoes it."""
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = tmp_path / "demo_output" / "parquet" / "demo"
    stamps = []
    for args in ([], [], ["--set", "output.on_existing=overwrite"]):
        proc = subprocess.run([sys.executable, "-m", "jobs.demo", *args], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=240)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "videos         5   ok 4   error 1" in proc.stdout, proc.stdout
        assert "meaningless" in proc.stdout and "s3_prefix: s3://" in proc.stdout
        files = sorted(out.glob("*.parquet"))
        assert len(files) == 1 and files[0].name.startswith("part-000-00000-")  # one chunk, never duplicated
        table = pq.read_table(files[0])
        assert table.num_rows == 15
        stamps.append(max(table.column("processed_at").to_pylist()))
        if len(stamps) == 2:
            assert "resuming run demo: 5 of 5 videos already complete, 0 to do" in proc.stderr, proc.stderr[-3000:]
            assert "started a local Ray" not in proc.stderr
    assert stamps[1] == stamps[0] < stamps[2]  # kept as it was, then redone


def test_demo_config_file_replaces_the_builtin_sections(tmp_path, capsys):
    """``jobs.demo --config FILE``: the file's sections win over the embedded demo's; the rest stays."""
    from jobs import demo

    cfg = tmp_path / "job.yaml"
    cfg.write_text("input: {s3_prefix: 's3://bkt/videos/'}\noutput: {path: s3://bkt/out}\n")
    assert demo.main(["--config", str(cfg), "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["input"]["s3_prefix"] == "s3://bkt/videos/" and printed["input"]["local_dir"] is None
    assert printed["output"]["path"] == "s3://bkt/out"
    assert printed["model"]["source"] == "demo_output/tiny-llava" and printed["run_id"] == "demo"
