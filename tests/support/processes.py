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


def run_demo(script: Path, folder: Path, first_port: int, timeout_s: float = 600) -> subprocess.CompletedProcess[str]:
    """A `make demo-*` script as a user runs it (this Python's `ferry` on PATH), its files under ``folder``,
    its servers' ports from ``first_port``; refuses a demo that did not end well, with the end of its output."""
    import sys

    env = {**os.environ, "FERRY_DEMO_DIR": str(folder), "FERRY_DEMO_PORT": str(first_port),
           "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    result = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True, timeout=timeout_s)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result
