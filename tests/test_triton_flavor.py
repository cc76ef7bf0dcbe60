"""The triton flavor on a real Triton: a Python-backend model directory logged to MLflow, its per-version
config proven at the load, committed with current.json and restored by a rollback; its failures."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import pytest
from train_triton_model import train_and_register

from conftest import World, _assert_record_invariants, make_settings
from ferry.core.current import read_current, read_history
from ferry.core.front import store_name
from ferry.core.model_config import config_digest
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
    reply = httpx.get(f"{world.settings.triton_url}/v2/models/{name}/config", timeout=10)
    assert reply.status_code == 200, reply.text
    return reply.json()


def instances(config: dict) -> int:
    return sum(int(group.get("count", 1)) for group in config.get("instance_group", []))


def assert_flavor_invariants(world: World, attempts: int) -> None:
    """conftest's assert_invariants, for a version folder that holds model.py (not model.onnx)."""
    model_dir = world.model_dir
    current = read_current(model_dir)
    assert current is not None
    manifest = json.loads((model_dir.version_dir(current.active_version) / "ferry.json").read_text())
    assert manifest["flavor"] == "triton" and manifest["sha256"] == current.sha256
    for name in manifest["files"]:
        assert (model_dir.version_dir(current.active_version) / name).is_file(), f"{name} is missing"
    for replica in world.ferry.fleet().replicas:
        where = replica.placement(world.model)
        assert where.front == [current.active_version], f"{replica.url}'s front serves {where.front}"
        assert where.store in ([current.active_version], []), f"{replica.url}'s store holds {where.store}"
    policy = list(model_dir.read_config().version_policy.specific.versions)
    assert policy == [current.active_version], f"config.pbtxt pins {policy}"
    pinned = config_digest(model_dir.read_config_text() or "")
    assert pinned == manifest["config_sha256"] == current.config_sha256, "config.pbtxt is not the active config"
    _assert_record_invariants(world, attempts)


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


BROKEN = [
    ("init-raises", "load", "weights.npz holds coef"),
    ("bad-backend", "load", "onnxruntime"),
    ("rename-output", "materialize", "probabilit"),
    ("golden-mismatch", "smoke", "differs from the golden output"),
]


@pytest.mark.parametrize(("breakage", "step", "message"), BROKEN)
def test_a_broken_version_fails_at_its_step_and_v2_keeps_its_config(flavor: TritonWorld, breakage: str, step: str,
                                                                    message: str) -> None:
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
        reason = json.loads((flavor.model_dir.quarantine_root / folder.rsplit("/", 1)[1] / "reason.json").read_text())
        assert message in (reason.get("detail") or "") + reason["error"]
    assert_flavor_invariants(flavor, attempts=attempts)
