"""The deploy transaction as separate calls with plain JSON in and out, for the Airflow DAG's tasks.

Each call runs one part of :class:`ferry.core.runner.Runner` in whatever process the orchestrator gives
it, under the model's lock for that part's duration. Between tasks the deploy's journal holds the model:
:func:`snapshot_current` creates it, each step records its intent, timing, candidate or failure in it,
and :func:`commit_current` or :func:`rollback_minimal` write the history record and remove it. While it
exists, every other deploy of the model (a DAG run or the CLI) is refused at once.
"""

from __future__ import annotations

from typing import Any

from ferry.core.current import find_attempt
from ferry.core.errors import InvalidInput
from ferry.core.lock import holding
from ferry.core.records import Kind, RolloutPlan, Step, Strategy
from ferry.core.runner import Runner
from ferry.core.services import Services
from ferry.core.target import Target

Handle = dict[str, Any]  # what XCom carries between tasks: {"model", "deploy_id", ...}
# Another run's snapshot, or a step of the deploy in flight, holds the model's lock for a moment: a snapshot
# waits that long for it, so that a run refused for a deploy in flight names that deploy (from its journal)
# rather than only the lock. Two runs triggered together meet this way.
SNAPSHOT_LOCK_WAIT_S = 5.0


def _runner(ferry: Services, model: str) -> Runner:
    return Runner(ferry, model, via="airflow")


def snapshot_current(ferry: Services, model: str, alias: str, rollout: dict | None = None,
                     allow_signature_change: bool = False, strategy: Strategy = "beside", batch: str = "1") -> Handle:
    """Take the model (fail fast if another deploy holds it), then record what is committed and served.

    The model is taken before the snapshot, so no other deploy can commit in between and be undone
    by this one's rollback. A failure here removes the journal and writes no history: the orchestrator
    may retry, and :func:`rollback_minimal` records the attempt once it is given up.
    """
    plan = RolloutPlan.model_validate(rollout) if rollout else None
    target = Target.of_alias(alias, rollout=plan, allow_signature_change=allow_signature_change, strategy=strategy,
                             batch=batch)
    runner = _runner(ferry, model)
    with holding(runner.model_dir, max(ferry.settings.deploy.lock_wait_s, SNAPSHOT_LOCK_WAIT_S)):
        journal = runner.begin(target)
    snapshot = journal.record.snapshot
    return {"model": runner.model, "deploy_id": journal.deploy_id,
            "active_version": snapshot.active_version if snapshot else None}


def _step(ferry: Services, handle: Handle, step: Step) -> Any:
    runner = _runner(ferry, handle["model"])
    with holding(runner.model_dir):
        return runner.run_step(runner.journal_of(handle["deploy_id"]), step)


def materialize_repo(ferry: Services, handle: Handle) -> Handle:
    candidate = _step(ferry, handle, Step.MATERIALIZE)
    return {**handle, "version": candidate.version, "run_id": candidate.run_id,
            "already_active": candidate.already_active}


def triton_load(ferry: Services, handle: Handle) -> Handle:
    _step(ferry, handle, Step.LOAD)
    return handle


def triton_ready(ferry: Services, handle: Handle) -> Handle:
    _step(ferry, handle, Step.READY)
    return handle


def triton_infer_smoke(ferry: Services, handle: Handle) -> Handle:
    return {**handle, "smoke": _step(ferry, handle, Step.SMOKE)}


def triton_bake(ferry: Services, handle: Handle) -> bool:
    """One look at the bake (a no-op when the run asked for none); True once it passed. For a sensor in
    reschedule mode: between looks the task gives its worker slot back."""
    runner = _runner(ferry, handle["model"])
    with holding(runner.model_dir):
        return runner.bake_poke(runner.journal_of(handle["deploy_id"]))


def commit_current(ferry: Services, handle: Handle) -> dict:
    """Commit the candidate (or record the no-op), write the history record and release the model."""
    runner = _runner(ferry, handle["model"])
    with holding(runner.model_dir):
        return runner.finish(runner.journal_of(handle["deploy_id"])).model_dump(mode="json")


def rollback_minimal(ferry: Services, model: str, alias: str, deploy_id: str | None,
                     snapshot_failure: dict | None) -> dict:
    """Undo a failed deploy: restore the snapshot, quarantine the candidate, pin Triton, record it all.

    Without a deploy id the snapshot itself failed: nothing was touched, and the attempt is recorded
    as rejected with the snapshot's error (``{"message", "hint"}``).
    """
    runner = _runner(ferry, model)
    if deploy_id is None:
        failure = snapshot_failure or {"message": "the snapshot failed", "hint": "see the snapshot task's log"}
        error = InvalidInput(failure["message"], failure.get("hint") or "")
        return runner.record_rejected(Target(Kind.DEPLOY, alias=alias), error).model_dump(mode="json")
    with holding(runner.model_dir):
        if (recorded := find_attempt(runner.model_dir, deploy_id)) is not None:  # `ferry recover` ended it already
            return recorded.model_dump(mode="json")
        return runner.undo(runner.journal_of(deploy_id)).model_dump(mode="json")
