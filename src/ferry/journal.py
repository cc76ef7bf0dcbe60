"""The deploy journal: ``.ferry/<model>/journal.json``, present exactly while a deploy is unfinished.

Every deploy (the CLI's in one process, the DAG's across its task processes) creates it
exclusively before it touches anything, and records each step before the step acts: the
snapshot, then ``step`` set to the step about to run, the candidate once staged, a failure once
seen, ``rollback`` before undoing. The history record is written before the journal is removed.
So if the deploying process dies at any point, the journal says what to undo or to finish, and
``ferry recover`` does it (:mod:`ferry.recover`); while it exists, every other deploy of the model
is refused.

Writes replace the file atomically but are not fsynced: what a killed process wrote is in the
page cache and survives it. A machine crash restarts Triton too, and ``ferry reconcile`` rebuilds
what it serves from ``current.json``, which is fsynced.
"""

from __future__ import annotations

import json
import os
import socket
from typing import Any

from ferry.errors import FerryError
from ferry.fsutil import atomic_write
from ferry.repository import ModelDir


def owner(via: str) -> dict[str, Any]:
    """Who writes a journal: ``via`` is "cli" (one process holds the model's lock throughout) or "airflow"."""
    return {"via": via, "host": socket.gethostname(), "pid": os.getpid()}


class Journal:
    def __init__(self, model_dir: ModelDir, record: dict[str, Any]) -> None:
        self.model_dir = model_dir
        self.record = record

    @property
    def deploy_id(self) -> str:
        return self.record.get("deploy_id", "")

    @classmethod
    def create(cls, model_dir: ModelDir, record: dict[str, Any]) -> "Journal":
        """Start a deploy's journal; refuse if the model has one already (a deploy in flight or one that died)."""
        model_dir.state.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(model_dir.journal_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            raise unfinished_error(model_dir, read_journal(model_dir))
        os.close(fd)
        journal = cls(model_dir, record)
        journal.save()
        return journal

    def save(self) -> None:
        atomic_write(self.model_dir.journal_path, json.dumps(self.record, indent=1).encode(), durable=False)

    def update(self, **fields: Any) -> None:
        self.record.update(fields)
        self.save()

    def begin(self, step: str) -> None:
        """Record the intent: ``step`` is about to act."""
        self.update(step=step)

    def remove(self) -> None:
        self.model_dir.journal_path.unlink(missing_ok=True)


def read_journal(model_dir: ModelDir) -> Journal | None:
    try:
        raw = model_dir.journal_path.read_text()
    except FileNotFoundError:
        return None
    try:
        record = json.loads(raw) if raw else {}
    except json.JSONDecodeError as error:
        raise FerryError(
            f"the deploy journal {model_dir.journal_path} is damaged ({error}); ferry will not guess what it recorded",
            f"check `ferry status {model_dir.model}`; if current.json and Triton agree, move the journal aside",
        )
    return Journal(model_dir, record)


def unfinished_error(model_dir: ModelDir, journal: Journal | None) -> FerryError:
    """Why a new deploy cannot start while a journal exists, and what to do about it."""
    record = journal.record if journal else {}
    what = (f"deploy {record.get('deploy_id') or '(starting)'} of '{model_dir.model}' by {record.get('who', 'unknown')} "
            f"since {record.get('started_at_utc', 'unknown')} UTC, at step {record.get('step', 'snapshot')}")
    if record.get("owner", {}).get("via") == "airflow":
        return FerryError(f"{what} is in progress (an Airflow run)",
                          f"wait for the run to end; if it is no longer running, run `ferry recover {model_dir.model}`")
    # A CLI deploy holds the model's lock while it runs; whoever sees its journal holds that lock, so it died.
    return FerryError(f"{what} did not finish (the deploying process stopped)",
                      f"run `ferry recover {model_dir.model}` to finish or undo it, then deploy again")
