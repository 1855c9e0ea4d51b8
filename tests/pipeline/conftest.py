"""Fixtures shared by the pipeline tests: the tiny checkpoint and generated sample videos."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:  # `tests.pipeline.*` helpers importable under plain `pytest` too
    sys.path.insert(0, _ROOT)

from tests.pipeline.videos import sample_set, write_video  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    from dycoke.testing import build_tiny_checkpoint

    return str(build_tiny_checkpoint(tmp_path_factory.mktemp("model") / "tiny-llava"))


@pytest.fixture(scope="session")
def sample_videos() -> dict[str, bytes]:
    return sample_set()


@pytest.fixture(scope="session")
def video_dir(tmp_path_factory, sample_videos):
    root = tmp_path_factory.mktemp("videos")
    for name, data in sample_videos.items():
        write_video(root / name, data)
    return root
