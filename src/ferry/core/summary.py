"""A deploy report in one line, as every front end says it (the CLI, the MLflow plugin, the watcher)."""

from __future__ import annotations

from ferry.core.records import DeployReport, Outcome


def rollback_state(report: DeployReport) -> str:
    """What serves after a rolled-back deploy: the previous version, nothing, or a warning to look."""
    rollback = report.rollback
    if not (rollback and rollback.verified):
        return f"ROLLBACK NOT VERIFIED: check `ferry status {report.model}`"
    if report.previous_version is None:
        return "nothing was active before, so nothing serves now"
    return f"v{report.previous_version} still active and serving"


def failure_reason(report: DeployReport, with_problems: bool = True) -> str:
    """Where a rolled-back deploy failed, why, what serves now and what was quarantined (and, ``with_problems``,
    what the rollback could not do)."""
    rollback = report.rollback
    quarantined = ", ".join(rollback.quarantined) if rollback and rollback.quarantined else "nothing"
    problems = "; ".join(rollback.problems) if with_problems and rollback and rollback.problems else ""
    where = f" on replica {report.failed_replica}" if report.failed_replica else ""
    return (f"failed at {report.failed_step}{where}: {report.error} ({rollback_state(report)}; "
            f"quarantined: {quarantined}{'; rollback problems: ' + problems if problems else ''})")


def failure_line(report: DeployReport) -> str:
    """The rolled-back version and its :func:`failure_reason`."""
    return f"v{report.version} {failure_reason(report)}"


def outcome_line(report: DeployReport) -> str:
    """Any outcome in one line, with the warnings after it."""
    if report.outcome == Outcome.COMMITTED:
        was = f"v{report.previous_version}" if report.previous_version else "nothing"
        text = f"v{report.version} committed (was {was})"
    elif report.outcome == Outcome.NOOP:
        text = f"v{report.version} already active"
    elif report.outcome == Outcome.ROLLED_BACK:
        text = failure_line(report)
    else:
        text = f"rejected: {report.error}" + (f" ({report.hint})" if report.hint else "")
    return "; ".join([text, *report.warnings[1 if report.outcome == Outcome.NOOP else 0:]])
