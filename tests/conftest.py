"""Shared pytest configuration.

Tests marked ``@pytest.mark.gpu`` need a CUDA device; they are skipped (not failed) when
``torch.cuda.is_available()`` is False. The marker itself is registered in pyproject.toml.

Import path: pytest puts ``tests/`` on ``sys.path`` to import this file, and ``tests/dycoke`` (no
``__init__.py``) would then be picked up as a *namespace package* named ``dycoke`` ahead of the real
package, because the editable install's finder runs after the normal path finder. Putting the
repository root first makes ``import dycoke`` / ``pipeline`` / ``jobs`` always resolve to the sources.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

_ROOT = str(Path(__file__).resolve().parent.parent)
if sys.path[:1] != [_ROOT]:
    if _ROOT in sys.path:
        sys.path.remove(_ROOT)
    sys.path.insert(0, _ROOT)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> str:
    """A tiny random-weight LLaVA-OneVision checkpoint saved in Hugging Face layout (built once per session)."""
    from dycoke.testing import build_tiny_checkpoint

    return str(build_tiny_checkpoint(tmp_path_factory.mktemp("model") / "tiny-llava"))


def _cuda_available() -> bool:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a hard dependency
        return False
    return bool(torch.cuda.is_available())


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_items or _cuda_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in gpu_items:
        item.add_marker(skip_gpu)
