"""Fault injection, not ferry: the ferry CLI with a SIGKILL planted at one point of the deploy.

    python fake_crash_deploy.py POINT ferry-arguments...

A real crash (the OOM killer, `kill -9`, a node lost) cannot be aimed at a step boundary on
demand; this process kills itself there, exactly as such a crash would stop it.
"""

from __future__ import annotations

import os
import signal
import sys

import ferry.core.journal
import ferry.core.runner
import ferry.core.steps
import ferry.core.undo
from ferry.adapters.cli import app
from ferry.core.repository import ModelDir

# point -> (where the function lives, its name, kill before or after it runs)
POINTS = {
    "before-snapshot": (ferry.core.steps, "take_snapshot", "before"),
    "before-materialize": (ferry.core.steps, "materialize", "before"),
    "inside-materialize": (ModelDir, "publish_version", "before"),  # staged in full, not renamed into place
    "after-publish": (ModelDir, "publish_version", "after"),  # the version exists, the journal does not name it yet
    "before-load": (ferry.core.steps, "load", "before"),
    "after-load": (ferry.core.steps, "load", "after"),
    "before-smoke": (ferry.core.steps, "smoke", "before"),
    "before-commit": (ferry.core.steps, "commit", "before"),
    "inside-commit": (ferry.core.steps, "write_current", "after"),  # committed, Triton not yet pinned to it
    "after-commit": (ferry.core.runner, "append_history", "before"),
    "after-history": (ferry.core.journal.Journal, "remove", "before"),
    "inside-rollback": (ferry.core.undo, "serve_only_active", "before"),  # current.json restored, Triton not yet
}


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


def plant(point: str) -> None:
    owner, name, when = POINTS[point]
    original = getattr(owner, name)

    def crashing(*args, **kwargs):
        if when == "before":
            die()
        result = original(*args, **kwargs)
        die()
        return result

    setattr(owner, name, crashing)


if __name__ == "__main__":
    plant(sys.argv[1])
    sys.argv = ["ferry", *sys.argv[2:]]
    app()
