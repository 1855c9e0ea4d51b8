"""Fixtures for the job tests: the tiny checkpoint (built once per session)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

_ROOT = str(Path(__file__).resolve().parents[2])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    from dycoke.testing import build_tiny_checkpoint

    return str(build_tiny_checkpoint(tmp_path_factory.mktemp("model") / "tiny-llava"))
