"""The bake over fakes: the gate's criteria, and the runner's commit or rollback on its verdict."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator

import pytest

from ferry.core import rollout
from ferry.core.current import read_current, read_history
from ferry.core.records import GateFigures, Outcome, RolloutPlan
from ferry.core.rollout import Counts, Tally
from ferry.core.runner import Runner
from ferry.core.target import Target
from unit.support import Bench

BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, float("inf"))


def _counts(version: int, role: str, ok: int, errors: int, latency_s: float, agree: int = 0,
            disagree: int = 0) -> Counts:
    """What the gateways would have counted for one version in one role."""
    histogram = Tally(buckets={b: float(ok + errors) if latency_s <= b else 0.0 for b in BUCKETS})
    counts: Counts = {(str(version), role, "ok"): Tally(ok), (str(version), role, "errors"): Tally(errors),
                      (str(version), role, "latency"): histogram}
    if role == "shadow":
        counts[(str(version), "shadow", "agree")] = Tally(agree)
        counts[(str(version), "shadow", "disagree")] = Tally(disagree)
    return counts


@pytest.fixture
def baking(bench: Bench, monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Counts]]:
    """v1 committed, v2 registered; the gateways' counters are what the test puts in the returned list."""
    bench.settings = bench.settings.with_overrides(gate_interval_s=0.2, gate_min_requests=50)
    bench.registry.add("iris", "champion")
    bench.deploy()
    bench.registry.add("iris", "champion")
    readings: list[Counts] = [{}]
    calls = []

    def read_counts(settings: object, model: str) -> Counts:  # the first reading is the bake's start
        calls.append(model)
        return {} if len(calls) == 1 else readings[-1]

    monkeypatch.setattr(rollout, "read_counts", read_counts)
    yield readings


def _bake(bench: Bench, mode: str = "canary", bake_s: float = 1.0, **events: list) -> object:
    plan = RolloutPlan(mode=mode, bake_s=bake_s, canary_percent=10)
    seen = events.get("seen", [])
    runner = Runner(bench.ferry, "iris", on_event=lambda step, status, t, detail: seen.append((step, status, detail)))
    return runner.deploy(Target.of_alias("champion", rollout=plan))


def test_a_candidate_that_holds_up_is_committed_at_the_end_of_the_bake(bench: Bench, baking: list) -> None:
    baking.append({**_counts(1, "active", 900, 1, 0.004), **_counts(2, "candidate", 100, 0, 0.004)})
    seen: list = []
    report = _bake(bench, seen=seen)
    assert report.outcome == Outcome.COMMITTED, report.error
    assert report.gate and report.gate[-1].verdict == "pass" and report.gate[-1].candidate.requests == 100
    assert any(step == "gate" and status == "pass" for step, status, _ in seen)
    assert not bench.model_dir.rollout_path.exists()
    assert read_history(bench.model_dir)[-1]["gate"], "the evaluations are in the history"
    bench.check_invariants(attempts=2)


def test_a_candidate_with_many_errors_is_rolled_back_after_two_failed_evaluations(bench: Bench,
                                                                                  baking: list) -> None:
    baking.append({**_counts(1, "active", 900, 0, 0.004), **_counts(2, "candidate", 80, 20, 0.004)})
    report = _bake(bench, bake_s=30)
    assert (report.outcome, report.failed_step) == (Outcome.ROLLED_BACK, "bake")
    assert "error ratio 20.00% over 1.00%" in report.error and len(report.gate) == 2
    assert report.steps["bake"] < 5, "rolled back at the second failed evaluation, not at the end"
    assert read_current(bench.model_dir).active_version == 1 and not bench.model_dir.rollout_path.exists()
    [quarantined] = report.rollback.quarantined
    reason = json.loads((bench.model_dir.quarantine_root / quarantined / "reason.json").read_text())
    assert json.loads(reason["detail"])["candidate"]["errors"] == 20, "the failing gate's figures are kept"
    bench.check_invariants(attempts=2)


def test_too_little_traffic_is_inconclusive_and_fails_closed(bench: Bench, baking: list) -> None:
    baking.append({**_counts(1, "active", 30, 0, 0.004), **_counts(2, "candidate", 3, 0, 0.004)})
    report = _bake(bench, bake_s=0.6)
    assert report.outcome == Outcome.ROLLED_BACK and "inconclusive" in report.error
    assert "3 candidate requests so far, the gate needs 50" in report.error
    bench.check_invariants(attempts=2)


@pytest.mark.parametrize("action", ["promote", "abort"])
def test_promote_commits_now_and_abort_rolls_back_now(bench: Bench, baking: list, action: str) -> None:
    baking.append({})
    timer = threading.Timer(0.5, lambda: rollout.request_control(bench.model_dir, action, "ops@example"))
    timer.start()
    report = _bake(bench, bake_s=60)
    timer.join()
    assert report.steps["bake"] < 10
    if action == "promote":
        assert report.outcome == Outcome.COMMITTED
    else:
        assert report.outcome == Outcome.ROLLED_BACK and report.error == "aborted by ops@example"
    assert not bench.model_dir.rollout_path.exists()
    bench.check_invariants(attempts=2)


def test_rollout_json_tells_the_gateways_during_the_bake(bench: Bench, baking: list) -> None:
    baking.append({})
    seen: list = []

    def look() -> None:
        state = rollout.read_rollout(bench.model_dir)
        seen.append(state)
        rollout.request_control(bench.model_dir, "abort", "the test")

    timer = threading.Timer(0.4, look)
    timer.start()
    _bake(bench, bake_s=60)
    timer.join()
    [state] = seen
    assert (state.active_version, state.candidate_version, state.plan.mode) == (1, 2, "canary")


@pytest.mark.parametrize(("candidate", "reason"), [
    (GateFigures(requests=200, errors=0, p95_s=0.012), "p95 12.0 ms over 7.0 ms"),
    (GateFigures(requests=200, errors=0, p95_s=0.004, agreed=150, disagreed=50), "agree with the active"),
    (GateFigures(requests=200, errors=3, p95_s=0.004), "error ratio 1.50% over 1.00%"),
])
def test_each_criterion_fails_on_its_own(bench: Bench, candidate: GateFigures, reason: str) -> None:
    active = GateFigures(requests=2000, errors=0, p95_s=0.004)
    evaluation = rollout.evaluate(bench.settings, active, candidate, 10.0, shadow=True)
    assert evaluation.verdict == "fail" and any(reason in r for r in evaluation.reasons), evaluation.reasons
    assert rollout.evaluate(bench.settings, active, active, 10.0, shadow=True).verdict == "pass"


def test_p95_is_read_from_the_histogram_deltas() -> None:
    start = {("2", "candidate", "latency"): Tally(buckets={0.001: 10, 0.01: 10, float("inf"): 10})}
    now = {("2", "candidate", "latency"): Tally(buckets={0.001: 10, 0.01: 110, float("inf"): 110})}
    p95 = rollout.figures(now, start, 2, "candidate").p95_s
    assert 0.009 < p95 <= 0.01, "the 100 new requests all took between 1 and 10 ms"


def test_a_bake_needs_a_sensible_plan() -> None:
    from ferry.core.errors import InvalidInput

    for plan in (RolloutPlan(mode="canary", bake_s=60, canary_percent=0),
                 RolloutPlan(mode="canary", bake_s=0, canary_percent=10),
                 RolloutPlan(mode="shadow", bake_s=60, mirror_percent=150)):
        with pytest.raises(InvalidInput):
            Target.of_alias("champion", rollout=plan)


def test_a_controller_that_died_during_the_bake_is_recovered_and_rollout_json_is_gone(bench: Bench,
                                                                                       baking: list) -> None:
    from ferry.core.records import Step

    baking.append({})
    runner = Runner(bench.ferry, "iris")
    journal = runner.begin(Target.of_alias("champion", rollout=RolloutPlan(mode="shadow", bake_s=60)))
    for step in (Step.MATERIALIZE, Step.LOAD, Step.READY, Step.SMOKE):
        runner.run_step(journal, step)
    journal.begin(Step.BAKE)
    runner.bake_start(journal)  # ... and the process is killed here
    assert bench.model_dir.rollout_path.exists()
    report = Runner(bench.ferry, "iris").recover()
    assert report.outcome == Outcome.ROLLED_BACK and "stopped during bake" in report.error
    assert not bench.model_dir.rollout_path.exists() and read_current(bench.model_dir).active_version == 1
    assert "removed rollout.json" in report.rollback.actions
    bench.check_invariants(attempts=2)
