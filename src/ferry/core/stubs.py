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
    wanted = {str(version_dir / "model.py").encode(), str(version_dir.resolve() / "model.py").encode()}
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if len(argv) > 1 and argv[0].endswith(STUB_NAME.encode()) and argv[1] in wanted:
            pids.append(int(entry.name))
    return pids


def stop_stubs_of(version_dir: Path) -> int:
    """SIGKILL the stubs of one version; returns how many were found."""
    pids = stubs_of(version_dir)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return len(pids)
