"""Releases as pure logic: the members an ensemble's steps pin, the entry store's rewritten steps, what committed
releases pin (from current.json files on disk), which member stores go stale, and an ensemble's layout."""

from __future__ import annotations

from pathlib import Path

import pytest

from ferry.core import release, triton_flavor
from ferry.core.current import write_current
from ferry.core.errors import StepFailed
from ferry.core.model_config import from_pbtxt
from ferry.core.records import CurrentState, ReleaseMember
from ferry.core.repository import ModelDir

ENSEMBLE = '''
platform: "ensemble"
input [ { name: "X" data_type: TYPE_FP32 dims: [ -1, 4 ] } ]
output [ { name: "Y" data_type: TYPE_FP32 dims: [ -1, 1 ] } ]
ensemble_scheduling { step [
  { model_name: "pre" model_version: -1 input_map { key: "X" value: "X" } output_map { key: "Z" value: "z" } },
  { model_name: "cls" model_version: 4 input_map { key: "Z" value: "z" } output_map { key: "Y" value: "Y" } }
] }
'''


def test_the_members_are_the_steps_models_in_order_with_the_version_each_pins() -> None:
    config = from_pbtxt(ENSEMBLE)
    assert release.is_entry(config)
    assert release.member_pins(config) == [("pre", -1), ("cls", 4)]
    assert not release.is_entry(from_pbtxt('backend: "python"'))


def test_one_member_pinned_at_two_versions_is_refused() -> None:
    twice = ENSEMBLE.replace('model_name: "cls" model_version: 4', 'model_name: "pre" model_version: 2')
    with pytest.raises(StepFailed, match="pin 'pre' at two versions"):
        release.member_pins(from_pbtxt(twice))


def test_the_entry_store_runs_each_members_store_at_its_version() -> None:
    config = from_pbtxt(ENSEMBLE)
    stores = [release.MemberStore("pre", 7, from_pbtxt('backend: "python"')),
              release.MemberStore("cls", 4, from_pbtxt('backend: "python"'))]
    pinned = release.entry_store_config(config, "pipe", 3, stores)
    assert pinned.name == "pipe.versions.3" and list(pinned.version_policy.specific.versions) == [3]
    assert [(s.model_name, s.model_version) for s in pinned.ensemble_scheduling.step] == [
        ("pre.versions.7", 7), ("cls.versions.4", 4)]
    assert [(s.model_name, s.model_version) for s in config.ensemble_scheduling.step] == [("pre", -1), ("cls", 4)]


def _commit(repository: Path, entry: str, members: list[tuple[str, int]]) -> None:
    model_dir = ModelDir(repository, entry)
    model_dir.ensure()
    write_current(model_dir, CurrentState(
        active_version=1, run_id="r", alias=None, updated_at_utc="20260101T000000", model=entry, sha256="s",
        deploy_id=f"d-{entry}", members=[ReleaseMember(model=m, version=v) for m, v in members]))


def test_what_committed_releases_pin_and_what_goes_stale(tmp_path: Path) -> None:
    _commit(tmp_path, "pipe", [("pre", 2), ("cls", 2)])
    _commit(tmp_path, "other", [("pre", 1), ("cls", 2)])
    anchor = ModelDir(tmp_path, "pipe")
    assert release.pinned_versions(anchor, "pre") == {1: ["other"], 2: ["pipe"]}
    assert release.pinned_versions(anchor, "cls", besides="pipe") == {2: ["other"]}
    assert release.release_of(anchor, "pre") == "'other' (which pins pre v1), 'pipe' (which pins pre v2)"
    assert release.release_of(anchor, "nobody") is None
    before = [ReleaseMember(model="pre", version=2), ReleaseMember(model="cls", version=2)]
    after = [ReleaseMember(model="pre", version=3), ReleaseMember(model="cls", version=3)]
    # pipe moves on: pre v2 was its own alone; cls v2 is still pinned by other
    assert release.stale_stores(anchor, "pipe", before, after) == [("pre", 2)]
    assert release.stale_stores(anchor, "pipe", before, before) == []


def test_an_unreadable_current_json_of_another_entry_pins_any_version(tmp_path: Path) -> None:
    _commit(tmp_path, "pipe", [("pre", 2)])
    broken = ModelDir(tmp_path, "broken")
    broken.ensure()
    broken.current_path.write_text("{not json")
    anchor = ModelDir(tmp_path, "pipe")
    assert release.pinned_versions(anchor, "pre") == {2: ["pipe"], release.ANY_VERSION: ["broken"]}
    # nothing of pre is unloaded on the unreadable entry's account
    assert release.stale_stores(anchor, "pipe", [ReleaseMember(model="pre", version=2)], []) == []


def test_a_release_being_deployed_pins_its_candidate_members(tmp_path: Path) -> None:
    from ferry.core.journal import Journal
    from ferry.core.records import Candidate, JournalRecord, Kind, Owner

    _commit(tmp_path, "pipe", [("pre", 2)])
    other = ModelDir(tmp_path, "other")
    other.ensure()
    candidate = Candidate(model="other", version=1, run_id="r", alias=None, sha256="s", size_bytes=0,
                          config_pbtxt="", members=[ReleaseMember(model="pre", version=3)])
    Journal.create(other, JournalRecord(model="other", kind=Kind.DEPLOY, target="@c", who="t", started_at_utc="x",
                                        owner=Owner(via="cli", host="h", pid=1), candidate=candidate))
    anchor = ModelDir(tmp_path, "pipe")
    assert release.pinned_versions(anchor, "pre") == {2: ["pipe"], 3: ["other"]}
    moving_on = [ReleaseMember(model="pre", version=3)]
    assert release.stale_stores(anchor, "pipe", moving_on, []) == []  # the other deploy's candidate stays


def test_missing_members_are_the_ones_a_replica_does_not_hold_ready() -> None:
    from ferry.core.triton import VersionState

    index = {"pre.versions.2": [VersionState(version=2, state="READY")],
             "cls.versions.2": [VersionState(version=2, state="UNAVAILABLE")]}
    members = [ReleaseMember(model="pre", version=2), ReleaseMember(model="cls", version=2)]
    assert release.missing_members(index, members) == ["cls v2"]


def test_an_ensemble_may_come_without_its_empty_version_folder() -> None:
    where = triton_flavor.layout({"pipe/config.pbtxt": 10, "pipe/smoke.json": 5, "MLmodel": 3}, "pipe")
    assert where.version_folder == "" and where.files == {} and where.smoke == "pipe/smoke.json"
    with pytest.raises(StepFailed, match="2 numbered version folders"):
        triton_flavor.layout({"pipe/config.pbtxt": 1, "pipe/1/a": 1, "pipe/2/b": 1}, "pipe")


def _report(outcome: str, members: list[tuple[str, int]], quarantined: list[str] | None = None,
            current: CurrentState | None = None):
    from ferry.core.records import DeployReport, Kind, RollbackReport

    rollback = RollbackReport(actions=[], quarantined=quarantined or [], verified=True, serving=[], problems=[])
    return DeployReport(deploy_id="d-new", model="pipe", kind=Kind.DEPLOY, target="@c", outcome=outcome, version=2,
                        error="member 'cls' v3: differs", failed_step="smoke", current=current,
                        rollback=rollback if outcome == "rolled_back" else None,
                        members=[ReleaseMember(model=m, version=v) for m, v in members])


def test_a_failed_release_refuses_only_the_member_versions_it_staged(tmp_path: Path) -> None:
    from ferry.core.writeback import member_plans

    _commit(tmp_path, "pipe", [("pre", 2), ("cls", 2)])
    anchor = ModelDir(tmp_path, "pipe")
    staged = [str(tmp_path / ".ferry" / "cls" / "quarantine" / "3.failed_20260101T000000")]
    plans = member_plans(anchor, _report("rolled_back", [("pre", 2), ("cls", 3)], staged))
    assert [(p.model, [(m.version, m.status) for m in p.marks]) for p in plans] == [("cls", [(3, "refused")])]
    assert "release pipe v2: member 'cls' v3" in plans[0].marks[0].error


def test_a_committed_release_moves_a_members_alias_only_while_it_pins_the_one_version(tmp_path: Path) -> None:
    from ferry.core.writeback import member_plans

    _commit(tmp_path, "other", [("pre", 1)])
    anchor = ModelDir(tmp_path, "pipe")
    current = CurrentState(active_version=2, run_id="r", alias="c", updated_at_utc="20260101T000000", model="pipe",
                           sha256="s", deploy_id="d-new", members=[ReleaseMember(model="pre", version=2),
                                                                     ReleaseMember(model="cls", version=2)])
    plans = {p.model: p for p in member_plans(anchor, _report("committed", [], current=current))}
    assert plans["pre"].serving.version == 2 and plans["pre"].kept == [1] and not plans["pre"].alias
    assert plans["cls"].serving.version == 2 and plans["cls"].alias
