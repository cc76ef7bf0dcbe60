"""The one runner of the deploy transaction, for every adapter: the CLI, the DAG's tasks and ``ferry recover``.

It owns what every run of the steps needs: the model's lock, the journal (each step's intent,
timing, candidate and failure), the events an adapter shows, the conversion of any error into a
step's failure, the undo, and the one history record per attempt. A deploy in one process
(:meth:`Runner.deploy`) and a deploy spread over processes (the DAG: :meth:`Runner.begin`, then
:meth:`Runner.run_step` per task, then :meth:`Runner.finish` or :meth:`Runner.undo`) go through
the same methods; between processes, the journal is the deploy's memory and its claim on the model.
"""

from __future__ import annotations

import os
import shutil
import socket
import time
from collections.abc import Callable
from typing import Any

from ferry.core import placement, release, rolling, steps, writeback
from ferry.core import undo as undoing
from ferry.core.baking import Baking
from ferry.core.current import append_history, find_attempt, read_attempts, read_current
from ferry.core.errors import Busy, FerryError, InvalidInput, NoSuchModel, StepFailed, unreachable
from ferry.core.events import RECORDED, REGISTRY, WRITE_BACK, EventHandler, describe, quiet
from ferry.core.journal import Journal, read_journal
from ferry.core.lock import current_user, holding
from ferry.core.model_config import config_digest
from ferry.core.records import (
    VALIDATION_STEPS,
    Candidate,
    DeployReport,
    Failure,
    JournalRecord,
    Kind,
    Outcome,
    Owner,
    Step,
    Strategy,
    Via,
    utc_stamp,
)
from ferry.core.services import Services
from ferry.core.target import Target


class Runner(Baking):
    """Runs the transaction on one model."""

    def __init__(self, ferry: Services, model: str, via: Via = "cli", on_event: EventHandler | None = None) -> None:
        self.ferry = ferry
        self.model_dir = ferry.model_dir(model)
        self.via = via
        self.emit = on_event or quiet

    @property
    def model(self) -> str:
        return self.model_dir.model

    # ------------------------------------------------------------ in one process

    def deploy(self, target: Target) -> DeployReport:
        """Run the whole transaction under the model's lock and journal; always leave one history record.

        Every outcome (committed, noop, rolled_back, rejected) comes back as the report; only a
        model that MLflow does not know leaves nothing behind, not even a record.
        """
        fresh = not self.model_dir.exists()
        try:
            with holding(self.model_dir, self.ferry.settings.deploy.lock_wait_s):
                return self._run_to_end(self.begin(target))
        except FerryError as error:
            if isinstance(error, NoSuchModel) and fresh:
                shutil.rmtree(self.model_dir.state_dir, ignore_errors=True)
                raise
            return self.record_rejected(target, error)

    def _run_to_end(self, journal: Journal) -> DeployReport:
        try:
            for step in (Step.MATERIALIZE, *VALIDATION_STEPS):
                self.run_step(journal, step)
                if step == Step.MATERIALIZE:
                    candidate = journal.record.candidate
                    assert candidate is not None, "materialize names the candidate, or raises"
                    if not steps.needs_validation(candidate):
                        break
            if self.bakes(journal):
                self.run_step(journal, Step.BAKE)
            return self.finish(journal)
        except StepFailed:
            return self.undo(journal)
        except NoSuchModel:
            journal.remove()  # nothing was touched, and there is no model to keep a record for
            raise
        except FerryError:
            if journal.record.failure and journal.record.failure.rejected:
                return self.undo(journal)  # nothing was touched: recorded as rejected
            raise

    # ------------------------------------------------------------ the parts, also run one per process

    def begin(self, target: Target) -> Journal:
        """Claim the model with a new journal and take the snapshot (the caller holds the lock).

        A failure here removes the journal again and raises: nothing was touched.
        """
        self._refuse_failed_version(target)
        record = JournalRecord(model=self.model, kind=target.kind, target=target.label, alias=target.alias,
                               version=target.version, who=current_user(),
                               owner=Owner(via=self.via, host=socket.gethostname(), pid=os.getpid()),
                               started_at_utc=utc_stamp(), rollout=target.rollout,
                               allow_signature_change=target.allow_signature_change, strategy=target.strategy,
                               batch=target.batch)
        journal = Journal.create(self.model_dir, record)
        if target.kind == Kind.DEPLOY or self.ferry.settings.mlflow.serving_alias:
            # MLflow's client starts while the snapshot runs (the write-back needs it too), once the model is
            # claimed: a deploy refused as busy or unfinished answers at once, without importing mlflow.
            self.ferry.start_registry()
        try:
            snapshot = self._timed(journal, Step.SNAPSHOT, lambda: steps.take_snapshot(self.ferry, self.model))
        except BaseException:
            journal.remove()
            raise
        if target.strategy == "rolling":
            try:
                rolling.check_can_roll(snapshot, target.batch)
            except BaseException:
                journal.remove()
                raise
        journal.update(deploy_id=snapshot.deploy_id, snapshot=snapshot)
        return journal

    def journal_of(self, deploy_id: str) -> Journal:
        """The journal of a deploy in flight (the caller holds the lock)."""
        journal = read_journal(self.model_dir)
        if journal is None or journal.deploy_id != deploy_id or journal.record.snapshot is None:
            raise Busy(f"deploy {deploy_id} of '{self.model}' is not in flight any more",
                       "it was finished or undone by another process (`ferry recover`?); see `ferry history`")
        return journal

    def run_step(self, journal: Journal, step: Step) -> Any:
        """Run one step against the journal: its intent, timing and result, or its failure for the undo."""
        record = journal.record
        snapshot = record.snapshot
        assert snapshot is not None, "a step runs only after the snapshot"
        action: Callable[[], object]
        if step == Step.MATERIALIZE:
            if record.alias is not None:
                self._timed(journal, REGISTRY, lambda: self.ferry.registry)  # MLflow's client, if still starting
            action = lambda: rolling.check_candidate(record.strategy, steps.materialize(  # noqa: E731
                self.ferry, snapshot, record.alias, record.version, record.allow_signature_change))
        elif step == Step.BAKE:
            action = lambda: self._bake(journal)  # noqa: E731
        elif step == Step.LOAD and record.strategy == "rolling" and record.candidate is not None \
                and steps.needs_validation(record.candidate):
            action = lambda: self._roll(journal)  # noqa: E731
        else:
            candidate = record.candidate
            assert candidate is not None, f"{step} runs only after materialize"
            action = lambda: getattr(steps, _STEP_FUNCTIONS[step])(self.ferry, snapshot, candidate)  # noqa: E731
        try:
            result = self._timed(journal, step, action)
        except (Exception, KeyboardInterrupt) as error:  # Ctrl-C too: a stopped deploy must not stay half done
            failure = steps.as_step_failure(step, error)
            rejected = not isinstance(error, StepFailed) and isinstance(error, FerryError) and step == Step.MATERIALIZE
            journal.update(failure=steps.failure_of(failure, rejected))
            if rejected:
                raise error  # the target could not be resolved: nothing was touched (retryable if MLflow was down)
            raise failure from error
        if step == Step.MATERIALIZE:
            journal.update(candidate=result, failure=None)
        return result

    def _roll(self, journal: Journal) -> None:
        """The load of a rolling deploy: every replica swapped to the candidate and proven, batch by batch."""
        candidate, snapshot = journal.record.candidate, journal.record.snapshot
        assert candidate is not None and snapshot is not None
        bake = (lambda number: self.bake_batch(journal, number)) if journal.record.rollout is not None else None
        rolling.roll(self.ferry, journal, candidate, steps.prove_on(self.ferry, snapshot, candidate), bake)
        journal.update(candidate=candidate.model_copy(update={"rolled": True}))

    def finish(self, journal: Journal) -> DeployReport:
        """Commit the candidate (or end the no-op), write the history record and release the model."""
        record = journal.record
        candidate, snapshot = record.candidate, record.snapshot
        assert candidate is not None and snapshot is not None
        current, warnings = self.run_step(journal, Step.COMMIT) if steps.needs_commit(candidate) \
            else (snapshot.current, [])
        report = self._report(record, Outcome.NOOP if candidate.already_active else Outcome.COMMITTED)
        report.current, report.warnings, report.gate = current, warnings, list(record.gate)
        if candidate.already_active:
            done = "proven and served again" if candidate.revalidate else "nothing to do"
            report.warnings.insert(0, f"v{candidate.version} is already active: {done}")
        elif record.kind == Kind.REVERT and (changes := steps.signature_crossed(self.ferry, snapshot, candidate)):
            report.warnings.append(f"v{candidate.version} has another signature than v{snapshot.active_version} "
                                   f"had ({'; '.join(changes)}): clients built for v{snapshot.active_version} break")
        return self._close(journal, report)

    def undo(self, journal: Journal, recovered_by: str | None = None) -> DeployReport:
        """Undo a failed deploy: restore the snapshot, quarantine the candidate, pin Triton, record it all."""
        record = journal.record
        failure = record.failure or Failure(step="unknown", message="a step failed without saying why")
        if failure.rejected:
            report = self._report(record, Outcome.REJECTED)
            report.error, report.hint, report.retryable = failure.message, failure.hint, failure.retryable
            report.failed_step = failure.step  # where it was refused (nothing was touched)
            return self._close(journal, report)
        snapshot = record.snapshot
        assert snapshot is not None
        # Only what this deploy staged is quarantined: a version directory somebody else wrote stays where it is.
        staged = record.candidate.version if record.candidate else self._staged_by(record.deploy_id)
        journal.update(step=Step.ROLLBACK, failure=failure)
        self.emit(Step.ROLLBACK, "start", 0.0, "")
        began = time.perf_counter()
        members = record.candidate.members if record.candidate else None
        undone = undoing.undo(self.ferry, snapshot, failure, staged, record.swapped, record.batch, members)
        record.steps[Step.ROLLBACK] = round(time.perf_counter() - began, 4)
        detail = "; ".join(undone.problems) or f"serving {undone.serving or 'nothing'}"
        self.emit(Step.ROLLBACK, "ok" if undone.verified else "failed", record.steps[Step.ROLLBACK], detail)
        report = self._report(record, Outcome.ROLLED_BACK)
        report.failed_step, report.error, report.hint = failure.step, failure.message, failure.hint
        report.detail, report.failed_replica = failure.detail or None, failure.replica
        report.gate = list(record.gate)
        report.version = staged if staged is not None else failure.version
        report.rollback, report.recovered_by = undone, recovered_by
        return self._close(journal, report)

    def record_rejected(self, target: Target, error: FerryError) -> DeployReport:
        """The one history record of an attempt refused before it touched anything."""
        report = DeployReport(deploy_id="", model=self.model, kind=target.kind, target=target.label,
                              outcome=Outcome.REJECTED, error=error.message, hint=error.hint,
                              retryable=unreachable(error), who=current_user(), started_at_utc=utc_stamp())
        report.finished_at_utc = utc_stamp()
        append_history(self.model_dir, report)
        self.emit(RECORDED, report.outcome, 0.0, "")
        return report

    # ------------------------------------------------------------ after a crash

    def recover(self) -> DeployReport | None:
        """Finish or undo the deploy a journal left behind; None when the model has no unfinished deploy.

        The commit point decides: once current.json names the deploy, the deploy is finished (Triton
        pinned to the new version); before that, it is rolled back like any failed deploy, its candidate
        quarantined with the step it stopped in as the reason. Safe to run again if it is interrupted too.
        """
        try:
            with holding(self.model_dir):
                return self._recover()
        except Busy:
            raise Busy(f"a deploy of '{self.model}' is running now (it holds {self.model_dir.lock_path})",
                       "recover only a deploy whose process has stopped: wait for this one to finish") from None

    def _recover(self) -> DeployReport | None:
        journal = read_journal(self.model_dir)
        if journal is None:
            return None
        record, who = journal.record, current_user()
        if record.deploy_id and (recorded := find_attempt(self.model_dir, record.deploy_id)) is not None:
            journal.remove()  # the deploy had finished; only its journal was left
            return recorded.model_copy(update={"recovered_by": who})
        if record.snapshot is None:
            report = self._report(record, Outcome.REJECTED)
            report.error = "the deploying process stopped before its snapshot; nothing had been changed"
            report.recovered_by = who
            return self._close(journal, report)
        candidate = record.candidate
        if candidate is not None and candidate.already_active and not candidate.revalidate:
            report = self._report(record, Outcome.NOOP)
            report.current, report.recovered_by = record.snapshot.current, who
            return self._close(journal, report)
        if candidate is not None and steps.committed_by(self.model_dir, record.deploy_id):
            return self._close(journal, self._finish_commit(record, candidate, who))
        if record.failure is None:
            record.failure = Failure(
                step=record.step, hint="`ferry recover` rolled the deploy back; deploy again",
                message=f"the deploying process (pid {record.owner.pid} on {record.owner.host}) stopped during "
                        f"{record.step}", version=candidate.version if candidate else None)
        return self.undo(journal, recovered_by=who)

    def _finish_commit(self, record: JournalRecord, candidate: Candidate, who: str) -> DeployReport:
        """The deploy stopped after its commit point: pin every replica it acted on; a failure is drift."""
        report = self._report(record, Outcome.COMMITTED)
        report.current, report.recovered_by = read_current(self.model_dir), who
        assert record.snapshot is not None
        try:
            fleet = steps.fleet_of(self.ferry, record.snapshot)
        except FerryError as error:
            report.warnings.append(f"committed v{candidate.version}, but its replicas are unknown: {error} "
                                   "(run `ferry reconcile`)")
            return report
        held = placement.held_versions(report.current)  # the previous version too, if its window is still open
        warm = None if candidate.rolled else next((v for v in held if v != candidate.version), None)
        loaded = placement.loaded_after_load(record.snapshot, candidate)
        before = record.snapshot.current.members if record.snapshot.current else []
        try:  # after the commit point: what cannot be read is drift for reconcile, never a reason to undo
            stale = release.stale_stores(self.model_dir, self.model, before, candidate.members)
        except (FerryError, OSError) as error:
            stale = []
            report.warnings.append(f"the previous release's member stores stay loaded: {error} (run `ferry reconcile`)")
        report.warnings += placement.pin_after_commit(self.model_dir, candidate, fleet, warm, loaded, stale)
        _, states = placement.wait_serving(fleet, self.model, [candidate.version], held=held)
        report.warnings += [f"{problem} (drift: run `ferry reconcile`)"
                            for problem in placement.serving_problems(states, [candidate.version])]
        return report

    def _staged_by(self, deploy_id: str) -> int | None:
        """A version directory this deploy staged before its journal could name the candidate."""
        for entry in self.model_dir.path.iterdir() if self.model_dir.path.exists() else []:
            manifest = self.model_dir.read_manifest(int(entry.name)) if entry.name.isdigit() else None
            if manifest is not None and manifest.deploy_id == deploy_id:
                return manifest.version
        return None

    # ------------------------------------------------------------ bookkeeping

    def _timed(self, journal: Journal, step: Step | str, action: Callable[[], Any]) -> Any:
        """Run ``action`` as ``step``: its intent in the journal first, its time in the journal after, and the
        events. A ``str`` step is a part of a step shown on its own line only (MLflow's client starting)."""
        if isinstance(step, Step):
            journal.begin(step)
        self.emit(step, "start", 0.0, "")
        began = time.perf_counter()
        try:
            result = action()
        except BaseException as error:
            self.emit(step, "failed", self._took(journal, step, began), str(error))
            raise
        detail = describe(step, result) if isinstance(step, Step) else "started beside the snapshot"
        self.emit(step, "ok", self._took(journal, step, began), detail)
        return result

    @staticmethod
    def _took(journal: Journal, step: Step | str, began: float) -> float:
        seconds = round(time.perf_counter() - began, 4)
        if isinstance(step, Step):
            journal.record.steps[step] = seconds
            journal.save()
        return seconds

    def _write_back(self, report: DeployReport) -> None:
        """Tell MLflow what happened (ferry.core.writeback), after the record; a failure there is only a warning."""
        if not writeback.due(self.ferry.settings, report):
            return
        self.emit(WRITE_BACK, "start", 0.0, "")
        told = writeback.tell(self.ferry.settings, lambda: self.ferry.registry, self.model_dir, report)
        report.warnings += told.warnings
        self.emit(WRITE_BACK, "ok" if told.told else "warned", told.seconds,
                  "MLflow told of the outcome" if told.told else told.warnings[0])

    def _refuse_failed_version(self, target: Target) -> None:
        if target.kind != Kind.REVERT or target.force:
            return
        last = next((r for r in reversed(read_attempts(self.model_dir)) if r.version == target.version
                     and r.outcome in (Outcome.COMMITTED, Outcome.ROLLED_BACK)), None)
        if last is not None and last.outcome == Outcome.ROLLED_BACK:
            raise InvalidInput(
                f"v{target.version} failed its last deploy ({last.deploy_id}, at {last.failed_step}: "
                f"{last.error.splitlines()[0] if last.error else 'no reason recorded'})",
                "go back to a version that served, or add --force to try this one again")

    def _report(self, record: JournalRecord, outcome: Outcome) -> DeployReport:
        snapshot, candidate = record.snapshot, record.candidate
        config = config_digest(candidate.config_pbtxt) if candidate and candidate.config_pbtxt else None
        before = config_digest(snapshot.config_text) if snapshot and snapshot.config_text else None
        return DeployReport(
            deploy_id=record.deploy_id, model=record.model, kind=record.kind, target=record.target, outcome=outcome,
            who=record.who, started_at_utc=record.started_at_utc,
            version=candidate.version if candidate else None, run_id=candidate.run_id if candidate else None,
            previous_version=snapshot.active_version if snapshot else None,
            config_sha256=config, config_changed=config is not None and before is not None and config != before,
            strategy=record.strategy, members=candidate.members if candidate else [],
        )

    def _close(self, journal: Journal, report: DeployReport) -> DeployReport:
        """Write the attempt's history record, end its journal (a journal outlives its deploy only if the
        process died), then write the outcome back to MLflow: the attempt is over before MLflow is called."""
        report.steps = dict(journal.record.steps)
        report.finished_at_utc = utc_stamp()
        append_history(self.model_dir, report)
        journal.remove()
        self.emit(RECORDED, report.outcome, 0.0, "")
        self._write_back(report)
        return report


_STEP_FUNCTIONS = {Step.LOAD: "load", Step.READY: "wait_ready", Step.SMOKE: "smoke", Step.COMMIT: "commit"}



def deploy(ferry: Services, model: str, alias: str | None = None, version: int | None = None,
           on_event: EventHandler | None = None, force: bool = False,
           allow_signature_change: bool = False, strategy: Strategy = "beside", batch: str = "1") -> DeployReport:
    """One attempt in this process: the version ``alias`` names, or ``version`` (going back to it)."""
    if (alias is None) == (version is None):
        raise InvalidInput("give either an alias or a version to deploy")
    target = Target.of_alias(alias, allow_signature_change=allow_signature_change, strategy=strategy, batch=batch) \
        if alias is not None else Target.of_version(version or 0, force)
    return Runner(ferry, model, on_event=on_event).deploy(target)
