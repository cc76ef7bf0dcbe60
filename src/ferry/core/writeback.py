"""The outcome of every attempt, written back onto the model version in MLflow.

Called by the runner once an attempt is decided and its history record written (the model still held, so
that no other commit comes in between): the attempt's end does not wait for MLflow, and what MLflow was told
is a line of its own in ``writeback.jsonl`` (records.WriteBackRecord). A failure here is a warning in the
report and that line. It never undoes or blocks a commit.

What MLflow shows afterwards (the tags of each version ferry decided on, and one alias):

    ferry.status          serving | retired | refused
    ferry.deploy_id       the attempt that gave the version this status (for retired: the commit that replaced it)
    ferry.updated_at_utc  when (compact UTC, as in current.json)
    ferry.failed_step     refused only: the step that caught it
    ferry.error           refused only: why, one line of at most ERROR_CHARS characters
    @<serving alias>      the committed version (settings.mlflow.serving_alias, "serving" by default)

Every call to MLflow made here has its own short timeout and no retries (settings.mlflow.writeback_timeout_s), and
the first one that finds MLflow unreachable ends the write-back: going back to a kept version must stay
fast while MLflow is down. :func:`sync` computes the same state from current.json and the history and
applies what differs, so it repairs a write-back that failed and changes nothing when run again.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import BaseModel, computed_field

from ferry.core.config import Settings
from ferry.core.current import read_attempts, read_current, read_records
from ferry.core.errors import FerryError, MlflowDown, MlflowRefused, one_line
from ferry.core.fsutil import append_line
from ferry.core.mlflow_write import MlflowWriter, connect
from ferry.core.records import CurrentState, DeployReport, Kind, Outcome, WriteBackRecord, utc_stamp
from ferry.core.registry import Registry
from ferry.core.release import pinned_versions
from ferry.core.repository import ModelDir

STATUS, DEPLOY_ID, UPDATED_AT = "ferry.status", "ferry.deploy_id", "ferry.updated_at_utc"
FAILED_STEP, ERROR = "ferry.failed_step", "ferry.error"
SERVING, RETIRED, REFUSED = "serving", "retired", "refused"
ERROR_CHARS = 500  # MLflow accepts far longer tag values; the UI shows one line well
_BUDGET_CALLS = 4  # the whole write-back gives up after this many timeouts' worth of time


@dataclass(frozen=True)
class Mark:
    """What one version's ferry.* tags must say."""

    version: int
    status: str
    deploy_id: str
    updated_at_utc: str
    failed_step: str = ""
    error: str = ""

    def tags(self) -> dict[str, str]:
        tags = {STATUS: self.status, DEPLOY_ID: self.deploy_id, UPDATED_AT: self.updated_at_utc}
        if self.status == REFUSED:
            error = one_line(self.error, ERROR_CHARS) or "no reason"
            tags.update({FAILED_STEP: self.failed_step or "unknown", ERROR: error})
        return tags


@dataclass
class Plan:
    """The state to write for one model: the version @serving names (if any) and every version's mark.

    Versions that MLflow still tags serving but that are not ``serving`` are retired by the serving mark's
    deploy (they are looked up, so that a write-back missed earlier is repaired by the next one)."""

    model: str
    serving: Mark | None = None
    marks: list[Mark] = field(default_factory=list)
    kept: list[int] = field(default_factory=list)  # versions left tagged serving (another release pins them)
    alias: bool = True  # move the serving alias to ``serving`` (False: another pinned version shares the model)


class SyncResult(BaseModel):
    model: str
    serving_version: int | None = None
    changes: list[str] = []
    warnings: list[str] = []
    unavailable: bool = False  # MLflow did not answer: worth running again
    refused: list[str] = []  # what MLflow would not take ("v9", "@serving"): it has no such model or version
    skipped: str = ""  # why the model was not synced at all (a deploy holds it)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def in_sync(self) -> bool:
        return not (self.unavailable or self.refused or self.skipped)


# ---------------------------------------------------------------- what to write


def plan_for_report(report: DeployReport) -> Plan:
    """The marks one decided attempt implies (nothing for a rejected one: no version was touched)."""
    plan = Plan(report.model)
    if report.outcome in (Outcome.COMMITTED, Outcome.NOOP) and report.current is not None:
        current = report.current
        plan.serving = _serving(current)
        if report.previous_version is not None and report.previous_version != current.active_version:
            plan.marks.append(Mark(report.previous_version, RETIRED, current.deploy_id, current.updated_at_utc))
    elif report.outcome == Outcome.ROLLED_BACK and report.version is not None \
            and report.version != report.previous_version:  # the restored version is still the committed one
        plan.marks.append(Mark(report.version, REFUSED, report.deploy_id, report.finished_at_utc,
                               report.failed_step or "", report.error or ""))
    return plan


def member_plans(model_dir: ModelDir, report: DeployReport) -> list[Plan]:
    """A release's members, each a model of its own in MLflow. A committed release's member versions serve; the
    member's @serving alias moves only while no other release pins another version of it (one alias cannot
    name two). A failed release's member versions that it staged, and that the undo quarantined, are refused
    with the release's reason (a reused version keeps what it had)."""
    if report.outcome in (Outcome.COMMITTED, Outcome.NOOP) and report.current is not None:
        current = report.current
        plans = []
        for member in current.members:
            others = sorted(v for v in pinned_versions(model_dir, member.model, besides=model_dir.model)
                            if v != member.version)
            plans.append(Plan(member.model, serving=Mark(member.version, SERVING, current.deploy_id,
                                                         current.updated_at_utc), kept=others, alias=not others))
        return plans
    if report.outcome != Outcome.ROLLED_BACK or report.rollback is None:
        return []
    quarantined = {(Path(folder).parent.parent.name, Path(folder).name.split(".", 1)[0])
                   for folder in report.rollback.quarantined}
    reason = f"release {report.model} v{report.version}: {report.error or ''}"
    return [Plan(m.model, marks=[Mark(m.version, REFUSED, report.deploy_id, report.finished_at_utc,
                                      report.failed_step or "", reason)])
            for m in report.members if (m.model, str(m.version)) in quarantined]


def member_plans_from_state(model_dir: ModelDir, current: CurrentState | None,
                            history: list[DeployReport]) -> list[Plan]:
    """What the members of a release must say, from current.json and the history: the committed release's
    member versions serve; a member version only ever seen in rolled-back releases, that nothing committed
    pins, is refused."""
    plans: dict[str, Plan] = {}
    if current is not None:
        committed = DeployReport(deploy_id=current.deploy_id, model=model_dir.model, kind=Kind.DEPLOY, target="",
                                 outcome=Outcome.COMMITTED, current=current)
        plans = {plan.model: plan for plan in member_plans(model_dir, committed)}
    served = {(m.model, m.version) for r in history if r.outcome == Outcome.COMMITTED and r.current
              for m in r.current.members}
    for report in history:
        if report.outcome == Outcome.ROLLED_BACK:
            for plan in member_plans(model_dir, report):
                marks = [m for m in plan.marks if (plan.model, m.version) not in served]
                plans.setdefault(plan.model, Plan(plan.model)).marks += marks
    return list(plans.values())


def plan_from_state(model: str, current: CurrentState | None, history: list[DeployReport]) -> Plan:
    """The marks current.json and the history imply: the committed version serves; every other version
    ferry decided on is retired (it served, and a later commit replaced it) or refused (its last attempt
    was rolled back)."""
    plan = Plan(model, serving=_serving(current) if current else None)
    decided = [r for r in history if r.outcome in (Outcome.COMMITTED, Outcome.ROLLED_BACK)]
    last = {record.version: index for index, record in enumerate(decided) if record.version is not None}
    for version, index in sorted(last.items()):
        if current is not None and version == current.active_version:
            continue
        record = decided[index]
        if record.outcome == Outcome.ROLLED_BACK:
            plan.marks.append(Mark(version, REFUSED, record.deploy_id, record.finished_at_utc,
                                   record.failed_step or "", record.error or ""))
        elif (mark := _retired_by(version, decided[index + 1:], current)) is not None:
            plan.marks.append(mark)
    return plan


def _serving(current: CurrentState) -> Mark:
    return Mark(current.active_version, SERVING, current.deploy_id, current.updated_at_utc)


def _retired_by(version: int, later: list[DeployReport], current: CurrentState | None) -> Mark | None:
    """The commit that replaced ``version`` (the first later commit of another version)."""
    for record in later:
        if record.outcome == Outcome.COMMITTED and record.version != version:
            stamp = (record.current.updated_at_utc if record.current else "") or record.finished_at_utc
            return Mark(version, RETIRED, record.deploy_id, stamp)
    if current is not None:
        return Mark(version, RETIRED, current.deploy_id, current.updated_at_utc)
    return None


# ---------------------------------------------------------------- MLflow, with short timeouts


# ---------------------------------------------------------------- applying a plan


@dataclass
class _Writer:
    mlflow: MlflowWriter
    model: str
    deadline: float
    changes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)

    def _check_time(self) -> None:
        if time.monotonic() > self.deadline:
            raise MlflowDown("MLflow answers too slowly: the write-back ran out of time")

    def mark(self, mark: Mark) -> None:
        """Make v<mark.version>'s ferry.* tags say ``mark``, touching only what differs."""
        self._check_time()
        try:
            now = self.mlflow.tags(self.model, mark.version)
            wanted = mark.tags()
            for key, value in wanted.items():
                if now.get(key) != value:
                    self._check_time()
                    self.mlflow.set_tag(self.model, mark.version, key, value)
            for key in (FAILED_STEP, ERROR):
                if key in now and key not in wanted:
                    self.mlflow.delete_tag(self.model, mark.version, key)
        except MlflowRefused as refused:
            self.refused.append(f"v{mark.version}")
            self.warnings.append(f"MLflow refused the outcome of {self.model} v{mark.version}: {refused}")
            return
        if now.get(STATUS) != mark.status or now.get(DEPLOY_ID) != mark.deploy_id:
            self.changes.append(f"v{mark.version}: {STATUS} {now.get(STATUS) or '(none)'} -> {mark.status}")

    def serve(self, mark: Mark, alias: str, explicit: Iterable[int]) -> None:
        """Tag the serving version, point @alias at it, retire every other version still tagged serving."""
        self.mark(mark)
        try:
            before = self.mlflow.aliases(self.model).get(alias)
            if before != mark.version:
                self._check_time()
                self.mlflow.set_alias(self.model, alias, mark.version)
                self.changes.append(f"@{alias}: {f'v{before}' if before else '(none)'} -> v{mark.version}")
        except MlflowRefused as refused:
            self.refused.append(f"@{alias}")
            self.warnings.append(f"MLflow refused @{alias} of {self.model}: {refused}")
            return
        try:
            stale = set(self.mlflow.versions_tagged(self.model, STATUS, SERVING)) - {mark.version} - set(explicit)
        except MlflowRefused:
            return  # a store that cannot search by tag: only the versions named in the plan are retired
        for version in sorted(stale):
            self.mark(Mark(version, RETIRED, mark.deploy_id, mark.updated_at_utc))


def _apply(settings: Settings, registry: Registry, plan: Plan) -> SyncResult:
    result = SyncResult(model=plan.model, serving_version=plan.serving.version if plan.serving else None)
    if not plan.serving and not plan.marks:
        return result
    try:
        mlflow = connect(settings, registry)
        if mlflow is None:
            return result
        writer = _Writer(mlflow, plan.model, time.monotonic() + _BUDGET_CALLS * settings.mlflow.writeback_timeout_s)
        try:
            if plan.serving is not None and plan.alias:
                writer.serve(plan.serving, settings.mlflow.serving_alias, [m.version for m in plan.marks] + plan.kept)
            elif plan.serving is not None:
                writer.mark(plan.serving)
            for mark in plan.marks:
                writer.mark(mark)
        finally:
            result.changes, result.warnings, result.refused = writer.changes, writer.warnings, writer.refused
    except MlflowDown as down:
        result.unavailable = True
        result.warnings.append(f"MLflow at {_uri(settings, registry)} was not told of the outcome: {down} "
                               f"(run `ferry sync {plan.model}` once it answers)")
    except Exception as error:  # a write-back must never break the record of a decided attempt
        result.unavailable = True
        result.warnings.append(f"MLflow was not told of the outcome: unexpected {type(error).__name__}: "
                               f"{one_line(str(error), 300)} (run `ferry sync {plan.model}`)")
    return result


def _apply_members(settings: Settings, registry: Registry, plans: list[Plan], result: SyncResult) -> None:
    """A release's member plans, each applied to its own model, told into the entry's ``result`` (nothing once
    MLflow did not answer for the entry)."""
    for plan in plans if not result.unavailable else []:
        told = _apply(settings, registry, plan)
        result.changes += [f"{plan.model} {change}" for change in told.changes]
        result.warnings += told.warnings
        result.unavailable, result.refused = result.unavailable or told.unavailable, result.refused + told.refused


def _uri(settings: Settings, registry: Registry) -> str:
    return getattr(registry, "tracking_uri", "") or settings.tracking_uri


# ---------------------------------------------------------------- entry points


def due(settings: Settings, report: DeployReport) -> bool:
    """Whether MLflow is to be told of ``report``: write-back is on, and the attempt was decided."""
    return bool(settings.mlflow.serving_alias) and report.outcome != Outcome.REJECTED


def tell(settings: Settings, registry: Callable[[], Registry], model_dir: ModelDir,
         report: DeployReport) -> WriteBackRecord:
    """Tag the version and move the serving alias (when :func:`due`), and leave the line in writeback.jsonl."""
    began = time.perf_counter()
    try:
        client = registry()
        result = _apply(settings, client, plan_for_report(report))
        _apply_members(settings, client, member_plans(model_dir, report), result)
    except FerryError as error:  # MLflow's client could not even start
        result = SyncResult(model=report.model, unavailable=True, warnings=[
            f"MLflow was not told of the outcome: {error} (run `ferry sync {report.model}`)"])
    record = WriteBackRecord(deploy_id=report.deploy_id, model=report.model, at_utc=utc_stamp(),
                             seconds=round(time.perf_counter() - began, 4), told=result.in_sync,
                             warnings=result.warnings)
    _append(model_dir, record)
    return record


def sync(settings: Settings, registry: Registry, model_dir: ModelDir) -> SyncResult:
    """Write to MLflow what current.json and the history say (the caller holds the model's lock, so that
    no commit happens in between); only what differs is written, so running it again changes nothing."""
    if not settings.mlflow.serving_alias:
        return SyncResult(model=model_dir.model, warnings=["FERRY_SERVING_ALIAS is empty: write-back is off"])
    began = time.perf_counter()
    current = read_current(model_dir)
    history = read_attempts(model_dir)
    result = _apply(settings, registry, plan_from_state(model_dir.model, current, history))
    _apply_members(settings, registry, member_plans_from_state(model_dir, current, history), result)
    _append(model_dir, WriteBackRecord(deploy_id=current.deploy_id if current else "", model=model_dir.model,
                                       by="sync", at_utc=utc_stamp(), seconds=round(time.perf_counter() - began, 4),
                                       told=result.in_sync, warnings=result.warnings))
    return result


def _append(model_dir: ModelDir, record: WriteBackRecord) -> None:
    model_dir.state_dir.mkdir(parents=True, exist_ok=True)
    append_line(model_dir.writeback_path, json.dumps(record.model_dump(mode="json"), sort_keys=True))


def read_write_backs(model_dir: ModelDir) -> list[WriteBackRecord]:
    """Every line of writeback.jsonl, oldest first; a damaged line is skipped, as in the history."""
    return read_records(model_dir.writeback_path, WriteBackRecord)
