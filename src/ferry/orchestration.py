"""The deploy transaction as separate calls with plain JSON in and out, for orchestrators (the Airflow DAG).

Each call runs one step of :mod:`ferry.deploy` in whatever process the orchestrator gives it, under
the model's lock for the step's duration. A deploy that spans processes cannot hold that lock from
start to end, so it is held between steps by the deploy's journal (:mod:`ferry.journal`):
:func:`snapshot_current` creates it, each step records its intent, timing, candidate or failure in it,
and :func:`commit_current` or :func:`rollback_minimal` write the history record and remove it. While it
exists, every other deploy of the model (a DAG run or the CLI) is refused at once.
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator

from filelock import FileLock, Timeout

from ferry.deploy import (
    Candidate,
    DeployReport,
    Ferry,
    Snapshot,
    commit,
    current_user,
    failure_record,
    finish,
    journal_record,
    load,
    materialize,
    rollback,
    smoke,
    take_snapshot,
    wait_ready,
)
from ferry.errors import FerryError, StepFailed
from ferry.journal import Journal, read_journal
from ferry.repository import ModelDir, check_name
from ferry.state import append_history, find_history, utc_stamp


@contextmanager
def _holding(model_dir: ModelDir) -> Iterator[None]:
    """The model's lock while one step runs: a CLI deploy or `ferry recover` never acts in the middle of it."""
    model_dir.state.mkdir(parents=True, exist_ok=True)
    try:
        with FileLock(str(model_dir.lock_path), timeout=0):
            yield
    except Timeout:
        raise FerryError(f"a deploy of '{model_dir.model}' is running (it holds {model_dir.lock_path})",
                         "wait for it to finish")


def _close(model_dir: ModelDir, journal: Journal, report: DeployReport) -> dict:
    report.steps = journal.record.get("steps", {}) | report.steps
    finish(model_dir, report, journal)
    return report.model_dump(mode="json")


def _report(record: dict, outcome: str) -> DeployReport:
    return DeployReport(
        deploy_id=record["deploy_id"], model=record["model"], kind=record["kind"], target=record["target"],
        outcome=outcome, who=record["who"], started_at_utc=record["started_at_utc"],
    )


def snapshot_current(ferry: Ferry, model: str, alias: str) -> dict:
    """Take the model (fail fast if another deploy holds it), then record what is committed and served.

    The model is taken before the snapshot, so no other deploy can commit in between and be undone
    by this one's rollback. A failure here removes the journal and writes no history: the orchestrator
    may retry, and :func:`rollback_minimal` records the attempt once it is given up.
    """
    model_dir = ferry.model_dir(model)
    check_name("alias", alias)
    began = time.perf_counter()
    report = DeployReport(deploy_id="", model=model, kind="deploy", target=f"@{alias}", outcome="rejected",
                          who=current_user(), started_at_utc=utc_stamp())
    with _holding(model_dir):
        journal = Journal.create(model_dir, journal_record(report, "airflow", alias=alias))
        try:
            snapshot = take_snapshot(ferry, model)
        except BaseException:
            journal.remove()
            raise
        journal.update(deploy_id=snapshot.deploy_id, snapshot=snapshot.model_dump(mode="json"),
                       steps={"snapshot": round(time.perf_counter() - began, 4)})
    return {"model": model, "deploy_id": snapshot.deploy_id, "active_version": snapshot.active_version}


def _journal_of(model_dir: ModelDir, deploy_id: str) -> tuple[Journal, Snapshot]:
    journal = read_journal(model_dir)
    if journal is None or journal.deploy_id != deploy_id:
        raise FerryError(f"deploy {deploy_id} of '{model_dir.model}' is not in flight any more",
                         "it was finished or undone by another process (`ferry recover`?); see `ferry history`")
    return journal, Snapshot.model_validate(journal.record["snapshot"])


def _step(ferry: Ferry, state: dict, name: str, action: Callable[[Snapshot, dict], Any]) -> Any:
    """Run one step against the journal; record its timing, or its failure for the rollback."""
    model_dir = ferry.model_dir(state["model"])
    with _holding(model_dir):
        journal, snapshot = _journal_of(model_dir, state["deploy_id"])
        journal.begin(name)
        record = journal.record
        began = time.perf_counter()
        try:
            result = action(snapshot, record)
        except Exception as error:
            failure = error if isinstance(error, FerryError) else StepFailed(name, f"unexpected {type(error).__name__}: {error}")
            # A retry that succeeds leaves it behind harmlessly: only the rollback reads it.
            record["failure"] = failure_record(StepFailed(name, failure.message, failure.hint, getattr(failure, "version", None)))
            record["failure"]["rejected"] = not isinstance(failure, StepFailed)
            record["steps"][name] = round(time.perf_counter() - began, 4)
            journal.save()
            raise failure from error
        record["steps"][name] = round(time.perf_counter() - began, 4)
        if isinstance(result, Candidate):
            record["candidate"] = result.model_dump(mode="json")
        journal.save()
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
    model_dir = ferry.model_dir(state["model"])
    with _holding(model_dir):
        journal, snapshot = _journal_of(model_dir, state["deploy_id"])
        candidate = _candidate(journal.record)
        report = _report(journal.record, "noop" if candidate.already_active else "committed")
        report.version, report.run_id, report.previous_version = candidate.version, candidate.run_id, snapshot.active_version
        report.current, report.warnings = current, warnings
        return _close(model_dir, journal, report)


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
    with _holding(model_dir):
        if (recorded := find_history(model_dir, deploy_id)) is not None:  # `ferry recover` ended it already
            return recorded
        journal, snapshot = _journal_of(model_dir, deploy_id)
        record = journal.record
        failure = record.get("failure") or {"step": "unknown", "message": "a step failed without saying why", "hint": ""}
        candidate = _candidate(record) if "candidate" in record else None
        if failure.get("rejected"):  # the target could not be resolved: nothing was touched
            report = _report(record, "rejected")
            report.error, report.hint = failure["message"], failure["hint"]
            return _close(model_dir, journal, report)
        journal.begin("rollback")
        began = time.perf_counter()
        step_failure = StepFailed(failure["step"], failure["message"], failure["hint"])
        rollback_report = rollback(ferry, snapshot, step_failure, candidate.version if candidate else None)
        report = _report(record, "rolled_back")
        report.failed_step, report.error, report.hint = failure["step"], failure["message"], failure["hint"]
        report.version = candidate.version if candidate else failure.get("version")
        report.previous_version = snapshot.active_version
        report.rollback = rollback_report
        report.steps = {"rollback": round(time.perf_counter() - began, 4)}
        return _close(model_dir, journal, report)

