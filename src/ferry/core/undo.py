"""The undo of a failed deploy: the snapshot's state put back, the candidate quarantined, Triton serving the
active version (and, for a release, its members) again. Best effort: every action is tried and reported."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TypeVar

from ferry.core import release, rolling
from ferry.core.current import restore_current
from ferry.core.errors import FerryError
from ferry.core.placement import serve_only_active, serving_problems, wait_serving
from ferry.core.records import Failure, QuarantineReason, ReleaseMember, RollbackReport, Snapshot, Step, utc_stamp
from ferry.core.repository import ModelDir
from ferry.core.rollout import remove_rollout
from ferry.core.services import Services
from ferry.core.steps import fleet_of
from ferry.core.stubs import stop_stubs_of

T = TypeVar("T")


def _quarantine_failed(model_dir: ModelDir, snapshot: Snapshot, candidate: int | None,
                       reason: QuarantineReason) -> list[str]:
    """Quarantine what this deploy staged and the candidate version, if there was one: never delete them."""
    folders = dict(model_dir.staging_dirs(snapshot.deploy_id))
    if candidate is not None and candidate != snapshot.active_version and model_dir.version_dir(candidate).exists():
        folders[model_dir.version_dir(candidate)] = candidate
    return [str(model_dir.quarantine(folder, reason.model_copy(update={"version": v})))
            for folder, v in folders.items()]


def undo(ferry: Services, snapshot: Snapshot, failure: Failure, candidate: int | None,
         swapped: list[str] | None = None, batch: str = "1",
         members: list[ReleaseMember] | None = None) -> RollbackReport:
    """Restore the snapshot's state, quarantine the failed version, and make Triton serve the active one.

    ``candidate`` is the version materialize produced (staged or reused), None if it produced none;
    what this deploy left half-staged is found by its deploy id. ``swapped``: the replicas a rolling deploy
    swapped to the candidate, put back batch by batch (drained first) before anything else. ``members``: a
    release's, as the journal's candidate recorded them (else read from the candidate's manifest). Best
    effort: every action is tried even if an earlier one failed, and the report says what worked.
    """
    model_dir = ferry.model_dir(snapshot.model)
    actions: list[str] = []
    problems: list[str] = []
    reason = QuarantineReason(deploy_id=snapshot.deploy_id, model=snapshot.model, failed_step=failure.step,
                              error=failure.message, hint=failure.hint, detail=failure.detail,
                              failed_at_utc=utc_stamp())

    def attempt(what: str, action: Callable[[], T]) -> T | None:
        try:
            result = action()
        except Exception as error:  # best effort: record it and go on with the next action
            problems.append(f"{what}: {error}")
            return None
        actions.append(what)
        return result

    if swapped:  # first: no replica answers as the candidate (rollout.json keeps the gateways away meanwhile)
        problems += attempt("swapped the replicas back to the active version",
                            lambda: rolling.swap_back(ferry, snapshot, swapped, batch, candidate)) or []
    if attempt("checked rollout.json", lambda: remove_rollout(model_dir)):  # first: no request to the candidate
        actions.append("removed rollout.json")
    if attempt("checked current.json", lambda: restore_current(model_dir, snapshot.current)):
        actions.append("restored current.json")
    attempt("restored config.pbtxt", lambda: model_dir.restore_config_text(snapshot.config_text))
    if failure.step == Step.LOAD and candidate is not None:
        attempt("stopped the candidate's backend stubs", lambda: stop_stubs_of(model_dir.version_dir(candidate)))
    fleet = fleet_of(ferry, snapshot)
    # Pin Triton before moving the candidate away: with the model directory unchanged since the
    # candidate's load, Triton keeps the active version's running instance instead of re-creating it.
    if (active := snapshot.active_version) is not None:
        attempt("checked the store's link", lambda: model_dir.ensure_store_link(active))
    tried = members or release.members_of(model_dir, candidate)
    entry = candidate if candidate is not None else failure.version  # a reused entry whose members failed to stage
    names = list(dict.fromkeys([m.model for m in tried] + release.member_models(model_dir, entry)))
    active_members = snapshot.current.members if snapshot.current else []
    stale = attempt("found the failed release's member stores", lambda: release.stale_stores(
        model_dir, snapshot.model, tried, active_members)) if names else []
    if failure.step == Step.LOAD:  # a member whose initialize hangs holds its stub: never one that serves
        for model, version in stale or []:
            folder = ModelDir(model_dir.repository, model).version_dir(version)
            attempt(f"stopped the backend stubs of member '{model}' v{version}",
                    functools.partial(stop_stubs_of, folder))
    attempt("asked Triton to serve only the active version",
            lambda: serve_only_active(fleet, snapshot, model_dir, stale))
    wanted = [snapshot.current.active_version] if snapshot.current else []
    verified, states = wait_serving(fleet, snapshot.model, wanted)
    if verified:
        attempt("removed the links of the stores unloaded", lambda: model_dir.drop_store_links(wanted))
    problems += serving_problems(states, wanted)
    replicas = {url: s for url, s in states.items() if not isinstance(s, FerryError)}
    serving = sorted(set().union(*replicas.values())) if replicas else []
    quarantined = attempt("quarantined the failed version",
                          lambda: _quarantine_failed(model_dir, snapshot, candidate, reason))
    if names:
        quarantined = (quarantined or []) + (attempt("quarantined the members the release staged",
                                                     lambda: release.quarantine_staged(
                                                         model_dir, names, active_members, reason)) or [])
    if ferry.settings.deploy.quarantine_keep > 0:
        attempt("pruned the files of older quarantined versions",
                lambda: model_dir.prune_quarantine(ferry.settings.deploy.quarantine_keep))
    return RollbackReport(actions=actions, quarantined=quarantined or [], verified=verified, serving=serving,
                          problems=problems, replicas=replicas)
