"""The deploy transaction as separate calls with plain JSON in and out, for orchestrators (the Airflow DAG).

Each call runs one step of :mod:`ferry.deploy` in whatever process the orchestrator gives it.
A deploy that spans processes cannot hold the model's lock from start to end, so
:func:`snapshot_current` creates an in-flight record (``.ferry/<model>/inflight.json``, created
exclusively); the other steps add their timings, the candidate and any failure to it, and
:func:`commit_current` or :func:`rollback_minimal` write the history record and remove it. While it
exists, every other deploy of the model (a DAG run or the CLI) is refused at once.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any, Callable

from filelock import FileLock, Timeout

from ferry.deploy import (
    Candidate,
    DeployReport,
    Ferry,
    Snapshot,
    commit,
    current_user,
    load,
    materialize,
    rollback,
    smoke,
    take_snapshot,
    wait_ready,
)
from ferry.errors import FerryError, StepFailed
from ferry.fsutil import atomic_write
from ferry.repository import ModelDir, check_name
from ferry.state import append_history, busy_error, read_inflight, utc_stamp


def _write(model_dir: ModelDir, record: dict) -> None:
    atomic_write(model_dir.inflight_path, json.dumps(record, indent=1).encode())


def _open_inflight(model_dir: ModelDir, record: dict) -> None:
    """Create the in-flight record, or fail at once if another deploy holds the model."""
    model_dir.state.mkdir(parents=True, exist_ok=True)
    try:
        with FileLock(str(model_dir.lock_path), timeout=0):  # held by a CLI deploy for its whole run
            fd = os.open(model_dir.inflight_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            os.close(fd)
    except Timeout:
        raise FerryError(f"a deploy of '{model_dir.model}' is running (it holds {model_dir.lock_path})",
                         "wait for it to finish")
    except FileExistsError:
        raise busy_error(model_dir, read_inflight(model_dir) or {})
    _write(model_dir, record)


def _close(model_dir: ModelDir, record: dict, report: DeployReport) -> dict:
    report.steps = record.get("steps", {}) | report.steps
    report.finished_at_utc = utc_stamp()
    append_history(model_dir, report.model_dump(mode="json"))
    model_dir.inflight_path.unlink(missing_ok=True)
    return report.model_dump(mode="json")


def _report(record: dict, outcome: str) -> DeployReport:
    return DeployReport(
        deploy_id=record["deploy_id"], model=record["model"], kind=record["kind"], target=record["target"],
        outcome=outcome, who=record["who"], started_at_utc=record["started_at_utc"],
    )


def snapshot_current(ferry: Ferry, model: str, alias: str) -> dict:
    """Take the model (fail fast if another deploy holds it), then record what is committed and served.

    The model is taken before the snapshot, so no other deploy can commit in between and be undone
    by this one's rollback. A failure here releases the model and writes no history: the orchestrator
    may retry, and :func:`rollback_minimal` records the attempt once it is given up.
    """
    model_dir = ferry.model_dir(model)
    check_name("alias", alias)
    began = time.perf_counter()
    record = {"model": model, "kind": "deploy", "target": f"@{alias}", "alias": alias, "who": current_user(),
              "started_at_utc": utc_stamp(), "deploy_id": "taking a snapshot"}
    _open_inflight(model_dir, record)
    try:
        snapshot = take_snapshot(ferry, model)
    except BaseException:
        model_dir.inflight_path.unlink(missing_ok=True)
        raise
    record.update(deploy_id=snapshot.deploy_id, snapshot=snapshot.model_dump(mode="json"),
                  steps={"snapshot": round(time.perf_counter() - began, 4)})
    _write(model_dir, record)
    return {"model": model, "deploy_id": snapshot.deploy_id, "active_version": snapshot.active_version}


def _in_flight(ferry: Ferry, state: dict) -> tuple[ModelDir, dict, Snapshot]:
    model_dir = ferry.model_dir(state["model"])
    record = read_inflight(model_dir)
    if record is None or record.get("deploy_id") != state["deploy_id"]:
        raise FerryError(f"deploy {state['deploy_id']} of '{state['model']}' is not in flight any more",
                         "it was finished or rolled back by another process; see `ferry history`")
    return model_dir, record, Snapshot.model_validate(record["snapshot"])


def _step(ferry: Ferry, state: dict, name: str, action: Callable[[Snapshot, dict], Any]) -> Any:
    """Run one step against the in-flight record; record its timing, or its failure for the rollback."""
    model_dir, record, snapshot = _in_flight(ferry, state)
    began = time.perf_counter()
    try:
        result = action(snapshot, record)
    except Exception as error:
        failure = error if isinstance(error, FerryError) else StepFailed(name, f"unexpected {type(error).__name__}: {error}")
        record["failure"] = {  # a retry that succeeds leaves it behind harmlessly: only the rollback reads it
            "step": name, "message": failure.message, "hint": failure.hint,
            "rejected": not isinstance(failure, StepFailed), "version": getattr(failure, "version", None),
        }
        record["steps"][name] = round(time.perf_counter() - began, 4)
        _write(model_dir, record)
        raise failure from error
    record["steps"][name] = round(time.perf_counter() - began, 4)
    if isinstance(result, Candidate):
        record["candidate"] = result.model_dump(mode="json")
    _write(model_dir, record)
    return result


def _candidate(record: dict) -> Candidate:
    return Candidate.model_validate(record["candidate"])


def materialize_repo(ferry: Ferry, state: dict) -> dict:
    candidate = _step(ferry, state, "materialize", lambda s, r: materialize(ferry, s, alias=r["alias"]))
    return {**state, "version": candidate.version, "run_id": candidate.run_id, "already_active": candidate.already_active}


def triton_load(ferry: Ferry, state: dict) -> dict:
    _step(ferry, state, "load", lambda s, r: load(ferry, s, _candidate(r)))
    return state


def triton_ready(ferry: Ferry, state: dict) -> dict:
    _step(ferry, state, "ready", lambda s, r: wait_ready(ferry, s, _candidate(r)))
    return state


def triton_infer_smoke(ferry: Ferry, state: dict) -> dict:
    return {**state, "smoke": _step(ferry, state, "smoke", lambda s, r: smoke(ferry, s, _candidate(r)))}


def commit_current(ferry: Ferry, state: dict) -> dict:
    """Commit the candidate (or record the no-op), write the history record and release the model."""
    current, warnings = _step(ferry, state, "commit", lambda s, r: commit(ferry, s, _candidate(r)))
    model_dir, record, snapshot = _in_flight(ferry, state)
    candidate = _candidate(record)
    report = _report(record, "noop" if candidate.already_active else "committed")
    report.version, report.run_id, report.previous_version = candidate.version, candidate.run_id, snapshot.active_version
    report.current, report.warnings = current, warnings
    return _close(model_dir, record, report)


def rollback_minimal(ferry: Ferry, model: str, alias: str, deploy_id: str | None, snapshot_failure: dict | None) -> dict:
    """Undo a failed deploy: restore the snapshot, quarantine the candidate, pin Triton, record it all.

    Without a deploy id the snapshot itself failed: nothing was touched, and the attempt is recorded
    as rejected with the snapshot's error (``{"message", "hint"}``).
    """
    model_dir = ferry.model_dir(model)
    if deploy_id is None:
        failure = snapshot_failure or {"message": "the snapshot failed", "hint": "see the snapshot task's log"}
        report = DeployReport(deploy_id="", model=model, kind="deploy", target=f"@{alias}", outcome="rejected",
                              error=failure["message"], hint=failure.get("hint"), who=current_user(),
                              started_at_utc=utc_stamp(), finished_at_utc=utc_stamp())
        append_history(model_dir, report.model_dump(mode="json"))
        return report.model_dump(mode="json")
    model_dir, record, snapshot = _in_flight(ferry, {"model": model, "deploy_id": deploy_id})
    failure = record.get("failure") or {"step": "unknown", "message": "a step failed without saying why", "hint": ""}
    candidate = _candidate(record) if "candidate" in record else None
    if failure.get("rejected"):  # the target could not be resolved: nothing was touched
        report = _report(record, "rejected")
        report.error, report.hint = failure["message"], failure["hint"]
        return _close(model_dir, record, report)
    began = time.perf_counter()
    step_failure = StepFailed(failure["step"], failure["message"], failure["hint"])
    rollback_report = rollback(ferry, snapshot, step_failure, candidate.version if candidate else None)
    report = _report(record, "rolled_back")
    report.failed_step, report.error, report.hint = failure["step"], failure["message"], failure["hint"]
    report.version = candidate.version if candidate else failure.get("version")
    report.previous_version = snapshot.active_version
    report.rollback = rollback_report
    report.steps = {"rollback": round(time.perf_counter() - began, 4)}
    return _close(model_dir, record, report)
