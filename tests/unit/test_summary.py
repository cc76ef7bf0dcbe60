"""One line per deploy outcome, as the CLI, the plugin and the watcher say it (ferry.core.summary)."""

from __future__ import annotations

from ferry.core.records import DeployReport, Kind, Outcome, RollbackReport
from ferry.core.summary import failure_line, outcome_line


def _report(outcome: Outcome, **fields: object) -> DeployReport:
    return DeployReport(deploy_id="d1", model="iris", kind=Kind.DEPLOY, target="@champion", outcome=outcome,
                        **fields)


def _rollback(verified: bool = True, problems: tuple[str, ...] = ()) -> RollbackReport:
    return RollbackReport(actions=[], quarantined=["/repo/iris/.quarantine/v2-d1"], verified=verified, serving=[1],
                          problems=list(problems))


def test_each_outcome_says_what_serves_now() -> None:
    assert outcome_line(_report(Outcome.COMMITTED, version=2, previous_version=1)) == "v2 committed (was v1)"
    assert outcome_line(_report(Outcome.COMMITTED, version=1)) == "v1 committed (was nothing)"
    noop = _report(Outcome.NOOP, version=1, warnings=["v1 is already active", "MLflow did not answer"])
    assert outcome_line(noop) == "v1 already active; MLflow did not answer"
    rejected = _report(Outcome.REJECTED, error="model 'iris' has no alias 'x'", hint="its aliases: none")
    assert outcome_line(rejected) == "rejected: model 'iris' has no alias 'x' (its aliases: none)"


def test_a_rolled_back_deploy_names_the_step_the_replica_what_serves_and_what_was_quarantined() -> None:
    report = _report(Outcome.ROLLED_BACK, version=2, previous_version=1, failed_step="smoke",
                     failed_replica="http://10.0.0.2:8000", error="output 'y' has shape [3]", rollback=_rollback())
    assert failure_line(report) == (
        "v2 failed at smoke on replica http://10.0.0.2:8000: output 'y' has shape [3] "
        "(v1 still active and serving; quarantined: /repo/iris/.quarantine/v2-d1)")
    assert outcome_line(report) == failure_line(report)


def test_an_unverified_rollback_says_to_look_and_lists_its_problems() -> None:
    report = _report(Outcome.ROLLED_BACK, version=2, failed_step="load", error="boom",
                     rollback=_rollback(verified=False, problems=("Triton did not answer",)))
    line = failure_line(report)
    assert "ROLLBACK NOT VERIFIED: check `ferry status iris`" in line
    assert line.endswith("rollback problems: Triton did not answer)")
