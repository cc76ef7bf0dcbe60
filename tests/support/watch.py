"""`ferry watch` run as its own process, as an operator runs it, for the tests that drive it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from conftest import World
from support.processes import free_port


@dataclass
class Watcher:
    """`ferry watch` run as its own process, as an operator runs it."""

    process: subprocess.Popen
    url: str
    log: Path

    def triggers(self) -> list[dict]:
        return httpx.get(f"{self.url}/triggers", timeout=5).json()

    def wait_done(self, count: int, timeout_s: float = 180.0) -> list[dict]:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            done = [t for t in self.triggers() if t["state"] == "done"]
            if len(done) >= count:
                return done
            assert self.process.poll() is None, self.log.read_text()[-3000:]
            time.sleep(0.3)
        raise AssertionError(f"{count} triggers not done in {timeout_s:g} s: {self.triggers()}\n"
                             f"{self.log.read_text()[-3000:]}")

    def metrics(self) -> str:
        return httpx.get(f"{self.url}/metrics", timeout=5).text

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)


def start_watch(world: World, *args: str, port: int | None = None, name: str = "watch") -> Watcher:
    port = port or free_port()
    log = world.settings.home / f"{name}.log"
    process = subprocess.Popen([sys.executable, "-m", "ferry", "watch", "--port", str(port), *args],
                               env={**os.environ, **world.env()}, stdout=open(log, "ab"),  # noqa: SIM115
                               stderr=subprocess.STDOUT)
    watcher = Watcher(process, f"http://127.0.0.1:{port}", log)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        assert process.poll() is None, log.read_text()[-3000:]
        try:
            if httpx.get(f"{watcher.url}/healthz", timeout=2).status_code == 200:
                return watcher
        except httpx.HTTPError:
            time.sleep(0.3)
    watcher.stop()
    raise AssertionError(f"ferry watch did not start: {log.read_text()[-3000:]}")


@pytest.fixture
def watchers() -> Iterator[list[Watcher]]:
    started: list[Watcher] = []
    yield started
    for watcher in started:
        watcher.stop()
