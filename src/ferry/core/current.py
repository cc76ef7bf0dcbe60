"""``current.json`` (the committed state of one model) and its append-only history."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ValidationError

from ferry.core.errors import FerryError, InvalidInput
from ferry.core.fsutil import append_line, atomic_write
from ferry.core.records import CurrentState, DeployReport
from ferry.core.repository import ModelDir

T = TypeVar("T")
R = TypeVar("R", bound=BaseModel)


def read_current(model_dir: ModelDir) -> CurrentState | None:
    try:
        raw = model_dir.current_path.read_text()
    except FileNotFoundError:
        return None
    try:
        return CurrentState.model_validate_json(raw)
    except ValidationError as error:
        raise InvalidInput(
            f"{model_dir.current_path} is unreadable ({error.errors()[0]['msg']}); "
            "ferry will not guess the active version",
            f"restore it from the last 'committed' line of {model_dir.history_path.name} "
            "(its 'current' field is the file's content), then run the command again",
        ) from None


def write_current(model_dir: ModelDir, state: CurrentState) -> None:
    atomic_write(model_dir.current_path, (state.model_dump_json(indent=2) + "\n").encode())


def restore_current(model_dir: ModelDir, snapshot: CurrentState | None) -> bool:
    """Put current.json back as the snapshot had it; True when something had to change."""
    if snapshot is None:
        existed = model_dir.current_path.exists()
        model_dir.current_path.unlink(missing_ok=True)
        return existed
    try:
        if read_current(model_dir) == snapshot:
            return False
    except FerryError:
        pass  # a damaged file is exactly what must be replaced
    write_current(model_dir, snapshot)
    return True


def append_history(model_dir: ModelDir, report: DeployReport) -> None:
    model_dir.state_dir.mkdir(parents=True, exist_ok=True)
    append_line(model_dir.history_path, json.dumps(report.model_dump(mode="json"), sort_keys=True))


def _lines(path: Path) -> list[str]:
    try:
        return path.read_text().splitlines()
    except FileNotFoundError:
        return []


def read_records(path: Path, kind: type[R]) -> list[R]:
    """Every line of a JSON-lines file ferry appends to, as typed records; a line that is not one is skipped."""
    records = []
    for line in _lines(path):
        try:
            records.append(kind.model_validate_json(line))
        except ValueError:
            continue
    return records


def _latest(records: list[T], limit: int | None) -> list[T]:
    return records if limit is None else records[len(records) - limit:] if limit > 0 else []


def read_history(model_dir: ModelDir, limit: int | None = None) -> list[dict[str, Any]]:
    """The latest ``limit`` records (all when None) as written, for showing them as they are; a damaged line
    is skipped, not fatal. Code that acts on the history reads :func:`read_attempts`."""
    records = []
    for line in _lines(model_dir.history_path):
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return _latest(records, limit)


def read_attempts(model_dir: ModelDir, limit: int | None = None) -> list[DeployReport]:
    """The latest ``limit`` attempts (all when None) as typed records; a line that is not one is skipped."""
    return _latest(read_records(model_dir.history_path, DeployReport), limit)


def find_attempt(model_dir: ModelDir, deploy_id: str) -> DeployReport | None:
    """The history record of one deploy, if it was written."""
    return next((r for r in reversed(read_attempts(model_dir)) if r.deploy_id == deploy_id), None)
