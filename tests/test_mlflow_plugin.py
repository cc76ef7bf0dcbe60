"""`mlflow deployments ... -t ferry`: through MLflow's own command line and its Python client, on real MLflow
(sqlite) and a real Triton."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow.deployments import PredictionsResponse, get_deploy_client
from mlflow.exceptions import MlflowException
from sklearn.datasets import load_iris

from conftest import World, assert_invariants
from ferry.core.current import read_current, read_history

MLFLOW = Path(sys.executable).parent / "mlflow"
FEATURES = load_iris().data.astype(np.float32)[[0, 60, 120]]  # one of each class
LABELS = [0, 1, 2]


def deployments(world: World, *args: str, drop: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    """`mlflow deployments <args>` in the world's environment (without the variables in ``drop``)."""
    env = {**os.environ, **world.env()}
    for name in drop:
        env.pop(name, None)
    return subprocess.run([str(MLFLOW), "deployments", *args], env=env, cwd=world.settings.home,
                          capture_output=True, text=True, timeout=180)


def last_line(process: subprocess.CompletedProcess) -> str:
    return process.stderr.strip().splitlines()[-1]


def test_the_mlflow_command_line_deploys_through_ferry(world: World, tmp_path: Path) -> None:
    world.register()
    url = world.settings.triton.urls
    created = deployments(world, "create", "-t", "ferry", "--name", "iris", "-m", "models:/iris@champion",
                          "-C", f"triton_url={url}", "-C", "load_timeout_s=30", drop=("FERRY_TRITON_URL",))
    assert created.returncode == 0, created.stderr
    assert "onnx deployment iris is created" in created.stdout
    assert read_current(world.model_dir).active_version == 1

    world.register("output-shape")  # v2, caught at smoke
    updated = deployments(world, "update", "-t", "ferry", "--name", "iris", "-m", "models:/iris@champion")
    assert updated.returncode != 0
    reason = last_line(updated)
    assert "MlflowException: failed at smoke: " in reason and "output 'probabilities' has shape [3, 4]" in reason
    assert "v1 still active and serving; quarantined: " in reason
    assert_invariants(world, attempts=2)

    got = deployments(world, "get", "-t", "ferry", "--name", "iris")
    assert got.returncode == 0, got.stderr
    for line in ("name: iris", "active_version: 1", "serving: [1]", "replicas_serving: 1", "drift: None",
                 "quarantined: 1"):
        assert line in got.stdout.splitlines()
    listed = deployments(world, "list", "-t", "ferry")
    assert listed.returncode == 0 and "'name': 'iris'" in listed.stdout and "'active_version': 1" in listed.stdout

    request = tmp_path / "input.json"
    request.write_text(json.dumps({"X": FEATURES.tolist()}))  # read by MLflow as a DataFrame: column X, a row each
    predicted = deployments(world, "predict", "-t", "ferry", "--name", "iris", "-I", str(request))
    assert predicted.returncode == 0, predicted.stderr
    answer = json.loads(predicted.stdout.strip().splitlines()[-1])
    assert (answer["model"], answer["version"], answer["predictions"]["label"]) == ("iris", 1, LABELS)

    bad_key = deployments(world, "delete", "-t", "ferry", "--name", "iris", "-C", "confirm=true", "-C", "bogus=1")
    assert bad_key.returncode != 0
    assert "unknown -C key 'bogus' for -t ferry; valid keys" in last_line(bad_key)
    assert "load_timeout_s" in last_line(bad_key) and "triton_url" in last_line(bad_key)
    assert read_current(world.model_dir) is not None

    deleted = deployments(world, "delete", "-t", "ferry", "--name", "iris", "-C", "confirm=true")
    assert deleted.returncode == 0, deleted.stderr
    assert "Deployment iris is deleted" in deleted.stdout
    assert_retired(world, version=1, attempts=2)


def assert_retired(world: World, version: int, attempts: int) -> None:
    """Nothing committed, nothing served; the versions' files, the history and the retired current.json stay."""
    model_dir = world.model_dir
    assert not model_dir.current_path.exists()
    assert world.ferry.triton.ready_versions(world.model) == []
    assert (model_dir.version_dir(version) / "model.onnx").is_file()
    assert len(read_history(model_dir)) == attempts
    kept = sorted((model_dir.state_dir / "retired").glob(f"*-v{version}.json"))
    assert kept and json.loads(kept[-1].read_text())["current"]["active_version"] == version
    assert not model_dir.journal_path.exists()


def log_copy_of(source: str, tracking_uri: str) -> str:
    """A new run holding the same files as ``source`` (a runs:/ URI), not registered anywhere."""
    mlflow.set_tracking_uri(tracking_uri)
    with tempfile.TemporaryDirectory() as folder:
        files = mlflow.artifacts.download_artifacts(artifact_uri=source, dst_path=folder)
        mlflow.set_experiment("ferry-examples")  # its artifacts live beside the database
        with mlflow.start_run() as run:
            mlflow.log_artifacts(files, artifact_path="onnx")
    return f"runs:/{run.info.run_id}/onnx"


def test_the_python_client_deploys_predicts_and_retires(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in world.env().items():
        monkeypatch.setenv(name, value)
    client = get_deploy_client("ferry")
    world.register()
    created = client.create_deployment("iris", "models:/iris@champion")
    assert (created["name"], created["outcome"], created["version"]) == ("iris", "committed", 1)
    with pytest.raises(MlflowException, match="deployment 'iris' exists: v1 is committed") as exists:
        client.create_deployment("iris", "models:/iris@champion")
    assert exists.value.error_code == "RESOURCE_ALREADY_EXISTS"

    world.register("unknown-op")  # v2, caught at load
    with pytest.raises(MlflowException) as failed:
        client.update_deployment("iris", "models:/iris@champion")
    assert failed.value.message.startswith("failed at load: Triton could not load v2")
    assert "(v1 still active and serving; quarantined: " in failed.value.message
    assert "\n" not in failed.value.message
    status = client.get_deployment("iris")
    observed = (status["active_version"], status["serving"], status["replicas_serving"], status["drift"])
    assert observed == (1, [1], 1, None)
    assert status["run_id"] == read_current(world.model_dir).run_id

    predictions = client.predict("iris", pd.DataFrame(FEATURES, columns=["a", "b", "c", "d"]))
    assert isinstance(predictions, PredictionsResponse)
    assert (predictions["version"], predictions["predictions"]["label"]) == (1, LABELS)
    assert predictions.get_predictions()["label"].tolist() == LABELS
    assert client.predict("iris", {"X": FEATURES})["predictions"]["label"] == LABELS
    assert client.predict("iris", [FEATURES])["predictions"]["label"] == LABELS
    with pytest.raises(MlflowException, match="input 'X' has shape \\[3, 2\\], the model takes \\[-1, 4\\]"):
        client.predict("iris", {"X": FEATURES[:, :2]})

    source = world.ferry.registry.get_version("iris", 1).source
    new_run = log_copy_of(source, world.settings.tracking_uri)
    from_run = client.update_deployment("iris", new_run)
    assert (from_run["outcome"], from_run["version"], from_run["registered_version"]) == ("committed", 3, 3)
    again = client.update_deployment("iris", new_run)  # the version registered from that run is reused
    assert (again["outcome"], again["version"]) == ("noop", 3)
    back = client.update_deployment("iris", "models:/iris/1", config={"load_timeout_s": "20"})
    assert (back["outcome"], back["version"], back["previous_version"]) == ("committed", 1, 3)
    with pytest.raises(MlflowException, match="v2 failed its last deploy"):
        client.update_deployment("iris", "models:/iris/2")
    with pytest.raises(MlflowException, match="names model 'wine', the deployment is 'iris'"):
        client.update_deployment("iris", "models:/wine/1")
    with pytest.raises(MlflowException, match=r"unknown -C key 'triton' for -t ferry; valid keys .*triton_url"):
        client.update_deployment("iris", "models:/iris/1", config={"triton": "http://127.0.0.1:1"})
    assert [d["name"] for d in client.list_deployments()] == ["iris"]
    assert_invariants(world, attempts=6)

    with pytest.raises(MlflowException, match="add -C confirm=true"):
        client.delete_deployment("iris")
    client.delete_deployment("iris", config={"confirm": "true"})
    assert_retired(world, version=1, attempts=6)
    client.delete_deployment("iris", config={"confirm": True})  # idempotent
    assert client.list_deployments() == []
    with pytest.raises(MlflowException, match="no deployment 'iris'") as missing:
        client.get_deployment("iris")
    assert missing.value.error_code == "RESOURCE_DOES_NOT_EXIST"
    with pytest.raises(MlflowException, match="has no committed version"):
        client.predict("iris", {"X": FEATURES})

    mlflow.deployments.run_local("ferry", "iris", "models:/iris/3")  # the world's Triton already runs
    assert read_current(world.model_dir).active_version == 3
    assert world.ferry.triton.ready_versions("iris") == [3]
