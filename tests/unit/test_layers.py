"""The import contracts of pyproject.toml hold and would catch a violation; no module of ferry imports itself
through others (no import cycles, TYPE_CHECKING imports included)."""

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
    assert "3 kept, 0 broken" in result.stdout


def test_a_core_module_that_imports_the_gateway_breaks_the_contract(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "src" / "ferry", tmp_path / "ferry", ignore=shutil.ignore_patterns("__pycache__"))
    steps = tmp_path / "ferry" / "core" / "steps.py"
    steps.write_text(steps.read_text() + "\nfrom ferry.adapters.gateway.app import Gateway  # noqa\n")
    result = _lint(tmp_path)
    assert result.returncode != 0
    assert "ferry.core.steps -> ferry.adapters.gateway.app" in result.stdout


def test_a_protocol_that_imports_the_gateway_application_breaks_the_gateways_layers(tmp_path: Path) -> None:
    shutil.copytree(ROOT / "src" / "ferry", tmp_path / "ferry", ignore=shutil.ignore_patterns("__pycache__"))
    shadow = tmp_path / "ferry" / "adapters" / "gateway" / "shadow.py"
    shadow.write_text(shadow.read_text() + "\nfrom ferry.adapters.gateway.app import Gateway  # noqa\n")
    result = _lint(tmp_path)
    assert result.returncode != 0
    assert "ferry.adapters.gateway.shadow -> ferry.adapters.gateway.app" in result.stdout


def import_cycles(package: str, path: Path) -> set[tuple[str, str]]:
    """Pairs of modules of ``package`` (found under ``path``) each of which imports the other, directly or not."""
    import grimp

    sys.path.insert(0, str(path))
    try:
        graph = grimp.build_graph(package, cache_dir=None)
    finally:
        sys.path.remove(str(path))
    return {tuple(sorted((module, imported))) for module in graph.modules
            for imported in graph.find_modules_directly_imported_by(module)
            if graph.find_shortest_chain(importer=imported, imported=module)}


def test_no_module_of_ferry_is_in_an_import_cycle() -> None:
    assert import_cycles("ferry", ROOT / "src") == set()


def test_the_cycle_check_finds_a_cycle(tmp_path: Path) -> None:
    package = tmp_path / "cyclic"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from cyclic import b\n")
    (package / "b.py").write_text("from cyclic import c\n")
    (package / "c.py").write_text("from cyclic import a\n")
    assert ("cyclic.a", "cyclic.b") in import_cycles("cyclic", tmp_path)


def test_no_module_of_ferry_is_over_400_lines() -> None:
    long = {str(path.relative_to(ROOT)): lines for path in (ROOT / "src" / "ferry").rglob("*.py")
            if (lines := len(path.read_text().splitlines())) > 400}
    assert long == {}, "split these into modules a reader can hold in mind"
