"""Python-backend stub processes on this host.

A candidate whose stub never finishes ``initialize`` keeps its load (and every later load of
the same model) waiting forever. Triton's API cannot cancel a load, but when the stub dies the
load fails and Triton moves on. This only reaches a Triton on the same host as ferry.
"""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

STUB_NAME = "triton_python_backend_stub"


def stubs_of(version_dir: Path) -> list[int]:
    """PIDs of the stubs running ``<version_dir>/model.py``."""
    # Triton names the file by the path it loaded the model from: the store's link, for ferry's models.
    wanted = os.fsencode(version_dir.resolve() / "model.py")
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if len(argv) > 1 and argv[0].endswith(STUB_NAME.encode()) and _resolved(argv[1]) == wanted:
            pids.append(int(entry.name))
    return pids


def _resolved(path: bytes) -> bytes:
    try:
        return os.fsencode(Path(os.fsdecode(path)).resolve())
    except (OSError, RuntimeError):  # a path that cannot be resolved is not the one looked for
        return path


def stop_stubs_of(version_dir: Path) -> int:
    """SIGKILL the stubs of one version; returns how many were found."""
    pids = stubs_of(version_dir)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return len(pids)
