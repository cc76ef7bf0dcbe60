"""A trigger (an alias move to deploy), what deploys it, and the file every ended trigger is written to."""

from __future__ import annotations

import json
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ferry.adapters.watch.logs import log
from ferry.core.fsutil import atomic_write
from ferry.core.records import utc_stamp

TRIGGERS_KEPT = 1000  # ended triggers kept in triggers.jsonl (the file is trimmed to this at twice as many)


@dataclass
class Trigger:
    model: str
    alias: str
    version: int  # what the alias named when it moved: the deploy goes ahead only while it still does
    source: str  # webhook | poll
    key: str  # the delivery id, or poll-v<N>-<UTC> (an Airflow run's id is derived from it)
    received_at_utc: str = field(default_factory=utc_stamp)
    state: str = "queued"  # queued | running | done | superseded | dropped
    outcome: str = ""
    detail: str = ""
    finished_at_utc: str = ""

    @property
    def label(self) -> str:
        return f"{self.model}@{self.alias} (v{self.version}) [{self.source} {self.key}]"


class Deployer(Protocol):
    via: str

    def run(self, trigger: Trigger) -> tuple[str, str]:
        """Deploy what the trigger names; ``(outcome, one-line detail)``."""
        ...


class TriggerLog:
    """Every ended trigger as one JSON line in ``path``, the newest ``keep`` of them kept across restarts."""

    def __init__(self, path: Path | None, keep: int = TRIGGERS_KEPT) -> None:
        self.path, self.keep = path, keep
        self._lock = threading.Lock()
        self._lines = len(self.read())

    def read(self) -> list[dict[str, Any]]:
        """The records, oldest first (a line torn by a crash is skipped)."""
        if self.path is None or not self.path.exists():
            return []
        records = []
        for line in self.path.read_text(errors="replace").splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                continue
        return records

    def append(self, trigger: Trigger) -> None:
        if self.path is None:
            return
        line = json.dumps(asdict(trigger), sort_keys=True) + "\n"
        with self._lock:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                with open(self.path, "a") as handle:
                    handle.write(line)
                self._lines += 1
                if self._lines > 2 * self.keep:
                    kept = self.path.read_text(errors="replace").splitlines(keepends=True)[-self.keep:]
                    atomic_write(self.path, "".join(kept).encode(), durable=False)
                    self._lines = len(kept)
            except OSError as error:
                log.warning("%s: not written to %s (%s); /triggers and this log still have it", trigger.label,
                            self.path, error)
