"""A lean `mlflow server` on sqlite for the write-back and watch tests, and what it shows of ferry's write-back."""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import World
from support.processes import free_port, stop_group, wait_healthy

BIN = Path(sys.executable).parent


@dataclass
class MlflowServer:
    """`mlflow server` on 127.0.0.1 with a sqlite backend, lean (one worker, no job runner), able to send
    webhooks to a loopback receiver over plain http, with its webhook list cached for 1 s only."""

    home: Path
    port: int = field(default_factory=free_port)
    key: str = field(default_factory=lambda: base64.urlsafe_b64encode(os.urandom(32)).decode())
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        return {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true",
                "MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http,https", "MLFLOW_WEBHOOK_CACHE_TTL": "1",
                "MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY": self.key}

    def start(self, timeout_s: float = 90.0) -> MlflowServer:
        self.home.mkdir(parents=True, exist_ok=True)
        log = open(self.home / "mlflow-server.log", "ab")  # noqa: SIM115 - the server's output until it stops
        self.process = subprocess.Popen(
            [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{self.home / 'mlflow.db'}",
             "--artifacts-destination", str(self.home / "artifacts"), "--host", "127.0.0.1", "--port", str(self.port),
             "--workers", "1"], env=self.env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        log.close()
        wait_healthy(self.process, f"{self.url}/health", self.home / "mlflow-server.log", timeout_s, "mlflow server")
        return self

    def stop(self) -> None:
        stop_group(self.process, grace_s=15)  # the group this test started: the server and its worker

    def pause(self, paused: bool) -> None:
        """Stop answering (connections still accepted by the kernel) or answer again."""
        assert self.process is not None
        os.killpg(self.process.pid, signal.SIGSTOP if paused else signal.SIGCONT)

    def client(self):
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=self.url, registry_uri=self.url)


@pytest.fixture
def mlflow_server(tmp_path: Path) -> Iterator[MlflowServer]:
    server = MlflowServer(tmp_path / "mlflow-server").start()
    try:
        yield server
    finally:
        server.stop()


def on_server(world: World, server: MlflowServer) -> World:
    world.settings = world.settings.with_overrides(tracking_uri=server.url)
    return world


def ferry_tags(server: MlflowServer, model: str, version: int) -> dict[str, str]:
    tags = server.client().get_model_version(model, str(version)).tags
    return {k: v for k, v in tags.items() if k.startswith("ferry.")}


def serving_version(server: MlflowServer, model: str, alias: str = "serving") -> int | None:
    aliases = server.client().get_registered_model(model).aliases
    return int(aliases[alias]) if alias in aliases else None
