"""The deploy DAG in Airflow as production runs it (docs/mlflow-and-airflow.md, "Airflow as production runs
it"): metadata on PostgreSQL, the LocalExecutor, scheduler, API server and DAG processor as separate processes,
each task in a process of its own, runs triggered and watched through the REST API. One Airflow and one Triton
for the module; each scenario deploys models of its own, so the scenarios share nothing but the servers."""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator

import pytest
from filelock import FileLock

from conftest import BROKEN_VERSIONS, World, assert_invariants
from ferry.adapters import dag_steps
from ferry.core.config import Settings
from ferry.core.current import read_current, read_history
from ferry.core.journal import read_journal
from ferry.runtime import server as triton
from support.airflow_local import LocalAirflow, start_airflow, task_process, wait_for
from support.postgres import PostgresServer, postgres_server  # noqa: F401 - the session fixture

RUN_TIMEOUT_S = 120.0
LOCK_MOMENT_S = 2.0  # how long a step of another deploy holds the lock in the race scenario


@pytest.fixture(scope="module")
def settings(triton_settings: Settings) -> Settings:
    """One ferry installation and its Triton for the module (conftest): the Airflow's tasks are given its settings."""
    return triton_settings


@pytest.fixture(scope="module")
def airflow(settings: Settings, postgres_server: PostgresServer,  # noqa: F811
            tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalAirflow]:
    running = start_airflow(tmp_path_factory.mktemp("airflow"), postgres_server, World(settings).env())
    try:
        yield running
    finally:
        running.stop()


def world_of(settings: Settings, model: str) -> World:
    return World(settings, model=model)


def deploy_conf(world: World) -> dict[str, str]:
    return {"model": world.model, "alias": "champion"}


def test_two_models_deploy_in_two_concurrent_runs(airflow: LocalAirflow, settings: Settings) -> None:
    worlds = [world_of(settings, "alpha"), world_of(settings, "beta")]
    for world in worlds:
        world.register()
    runs = [airflow.trigger(deploy_conf(world)) for world in worlds]
    states = [airflow.wait_finished(run, RUN_TIMEOUT_S) for run in runs]
    assert states == ["success", "success"], [airflow.task_states(run) for run in runs]
    first, second = (airflow.api("GET", f"/dags/mlflow_to_triton_deploy/dagRuns/{run}") for run in runs)
    assert first["start_date"] < second["end_date"] and second["start_date"] < first["end_date"], \
        "the two runs did not overlap"
    ran = [task for run in runs for task in airflow.task_instances(run).values() if task["state"] == "success"]
    assert len({task["pid"] for task in ran}) == len(ran) == 14, "each task in a process of its own"
    for world in worlds:
        assert read_current(world.model_dir).active_version == 1
        [record] = read_history(world.model_dir)
        assert record["outcome"] == "committed"
        assert_invariants(world, attempts=1)


def test_a_second_run_of_one_model_is_refused_at_once(airflow: LocalAirflow, settings: Settings) -> None:
    world = world_of(settings, "gamma")
    world.register()
    runs = [airflow.trigger(deploy_conf(world)) for _ in range(2)]
    states = {run: airflow.wait_finished(run, RUN_TIMEOUT_S) for run in runs}
    assert sorted(states.values()) == ["failed", "success"], {run: airflow.task_states(run) for run in runs}
    holder, refused = sorted(runs, key=lambda run: states[run] != "success")
    tasks = airflow.task_instances(refused)
    assert tasks["snapshot_current"]["state"] == "failed" and tasks["snapshot_current"]["try_number"] == 1, \
        "a refused run must fail at once, not be retried"
    assert tasks["rollback_minimal"]["state"] == "success" and tasks["commit_current"]["state"] == "upstream_failed"
    holder_commit = airflow.task_instances(holder)["commit_current"]
    assert tasks["snapshot_current"]["end_date"] < holder_commit["start_date"], "refused only after the holder ended"
    committed, rejected = (next(r for r in read_history(world.model_dir) if r["outcome"] == outcome)
                           for outcome in ("committed", "rejected"))
    assert committed["deploy_id"] in rejected["error"] and "is in progress (an Airflow run)" in rejected["error"]
    assert committed["deploy_id"] in airflow.task_log(refused, "snapshot_current", 1)
    assert_invariants(world, attempts=2)


def test_a_run_that_meets_the_lock_for_a_moment_still_names_the_holder(airflow: LocalAirflow,
                                                                       settings: Settings) -> None:
    """The race of two runs' snapshots, made certain: a deploy is in flight elsewhere, and a step of it holds
    the model's lock at the moment this run's snapshot asks for it."""
    world = world_of(settings, "eta")
    world.register()
    held = dag_steps.snapshot_current(world.ferry, world.model, "champion")
    with FileLock(str(world.model_dir.lock_path), timeout=0):
        run = airflow.trigger(deploy_conf(world))
        task = wait_for("snapshot_current to run", lambda: _running_task(airflow, run, "snapshot_current"),
                        RUN_TIMEOUT_S)
        wait_for("its process", lambda: task_process(task["id"]), 30, every_s=0.01)
        time.sleep(LOCK_MOMENT_S)  # its snapshot reaches the lock well within this, and waits
    assert airflow.wait_finished(run, RUN_TIMEOUT_S) == "failed"
    assert airflow.task_instances(run)["snapshot_current"]["try_number"] == 1
    [rejected] = read_history(world.model_dir)
    assert held["deploy_id"] in rejected["error"], rejected["error"]
    failure = {"message": "abandoned by the test", "hint": ""}
    dag_steps.rollback_minimal(world.ferry, world.model, "champion", held["deploy_id"], failure)
    assert_invariants(world, attempts=2)


def _running_task(airflow: LocalAirflow, run_id: str, task_id: str) -> dict | None:
    task = airflow.task_instances(run_id).get(task_id)
    return task if task and task["state"] == "running" else None


def _in_load(world: World) -> bool | None:
    """True while a deploy of the world's model is inside its load step: begun, its time not yet recorded."""
    journal = read_journal(world.model_dir)
    return True if journal and journal.record.step == "load" and "load" not in journal.record.steps else None


def kill_mid_load(airflow: LocalAirflow, world: World, run_id: str) -> int:
    """SIGKILL the process of the run's triton_load while the load step runs (as the OOM killer would)."""
    task = wait_for("triton_load to run", lambda: _running_task(airflow, run_id, "triton_load"), RUN_TIMEOUT_S)
    pid = wait_for(f"the process of task instance {task['id']}", lambda: task_process(task["id"]), 30, every_s=0.01)
    wait_for("the load step to begin", lambda: _in_load(world), 30, every_s=0.002)
    os.kill(pid, signal.SIGKILL)
    assert _in_load(world), "the kill landed after the load step ended: the scenario did not happen"
    return pid


def test_a_task_process_killed_mid_load_is_retried_and_the_deploy_commits(airflow: LocalAirflow,
                                                                          settings: Settings) -> None:
    world = world_of(settings, "delta")
    world.register()
    run = airflow.trigger(deploy_conf(world))
    kill_mid_load(airflow, world, run)
    assert airflow.wait_finished(run, RUN_TIMEOUT_S) == "success", airflow.task_states(run)
    load = airflow.task_instances(run)["triton_load"]
    assert load["try_number"] == 2, "Airflow retries a task whose process died while it has retries left"
    assert "Process terminated by signal" in airflow.task_log(run, "triton_load", 1)
    [record] = read_history(world.model_dir)
    assert record["outcome"] == "committed" and record["version"] == 1
    assert_invariants(world, attempts=1)


def test_a_run_failed_after_its_load_was_killed_is_undone_by_ferry_recover(airflow: LocalAirflow,
                                                                           settings: Settings) -> None:
    """The run is given up while the killed task waits for its retry (an operator marks it failed, as for a
    lost worker): nothing ends the deploy, its journal holds the model, and `ferry recover` undoes it."""
    world = world_of(settings, "theta")
    world.register()
    run = airflow.trigger(deploy_conf(world))
    kill_mid_load(airflow, world, run)
    wait_for("triton_load to wait for its retry",
             lambda: True if airflow.task_states(run).get("triton_load") == "up_for_retry" else None, RUN_TIMEOUT_S)
    airflow.mark_failed(run)
    assert airflow.run_state(run) == "failed"
    assert airflow.task_states(run)["rollback_minimal"] != "success", "the rollback task ran after all"
    assert world.model_dir.journal_path.exists() and read_history(world.model_dir) == []
    refused = world.deploy()
    assert refused.outcome == "rejected" and "ferry recover theta" in str(refused.hint)
    recovered = world.cli("recover", world.model, "--json")
    assert recovered.returncode == 0, recovered.stdout + recovered.stderr
    report = json.loads(recovered.stdout)
    assert report["outcome"] == "rolled_back" and report["failed_step"] == "load" and report["recovered_by"]
    assert "stopped during load" in report["error"]
    assert read_current(world.model_dir) is None
    assert_invariants(world, attempts=2)
    assert world.deploy().outcome == "committed", "the next deploy finishes the job"
    assert_invariants(world, attempts=3)


def test_a_broken_version_fails_at_once_without_retries(airflow: LocalAirflow, settings: Settings) -> None:
    breakage, step, message = BROKEN_VERSIONS[0]  # corrupt bytes, caught at materialize
    world = world_of(settings, "epsilon")
    world.register()
    assert world.deploy().outcome == "committed"
    before = world.current_bytes()
    broken = world.register(breakage)
    run = airflow.trigger(deploy_conf(world))
    assert airflow.wait_finished(run, RUN_TIMEOUT_S) == "failed"
    tasks = airflow.task_instances(run)
    assert tasks["materialize_repo"]["state"] == "failed" and tasks["materialize_repo"]["try_number"] == 1
    assert tasks["rollback_minimal"]["state"] == "success"
    assert message in airflow.task_log(run, "materialize_repo", 1)
    record = read_history(world.model_dir)[-1]
    assert record["outcome"] == "rolled_back" and record["version"] == broken and record["failed_step"] == step
    assert world.current_bytes() == before
    assert_invariants(world, attempts=2)


def test_an_unavailable_triton_is_retried_until_it_answers(airflow: LocalAirflow, settings: Settings) -> None:
    """Last in the module: Triton restarts empty, so the models deployed before are no longer loaded."""
    world = world_of(settings, "zeta")
    world.register()
    triton.down(settings, grace_s=0)
    try:
        run = airflow.trigger(deploy_conf(world))
        wait_for("snapshot_current to wait for its retry",
                 lambda: True if airflow.task_states(run).get("snapshot_current") == "up_for_retry" else None,
                 RUN_TIMEOUT_S)
    finally:
        triton.up(settings)
    assert airflow.wait_finished(run, RUN_TIMEOUT_S) == "success", airflow.task_states(run)
    assert airflow.task_instances(run)["snapshot_current"]["try_number"] >= 2
    assert f"Triton at {settings.triton.urls} is not reachable" in airflow.task_log(run, "snapshot_current", 1)
    [record] = read_history(world.model_dir)
    assert record["outcome"] == "committed"
    assert_invariants(world, attempts=1)
