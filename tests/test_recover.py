"""Crashes and races: a killed deploy is finished or undone by `ferry recover`; deploys of a model serialize."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from filelock import FileLock

from conftest import FAKES, World, assert_invariants
from ferry.core.current import read_current, read_history
from ferry.core.reconcile import reconcile
from ferry.runtime import server

CRASHING_FERRY = [sys.executable, str(FAKES / "fake_crash_deploy.py")]

# Where the deploying process is killed, the version it deploys, and the version active once recovered:
# the one before until current.json names the new one (the commit point), the new one from then on.
CRASH_POINTS = [
    ("before-snapshot", "none", 1),
    ("before-materialize", "none", 1),
    ("inside-materialize", "none", 1),
    ("after-publish", "none", 1),
    ("before-load", "none", 1),
    ("after-load", "none", 1),
    ("before-smoke", "none", 1),
    ("before-commit", "none", 1),
    ("inside-commit", "none", 2),
    ("after-commit", "none", 2),
    ("after-history", "none", 2),
    ("inside-rollback", "golden-mismatch", 1),
]


@pytest.mark.parametrize("fleet", [2], indirect=True, ids=["two replicas"])  # undone or finished on both
@pytest.mark.parametrize("point, breakage, active", CRASH_POINTS, ids=[p[0] for p in CRASH_POINTS])
def test_a_deploy_killed_at_any_point_is_recovered(fleet: World, point: str, breakage: str, active: int) -> None:
    world = fleet
    world.register()
    assert world.deploy().outcome == "committed"
    world.register(breakage)

    crashed = world.cli(point, "deploy", "iris", "--alias", "champion", program=CRASHING_FERRY)
    assert crashed.returncode == -9, crashed.stderr
    assert world.model_dir.journal_path.exists()
    for replica in world.ferry.fleet().replicas:  # what a client naming no version reaches before the recover
        front = replica.placement(world.model).front
        assert front == [1] or (active == 2 and front == [2]), f"killed {point}: {replica.url}'s front serves {front}"

    refused = world.cli("deploy", "iris", "--alias", "champion")
    assert refused.returncode == 2
    assert "did not finish" in refused.stderr and "run `ferry recover iris`" in refused.stderr

    status = world.cli("status", "iris", "--json")
    assert status.returncode == 1 and "run `ferry recover iris`" in json.loads(status.stdout)[0]["in_flight"]

    recovered = world.cli("recover", "iris", "--json")
    assert recovered.returncode == 0, recovered.stderr
    report = json.loads(recovered.stdout)
    assert report["recovered_by"]
    assert read_current(world.model_dir).active_version == active
    assert_invariants(world, attempts=3)  # v1, the crashed deploy (recorded by recover or before the kill), the refused
    if active == 1 and point not in ("before-snapshot", "before-materialize"):
        assert report["outcome"] == "rolled_back" and not world.model_dir.version_dir(2).exists()
        [quarantined] = report["rollback"]["quarantined"]
        reason = json.loads((Path(quarantined) / "reason.json").read_text())
        expected = "differs from the golden output" if breakage != "none" else "stopped during"
        assert expected in reason["error"]

    again = world.cli("recover", "iris")
    assert again.returncode == 0 and "nothing to recover" in again.stdout
    final = world.deploy()  # the model deploys normally again
    assert final.outcome == {2: "noop", 1: "committed" if breakage == "none" else "rolled_back"}[active]
    assert_invariants(world, attempts=4)


def test_concurrent_deploys_of_one_model_run_one_at_a_time(world: World) -> None:
    for alias in ("a", "b", "c"):
        world.register(alias=alias)
    world.register("output-shape", alias="broken")
    aliases = ["a", "b", "broken", "c", "a", "c", "broken", "b"]
    results: list[subprocess.CompletedProcess] = [None] * len(aliases)  # type: ignore[list-item]

    def deploy(i: int) -> None:
        results[i] = world.cli("deploy", "iris", "--alias", aliases[i], "--json", timeout_s=600,
                               FERRY_LOCK_WAIT_S="600")  # queue behind the running deploy instead of failing fast

    threads = [threading.Thread(target=deploy, args=(i,)) for i in range(len(aliases))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    reports = [json.loads(r.stdout) for r in results]
    assert sorted(r["outcome"] for r in reports).count("rolled_back") == 2
    history = read_history(world.model_dir)
    assert sorted(r["deploy_id"] for r in history) == sorted(r["deploy_id"] for r in reports)
    # One at a time: each deploy saw the state the one before it left.
    active = None
    for record in history:
        assert record["previous_version"] == active, f"{record['deploy_id']} overlapped another deploy"
        if record["outcome"] == "committed":
            active = record["version"]
    assert read_current(world.model_dir).active_version == active
    assert_invariants(world, attempts=len(aliases))


def test_a_busy_model_fails_fast_and_other_models_deploy_meanwhile(world: World) -> None:
    world.register()
    other = World(world.settings, model="wine")
    other.register()
    with FileLock(str(world.model_dir.lock_path), timeout=0):
        busy = world.deploy()
        assert busy.outcome == "rejected" and "another deploy of 'iris' is running" in busy.error
        assert other.deploy().outcome == "committed"
    assert world.deploy().outcome == "committed"
    assert_invariants(world, attempts=2)
    assert_invariants(other, attempts=1)


def test_reconcile_loads_the_committed_versions_after_a_triton_restart(world: World) -> None:
    world.register()
    world.deploy()
    world.register(trees=5)
    world.deploy()
    server.down(world.settings, grace_s=0)
    server.up(world.settings)
    assert world.ferry.triton.ready_versions("iris") == []  # explicit mode: a restarted Triton serves nothing

    result = world.cli("reconcile", "--json")
    assert result.returncode == 0, result.stderr
    reconciled = [(r["model"], r["action"], r["active_version"]) for r in json.loads(result.stdout)]
    assert reconciled == [("iris", "loaded", 2)]
    assert reconcile(world.ferry, "iris").action == "in place"  # idempotent: nothing to do the second time
    assert_invariants(world, attempts=2)
