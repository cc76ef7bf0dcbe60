"""The triton flavor on a real Triton: a Python-backend model directory logged to MLflow, its per-version
config proven at the load, committed with current.json and restored by a rollback; its failures."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from train_triton_model import train_and_register

from conftest import World, assert_invariants, make_settings
from ferry.core.current import read_current, read_history
from ferry.core.front import store_name
from ferry.core.model_config import config_digest
from ferry.core.triton import API_KEY_HEADER
from ferry.runtime import server

MODEL = "iris_py"


class TritonWorld(World):
    def register_triton(self, breakage: str = "none", batching: bool = False) -> int:
        return train_and_register(self.model, "champion", breakage, batching, self.settings.tracking_uri)


@pytest.fixture(scope="module")
def flavor(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TritonWorld]:
    settings = make_settings(tmp_path_factory.mktemp("flavor"))
    server.up(settings)
    try:
        yield TritonWorld(settings, model=MODEL)
    finally:
        server.down(settings, grace_s=0)


def triton_config(world: World, name: str) -> dict:
    reply = httpx.get(f"{world.settings.triton.urls}/v2/models/{name}/config", timeout=10)
    assert reply.status_code == 200, reply.text
    return reply.json()


def instances(config: dict) -> int:
    return sum(int(group.get("count", 1)) for group in config.get("instance_group", []))


def assert_flavor_invariants(world: World, attempts: int) -> None:
    """conftest's invariants, and that the active version is a Triton model directory whose config is the one
    config.pbtxt and current.json name."""
    assert_invariants(world, attempts)
    current = read_current(world.model_dir)
    assert current is not None
    manifest = json.loads((world.model_dir.version_dir(current.active_version) / "ferry.json").read_text())
    pinned = config_digest(world.model_dir.read_config_text() or "")
    assert manifest["flavor"] == "triton" and pinned == manifest["config_sha256"] == current.config_sha256


def test_a_config_change_is_committed_and_rolled_back_with_its_version(flavor: TritonWorld) -> None:
    flavor.register_triton()
    first = flavor.deploy()
    assert first.outcome == "committed", first.error
    assert "smoke" in first.steps
    before = triton_config(flavor, MODEL)
    assert before["max_batch_size"] == 0 and before["platform"] == "ensemble"
    assert triton_config(flavor, store_name(MODEL, 1))["max_batch_size"] == 0
    assert_flavor_invariants(flavor, attempts=1)

    flavor.register_triton(batching=True)
    second = flavor.deploy()
    assert second.outcome == "committed" and second.version == 2, second.error
    assert triton_config(flavor, MODEL)["max_batch_size"] == 8
    store = triton_config(flavor, store_name(MODEL, 2))
    assert store["max_batch_size"] == 8 and instances(store) == 2 and "dynamic_batching" in store
    assert "max_batch_size: 8" in (flavor.model_dir.read_config_text() or "")
    assert_flavor_invariants(flavor, attempts=2)
    diff = flavor.cli("diff", MODEL, "1", "2")
    assert diff.returncode == 0, diff.stderr
    assert "+max_batch_size: 8" in diff.stdout and "compatible: v2 keeps the inputs and outputs" in diff.stdout

    back = flavor.cli("rollback", MODEL)
    assert back.returncode == 0, back.stderr
    assert read_current(flavor.model_dir).active_version == 1
    assert triton_config(flavor, MODEL)["max_batch_size"] == 0
    assert triton_config(flavor, store_name(MODEL, 1))["max_batch_size"] == 0
    assert "max_batch_size: 8" not in (flavor.model_dir.read_config_text() or "")
    assert_flavor_invariants(flavor, attempts=3)
    again = flavor.cli("rollback", MODEL, "--to", "2")
    assert again.returncode == 0, again.stderr
    assert triton_config(flavor, MODEL)["max_batch_size"] == 8
    assert_flavor_invariants(flavor, attempts=4)


def serving_with_batching(world: TritonWorld) -> None:
    """What the tests after the first start from (and make themselves when xdist runs them on another worker):
    a version with Triton's batching committed."""
    current = read_current(world.model_dir)
    if current is None or "max_batch_size: 8" not in (world.model_dir.read_config_text() or ""):
        world.register_triton(batching=True)
        assert world.deploy().outcome == "committed"


BROKEN = [
    ("init-raises", "load", "weights.npz holds coef"),
    ("bad-backend", "load", "onnxruntime"),
    ("rename-output", "materialize", "probabilit"),
    ("golden-mismatch", "smoke", "differs from the golden output"),
]


@pytest.mark.parametrize(("breakage", "step", "message"), BROKEN)
def test_a_broken_version_fails_at_its_step_and_v2_keeps_its_config(flavor: TritonWorld, breakage: str, step: str,
                                                                    message: str) -> None:
    serving_with_batching(flavor)
    attempts = len(read_history(flavor.model_dir)) + 1
    active = read_current(flavor.model_dir).active_version
    broken = flavor.register_triton(breakage, batching=True)
    report = flavor.deploy()
    assert report.outcome == "rolled_back" and report.failed_step == step, report.error
    assert message in report.error and "\n" not in report.error, report.error
    if breakage == "rename-output":
        assert "--allow-signature-change" in (report.hint or ""), report.hint
    assert read_current(flavor.model_dir).active_version == active
    assert triton_config(flavor, MODEL)["max_batch_size"] == 8
    record = read_history(flavor.model_dir)[-1]
    assert record["version"] == broken and record["failed_step"] == step and "\n" not in record["error"]
    for folder in report.rollback.quarantined:
        kept = flavor.model_dir.quarantine_root / folder.rsplit("/", 1)[1]
        reason = json.loads((kept / "reason.json").read_text())
        assert message in (reason.get("detail") or "") + reason["error"]
        manifest = json.loads((kept / "ferry.json").read_text())  # the config it brought is kept for analysis
        assert manifest["version"] == broken and manifest["config_pbtxt"], manifest
    assert_flavor_invariants(flavor, attempts=attempts)


def test_a_signature_change_asked_for_is_committed_and_rolled_back(flavor: TritonWorld) -> None:
    serving_with_batching(flavor)
    attempts = len(read_history(flavor.model_dir))
    renamed = flavor.register_triton("rename-output", batching=True)
    served = read_current(flavor.model_dir).active_version
    asked = flavor.cli("deploy", MODEL, "--alias", "champion", "--allow-signature-change")
    assert asked.returncode == 0, asked.stderr
    assert read_current(flavor.model_dir).active_version == renamed
    assert [o["name"] for o in triton_config(flavor, MODEL)["output"]] == ["probability"]
    assert_flavor_invariants(flavor, attempts=attempts + 1)
    diff = flavor.cli("diff", MODEL, str(served), str(renamed))
    assert diff.returncode == 0, diff.stderr
    assert "breaks clients" in diff.stdout and "probabilit" in diff.stdout and "compatible" not in diff.stdout
    back = flavor.cli("rollback", MODEL)
    assert back.returncode == 0, back.stderr
    assert f"has another signature than v{renamed}" in back.stderr, back.stderr
    assert [o["name"] for o in triton_config(flavor, MODEL)["output"]] == ["probabilities"]
    assert_flavor_invariants(flavor, attempts=attempts + 2)


def test_a_version_logged_as_nvidias_plugin_logs_it_deploys_through_mlflow_deployments(tmp_path: Path) -> None:
    """MLmodel + <dir>/config.pbtxt + <dir>/1/..., no smoke.json: ferry's smoke infers zeros shaped from the config."""
    import mlflow
    import numpy as np
    from mlflow.models import Model
    from sklearn.datasets import load_iris
    from train_model import use_experiment
    from train_triton_model import build_model_dir, train

    from conftest import start_fleet, stop_fleet
    from ferry.publish import register_version
    from test_mlflow_plugin import deployments

    world = start_fleet(tmp_path, 1)
    world.model = "iris_plugin"
    try:
        features, labels = load_iris(return_X_y=True)
        mlflow.set_tracking_uri(world.settings.tracking_uri)
        use_experiment("plugin")
        with mlflow.start_run() as run:
            folder = tmp_path / "logged"
            build_model_dir(folder, world.model, train(labels, features.astype(np.float32)))
            model = Model(artifact_path="triton", run_id=run.info.run_id)
            model.add_flavor("triton", data=world.model)
            model.save(str(folder / "MLmodel"))
            mlflow.log_artifacts(str(folder), artifact_path="triton")
        register_version(world.model, f"runs:/{run.info.run_id}/triton", run.info.run_id, "champion",
                         tracking_uri=world.settings.tracking_uri)
        created = deployments(world, "create", "-t", "ferry", "--name", world.model, "-m",
                              f"models:/{world.model}@champion")
        assert created.returncode == 0, created.stderr
        assert read_current(world.model_dir).active_version == 1
        assert not (world.model_dir.version_dir(1) / "smoke.json").exists()
        assert_flavor_invariants(world, attempts=1)
    finally:
        stop_fleet(world)


def test_a_fleet_of_two_commits_a_config_change_on_both(tmp_path: Path) -> None:
    from conftest import replica_settings, start_fleet, stop_fleet

    world = start_fleet(tmp_path, 2)
    flavor = TritonWorld(world.settings, model=MODEL)
    try:
        flavor.register_triton()
        assert flavor.deploy().outcome == "committed"
        flavor.register_triton(batching=True)
        report = flavor.deploy()
        assert report.outcome == "committed" and report.version == 2, report.error
        for replica in replica_settings(world.settings):
            reply = httpx.get(f"{replica.triton.urls}/v2/models/{store_name(MODEL, 2)}/config", timeout=10,
                              headers={API_KEY_HEADER: "fleet-key"})
            assert reply.status_code == 200, reply.text
            assert reply.json()["max_batch_size"] == 8 and instances(reply.json()) == 2
        assert_flavor_invariants(flavor, attempts=2)
    finally:
        stop_fleet(world)


def test_a_canary_bake_commits_a_config_change(tmp_path: Path) -> None:
    import threading

    from ferry.core.records import RolloutPlan
    from ferry.core.runner import Runner, Target
    from ferry.core.services import Services
    from support.gateway import TOKEN, running_gateway

    settings = make_settings(tmp_path)
    server.up(settings)
    flavor = TritonWorld(settings, model=MODEL)
    try:
        flavor.register_triton()
        assert flavor.deploy().outcome == "committed"
        flavor.register_triton(batching=True)
        with running_gateway(flavor) as gateway:
            stop, answers = threading.Event(), []

            def send() -> None:
                body = {"inputs": [{"name": "X", "shape": [1, 4], "datatype": "FP32", "data": [5.1, 3.5, 1.4, 0.2]}]}
                with httpx.Client(base_url=gateway.url, headers={"Authorization": f"Bearer {TOKEN}"}) as http:
                    while not stop.is_set():
                        answers.append(http.post(f"/v2/models/{MODEL}/infer", json=body, timeout=10).status_code)

            workers = [threading.Thread(target=send, daemon=True) for _ in range(3)]
            for worker in workers:
                worker.start()
            try:
                baked = settings.with_overrides(gateways=gateway.url, gate_interval_s=1.0, gate_min_requests=10,
                                                gate_latency_slack_ms=50.0)
                report = Runner(Services(baked), MODEL).deploy(
                    Target.of_alias("champion", rollout=RolloutPlan(mode="canary", bake_s=3, canary_percent=30)))
            finally:
                stop.set()
                for worker in workers:
                    worker.join(timeout=15)
        assert report.outcome == "committed" and report.version == 2, report.error
        assert "bake" in report.steps and report.gate, report.steps
        assert answers and set(answers) == {200}
        assert triton_config(flavor, MODEL)["max_batch_size"] == 8
        assert_flavor_invariants(flavor, attempts=2)
    finally:
        server.down(settings, grace_s=0)
