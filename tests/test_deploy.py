"""The deploy transaction end to end, on a real Triton and a real MLflow."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import BROKEN_VERSIONS, FAKES, World, assert_invariants, make_settings
from ferry.core.current import read_current, read_history
from ferry.core.errors import FerryError, NoSuchModel
from ferry.core.repository import ModelDir
from ferry.core.runner import deploy
from ferry.core.services import Services


def _infer(world: World, version: int) -> np.ndarray:
    sample = {"X": np.array([[5.1, 3.5, 1.4, 0.2]], dtype=np.float32)}
    return world.ferry.triton.infer(world.model, version, sample, {"X": "FP32"})["probabilities"]


def test_first_deploy_commits_and_serves(world: World) -> None:
    world.register()
    report = world.deploy()
    assert report.outcome == "committed", report.error
    assert report.version == 1 and report.previous_version is None
    assert set(report.steps) == {"snapshot", "materialize", "load", "ready", "smoke", "commit"}
    current = read_current(world.model_dir)
    assert (current.active_version, current.alias, current.model) == (1, "champion", "iris")
    assert len(current.updated_at_utc) == 15 and current.updated_at_utc[8] == "T"
    assert _infer(world, 1).shape == (1, 3)
    assert_invariants(world, attempts=1)


def test_upgrade_commits_new_version_and_retires_old(world: World) -> None:
    world.register()
    world.deploy()
    world.register(trees=5)
    report = world.deploy()
    assert report.outcome == "committed", report.error
    current = read_current(world.model_dir)
    assert (current.active_version, current.previous_version) == (2, 1)
    assert world.model_dir.version_dir(1).is_dir(), "the previous version's files are kept for rollbacks"
    assert_invariants(world, attempts=2)


def test_redeploying_the_active_version_is_a_noop(world: World) -> None:
    world.register()
    world.deploy()
    before = world.current_bytes()
    report = world.deploy()
    assert report.outcome == "noop" and report.ok
    assert "already active" in report.warnings[0]
    assert world.current_bytes() == before
    assert_invariants(world, attempts=2)


@pytest.mark.parametrize(("breakage", "step", "message"), BROKEN_VERSIONS)
def test_broken_version_fails_at_its_step_and_rolls_back(world: World, breakage: str, step: str, message: str) -> None:
    world.register()
    world.deploy()
    before = world.current_bytes()
    broken = world.register(breakage)
    report = world.deploy()
    assert report.outcome == "rolled_back"
    assert report.failed_step == step
    assert message in report.error
    assert report.version == broken
    assert world.current_bytes() == before, "current.json changed although the deploy failed"
    assert report.rollback.verified and report.rollback.serving == [1]
    assert _infer(world, 1).shape == (1, 3), "the active version stopped serving"
    [folder] = report.rollback.quarantined
    assert folder.endswith(f"/quarantine/{broken}.failed_{folder.rsplit('.failed_', 1)[1]}")
    reason = json.loads((world.model_dir.quarantine_root / folder.rsplit("/", 1)[1] / "reason.json").read_text())
    assert (reason["version"], reason["failed_step"]) == (broken, step)
    assert (world.model_dir.quarantine_root / folder.rsplit("/", 1)[1] / "model.onnx").is_file(), "files not kept"
    assert_invariants(world, attempts=2)


def test_failed_first_deploy_leaves_nothing_serving(world: World) -> None:
    world.register("golden-mismatch")
    report = world.deploy()
    assert report.outcome == "rolled_back" and report.failed_step == "smoke"
    assert report.previous_version is None
    assert report.rollback.verified and report.rollback.serving == []
    assert world.current_bytes() is None
    assert_invariants(world, attempts=1)


def test_unknown_alias_is_rejected_and_nothing_changes(world: World) -> None:
    world.register()
    world.deploy()
    before = world.current_bytes()
    report = deploy(world.ferry, "iris", alias="no-such-alias")
    assert report.outcome == "rejected" and not report.ok
    assert "has no alias 'no-such-alias'" in report.error and "champion -> v1" in report.hint
    assert world.current_bytes() == before
    assert world.ferry.triton.ready_versions("iris") == [1]
    assert not world.model_dir.quarantine_root.exists()
    assert_invariants(world, attempts=2)


def test_a_model_mlflow_does_not_know_is_refused_and_leaves_nothing(world: World) -> None:
    world.register()
    world.deploy()
    with pytest.raises(NoSuchModel, match="no model named 'no-such-model' in MLflow"):
        deploy(world.ferry, "no-such-model", alias="champion")
    assert not ModelDir(world.settings.repository, "no-such-model").exists()
    assert_invariants(world, attempts=1)


def test_names_with_path_separators_are_refused_before_anything(world: World) -> None:
    with pytest.raises(FerryError, match="not a valid name"):
        deploy(world.ferry, "../etc", alias="champion")
    world.register()
    with pytest.raises(FerryError, match=r"alias '\.\./\.\./x' is not a valid name"):
        deploy(world.ferry, "iris", alias="../../x")
    assert not (world.settings.repository.parent / "etc").exists()
    assert not world.model_dir.exists()


def test_triton_not_running_is_rejected_and_nothing_changes(world: World, tmp_path) -> None:
    world.register()
    world.deploy()
    before = world.current_bytes()
    unreachable = world.settings.with_overrides(triton_url=make_settings(tmp_path).triton.urls)
    report = deploy(Services(unreachable), world.model, alias="champion")
    assert report.outcome == "rejected"
    assert "not reachable" in report.error and "ferry triton up" in report.hint
    assert world.current_bytes() == before
    assert_invariants(world, attempts=2)


def test_load_that_hangs_times_out_then_rolls_back(world: World) -> None:
    world.register()
    world.deploy()
    before = world.current_bytes()
    world.register(trees=5)
    report = world.deploy(python_runner=FAKES / "fake_hanging_runner.py", load_timeout_s=3.0)
    assert report.outcome == "rolled_back" and report.failed_step == "load"
    assert "timed out" in report.error
    assert report.rollback.verified and report.rollback.serving == [1]
    assert world.current_bytes() == before
    assert_invariants(world, attempts=2)
    # Triton is not left stuck: the next deploy goes through.
    world.register(trees=5)
    assert world.deploy().outcome == "committed"
    assert_invariants(world, attempts=3)


def test_rollback_to_an_earlier_version_goes_through_validation(world: World) -> None:
    world.register()
    world.deploy()
    world.register(trees=5)
    world.deploy()
    report = deploy(world.ferry, world.model, version=1)
    assert report.outcome == "committed" and report.kind == "rollback"
    assert set(report.steps) >= {"load", "ready", "smoke", "commit"}
    current = read_current(world.model_dir)
    assert (current.active_version, current.previous_version) == (1, 2)
    assert_invariants(world, attempts=3)
    assert [r["outcome"] for r in read_history(world.model_dir)] == ["committed"] * 3


def test_commit_and_rollback_keep_the_running_instances(world: World) -> None:
    """The instance that passed smoke is the one production gets; a rollback does not restart the active one."""
    from ferry.core import steps
    from ferry.core import undo as undoing
    from ferry.core.stubs import stubs_of

    world.register()
    world.deploy()
    world.register(trees=5)
    snapshot = steps.take_snapshot(world.ferry, world.model)
    candidate = steps.materialize(world.ferry, snapshot, alias="champion")
    steps.load(world.ferry, snapshot, candidate)
    steps.wait_ready(world.ferry, snapshot, candidate)
    steps.smoke(world.ferry, snapshot, candidate)
    validated = stubs_of(world.model_dir.version_dir(2))
    assert len(validated) == 1
    steps.commit(world.ferry, snapshot, candidate)
    assert stubs_of(world.model_dir.version_dir(2)) == validated

    world.register("golden-mismatch")
    snapshot = steps.take_snapshot(world.ferry, world.model)
    candidate = steps.materialize(world.ferry, snapshot, alias="champion")
    steps.load(world.ferry, snapshot, candidate)
    active = stubs_of(world.model_dir.version_dir(2))
    with pytest.raises(steps.StepFailed) as failure:
        steps.smoke(world.ferry, snapshot, candidate)
    report = undoing.undo(world.ferry, snapshot, steps.failure_of(failure.value), candidate.version)
    assert report.verified and report.serving == [2]
    assert stubs_of(world.model_dir.version_dir(2)) == active


def test_version_from_an_mlflow_logged_model_deploys_with_a_shape_only_smoke(world: World) -> None:
    """A version registered from mlflow.onnx.log_model (source models:/m-...) carries no smoke sample."""
    import mlflow
    import onnx
    from skl2onnx import to_onnx
    from sklearn.datasets import load_iris
    from sklearn.linear_model import LogisticRegression
    from train_model import use_experiment

    features, labels = load_iris(return_X_y=True)
    features = features.astype(np.float32)
    classifier = LogisticRegression(max_iter=1000).fit(features, labels)
    model = to_onnx(classifier, features[:1], options={id(classifier): {"zipmap": False}}, target_opset=17)
    mlflow.set_tracking_uri(world.settings.tracking_uri)
    use_experiment("logged-models")
    with mlflow.start_run():
        info = mlflow.onnx.log_model(model, name="onnx")
    version = mlflow.register_model(info.model_uri, world.model)
    mlflow.MlflowClient().set_registered_model_alias(world.model, "champion", version.version)
    assert isinstance(model, onnx.ModelProto) and version.source.startswith("models:/m-")

    report = world.deploy()
    assert report.outcome == "committed", report.error
    assert not (world.model_dir.version_dir(1) / "smoke.json").exists()
    assert_invariants(world, attempts=1)


def test_a_version_directory_ferry_did_not_write_is_refused_and_left_alone(world: World) -> None:
    world.register()
    world.deploy()
    world.register(trees=5)
    foreign = world.model_dir.version_dir(2)
    foreign.mkdir()
    (foreign / "model.onnx").write_bytes(b"someone else's file")
    report = world.deploy()
    assert report.outcome == "rejected" and report.rollback is None, "refused before anything was touched"
    assert "holds no ferry manifest" in report.error and "move" in report.hint
    assert (foreign / "model.onnx").read_bytes() == b"someone else's file", \
        "a directory ferry did not write was touched"
    assert world.ferry.triton.ready_versions(world.model) == [1]


def test_quarantine_retention_keeps_every_reason_and_the_newest_files(world: World) -> None:
    world.register()
    world.deploy()
    for breakage in ("golden-mismatch", "output-shape", "golden-mismatch"):
        world.register(breakage)
        assert world.deploy(quarantine_keep=2).outcome == "rolled_back"
    folders = sorted(world.model_dir.quarantine_root.iterdir(), key=lambda p: (p / "reason.json").stat().st_mtime_ns)
    assert [f.name.split(".")[0] for f in folders] == ["2", "3", "4"]
    assert sorted(p.name for p in folders[0].iterdir()) == ["ferry.json", "reason.json"]
    for kept in folders[1:]:
        assert (kept / "model.onnx").is_file()
    assert_invariants(world, attempts=4)
