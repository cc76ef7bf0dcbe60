"""The import contract of pyproject.toml holds, and it would catch a core module that imports an adapter."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LINT_IMPORTS = Path(sys.executable).parent / "lint-imports"


def _lint(package_root: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(LINT_IMPORTS), str(ROOT / "pyproject.toml"), "--no-cache"],
                          cwd=package_root, env={"PYTHONPATH": str(package_root), "PATH": "/usr/bin:/bin"},
                          capture_output=True, text=True, timeout=120)


def test_the_layers_hold() -> None:
    result = _lint(ROOT / "src")
    assert result.returncode == 0, result.stdout[-2000:]
    assert "2 kept, 0 broken" in result.stdout


def test_a_core_module_that_imports_the_gateway_breaks_the_contract(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "src" / "ferry", tmp_path / "ferry", ignore=shutil.ignore_patterns("__pycache__"))
    steps = tmp_path / "ferry" / "core" / "steps.py"
    steps.write_text(steps.read_text() + "\nfrom ferry.adapters.gateway.app import Gateway  # noqa\n")
    result = _lint(tmp_path)
    assert result.returncode != 0
    assert "ferry.core.steps -> ferry.adapters.gateway.app" in result.stdout
