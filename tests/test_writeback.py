"""The outcome written back to a real MLflow tracking server (sqlite backend), with a real Triton: the tags
and @serving after a good and a broken version; MLflow stopped or hung after the commit (the commit stands,
the warning is recorded, a rollback stays fast); `ferry sync` repairs it and is idempotent.

``MlflowServer`` is the lean `mlflow server` of the MLflow-loop tests (tests/test_watch.py uses it too).
"""

from __future__ import annotations

import time

from conftest import World
from ferry.core.current import read_current, read_history
from ferry.core.writeback import read_write_backs
from strict_json import loads
from support.mlflow_sqlite import MlflowServer, ferry_tags, mlflow_server, on_server, serving_version

__all__ = ["mlflow_server"]  # the fixture

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
    from ferry.core.services import Services

    world = on_server(world, mlflow_server)
    world.register()
    world.deploy()
    world.register()
    world.deploy()
    ferry = Services(world.settings.with_overrides(writeback_timeout_s=1.0))
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
