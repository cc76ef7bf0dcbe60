"""What is committed for a model, what Triton serves, and whether the two agree."""

from __future__ import annotations

from pathlib import Path

from filelock import FileLock, Timeout
from pydantic import BaseModel

from ferry.core.current import read_current
from ferry.core.errors import FerryError
from ferry.core.journal import read_journal, unfinished_error
from ferry.core.records import CurrentState
from ferry.core.repository import STATE_DIR, ModelDir
from ferry.core.triton import Triton, VersionState, ready_versions

UNKNOWN = "unknown"


class LiveFigures(BaseModel):
    """The active version's p95 latency and failure ratio (filled in by ferry.observability.live)."""

    p95_ms: float | None = None
    failure_ratio: float | None = None
    source: str = ""  # "prometheus (5m)" or "triton (since load)"
    error: str | None = None


class ModelStatus(BaseModel):
    model: str
    current: CurrentState | None = None
    current_error: str | None = None
    triton: list[VersionState] | None = None
    triton_error: str | None = None
    serving: list[int] = []
    drift: str | None = None  # None when Triton serves exactly the committed version; "unknown" when it cannot tell
    quarantined: list[str] = []
    in_flight: str | None = None  # a deploy that is running, or whose process stopped before it finished
    live: LiveFigures | None = None  # p95 latency and failure ratio of the active version


def list_models(repository: Path) -> list[str]:
    if not repository.exists():
        return []
    committed = {p.parent.name for p in (repository / STATE_DIR).glob("*/current.json")}
    configured = {p.parent.name for p in repository.glob("*/config.pbtxt")}
    return sorted((committed | configured) - {STATE_DIR})


def model_status(repository: Path, triton: Triton, model: str) -> ModelStatus:
    model_dir = ModelDir(repository, model)
    report = ModelStatus(model=model)
    try:
        report.current = read_current(model_dir)
    except FerryError as error:
        report.current_error = str(error)
    try:
        report.triton = triton.versions(model)
        report.serving = ready_versions(report.triton)
    except FerryError as error:
        report.triton_error = str(error)
    if model_dir.quarantine_root.exists():
        report.quarantined = sorted(p.name for p in model_dir.quarantine_root.iterdir())
    report.in_flight = _in_flight(model_dir)
    report.drift = _drift(report)
    return report


def _in_flight(model_dir: ModelDir) -> str | None:
    try:
        journal = read_journal(model_dir)
    except FerryError as error:
        return str(error)
    if journal is None:
        return None
    try:
        with FileLock(str(model_dir.lock_path), timeout=0):
            return str(unfinished_error(model_dir, journal))
    except Timeout:
        record = journal.record
        return f"deploy {journal.deploy_id or '(starting)'} ({record.target}) is running, at step {record.step}"


def _drift(report: ModelStatus) -> str | None:
    if report.triton is None or report.current_error:
        return UNKNOWN  # Triton did not answer, or current.json cannot be read
    committed = [report.current.active_version] if report.current else []
    if report.serving == committed:
        return None
    return f"current.json names {committed or 'no version'}, Triton serves {report.serving or 'nothing'}"
