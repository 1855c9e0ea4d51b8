"""Load: 500 generated videos through the whole pipeline on a local Ray with a small object store.

Frames are decoded at 224 px (16 frames, 2.4 MB per video, 1.2 GB through the object store in all,
four times the store's 300 MB), so only Ray Data's backpressure keeps memory bounded. Checks that every
(video, task) row is present exactly once and that memory stays bounded; reports the peak RSS of the
driver plus all Ray processes, the peak object-store use and what was spilled, as a ``LOAD_FIGURES`` JSON
line (``pytest -s``), quoted in docs/reliability.md. ``LOAD_VIDEOS=<n>`` changes the number of videos.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections import Counter

import pytest

import pipeline.run as run_module
from pipeline import sink
from pipeline.config import load_config
from pipeline.samples import make_video
from tests.pipeline.proctree import ProcessWatcher

pytestmark = pytest.mark.slow

NUM_VIDEOS = int(os.environ.get("LOAD_VIDEOS", "500"))
OBJECT_STORE_BYTES = 300 * 1024**2
FRAMES, FRAME_SIZE = 16, 224
GiB = 1024**3
MiB = 1024**2


class StoreSampler:
    """Polls the raylet's object-store stats (used bytes; cumulative spilled bytes and objects)."""

    def __init__(self, interval: float = 0.5):
        self.interval = interval
        self.peak_used = 0
        self.spilled_bytes = 0
        self.spilled_objects = 0
        self.restored_bytes = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def sample(self) -> None:
        import ray
        from ray._private.internal_api import get_memory_info_reply, get_state_from_address

        # this run's own cluster by address (another Ray on the machine would make "auto" ambiguous)
        stats = get_memory_info_reply(get_state_from_address(ray.get_runtime_context().gcs_address)).store_stats
        self.peak_used = max(self.peak_used, stats.object_store_bytes_used)
        self.spilled_bytes = max(self.spilled_bytes, stats.spilled_bytes_total)
        self.spilled_objects = max(self.spilled_objects, stats.spilled_objects_total)
        self.restored_bytes = max(self.restored_bytes, stats.restored_bytes_total)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.sample()

    def __enter__(self) -> StoreSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        self.sample()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("load_videos")
    # a few shapes and lengths; encoding is cheap at this size (the decoder still resizes to 224 px)
    shapes = [(64, 48), (96, 64), (48, 48), (80, 32)]
    clips = [make_video(num_frames=12 + 5 * k, width=w, height=h, fps=15) for k, (w, h) in enumerate(shapes)]
    for i in range(NUM_VIDEOS):
        (root / f"{i // 100:02d}" / f"video_{i:04d}.mp4").parent.mkdir(exist_ok=True)
        (root / f"{i // 100:02d}" / f"video_{i:04d}.mp4").write_bytes(clips[i % len(clips)] + b"")
    return root


def test_500_videos_bounded_memory_every_row(corpus, tiny_model, tmp_path):
    import ray

    cfg = load_config(data={
        "input": {"local_dir": str(corpus)},
        "output": {"path": str(tmp_path / "out"), "min_rows_per_file": 200, "max_rows_per_file": 400},
        "model": {"source": tiny_model, "dtype": "float32", "device": "cpu"},
        "decode": {"num_frames": FRAMES, "frame_size": FRAME_SIZE},
        "tasks": {"questions": ["What moves?"], "max_new_tokens": 2},
        "stages": {"mode": "fused", "decode_num_cpus": 0.5, "actor_num_cpus": 1, "decode_memory_gb": 0.25,
                   "fused_batch_size": 16, "engine_max_batch_size": 16, "decode_batch_size": 8},
        "ray": {"progress_bars": False},
    })
    ray.init(num_cpus=2, object_store_memory=OBJECT_STORE_BYTES, include_dashboard=False, log_to_driver=False)
    try:
        with ProcessWatcher(interval=0.5) as procs, StoreSampler() as store:
            t0 = time.monotonic()
            result = run_module.run(cfg)
            wall = time.monotonic() - t0
    finally:
        ray.shutdown()

    table = sink.read_committed(result.target, columns=["video_id", "task_id", "status"])
    keys = Counter(zip(table.column("video_id").to_pylist(), table.column("task_id").to_pylist(), strict=True))
    assert len({v for v, _ in keys}) == NUM_VIDEOS, "videos without rows"
    assert table.num_rows == 2 * NUM_VIDEOS and set(keys.values()) == {1}, "rows missing or duplicated"
    assert set(table.column("status").to_pylist()) == {"ok"}

    figures = {
        "videos": NUM_VIDEOS, "rows": table.num_rows, "rows_lost": 2 * NUM_VIDEOS - table.num_rows,
        "files": len(sink.committed_files(result.target.uri)[1]), "wall_s": round(wall, 1),
        "videos_per_s": round(NUM_VIDEOS / wall, 2),
        "frames_through_store_mib": round(NUM_VIDEOS * FRAMES * FRAME_SIZE**2 * 3 / MiB),
        "object_store_mib": OBJECT_STORE_BYTES // MiB, "peak_store_used_mib": round(store.peak_used / MiB),
        "spilled_mib": round(store.spilled_bytes / MiB), "spilled_objects": store.spilled_objects,
        "restored_mib": round(store.restored_bytes / MiB),
        "peak_rss_sum_mib": round(procs.peak_rss_total / MiB), "peak_rss_one_process_mib": round(procs.peak_rss_max / MiB),
    }
    print("LOAD_FIGURES", json.dumps(figures))
    # bounded: the driver + every Ray process together stay under 6 GiB (frames alone would be 1.2 GB if held)
    assert procs.peak_rss_total < 6 * GiB
    assert procs.peak_rss_max < 2 * GiB
