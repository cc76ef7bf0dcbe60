"""What the runner tells an adapter as a deploy goes: (step, "start" | "ok" | "failed", seconds, detail)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ferry.core.records import Candidate, Step

EventHandler = Callable[[str, str, float, str], None]  # (step, "start" | "ok" | "failed", seconds, detail)
RECORDED = "recorded"  # an attempt is over: its history record is written, its outcome final
WRITE_BACK = "write-back"  # after RECORDED: MLflow told of the outcome ("ok") or not ("warned")
REGISTRY = "mlflow client"  # shown on its own line: MLflow's client starts beside the snapshot (about a second)


def quiet(step: str, status: str, seconds: float, detail: str) -> None:
    pass


def describe(step: Step, result: Any) -> str:
    if step == Step.SNAPSHOT:
        return f"active v{result.active_version}" if result.current else "nothing active yet"
    if step == Step.MATERIALIZE:
        candidate: Candidate = result
        if candidate.already_active:
            served = "Triton did not serve it: proving it again" if candidate.revalidate else "served"
            return f"v{candidate.version} is already active ({served})"
        if candidate.members:  # an ensemble has no files of its own: what it is is its members
            members = ", ".join(m.label for m in candidate.members)
            return f"v{candidate.version} (run {candidate.run_id[:8]}), a release of {members}"
        origin = "reused" if candidate.reused else f"{candidate.size_bytes} bytes"
        return f"v{candidate.version} (run {candidate.run_id[:8]}, {origin}, sha256 {candidate.sha256[:12]})"
    if step == Step.COMMIT and result[0] is not None:
        return f"current.json -> v{result[0].active_version}"
    return ""
