"""The deploy journal: ``.ferry/<model>/journal.json``, present exactly while a deploy is unfinished.

Every deploy (the CLI's in one process, the DAG's across its task processes) creates it
exclusively before it touches anything, and records each step before the step acts: the
snapshot, then ``step`` set to the step about to run, the candidate once staged, a failure once
seen, ``rollback`` before undoing. The history record is written before the journal is removed.
So if the deploying process dies at any point, the journal says what to undo or to finish, and
``ferry recover`` does it (:mod:`ferry.core.runner`); while it exists, every other deploy of the
model is refused.

Its content is a :class:`~ferry.core.records.JournalRecord`; this module is the only reader and writer.
Writes replace the file atomically but are not fsynced: what a killed process wrote is in the
page cache and survives it. A machine crash restarts Triton too, and ``ferry reconcile`` rebuilds
what it serves from ``current.json``, which is fsynced.
"""

from __future__ import annotations

import os
import socket
from typing import Any

from pydantic import ValidationError

from ferry.core.errors import Busy, InvalidInput
from ferry.core.fsutil import atomic_write
from ferry.core.records import JournalRecord, Step
from ferry.core.repository import ModelDir


class Journal:
    def __init__(self, model_dir: ModelDir, record: JournalRecord) -> None:
        self.model_dir = model_dir
        self.record = record

    @property
    def deploy_id(self) -> str:
        return self.record.deploy_id

    @classmethod
    def create(cls, model_dir: ModelDir, record: JournalRecord) -> Journal:
        """Start a deploy's journal; refuse if the model has one already (a deploy in flight or one that died)."""
        model_dir.state_dir.mkdir(parents=True, exist_ok=True)
        journal = cls(model_dir, record)
        # Written in full beside it, then linked into place: link() is atomic and fails if the name exists
        # (on NFS too), so the journal is never seen empty and two deploys cannot both create it.
        draft = model_dir.journal_path.with_name(f".journal.json.new-{os.getpid()}")
        draft.write_bytes(journal.encoded())
        try:
            os.link(draft, model_dir.journal_path)
        except FileExistsError:
            raise unfinished_error(model_dir, read_journal(model_dir)) from None
        finally:
            draft.unlink(missing_ok=True)
        return journal

    def encoded(self) -> bytes:
        return self.record.model_dump_json(indent=1).encode()

    def save(self) -> None:
        atomic_write(self.model_dir.journal_path, self.encoded(), durable=False)

    def update(self, **fields: Any) -> None:
        for name, value in fields.items():
            setattr(self.record, name, value)
        self.save()

    def begin(self, step: Step) -> None:
        """Record the intent: ``step`` is about to act, in this process (a DAG runs each step in its own)."""
        owner = self.record.owner.model_copy(update={"host": socket.gethostname(), "pid": os.getpid()})
        self.update(step=step, owner=owner)

    def remove(self) -> None:
        self.model_dir.journal_path.unlink(missing_ok=True)


def read_journal(model_dir: ModelDir) -> Journal | None:
    try:
        raw = model_dir.journal_path.read_text()
    except FileNotFoundError:
        return None
    try:
        return Journal(model_dir, JournalRecord.model_validate_json(raw))
    except ValidationError as error:
        raise InvalidInput(
            f"the deploy journal {model_dir.journal_path} is damaged ({error.errors()[0]['msg']}); "
            "ferry will not guess what it recorded",
            f"check `ferry status {model_dir.model}`; if current.json and Triton agree, move the journal aside",
        ) from None


def unfinished_error(model_dir: ModelDir, journal: Journal | None) -> Busy:
    """Why a new deploy cannot start while a journal exists, and what to do about it."""
    if journal is None:  # removed between our attempt and our look: it has just finished
        return Busy(f"a deploy of '{model_dir.model}' has just ended", "deploy again")
    record = journal.record
    what = (f"deploy {record.deploy_id or '(starting)'} of '{model_dir.model}' by {record.who} "
            f"since {record.started_at_utc} UTC, at step {record.step}")
    if record.owner.via == "airflow":
        return Busy(f"{what} is in progress (an Airflow run)",
                    f"wait for the run to end; if it is no longer running, run `ferry recover {model_dir.model}`")
    # A CLI deploy holds the model's lock while it runs; whoever sees its journal holds that lock, so it died.
    return Busy(f"{what} did not finish (the deploying process stopped)",
                f"run `ferry recover {model_dir.model}` to finish or undo it, then deploy again")
