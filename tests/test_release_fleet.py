"""Releases on a fleet of two real Tritons: one replica killed in the middle of a release's load (the other rolled
back, reconcile gives the restarted one the whole committed release), and the deploying process SIGKILLed at each
step boundary of a release, then `ferry recover`."""

from __future__ import annotations

import json
import os
import signal
from collections.abc import Iterator

import pytest

from conftest import replica_settings, start_fleet, stop_fleet
from ferry.core.current import read_current, read_history
from ferry.core.reconcile import reconcile
from ferry.core.triton import Triton
from ferry.runtime import server
from test_fleet import _pid
from test_recover import CRASHING_FERRY
from test_release import ENTRY, SCALE, SCORE, ReleaseWorld, assert_release_invariants


@pytest.fixture(scope="module")
def fleet_release(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ReleaseWorld]:
    world = start_fleet(tmp_path_factory.mktemp("release-fleet"), 2)
    try:
        released = ReleaseWorld(world.settings, model=ENTRY)
        released.register_release()
        assert released.deploy().outcome == "committed"
        yield released
    finally:
        stop_fleet(world)


def test_a_replica_killed_in_a_releases_load_rolls_back_the_other_and_reconcile_restores_the_release(
        fleet_release: ReleaseWorld, monkeypatch: pytest.MonkeyPatch) -> None:
    # A release of its own: the rollback that cannot reach the dead replica is recorded unverified, as it should.
    world = ReleaseWorld(fleet_release.settings, model="killed_pipeline")
    world.register_release()
    assert world.deploy().outcome == "committed"
    before = read_current(world.model_dir)
    doomed = replica_settings(world.settings)[1]
    load = Triton.load

    def killed_between_the_members_and_the_entry(triton: Triton, name: str, *args, **kwargs):  # a node lost
        if triton.url == doomed.triton.endpoint.url and name.startswith(f"{world.model}.versions."):
            os.kill(_pid(doomed), signal.SIGKILL)
        return load(triton, name, *args, **kwargs)

    monkeypatch.setattr(Triton, "load", killed_between_the_members_and_the_entry)
    world.register_release(factor=2.0)
    report = world.deploy()
    monkeypatch.undo()
    assert report.outcome == "rolled_back" and report.failed_step == "load", report.error
    assert report.failed_replica == doomed.triton.endpoint.url
    assert read_current(world.model_dir) == before
    survivor = world.settings.triton.urls.split(",")[0]
    assert report.rollback.replicas[survivor] == [before.active_version]

    server.down(doomed, grace_s=0)
    server.up(doomed)
    reconciled = world.cli("reconcile", "--json")  # every model, as the sidecar runs it after a restart
    assert reconciled.returncode == 0, reconciled.stdout + reconciled.stderr
    actions = {r["model"]: (r["action"], r["detail"]) for r in json.loads(reconciled.stdout)}
    assert actions[world.model][0] == actions[ENTRY][0] == "loaded", actions
    assert actions["killed_scale"] == (
        "in place", f"a member of '{world.model}' (which pins killed_scale v1): reconciled with its release")
    assert_release_invariants(world, None, entry=world.model)
    assert_release_invariants(fleet_release, len(read_history(fleet_release.model_dir)))
    assert len(read_history(world.model_dir)) == 2
    again = reconcile(world.ferry, world.model)
    assert again.action == "in place", again.detail


# Where the deploying process is killed, the release it deploys, and whether the new release is active once
# recovered (from the commit point on).
RELEASE_CRASHES = [
    ("inside-materialize", "none", False),
    ("after-publish", "none", False),
    ("after-load", "none", False),
    ("before-smoke", "none", False),
    ("before-commit", "none", False),
    ("inside-commit", "none", True),
    ("after-commit", "none", True),
    ("inside-rollback", "pipeline", False),
]


@pytest.mark.parametrize("point, breakage, committed", RELEASE_CRASHES, ids=[p[0] for p in RELEASE_CRASHES])
def test_a_release_killed_at_any_point_is_recovered_whole(fleet_release: ReleaseWorld, point: str, breakage: str,
                                                         committed: bool) -> None:
    world = fleet_release
    attempts = len(read_history(world.model_dir)) + 1
    before = read_current(world.model_dir)
    versions = world.register_release(breakage)
    crashed = world.cli(point, "deploy", ENTRY, "--alias", "champion", program=CRASHING_FERRY)
    assert crashed.returncode == -9, crashed.stderr
    assert world.model_dir.journal_path.exists()
    for replica in world.ferry.fleet().replicas:  # before the recover, clients reach a committed release only
        front = replica.placement(ENTRY).front
        assert front == [before.active_version] or (committed and front == [versions[ENTRY]]), \
            f"killed {point}: {replica.url}'s front serves {front}"

    recovered = world.cli("recover", ENTRY, "--json")
    assert recovered.returncode == 0, recovered.stderr
    report = json.loads(recovered.stdout)
    current = read_current(world.model_dir)
    if committed:
        assert current.active_version == versions[ENTRY]
        assert [(m.model, m.version) for m in current.members] == [(SCALE, versions[SCALE]), (SCORE, versions[SCORE])]
    else:
        assert current == before
        if point != "inside-materialize" or report.get("rollback"):
            quarantined = " ".join(report["rollback"]["quarantined"])
            assert f"/{ENTRY}/quarantine/{versions[ENTRY]}." in quarantined or point == "inside-materialize"
    assert_release_invariants(world, attempts)
