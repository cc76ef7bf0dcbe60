"""The bake, as the runner runs it (ferry.core.rollout holds the gate): rollout.json for the gateways, an
evaluation of the gate per interval, promote and abort; in one process, or one look at a time for the DAG."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from ferry.core import rollout, steps
from ferry.core.errors import StepFailed
from ferry.core.events import EventHandler
from ferry.core.journal import Journal
from ferry.core.records import GateEvaluation, GateFigures, RolloutState, Step, utc_stamp

if TYPE_CHECKING:
    from ferry.core.repository import ModelDir
    from ferry.core.services import Services

GATE = "gate"  # each evaluation of a bake's gate: status "pass" | "fail" | "waiting"


def _describe_figures(evaluation: GateEvaluation) -> str:
    def shown(figures: GateFigures) -> str:
        p95 = f", p95 {figures.p95_s * 1000:.1f} ms" if figures.p95_s is not None else ""
        agreement = f", agreement {figures.agreement:.1%}" if figures.agreement is not None else ""
        return f"{figures.requests} requests, {figures.error_ratio:.2%} errors{p95}{agreement}"

    return f"candidate {shown(evaluation.candidate)}; active {shown(evaluation.active)}"


class Baking:
    """The bake's part of :class:`ferry.core.runner.Runner`."""

    ferry: Services
    model_dir: ModelDir
    emit: EventHandler

    @property
    def model(self) -> str:
        return self.model_dir.model

    def bakes(self, journal: Journal) -> bool:
        """Whether this deploy bakes its candidate: asked for, and there is a new version to prove."""
        record = journal.record
        return record.rollout is not None and record.rollout.mode != "rolling" and record.candidate is not None \
            and not record.candidate.already_active  # a rolling deploy bakes each batch inside its load

    def bake_start(self, journal: Journal) -> None:
        """Tell the gateways (rollout.json) and note where their counters stand."""
        record = journal.record
        assert record.rollout is not None and record.candidate is not None and record.snapshot is not None
        if record.snapshot.active_version is None:
            raise StepFailed(Step.BAKE, "a first deploy has no active version to compare the candidate with",
                             "deploy it without a bake")
        journal.update(gate_baseline=rollout.dump_counts(rollout.read_counts(self.ferry.settings, self.model)),
                       bake_started_unix=time.time())
        rollout.write_rollout(self.model_dir, RolloutState(
            model=self.model, deploy_id=record.deploy_id, active_version=record.snapshot.active_version,
            candidate_version=record.candidate.version, plan=record.rollout, started_at_utc=utc_stamp()))

    def bake_check(self, journal: Journal) -> bool:
        """One evaluation of the gate; True once the bake passed (or was promoted), StepFailed if it failed."""
        record = journal.record
        assert record.rollout is not None and record.candidate is not None and record.snapshot is not None
        if (control := rollout.take_control(self.model_dir)) is not None:
            if control.get("action") == "abort":
                raise StepFailed(Step.BAKE, f"aborted by {control.get('by', 'someone')}", "deploy again when ready",
                                 version=record.candidate.version)
            return True  # promoted
        elapsed = time.time() - (record.bake_started_unix or time.time())
        now = rollout.read_counts(self.ferry.settings, self.model)
        start = rollout.load_counts(record.gate_baseline)
        role = rollout.ROLES[record.rollout.mode]
        active = rollout.figures(now, start, record.snapshot.active_version or 0, "active")
        candidate = rollout.figures(now, start, record.candidate.version, role)
        evaluation = rollout.evaluate(self.ferry.settings, active, candidate, elapsed, record.rollout.mode == "shadow")
        journal.update(gate=[*record.gate, evaluation])
        self.emit(GATE, evaluation.verdict, elapsed, "; ".join(evaluation.reasons) or _describe_figures(evaluation))
        ended = elapsed >= record.rollout.bake_s
        failure = rollout.decide(record.gate, self.ferry.settings.bake.failures, record.candidate.version, ended)
        if failure is not None:
            raise failure
        return ended

    def bake_poke(self, journal: Journal) -> bool:
        """The bake one look at a time, for an orchestrator that must not hold a worker for the whole bake
        (the DAG's sensor): starts it on the first call, then one gate evaluation per call; True once done."""
        if not self.bakes(journal):
            return True
        record = journal.record
        try:
            if record.bake_started_unix is None:
                journal.begin(Step.BAKE)
                self.bake_start(journal)
                return False
            done = self.bake_check(journal)
        except StepFailed as failure:
            journal.update(failure=steps.failure_of(failure))
            raise
        if done:
            record.steps[Step.BAKE] = round(time.time() - (record.bake_started_unix or time.time()), 4)
            journal.save()
        return done

    def bake_batch(self, journal: Journal, number: int) -> None:
        """A rolling deploy's bake of one batch, swapped and admitted: the gate judges the live traffic its
        replicas answer as the candidate, against what the others answer as the active version."""
        journal.update(gate_baseline=rollout.dump_counts(rollout.read_counts(self.ferry.settings, self.model)),
                       bake_started_unix=time.time())
        try:
            self._gate_until_decided(journal)
        except StepFailed as failure:
            raise StepFailed(failure.step, f"batch {number}: {failure.message}", failure.hint, failure.version,
                             failure.retryable, failure.detail) from failure

    def _bake(self, journal: Journal) -> None:
        """The bake in this process: an evaluation every gate interval until it passes, fails or is decided."""
        self.bake_start(journal)
        self._gate_until_decided(journal)

    def _gate_until_decided(self, journal: Journal) -> None:
        settings, plan = self.ferry.settings, journal.record.rollout
        assert plan is not None
        next_check = time.monotonic() + min(settings.bake.interval_s, plan.bake_s)
        while True:
            time.sleep(0.2)
            if time.monotonic() < next_check and not self.model_dir.rollout_control_path.exists():
                continue
            if self.bake_check(journal):
                return
            remaining = plan.bake_s - (time.time() - (journal.record.bake_started_unix or 0))
            next_check = time.monotonic() + max(0.2, min(settings.bake.interval_s, remaining))
