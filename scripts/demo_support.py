"""What the Python demos share: ports, printing, running and waiting."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import httpx

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
T = TypeVar("T")


def free_port(block: int = 1) -> int:
    """A port on 127.0.0.1 with ``block - 1`` free ports after it (Triton takes three in a row)."""
    for _ in range(100):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            base = s.getsockname()[1]
        if base + block < 65536 and all(_free(base + i) for i in range(1, block)):
            return base
    raise SystemExit("no free port on 127.0.0.1")


def _free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


def say(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m", flush=True)


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(args, check=True, env=os.environ)


def wait_for(what: str, check: Callable[[], T], timeout_s: float = 120.0) -> T:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if result := check():
                return result
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"{what} did not happen within {timeout_s:g} s")
