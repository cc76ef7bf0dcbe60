"""The DAG's steps are the same runner, one part per process: the journal carries the deploy between them."""

from __future__ import annotations

import numpy as np
import pytest

from ferry.adapters import dag_steps
from ferry.core.current import read_current, read_history
from ferry.core.errors import Busy, FerryError, StepFailed
from ferry.core.runner import Runner
from unit.support import Bench


def test_the_steps_commit_like_one_deploy(bench: Bench) -> None:
    bench.registry.add("iris", "champion")
    handle = dag_steps.snapshot_current(bench.ferry, "iris", "champion")
    handle = dag_steps.materialize_repo(bench.ferry, handle)
    for step in (dag_steps.triton_load, dag_steps.triton_ready, dag_steps.triton_infer_smoke):
        handle = step(bench.ferry, handle)
    report = dag_steps.commit_current(bench.ferry, handle)
    assert report["outcome"] == "committed" and report["version"] == 1
    assert set(report["steps"]) == {"snapshot", "materialize", "load", "ready", "smoke", "commit"}
    [record] = read_history(bench.model_dir)
    assert record["deploy_id"] == handle["deploy_id"] and record["who"]
    bench.check_invariants(attempts=1)


def test_a_failed_step_is_undone_by_rollback_minimal(bench: Bench) -> None:
    bench.registry.add("iris", "champion")
    bench.deploy()
    bench.registry.add("iris", "champion")
    bench.triton.wrong_outputs[2] = {"Y": np.zeros((2, 3), dtype=np.float32)}
    handle = dag_steps.snapshot_current(bench.ferry, "iris", "champion")
    handle = dag_steps.materialize_repo(bench.ferry, handle)
    handle = dag_steps.triton_ready(bench.ferry, dag_steps.triton_load(bench.ferry, handle))
    with pytest.raises(StepFailed, match="differs from the golden output"):
        dag_steps.triton_infer_smoke(bench.ferry, handle)
    report = dag_steps.rollback_minimal(bench.ferry, "iris", "champion", handle["deploy_id"], None)
    assert report["outcome"] == "rolled_back" and report["failed_step"] == "smoke"
    assert read_current(bench.model_dir).active_version == 1
    again = dag_steps.rollback_minimal(bench.ferry, "iris", "champion", handle["deploy_id"], None)
    assert again == report, "a retried rollback task returns the recorded outcome"
    bench.check_invariants(attempts=2)


def test_a_rejected_target_is_recorded_once_as_rejected(bench: Bench) -> None:
    bench.registry.add("iris", "champion")
    handle = dag_steps.snapshot_current(bench.ferry, "iris", "nope")
    with pytest.raises(FerryError, match="has no alias 'nope'") as error:
        dag_steps.materialize_repo(bench.ferry, handle)
    assert not isinstance(error.value, StepFailed) and not error.value.retryable
    report = dag_steps.rollback_minimal(bench.ferry, "iris", "nope", handle["deploy_id"], None)
    assert report["outcome"] == "rejected" and report["rollback"] is None
    bench.check_invariants(attempts=1)


def test_a_failed_snapshot_is_recorded_by_rollback_minimal(bench: Bench) -> None:
    bench.registry.add("iris", "champion")
    bench.triton.unreachable = True
    with pytest.raises(FerryError) as error:
        dag_steps.snapshot_current(bench.ferry, "iris", "champion")
    assert error.value.retryable and not bench.model_dir.journal_path.exists()
    failure = {"message": error.value.message, "hint": error.value.hint}
    report = dag_steps.rollback_minimal(bench.ferry, "iris", "champion", None, failure)
    assert report["outcome"] == "rejected" and "not reachable" in report["error"]
    assert len(read_history(bench.model_dir)) == 1


def test_a_step_of_a_deploy_that_was_recovered_meanwhile_is_refused(bench: Bench) -> None:
    bench.registry.add("iris", "champion")
    handle = dag_steps.snapshot_current(bench.ferry, "iris", "champion")
    Runner(bench.ferry, "iris").recover()  # an operator ended it while the run was between tasks
    with pytest.raises(Busy, match="not in flight any more"):
        dag_steps.materialize_repo(bench.ferry, handle)
    [record] = read_history(bench.model_dir)
    assert record["deploy_id"] == handle["deploy_id"] and record["recovered_by"]
