"""Issue 14 end to end: ``python -m jobs.corpus`` over a local folder holding the listing classes (non-UTF-8 name,
a tree deeper than PATH_MAX, a symlink and a dangling symlink) and decoder classes (AV1, cover art, zero samples),
under a TMPDIR of 100+ characters, with its own local Ray. Checks exactly one row per (listed file, task), the
summary's count of what was not listed, and that nothing is left in TMPDIR or in the job's Ray temp folder."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.pipeline import oddities
from tests.pipeline.test_pipeline_inputs import CLIP, _deep_tree

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(300)
def test_local_corpus_with_every_listing_class_one_row_per_task(tmp_path, tiny_model):
    import yaml

    corpus, out = tmp_path / "corpus", tmp_path / "out"
    corpus.mkdir()
    odd = oddities.oddity_set()
    (corpus / "plain.mp4").write_bytes(CLIP)
    with open(os.path.join(os.fsencode(corpus), b"caf\xe9.mp4"), "wb") as f:
        f.write(CLIP)
    deep = _deep_tree(corpus, levels=18)
    (corpus / "z_link_to_plain.mp4").symlink_to(corpus / "plain.mp4")
    (corpus / "dangling.mp4").symlink_to(tmp_path / "gone.mp4")
    expected = {"plain.mp4": "ok", "caf%E9.mp4": "ok", "deep.mp4": "ok"}
    for name in ("av1.mp4", "audio_cover_art.m4a.mp4", "zero_samples.mp4", "vfr_gaps.mkv"):
        (corpus / name).write_bytes(odd[name][0])
        expected[name] = odd[name][1]
    long_tmp = tmp_path / ("scheduler-job-98765-task-0001-" + "t" * 70)
    long_tmp.mkdir()
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({
        "input": {"local_dir": str(corpus)}, "output": {"path": str(out)},
        "model": {"source": tiny_model, "dtype": "float32", "device": "cpu"}, "decode": {"num_frames": 4},
        "tasks": {"caption_prompt": "Describe.", "questions": ["What moves?"], "mcq": [], "max_new_tokens": 2},
        "stages": {"mode": "fused", "decode_num_cpus": 0.5, "actor_num_cpus": 1, "decode_memory_gb": 0.25,
                   "fused_batch_size": 4, "decode_batch_size": 2},
        "ray": {"num_cpus": 2, "progress_bars": False},
    }))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TMPDIR": str(long_tmp), "RAY_AUTH_MODE": "disabled"}
    for name in ("RAY_ADDRESS", "RAY_TMPDIR"):
        env.pop(name, None)
    proc = subprocess.run([sys.executable, "-m", "jobs.corpus", "--config", str(job), "--summary-json",
                           str(tmp_path / "summary.json")], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=280)
    assert proc.returncode == 0, proc.stderr[-4000:]

    rows = [r for f in sorted(out.rglob("*.parquet")) for r in pq.read_table(f).to_pylist()]
    per_task = Counter((r["video_uri"], r["task_id"]) for r in rows)
    assert set(per_task.values()) == {1} and {t for _, t in per_task} == {"caption", "qa:0"}
    got = {}
    for r in rows:
        name = r["video_uri"].rsplit("/", 1)[-1]
        got[name] = r["status"] if r["status"] == "ok" else r["error_type"]
    assert got == expected
    assert any(r["video_uri"] == deep for r in rows) and len(rows) == 2 * len(expected)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["not_listed"] == {"duplicates (a symlink or hard link to a listed file)": 1, "broken symlinks": 1}
    assert "not listed (no rows)" in proc.stdout
    # nothing outside the output folder: not in TMPDIR, and the job's Ray temp folder is gone
    assert list(long_tmp.iterdir()) == []
    (ray_temp,) = re.findall(r"started a local Ray \(temp folder (\S+)\)", proc.stderr)
    assert not os.path.exists(ray_temp)
