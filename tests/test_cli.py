"""The command line as users and scripts run it: exit codes, one-line reasons, JSON."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from conftest import ROOT, World, assert_invariants
from strict_json import loads


def run(world: World, *args: str) -> subprocess.CompletedProcess:
    return world.cli(*args)


def test_deploy_status_history_and_rollback_from_the_command_line(world: World) -> None:
    world.register()
    first = run(world, "deploy", "iris", "--alias", "champion")
    assert first.returncode == 0, first.stderr
    for step in ("snapshot", "materialize", "load", "ready", "smoke", "commit"):
        assert step in first.stdout
    assert "committed iris v1" in first.stdout

    world.register("golden-mismatch")
    failed = run(world, "deploy", "iris", "--alias", "champion", "--json")
    assert failed.returncode == 1
    report = loads(failed.stdout)
    assert (report["outcome"], report["failed_step"], report["version"]) == ("rolled_back", "smoke", 2)

    status = run(world, "status", "iris", "--json")
    assert status.returncode == 0, status.stderr
    [model] = loads(status.stdout)
    assert model["current"]["active_version"] == 1 and model["serving"] == [1] and model["drift"] is None
    assert model["quarantined"][0].startswith("2.failed_")

    world.register(trees=5)
    assert run(world, "deploy", "iris", "--alias", "champion").returncode == 0
    back = run(world, "rollback", "iris")
    assert back.returncode == 0, back.stderr
    assert "committed iris v1 (was v3)" in back.stdout

    history = loads(run(world, "history", "iris", "--json").stdout)
    assert [(r["target"], r["outcome"]) for r in history] == [
        ("@champion", "committed"), ("@champion", "rolled_back"), ("@champion", "committed"), ("v1", "committed")
    ]
    assert_invariants(world, attempts=4)


def test_failures_exit_non_zero_with_a_one_line_reason(world: World) -> None:
    world.register()
    unknown = run(world, "deploy", "iris", "--alias", "nope")
    assert unknown.returncode == 2
    assert unknown.stderr.splitlines()[0] == "error: model 'iris' has no alias 'nope' in MLflow"
    assert "champion -> v1" in unknown.stderr

    no_previous = run(world, "rollback", "iris")
    assert no_previous.returncode == 2 and "--to VERSION" in no_previous.stderr


def test_a_failed_first_deploy_says_nothing_serves(world: World) -> None:
    world.register("golden-mismatch")
    failed = run(world, "deploy", "iris", "--alias", "champion")
    assert failed.returncode == 1
    assert "failed at smoke" in failed.stderr and "nothing was active before, so nothing serves now" in failed.stderr


def test_status_reports_drift_when_triton_serves_something_else(world: World) -> None:
    world.register()
    assert run(world, "deploy", "iris", "--alias", "champion").returncode == 0
    world.ferry.triton.unload("iris")
    status = run(world, "status", "iris", "--json")
    assert status.returncode == 1
    [model] = loads(status.stdout)
    assert model["drift"] == "current.json names [1], Triton serves nothing"


def test_demo_tells_the_whole_story(tmp_path: Path) -> None:
    from conftest import make_settings

    settings = make_settings(tmp_path)
    env = {**os.environ, "FERRY_HOME": str(tmp_path / "demo"), "FERRY_TRITON_URL": settings.triton.urls,
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    result = subprocess.run(["bash", str(ROOT / "scripts" / "demo.sh")], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = result.stdout.split("== Summary", 1)[1]
    assert "@champion -> v1: committed" in summary
    assert "@champion -> v2: rolled_back at smoke" in summary and "Triton serves [1]" in summary
    assert "Triton stopped" in result.stdout
