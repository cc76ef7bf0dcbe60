"""Deploy an MLflow model version (by alias) into Triton: the ferry transaction as an Airflow DAG.

Each task is one call of ferry's runner (ferry.adapters.dag_steps); XCom carries small plain JSON.
A failure in any step from materialize to the bake runs rollback_minimal; commit_current is then
upstream_failed, so a rolled-back run ends failed. Only an unreachable MLflow or Triton is retried.
Reads the same environment as the ferry CLI (FERRY_*, MLFLOW_TRACKING_URI).
"""

from __future__ import annotations

import itertools
import logging
from datetime import timedelta

from airflow.providers.standard.operators.python import PythonOperator
from airflow.providers.standard.sensors.python import PythonSensor
from airflow.sdk import DAG, Param, TriggerRule
from airflow.sdk.exceptions import AirflowFailException

from ferry.core.config import load_settings
from ferry.core.repository import NAME_PATTERN

log = logging.getLogger(__name__)
STEPS = ("materialize_repo", "triton_load", "triton_ready", "triton_infer_smoke")


def _call(step: str, *args):
    """Run one core step. Bad input or a broken model fails the task for good, its reason on the last line."""
    from ferry.adapters import dag_steps
    from ferry.core.errors import FerryError
    from ferry.core.services import Services

    try:
        return getattr(dag_steps, step)(Services(load_settings()), *args)
    except FerryError as error:
        reason = f"{step} failed: {error}"
        log.error(reason)
        if error.retryable:
            raise RuntimeError(reason) from error  # a dependency that did not answer: Airflow retries
        raise AirflowFailException(reason) from error


def rollout_plan(bake: str, mode: str, percent: float) -> dict | None:
    """The run's bake params as ferry's rollout plan (none when ``bake`` is empty)."""
    if not bake:
        return None
    from ferry.core.addresses import parse_duration

    share = {"canary_percent": percent} if mode == "canary" else {"mirror_percent": percent}
    return {"mode": mode, "bake_s": parse_duration(bake, "bake"), **share}


def snapshot_current(model: str, alias: str, bake: str, mode: str, percent: float, ti,
                     allow_signature_change: bool | str = False, strategy: str = "beside", batch: str = "1") -> dict:
    try:
        return _call("snapshot_current", model, alias, rollout_plan(bake, mode, float(percent)),
                     str(allow_signature_change).lower() == "true", strategy, batch)
    except Exception as error:
        cause = error.__cause__
        ti.xcom_push(key="failure", value={"message": getattr(cause, "message", str(error)),
                                           "hint": getattr(cause, "hint", "")})
        raise


def step(name: str):
    def run(ti) -> dict:
        return _call(name, ti.xcom_pull(task_ids="snapshot_current"))

    return run


def bake(ti) -> bool:
    """One look at the bake (reschedule mode: the worker slot is free between looks); True once it passed."""
    return _call("triton_bake", ti.xcom_pull(task_ids="snapshot_current"))


def rollback_minimal(model: str, alias: str, ti) -> dict:
    handle = ti.xcom_pull(task_ids="snapshot_current") or {}
    report = _call("rollback_minimal", model, alias, handle.get("deploy_id"),
                   ti.xcom_pull(task_ids="snapshot_current", key="failure"))
    if report.get("rollback") and not report["rollback"]["verified"]:
        raise AirflowFailException(f"rollback not verified: {report['rollback']['problems']}")
    return report


settings = load_settings()
name_schema = {"type": "string", "pattern": NAME_PATTERN.pattern}
retry_dependencies = {"retries": 2, "retry_delay": timedelta(seconds=5), "retry_exponential_backoff": True}

with DAG(
    dag_id="mlflow_to_triton_deploy",
    schedule=None,
    catchup=False,
    doc_md=__doc__,
    params={
        "model": Param(settings.deploy.default_model, description="Registered model name in MLflow (and in Triton)",
                       **name_schema),
        "alias": Param(settings.deploy.default_alias, description="MLflow alias naming the version to deploy",
                       **name_schema),
        "bake": Param("", type="string", pattern=r"^(\d+(\.\d+)?[smh]?)?$",
                      description="Bake on live traffic this long before the commit (5m); empty: no bake"),
        "mode": Param("canary", enum=["canary", "shadow"], description="canary: the candidate answers a share; "
                      "shadow: it gets copies and its answers are compared"),
        "percent": Param(10, type="number", minimum=1, maximum=100,
                         description="canary: the share of requests it answers; shadow: the share copied to it"),
        "allow_signature_change": Param(False, type="boolean", description="Deploy a version whose inputs or "
                                        "outputs differ from the active version's (it breaks their clients)"),
        "strategy": Param("beside", enum=["beside", "rolling"], description="beside: the candidate loads beside "
                          "the active version; rolling: replica batch by batch (a model that fits once)"),
        "batch": Param("1", type="string", pattern=r"^([1-9][0-9]*|[1-9][0-9]?%|100%)$",
                       description="rolling: replicas per batch (1, 2, 25%)"),
    },
    tags=["ferry"],
) as dag:
    names = {"model": "{{ params.model }}", "alias": "{{ params.alias }}"}
    snapshot = PythonOperator(task_id="snapshot_current", python_callable=snapshot_current,
                              op_kwargs={**names, "bake": "{{ params.bake }}", "mode": "{{ params.mode }}",
                                         "percent": "{{ params.percent }}",
                                         "allow_signature_change": "{{ params.allow_signature_change }}",
                                         "strategy": "{{ params.strategy }}", "batch": "{{ params.batch }}"},
                              **retry_dependencies)
    steps = [PythonOperator(task_id=name, python_callable=step(name), **retry_dependencies) for name in STEPS]
    # A sensor in reschedule mode: each look is a short task run, and no worker waits through the bake.
    steps.append(PythonSensor(task_id="triton_bake", python_callable=bake, mode="reschedule",
                              poke_interval=settings.bake.interval_s, timeout=24 * 3600, **retry_dependencies))
    commit = PythonOperator(task_id="commit_current", python_callable=step("commit_current"), **retry_dependencies)
    rollback = PythonOperator(task_id="rollback_minimal", python_callable=rollback_minimal, op_kwargs=names,
                              trigger_rule=TriggerRule.ONE_FAILED)

    snapshot >> steps[0]
    for upstream, downstream in itertools.pairwise(steps):
        upstream >> downstream
    steps[-1] >> commit
    steps >> rollback
