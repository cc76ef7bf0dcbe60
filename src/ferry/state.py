"""``current.json`` (the committed state of one model) and its append-only history."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

from pydantic import BaseModel, ValidationError

from ferry.errors import FerryError
from ferry.fsutil import append_line, atomic_write
from ferry.repository import ModelDir


def utc_stamp(moment: dt.datetime | None = None) -> str:
    """Compact UTC, as consumers of current.json already read it: 20251231T025902."""
    return (moment or dt.datetime.now(dt.timezone.utc)).strftime("%Y%m%dT%H%M%S")


def parse_utc_stamp(stamp: str) -> dt.datetime:
    return dt.datetime.strptime(stamp, "%Y%m%dT%H%M%S").replace(tzinfo=dt.timezone.utc)


class CurrentState(BaseModel):
    active_version: int
    run_id: str
    alias: str | None
    updated_at_utc: str
    model: str
    previous_version: int | None = None
    sha256: str
    deploy_id: str


def read_current(model_dir: ModelDir) -> CurrentState | None:
    try:
        raw = model_dir.current_path.read_text()
    except FileNotFoundError:
        return None
    try:
        return CurrentState.model_validate_json(raw)
    except ValidationError as error:
        raise FerryError(
            f"{model_dir.current_path} is unreadable ({error.errors()[0]['msg']}); ferry will not guess the active version",
            f"restore it from the last 'committed' line of {model_dir.history_path.name} "
            "(its 'current' field is the file's content), then run the command again",
        )


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


def append_history(model_dir: ModelDir, record: dict[str, Any]) -> None:
    model_dir.state.mkdir(parents=True, exist_ok=True)
    append_line(model_dir.history_path, json.dumps(record, sort_keys=True))


def read_history(model_dir: ModelDir, limit: int | None = None) -> list[dict[str, Any]]:
    try:
        lines = model_dir.history_path.read_text().splitlines()
    except FileNotFoundError:
        return []
    records = [json.loads(line) for line in lines if line.strip()]
    return records[-limit:] if limit else records


def find_history(model_dir: ModelDir, deploy_id: str) -> dict[str, Any] | None:
    """The history record of one deploy, if it was written."""
    return next((r for r in reversed(read_history(model_dir)) if r.get("deploy_id") == deploy_id), None)
