"""Dependency direction (DESIGN 2): dycoke/ depends on torch and transformers only."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "dycoke"
FORBIDDEN = ("ray", "boto3", "pydantic", "pyarrow")


def test_import_dycoke_pulls_in_no_pipeline_dependencies() -> None:
    code = (
        "import dycoke; import sys; "
        "assert 'ray' not in sys.modules and 'boto3' not in sys.modules "
        "and 'pydantic' not in sys.modules and 'pyarrow' not in sys.modules, "
        "sorted(m for m in sys.modules if m.split('.')[0] in ('ray', 'boto3', 'pydantic', 'pyarrow'))"
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr


def _imported_roots(tree: ast.AST) -> list[tuple[str, int]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name.split(".")[0], node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.module.split(".")[0], node.lineno))
        elif (
            isinstance(node, ast.Call)
            and getattr(node.func, "attr", getattr(node.func, "id", None)) in ("import_module", "__import__")
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.append((node.args[0].value.split(".")[0], node.lineno))
    return found


def _package_files() -> list[Path]:
    return sorted(PACKAGE.rglob("*.py"))


def test_package_has_sources() -> None:
    assert (PACKAGE / "__init__.py").is_file()
    assert len(_package_files()) >= 4


@pytest.mark.parametrize("path", _package_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_forbidden_imports_in_source(path: Path) -> None:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    bad = [(name, line) for name, line in _imported_roots(tree) if name in FORBIDDEN]
    assert not bad, f"{path.relative_to(ROOT)} imports {bad} (dycoke/ may use torch and transformers only)"


def test_static_checker_catches_forbidden_imports() -> None:
    src = "import ray.data\nfrom boto3.session import Session\nimport importlib\nimportlib.import_module('pyarrow')\n"
    names = {n for n, _ in _imported_roots(ast.parse(src))}
    assert {"ray", "boto3", "pyarrow"} <= names
