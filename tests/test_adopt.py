"""Adopting a repository another tool deployed: checked against MLflow, taken over without a reload."""

from __future__ import annotations

import json
import shutil
from importlib import resources
from pathlib import Path

from conftest import World, assert_invariants
from ferry.core.current import read_current
from ferry.core.model_config import build_config, read_onnx_signature, to_override_json, to_pbtxt, with_versions
from strict_json import loads


def _legacy_repository(world: World) -> None:
    """What a hand-written deploy script leaves: versions 1 and 2 from MLflow, v2 served and named in a
    current.json inside the model directory, a failed v3 beside them, and a v9 MLflow never had."""
    world.register()
    world.register(trees=3)
    ferry, model_dir = world.ferry, world.model_dir
    for version in (1, 2):
        ref = ferry.registry.get_version("iris", version)
        target = model_dir.version_dir(version)
        target.mkdir(parents=True)
        ferry.registry.artifacts(ref).download("model.onnx", target)
        shutil.copyfile(str(resources.files("ferry.runtime") / "onnx_runner.py"), target / "model.py")
    (model_dir.path / "3.failed_20260101T000000").mkdir()
    (model_dir.path / "3.failed_20260101T000000" / "model.onnx").write_bytes(b"broken")
    (model_dir.path / "9").mkdir()
    (model_dir.path / "9" / "model.onnx").write_bytes(b"someone's experiment")
    config = with_versions(build_config("iris", read_onnx_signature(model_dir.version_dir(2) / "model.onnx"),
                                        "python"), [2])
    model_dir.config_path.write_text(to_pbtxt(config))
    run_id = ferry.registry.get_version("iris", 2).run_id
    (model_dir.path / "current.json").write_text(json.dumps(
        {"active_version": 2, "run_id": run_id, "alias": "champion", "updated_at_utc": "20260101T000000"}))
    ferry.triton.load("iris", to_override_json(config))
    assert ferry.triton.ready_versions("iris") == [2]


def test_a_served_model_without_ferrys_state_is_adopted_without_a_reload(world: World) -> None:
    _legacy_repository(world)
    refused = world.cli("deploy", "iris", "--alias", "champion")
    assert refused.returncode == 2 and "Triton serves v2 of 'iris'" in refused.stderr
    assert "ferry adopt iris" in refused.stderr

    dry = world.cli("adopt", "iris", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert "would adopt v2" in dry.stdout and "v9: not in MLflow" in dry.stdout
    assert "3.failed_20260101T000000: move into" in dry.stdout
    assert read_current(world.model_dir) is None and (world.model_dir.path / "current.json").exists()

    loads_before = _loads(world)
    adopted = world.cli("adopt", "iris", "--json")
    assert adopted.returncode == 0, adopted.stderr
    plan = loads(adopted.stdout)
    assert plan["active_version"] == 2 and [v["verdict"] for v in plan["versions"]] == [
        "matches MLflow", "matches MLflow", "not in MLflow"]
    current = read_current(world.model_dir)
    assert (current.active_version, current.alias) == (2, "champion")
    assert world.ferry.triton.ready_versions("iris") == [2] and _loads(world) == loads_before, "nothing reloaded"
    assert not (world.model_dir.path / "3.failed_20260101T000000").exists()
    assert (world.model_dir.path / "9" / "model.onnx").read_bytes() == b"someone's experiment"
    assert (world.model_dir.state_dir / "adopted" / "current.json").exists()
    shutil.rmtree(world.model_dir.path / "9")  # the experiment's owner takes it back
    assert_invariants(world, attempts=1)  # the refused deploy

    import httpx

    from support.gateway import TOKEN, running_gateway

    body = {"inputs": [{"name": "X", "shape": [1, 4], "datatype": "FP32", "data": [5.1, 3.5, 1.4, 0.2]}]}
    auth = {"authorization": f"Bearer {TOKEN}"}
    with running_gateway(world) as gateway:  # the adopted model is not behind a front yet: the gateway calls it
        reply = httpx.post(f"{gateway.url}/v2/models/iris/infer", json=body, headers=auth, timeout=10)
        assert reply.status_code == 200 and reply.json()["model_version"] == "2", reply.text
        assert httpx.get(f"{gateway.url}/readyz", timeout=10).status_code == 200
        world.register(trees=3)  # v3 in MLflow: the failed directory that Triton would have read as v3 is gone
        assert world.deploy().outcome == "committed"  # and now the model is behind a front
        reply = httpx.post(f"{gateway.url}/v2/models/iris/infer", json=body, headers=auth, timeout=10)
        assert reply.status_code == 200 and reply.json()["model_version"] == "3", reply.text
    assert world.ferry.triton.placement("iris").front == [3]
    back = world.cli("rollback", "iris")
    assert back.returncode == 0 and "committed iris v2 (was v3)" in back.stdout, back.stderr
    assert_invariants(world, attempts=3)


def test_adoption_refuses_a_version_mlflow_does_not_vouch_for(world: World) -> None:
    _legacy_repository(world)
    (world.model_dir.version_dir(2) / "model.onnx").write_bytes(
        (world.model_dir.version_dir(1) / "model.onnx").read_bytes())  # v2's file replaced by hand
    result = world.cli("adopt", "iris")
    assert result.returncode == 2 and "v2, differs from MLflow" in result.stderr
    assert read_current(world.model_dir) is None and (world.model_dir.path / "3.failed_20260101T000000").exists()


def _loads(world: World) -> int:
    log = Path(world.settings.triton_dir / "tritonserver.log").read_text(errors="replace")
    return log.count("loading: iris:")


def test_another_tools_marker_does_not_block_what_serves_and_nothing_serving_asks_for_a_version(
        world: World) -> None:
    """The old tool's ``current.json`` in its own shape: a served version decides and the file is only moved
    aside; with nothing served, a marker without a known key is refused with the option to pass instead."""
    _legacy_repository(world)
    marker = json.dumps({"version": 2, "deployed_by": "oldtool"}).encode()
    (world.model_dir.path / "current.json").write_bytes(marker)

    world.ferry.triton.unload("iris")
    (world.model_dir.path / "current.json").write_text('{"deployed_by": "oldtool"}')
    unnamed = world.cli("adopt", "iris")
    assert unnamed.returncode == 2 and "names no version under active_version, version, model_version" in \
        unnamed.stderr and "ferry adopt iris --version N" in unnamed.stderr, unnamed.stderr
    named = world.cli("adopt", "iris", "--dry-run", "--version", "2")
    assert named.returncode == 0 and "would adopt v2" in named.stdout, named.stderr
    assert read_current(world.model_dir) is None, "a dry run changes nothing"

    (world.model_dir.path / "current.json").write_bytes(marker)
    config = world.model_dir.read_config()
    world.ferry.triton.load("iris", to_override_json(config))
    adopted = world.cli("adopt", "iris", "--json")
    assert adopted.returncode == 0, adopted.stderr
    assert loads(adopted.stdout)["active_version"] == 2 and read_current(world.model_dir).active_version == 2
    assert (world.model_dir.state_dir / "adopted" / "current.json").read_bytes() == marker, "kept as it was"
    assert not (world.model_dir.path / "current.json").exists()
    assert world.ferry.triton.ready_versions("iris") == [2]
