"""The Airflow DAG on a real Airflow 3 (sqlite), real MLflow and real Triton, run with dag.test()."""

from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import BROKEN_VERSIONS, ROOT, World, assert_invariants
from ferry.core.current import read_current, read_history
from ferry.core.front import store_name
from ferry.core.runner import deploy
from ferry.core.services import Services

DAG_ID = "mlflow_to_triton_deploy"
STEP_TASKS = ["materialize_repo", "triton_load", "triton_ready", "triton_infer_smoke", "triton_bake"]
TASK_OF_STEP = dict(zip(["materialize", "load", "ready", "smoke"], STEP_TASKS))


@pytest.fixture(scope="session")
def airflow_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated sqlite Airflow, configured before anything imports airflow."""
    home = tmp_path_factory.mktemp("airflow")
    os.environ.update({
        "AIRFLOW_HOME": str(home), "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
    })
    subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], check=True, capture_output=True, timeout=300)
    return home


@pytest.fixture
def dag(airflow_home: Path):
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(str(ROOT / "dags"))
    assert bag.import_errors == {}
    return bag.get_dag(DAG_ID)


@pytest.fixture
def dag_world(world: World, monkeypatch: pytest.MonkeyPatch) -> World:
    for name, value in world.env().items():
        monkeypatch.setenv(name, value)
    return world


def states(run) -> dict[str, str]:
    return {ti.task_id: str(ti.state) for ti in run.get_task_instances()}


def test_dag_parses_with_nothing_reachable(airflow_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    monkeypatch.setenv("FERRY_TRITON_URL", "http://127.0.0.1:9")
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(str(ROOT / "dags"))
    assert bag.import_errors == {}
    dag = bag.get_dag(DAG_ID)
    assert type(dag.timetable).__name__ == "NullTimetable", "the DAG runs only when triggered"
    chain = ["snapshot_current", *STEP_TASKS, "commit_current"]
    for upstream, downstream in itertools.pairwise(chain):
        assert dag.get_task(upstream).downstream_task_ids >= {downstream}
    rollback = dag.get_task("rollback_minimal")
    assert rollback.upstream_task_ids == set(STEP_TASKS)
    from airflow.sdk import TriggerRule

    assert rollback.trigger_rule == TriggerRule.ONE_FAILED
    assert dag.get_task("commit_current").downstream_task_ids == set(), "commit_current must stay a leaf"


def test_good_version_commits(dag, dag_world: World) -> None:
    dag_world.register()
    run = dag.test(run_conf={"model": "iris", "alias": "champion"})
    assert str(run.state) == "success", states(run)
    assert states(run)["commit_current"] == "success" and states(run)["rollback_minimal"] == "skipped"
    assert read_current(dag_world.model_dir).active_version == 1
    [record] = read_history(dag_world.model_dir)
    assert record["outcome"] == "committed" and set(record["steps"]) >= {"snapshot", "load", "smoke", "commit"}
    assert not dag_world.model_dir.journal_path.exists()
    assert_invariants(dag_world, attempts=1)


@pytest.mark.parametrize(("breakage", "step", "message"), BROKEN_VERSIONS)
def test_broken_version_rolls_back_and_the_run_fails(dag, dag_world: World, breakage: str, step: str,
                                                     message: str) -> None:
    task = TASK_OF_STEP[step]
    dag_world.register()
    assert deploy(dag_world.ferry, "iris", alias="champion").outcome == "committed"
    before = dag_world.current_bytes()
    broken = dag_world.register(breakage)
    run = dag.test(run_conf={"model": "iris", "alias": "champion"})
    task_states = states(run)
    assert str(run.state) == "failed"
    assert task_states[task] == "failed"
    assert task_states["rollback_minimal"] == "success"
    assert task_states["commit_current"] == "upstream_failed"
    assert dag_world.current_bytes() == before
    record = read_history(dag_world.model_dir)[-1]
    assert record["outcome"] == "rolled_back" and message in record["error"] and record["version"] == broken
    assert any(Path(q).name.startswith(f"{broken}.failed_") for q in record["rollback"]["quarantined"])
    assert_invariants(dag_world, attempts=2)


def test_unknown_alias_is_rejected_without_touching_anything(dag, dag_world: World) -> None:
    dag_world.register()
    run = dag.test(run_conf={"model": "iris", "alias": "missing"})
    assert str(run.state) == "failed" and states(run)["materialize_repo"] == "failed"
    [record] = read_history(dag_world.model_dir)
    assert record["outcome"] == "rejected" and "has no alias 'missing'" in record["error"]
    assert_invariants(dag_world, attempts=1)


def test_a_bad_param_is_refused_before_any_task_runs(dag, dag_world: World) -> None:
    from airflow.sdk.definitions.param import ParamValidationError

    with pytest.raises(ParamValidationError):
        dag.test(run_conf={"model": "iris", "alias": "../../etc"})
    assert read_history(dag_world.model_dir) == []


def test_a_run_during_another_deploy_of_the_model_fails_fast(dag, dag_world: World) -> None:
    from ferry.adapters import dag_steps as orchestration

    dag_world.register()
    held = orchestration.snapshot_current(dag_world.ferry, "iris", "champion")  # a deploy in flight elsewhere
    run = dag.test(run_conf={"model": "iris", "alias": "champion"})
    assert str(run.state) == "failed" and states(run)["snapshot_current"] == "failed"
    [record] = read_history(dag_world.model_dir)
    assert record["outcome"] == "rejected" and "is in progress" in record["error"]
    cli = deploy(dag_world.ferry, "iris", alias="champion")
    assert cli.outcome == "rejected" and held["deploy_id"] in cli.error
    assert dag_world.model_dir.journal_path.exists(), "the deploy in flight was disturbed"
    failure = {"message": "abandoned by the test", "hint": ""}
    orchestration.rollback_minimal(dag_world.ferry, "iris", "champion", held["deploy_id"], failure)
    assert not dag_world.model_dir.journal_path.exists()
    assert deploy(dag_world.ferry, "iris", alias="champion").outcome == "committed"


def test_an_unreachable_triton_is_a_retryable_failure(dag_world: World, tmp_path: Path) -> None:
    from conftest import make_settings
    from ferry.adapters import dag_steps as orchestration
    from ferry.core.errors import FerryError

    unreachable = Services(dag_world.settings.with_overrides(triton_url=make_settings(tmp_path).triton.urls))
    with pytest.raises(FerryError) as error:
        orchestration.snapshot_current(unreachable, "iris", "champion")
    assert error.value.retryable and not dag_world.model_dir.journal_path.exists()


def test_demo_airflow_triggers_the_dag_through_the_rest_api(tmp_path: Path) -> None:
    from conftest import make_settings

    env = {**os.environ, "FERRY_HOME": str(tmp_path / "demo"), "FERRY_TRITON_URL": make_settings(tmp_path).triton.urls}
    for name in [n for n in env if n.startswith("AIRFLOW")]:  # the demo brings its own Airflow
        del env[name]
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "demo_airflow.py")], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "good v1: run" in result.stdout and "ended SUCCESS" in result.stdout
    assert "broken v2: run" in result.stdout and "ended FAILED" in result.stdout
    assert "rollback_minimal     success" in result.stdout


def test_a_version_that_is_not_ready_rolls_back(dag_world: World) -> None:
    """Triton drops the candidate between load and ready (as a restarted replica would): ready fails."""
    from ferry.adapters import dag_steps as orchestration
    from ferry.core.errors import StepFailed

    dag_world.register()
    assert deploy(dag_world.ferry, "iris", alias="champion").outcome == "committed"
    before = dag_world.current_bytes()
    dag_world.register(trees=5)
    ferry = Services(dag_world.settings.with_overrides(ready_timeout_s=1.0))
    handle = orchestration.snapshot_current(ferry, "iris", "champion")
    orchestration.materialize_repo(ferry, handle)
    orchestration.triton_load(ferry, handle)
    ferry.triton.unload(store_name("iris", 2))  # the candidate's store
    with pytest.raises(StepFailed, match="v2 not ready"):
        orchestration.triton_ready(ferry, handle)
    report = orchestration.rollback_minimal(ferry, "iris", "champion", handle["deploy_id"], None)
    assert report["outcome"] == "rolled_back" and report["failed_step"] == "ready"
    assert report["rollback"]["verified"] and report["rollback"]["serving"] == [1]
    assert dag_world.current_bytes() == before
    assert_invariants(dag_world, attempts=2)
