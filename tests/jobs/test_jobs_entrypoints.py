"""The job entry points: --help, start-up validation, --print-config, old field names, and `make demo` run twice."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from jobs import corpus
from pipeline.config import load_config
from pipeline.renames import NEW_PLACES
from tests.pipeline.configdata import OLD_FILE, leaf_fields

ROOT = Path(__file__).resolve().parents[2]


def test_help_lists_every_field(capsys):
    """--help shows every config field as a flag with its description and default; old names are not shown."""
    with pytest.raises(SystemExit) as exc:
        corpus.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for name in leaf_fields():
        assert f"--{name} " in out, name
    flat = " ".join(out.split())
    assert "F, frames sampled per video" in flat and "(default: 32)" in flat
    assert "--set FIELD=VALUE" in out and "--print-config" in out and "--config" in out
    assert not any(f"--{old} " in out for old in NEW_PLACES)


def test_bad_config_fails_at_start_up_naming_the_field(tmp_path, capsys):
    cfg = tmp_path / "job.yaml"
    cfg.write_text("input: {local_dir: v}\noutput: {path: o}\nmodel: {source: m}\nfused: {batch_size: two}\n")
    with pytest.raises(SystemExit) as exc:
        corpus.main(["--config", str(cfg)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "fused.batch_size" in err and "valid integer" in err
    cfg.write_text("input: {local_dir: v}\noutput: {path: o}\nmodel: {source: m}\nstages: {fused_actors: two}\n")
    with pytest.raises(SystemExit) as exc:  # an old name: the message names the new place and the old
        corpus.main(["--config", str(cfg)])
    assert exc.value.code == 2
    assert "fused.concurrency (given as stages.fused_actors)" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        corpus.main(["--config", str(cfg).replace("job", "nope")])
    assert exc.value.code == 2 and "does not exist" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        corpus.main(["--decode.num_frames", "8"])
    assert exc.value.code == 2 and "--config" in capsys.readouterr().err


def test_print_config_applies_overrides(tmp_path, capsys):
    cfg = tmp_path / "job.yaml"
    cfg.write_text("input: {local_dir: v}\noutput: {path: o}\nmodel: {source: m}\n")
    assert corpus.main(["--config", str(cfg), "--decode.num_frames", "16", "--set", "mode=split",
                        "--set", "tasks.questions=[a, b]", "--tasks.mcq", '[{"question": "q", "options": ["x", "y"]}]',
                        "--fused.concurrency", "[1, 4]", "--compression.method", "holitom", "--print-config"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["decode"]["num_frames"] == 16 and printed["mode"] == "split"
    assert printed["tasks"]["questions"] == ["a", "b"] and printed["tasks"]["mcq"][0]["options"] == ["x", "y"]
    assert printed["fused"]["concurrency"] == [1, 4] and printed["compression"]["method"] == "holitom"
    # flags win over --set, which wins over the file
    assert corpus.main(["--config", str(cfg), "--set", "decode.num_frames=8", "--decode.num_frames", "4",
                        "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["decode"]["num_frames"] == 4


def test_print_config_prints_the_new_form_of_an_old_job_file(tmp_path, capsys, caplog):
    """An old job file and old names in --set and flags work, each with a warning naming its new place;
    --print-config prints the new form, which loads back to the same configuration."""
    cfg = tmp_path / "job.yaml"
    cfg.write_text(OLD_FILE)
    assert corpus.main(["--config", str(cfg), "--set", "dycoke.holitom_tau=0.7", "--stages.fused_batch_size", "9",
                        "--print-config"]) == 0
    printed = capsys.readouterr().out
    assert "dycoke.holitom_tau is now compression.holitom.tau" in caplog.text
    assert "stages.fused_batch_size is now fused.batch_size" in caplog.text
    assert "stages:" not in printed and "holitom_tau" not in printed
    data = yaml.safe_load(printed)
    assert data["compression"]["holitom"]["tau"] == 0.7 and data["fused"]["batch_size"] == 9
    new = tmp_path / "new.yaml"
    new.write_text(printed)
    assert load_config(new) == load_config(cfg, ["dycoke.holitom_tau=0.7", "stages.fused_batch_size=9"])


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
