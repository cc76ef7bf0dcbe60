"""Bring a model back to a state somebody chose: after a deploying process died (recover), or after Triton restarted (reconcile)."""

from __future__ import annotations

from filelock import Timeout
from pydantic import BaseModel

from ferry.deploy import (
    Candidate,
    DeployReport,
    Ferry,
    Snapshot,
    current_user,
    failure_record,
    finish,
    model_lock,
    pin,
    rollback,
    wait_serving,
)
from ferry.errors import FerryError, StepFailed
from ferry.journal import Journal, read_journal
from ferry.repository import ModelDir
from ferry.state import find_history, read_current
from ferry.triton import TritonError


def recover(ferry: Ferry, model: str) -> DeployReport | None:
    """Finish or undo the deploy a journal left behind; None when the model has no unfinished deploy.

    The commit point decides: once current.json names the deploy, the deploy is finished (Triton
    pinned to the new version); before that, it is rolled back like any failed deploy, its candidate
    quarantined with the step it stopped in as the reason. Safe to run again if it is interrupted too.
    """
    model_dir = ferry.model_dir(model)
    try:
        with model_lock(ferry, model_dir):
            journal = read_journal(model_dir)
            if journal is None:
                return None
            recorded = find_history(model_dir, journal.deploy_id) if journal.deploy_id else None
            if recorded is not None:
                journal.remove()  # the deploy had finished; only its journal was left
                return DeployReport.model_validate({**recorded, "recovered_by": current_user()})
            report = _end(ferry, model_dir, journal)
            finish(model_dir, report, journal)
            return report
    except Timeout:
        raise FerryError(f"a deploy of '{model}' is running now (it holds {model_dir.lock_path})",
                         "recover only a deploy whose process has stopped: wait for this one to finish")


def _end(ferry: Ferry, model_dir: ModelDir, journal: Journal) -> DeployReport:
    record = journal.record
    report = DeployReport(
        deploy_id=journal.deploy_id, model=model_dir.model, kind=record.get("kind", "deploy"),
        target=record.get("target", ""), outcome="rejected", who=record.get("who", ""),
        started_at_utc=record.get("started_at_utc", ""), steps=record.get("steps", {}), recovered_by=current_user(),
    )
    if "snapshot" not in record:
        report.error = "the deploying process stopped before its snapshot; nothing had been changed"
        return report
    snapshot = Snapshot.model_validate(record["snapshot"])
    candidate = Candidate.model_validate(record["candidate"]) if record.get("candidate") else None
    report.previous_version = snapshot.active_version
    if candidate is not None:
        report.version, report.run_id = candidate.version, candidate.run_id
        if candidate.already_active:
            report.outcome, report.current = "noop", snapshot.current
            return report
        if _committed(model_dir, journal.deploy_id):
            return _finish_commit(ferry, model_dir, candidate, report)
    failure = _failure(record)
    journal.update(step="rollback", failure=failure_record(failure))
    if candidate is None:
        report.version = _staged_by(model_dir, journal.deploy_id)
    report.outcome, report.failed_step, report.error, report.hint = "rolled_back", failure.step, failure.message, failure.hint
    report.rollback = rollback(ferry, snapshot, failure, report.version)
    return report


def _committed(model_dir: ModelDir, deploy_id: str) -> bool:
    try:
        current = read_current(model_dir)
    except FerryError:
        return False  # current.json is written atomically, so this deploy did not damage it: restore the snapshot's
    return current is not None and current.deploy_id == deploy_id


def _failure(record: dict) -> StepFailed:
    """The failure the deploy recorded (its rollback was cut short), else the step it stopped in."""
    if failure := record.get("failure"):
        return StepFailed(failure["step"], failure["message"], failure.get("hint", ""), failure.get("version"))
    step = record.get("step", "snapshot")
    who = record.get("owner", {})
    return StepFailed(step, f"the deploying process (pid {who.get('pid')} on {who.get('host')}) stopped during {step}",
                      "`ferry recover` rolled the deploy back; deploy again")


def _staged_by(model_dir: ModelDir, deploy_id: str) -> int | None:
    """A version directory this deploy staged before its journal could name the candidate."""
    for entry in model_dir.path.iterdir() if model_dir.path.exists() else []:
        if entry.name.isdigit() and (model_dir.read_manifest(int(entry.name)) or {}).get("deploy_id") == deploy_id:
            return int(entry.name)
    return None


def _finish_commit(ferry: Ferry, model_dir: ModelDir, candidate: Candidate, report: DeployReport) -> DeployReport:
    report.outcome, report.current = "committed", read_current(model_dir)
    try:
        pin(ferry, model_dir, candidate.config_pbtxt, candidate.version)
        verified, serving = wait_serving(ferry, model_dir.model, [candidate.version])
        if not verified:
            report.warnings.append(f"committed v{candidate.version}, but Triton serves {serving}: run `ferry reconcile`")
    except (OSError, TritonError) as error:
        report.warnings.append(f"committed v{candidate.version}, but pinning Triton to it failed: {error}")
    return report


# ---------------------------------------------------------------- reconcile


class Reconciled(BaseModel):
    model: str
    active_version: int | None
    action: str  # "in place" | "loaded" | "unloaded" | "skipped" | "failed"
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.action in ("in place", "loaded", "unloaded")


def reconcile(ferry: Ferry, model: str) -> Reconciled:
    """Make Triton serve exactly the committed version of ``model`` (after a restart, or on a new replica).

    Touches Triton only when it differs, so it is cheap and safe to run periodically.
    A model with an unfinished deploy is skipped: `ferry recover` decides what is committed.
    """
    model_dir = ferry.model_dir(model)
    try:
        with model_lock(ferry, model_dir):
            if (journal := read_journal(model_dir)) is not None:
                return Reconciled(model=model, active_version=None, action="skipped",
                                  detail=f"deploy {journal.deploy_id} is unfinished: run `ferry recover {model}` first")
            return _reconcile(ferry, model_dir)
    except Timeout:
        return Reconciled(model=model, active_version=None, action="skipped", detail="a deploy is running")
    except FerryError as error:
        return Reconciled(model=model, active_version=None, action="failed", detail=str(error))


def _reconcile(ferry: Ferry, model_dir: ModelDir) -> Reconciled:
    current = read_current(model_dir)
    wanted = [current.active_version] if current else []
    serving = ferry.triton.ready_versions(model_dir.model)
    version = current.active_version if current else None
    if serving == wanted and (current is None or _pinned(model_dir, current.active_version)):
        return Reconciled(model=model_dir.model, active_version=version, action="in place")
    if current is None:
        ferry.triton.unload(model_dir.model)
        verified, serving = wait_serving(ferry, model_dir.model, [])
        return _result(model_dir, None, "unloaded", verified, serving)
    if not (model_dir.version_dir(version) / "model.onnx").is_file():
        raise FerryError(f"current.json names v{version}, but {model_dir.version_dir(version)} has no model.onnx",
                         f"restore that directory, or `ferry rollback {model_dir.model} --to` a version that has its files")
    config_text = model_dir.read_config_text()
    if config_text is None:
        raise FerryError(f"{model_dir.config_path} is missing", "restore it, or deploy the version again")
    pin(ferry, model_dir, config_text, version)
    verified, serving = wait_serving(ferry, model_dir.model, wanted, timeout_s=ferry.settings.ready_timeout_s)
    return _result(model_dir, version, "loaded", verified, serving)


def _pinned(model_dir: ModelDir, version: int) -> bool:
    config = model_dir.read_config()
    return config is not None and list(config.version_policy.specific.versions) == [version]


def _result(model_dir: ModelDir, version: int | None, action: str, verified: bool, serving: list[int]) -> Reconciled:
    if not verified:
        return Reconciled(model=model_dir.model, active_version=version, action="failed",
                          detail=f"Triton serves {serving or 'nothing'} instead; see its log")
    return Reconciled(model=model_dir.model, active_version=version, action=action,
                      detail=f"Triton serves {serving or 'nothing'}")
