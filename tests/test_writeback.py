"""The outcome written back to a real MLflow tracking server (sqlite backend), with a real Triton: the tags
and @serving after a good and a broken version; MLflow stopped or hung after the commit (the commit stands,
the warning is recorded, a rollback stays fast); `ferry sync` repairs it and is idempotent.

``MlflowServer`` is the lean `mlflow server` of the MLflow-loop tests (tests/test_watch.py uses it too).
"""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from conftest import World
from ferry.core.current import read_current, read_history
from ferry.core.writeback import read_write_backs
from strict_json import loads
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


def test_a_good_then_a_broken_version_as_mlflow_shows_them(world: World, mlflow_server: MlflowServer) -> None:
    world = on_server(world, mlflow_server)
    world.register()
    deployed = world.cli("deploy", "iris", "--alias", "champion")
    assert deployed.returncode == 0, deployed.stderr
    current = read_current(world.model_dir)
    assert ferry_tags(mlflow_server, "iris", 1) == {
        "ferry.status": "serving", "ferry.deploy_id": current.deploy_id, "ferry.updated_at_utc": current.updated_at_utc}
    assert serving_version(mlflow_server, "iris") == 1
    assert mlflow_server.client().get_model_version_by_alias("iris", "serving").version == "1"

    world.register("output-shape")
    refused = world.cli("deploy", "iris", "--alias", "champion")
    assert refused.returncode == 1
    record = read_history(world.model_dir)[-1]
    tags = ferry_tags(mlflow_server, "iris", 2)
    assert tags["ferry.status"] == "refused" and tags["ferry.failed_step"] == "smoke"
    assert tags["ferry.deploy_id"] == record["deploy_id"] and tags["ferry.updated_at_utc"] == record["finished_at_utc"]
    assert "output 'probabilities' has shape [3, 4]" in tags["ferry.error"] and "\n" not in tags["ferry.error"]
    assert serving_version(mlflow_server, "iris") == 1, "@serving stays on what serves"
    assert ferry_tags(mlflow_server, "iris", 1)["ferry.status"] == "serving"
    assert record["warnings"] == []

    world.register()
    assert world.deploy().outcome == "committed"
    assert serving_version(mlflow_server, "iris") == 3
    retired = ferry_tags(mlflow_server, "iris", 1)
    assert retired == {**retired, "ferry.status": "retired", "ferry.deploy_id": read_current(world.model_dir).deploy_id}
    synced = world.cli("sync", "iris")
    assert synced.returncode == 0 and "already in sync" in synced.stdout, synced.stdout + synced.stderr


def test_mlflow_stopped_after_the_commit_leaves_a_warning_and_sync_repairs_it(world: World,
                                                                               mlflow_server: MlflowServer) -> None:
    from ferry.adapters import dag_steps

    world = on_server(world, mlflow_server)
    world.register()
    assert world.deploy().outcome == "committed"
    world.register()
    ferry = world.ferry
    handle = dag_steps.snapshot_current(ferry, "iris", "champion")
    for step in (dag_steps.materialize_repo, dag_steps.triton_load, dag_steps.triton_ready,
                 dag_steps.triton_infer_smoke):
        handle = step(ferry, handle)
    mlflow_server.stop()
    began = time.monotonic()
    report = dag_steps.commit_current(ferry, handle)
    took = time.monotonic() - began
    assert report["outcome"] == "committed" and read_current(world.model_dir).active_version == 2
    [warning] = report["warnings"]
    assert "was not told of the outcome" in warning and "ferry sync iris" in warning
    assert read_history(world.model_dir)[-1]["outcome"] == "committed", "the attempt's record comes first"
    [told] = [r for r in read_write_backs(world.model_dir) if r.deploy_id == handle["deploy_id"]]
    assert not told.told and told.warnings == [warning]
    assert took < 3, f"the commit waited {took:.1f} s for a stopped MLflow"
    unsynced = world.cli("sync", "iris")
    assert unsynced.returncode == 3 and "was not told of the outcome" in unsynced.stderr, unsynced.stderr

    mlflow_server.start()
    assert serving_version(mlflow_server, "iris") == 1, "MLflow still shows the state before the commit"
    synced = world.cli("sync")
    assert synced.returncode == 0, synced.stdout + synced.stderr
    assert "iris: v2 serving" in synced.stdout and "@serving: v1 -> v2" in synced.stdout
    assert serving_version(mlflow_server, "iris") == 2
    assert ferry_tags(mlflow_server, "iris", 2)["ferry.deploy_id"] == handle["deploy_id"]
    assert ferry_tags(mlflow_server, "iris", 1)["ferry.status"] == "retired"
    again = world.cli("sync", "iris", "--json")
    assert again.returncode == 0 and loads(again.stdout)[0]["changes"] == []


def test_going_back_with_mlflow_hung_stays_fast(world: World, mlflow_server: MlflowServer) -> None:
    from ferry.core.runner import deploy
    from ferry.core.steps import Ferry

    world = on_server(world, mlflow_server)
    world.register()
    world.deploy()
    world.register()
    world.deploy()
    ferry = Ferry(world.settings.with_overrides(writeback_timeout_s=1.0))
    ferry.registry  # noqa: B018 - MLflow's client, built before the clock starts (as after a deploy's materialize)
    mlflow_server.pause(True)
    try:
        began = time.monotonic()
        report = deploy(ferry, "iris", version=1)
        took = time.monotonic() - began
    finally:
        mlflow_server.pause(False)
    assert report.outcome == "committed" and read_current(world.model_dir).active_version == 1, report.error
    [warning] = report.warnings
    assert "was not told of the outcome" in warning and "timeout" in warning.lower(), warning
    assert took < sum(report.steps.values()) + 2.0, f"going back took {took:.1f} s with MLflow hung"
    synced = world.cli("sync", "iris")
    assert synced.returncode == 0 and serving_version(mlflow_server, "iris") == 1, synced.stderr
