"""What every test server needs: a free loopback port, a wait until it answers, a stop of its process group."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now (the kernel's pick)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_healthy(process: subprocess.Popen[bytes], url: str, log: Path, timeout_s: float, what: str) -> None:
    """Until ``url`` answers 200; RuntimeError (with the end of ``log``) if ``process`` exits or time runs out,
    the process group stopped first in the second case."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    stop_group(process, grace_s=5)
    raise RuntimeError(f"{what} not ready within {timeout_s:g} s; see {log}")


def stop_group(process: subprocess.Popen[bytes] | None, grace_s: float) -> None:
    """SIGTERM to the group ``process`` leads (started with start_new_session), SIGKILL after ``grace_s``."""
    if process is None or process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(10)
