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
    assert "5 kept, 0 broken" in result.stdout


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


def test_a_front_end_that_imports_another_breaks_their_independence(tmp_path: Path) -> None:
    """The MLflow plugin's predict reaching into the gateway (as it did before ferry.adapters.inference)."""
    shutil.copytree(ROOT / "src" / "ferry", tmp_path / "ferry", ignore=shutil.ignore_patterns("__pycache__"))
    predict = tmp_path / "ferry" / "adapters" / "mlflow_predict.py"
    predict.write_text(predict.read_text() + "\nfrom ferry.adapters.gateway import balancer  # noqa\n")
    result = _lint(tmp_path)
    assert result.returncode != 0
    assert "the front ends are independent" in result.stdout and "BROKEN" in result.stdout, result.stdout[-2000:]


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


def test_every_catch_all_says_which_boundary_it_guards() -> None:
    """`except Exception` only where a boundary must not die, each with a comment saying which."""
    silent = []
    for path in sorted((ROOT / "src" / "ferry").rglob("*.py")):
        lines = path.read_text().splitlines()
        for number, line in enumerate(lines, 1):
            if "except Exception" in line and "#" not in line and not lines[number - 2].strip().startswith("#"):
                silent.append(f"{path.relative_to(ROOT)}:{number}")
    assert silent == [], "say which boundary each of these guards, or catch what can happen there"


def _error_classes_outside_the_tree() -> list[str]:
    """Exception classes defined in src/ferry anywhere but core/errors.py (docs/design.md: one error tree)."""
    import ast

    tree_file = ROOT / "src" / "ferry" / "core" / "errors.py"
    tree = {node.name for node in ast.walk(ast.parse(tree_file.read_text())) if isinstance(node, ast.ClassDef)}
    found = []
    for path in sorted((ROOT / "src" / "ferry").rglob("*.py")):
        if path == tree_file:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            bases = [ast.unparse(base) for base in getattr(node, "bases", [])]
            if isinstance(node, ast.ClassDef) and any(b.endswith(("Error", "Exception")) or b in tree for b in bases):
                found.append(f"{path.relative_to(ROOT)}: {node.name}({', '.join(bases)})")
    return found


def test_every_kind_of_gateway_refusal_has_its_status() -> None:
    from ferry.adapters.gateway.refusals import HTTP_STATUS, status_of
    from ferry.core import errors

    kinds = [k for k in vars(errors).values() if isinstance(k, type) and issubclass(k, errors.GatewayError)
             and k is not errors.GatewayError]
    assert kinds and all(k in HTTP_STATUS for k in kinds), [k for k in kinds if k not in HTTP_STATUS]
    assert status_of(errors.BadRequest("x").on_route("route")) == 400


def test_error_classes_outside_the_tree_are_only_the_known_refinements() -> None:
    """Refinements of a tree class kept beside the code that raises them (each a subclass of one in the tree), and
    three signals that never leave their module: the balancer's failed connection (an OSError, so that the callers'
    ``except OSError`` turns it into BackendDown), the HTTP server's refusal from inside a parser callback (it stops
    the parser) and the JSON decoder's refusal of NaN and Infinity."""
    assert _error_classes_outside_the_tree() == [
        "src/ferry/adapters/gateway/balancer.py: ConnectFailed(ConnectionError)",
        "src/ferry/adapters/gateway/http_server.py: _Refused(Exception)",
        "src/ferry/adapters/gateway/wording.py: UnknownModelError(NotServed)",
        "src/ferry/adapters/gateway/wording.py: UnknownVersionError(NotServed)",
        "src/ferry/adapters/inference/guard.py: _NotJson(ValueError)",
        "src/ferry/adapters/inference/routing.py: UnknownModel(NoSuchModel)",
        "src/ferry/core/mlflow_rest.py: ServerError(Unavailable)",
        "src/ferry/core/release_staging.py: ReleaseRefused(InvalidInput)",
        "src/ferry/core/staging.py: ForeignVersion(InvalidInput)",
    ]

