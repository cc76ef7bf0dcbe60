"""The runner over fakes: every outcome, the journal, the history record, the events and the refusals."""

from __future__ import annotations

import json

import numpy as np
import pytest
from filelock import FileLock

from ferry.core import failure_text
from ferry.core.current import read_current, read_history
from ferry.core.errors import Busy, Misconfigured, NoSuchModel, Unavailable
from ferry.core.journal import read_journal
from ferry.core.records import Outcome, QuarantineReason, Step
from ferry.core.repository import ModelDir
from ferry.core.runner import Runner
from ferry.core.target import Target
from unit.fakes import tiny_onnx
from unit.support import Bench


def test_a_good_version_is_committed_with_one_record(bench: Bench) -> None:
    bench.registry.add("iris", "champion")
    events: list[tuple[str, str]] = []
    report = Runner(bench.ferry, "iris", on_event=lambda s, status, t, d: events.append((s, status))).deploy(
        Target.of_alias("champion"))
    assert report.outcome == Outcome.COMMITTED, report.error
    assert read_current(bench.model_dir).active_version == 1
    assert [e for e in events if e[1] != "start"] == [
        ("snapshot", "ok"), ("mlflow client", "ok"), ("materialize", "ok"), ("load", "ok"), ("ready", "ok"),
        ("smoke", "ok"), ("commit", "ok"), ("recorded", "committed"), ("write-back", "ok")]
    assert set(report.steps) == {s.value for s in Step} - {"rollback", "bake"}
    bench.check_invariants(attempts=1)


def test_the_candidate_is_made_durable_before_the_commit_point(bench: Bench,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Its files reach the disk in the background during the load; current.json names them only once they have."""
    made_durable: list[tuple[int, int | None]] = []
    durable = ModelDir.make_durable

    def record(model_dir: ModelDir, version: int) -> None:
        current = read_current(model_dir)
        made_durable.append((version, current.active_version if current else None))
        durable(model_dir, version)

    monkeypatch.setattr(ModelDir, "make_durable", record)
    bench.registry.add("iris", "champion")
    assert bench.deploy().outcome == Outcome.COMMITTED
    bench.registry.add("iris", "champion")
    assert bench.deploy().outcome == Outcome.COMMITTED
    assert made_durable == [(1, None), (2, 1)], "fsynced while current.json still named the version before"


@pytest.mark.parametrize(("failure", "retryable"), [
    (Unavailable("the artifact store stopped answering while model.onnx downloaded (fake)"), True),
    (Misconfigured("S3 refused the credentials (fake)", "check AWS_ACCESS_KEY_ID"), False),
])
def test_a_store_that_fails_mid_download_for_want_of_it_or_of_ferrys_setup_is_rejected_with_nothing_kept(
        bench: Bench, failure: Exception, retryable: bool) -> None:
    """Neither is the version's fault: it is not rolled back, quarantined or recorded as failed; the retry commits."""
    bench.registry.add("iris", "champion")
    first = bench.deploy()
    bench.registry.add("iris", "champion")
    bench.registry.store_fails_with = failure
    report = bench.deploy()
    assert report.outcome == Outcome.REJECTED and report.retryable == retryable, report
    assert str(failure).split(" (")[0] in (report.error or "")
    assert read_current(bench.model_dir) == first.current
    assert not bench.model_dir.version_dir(2).exists() and not bench.model_dir.quarantine_root.exists()
    assert list(bench.model_dir.staging_dirs(report.deploy_id)) == [] and read_journal(bench.model_dir) is None
    bench.registry.store_fails_with = None
    assert bench.deploy().outcome == Outcome.COMMITTED, "the retry commits"


def test_the_second_version_retires_the_first(bench: Bench) -> None:
    bench.registry.add("iris", "champion")
    bench.deploy()
    bench.registry.add("iris", "champion")
    report = bench.deploy()
    assert (report.outcome, report.version, report.previous_version) == (Outcome.COMMITTED, 2, 1)
    assert bench.triton.loads[-3:] == [("iris.versions.2", [2]), ("iris.versions.2", [2]), ("iris", [2])], \
        "loaded into its own store beside the active's; at the commit the front repointed"
    assert bench.triton.unloads[-1:] == ["iris.versions.1"], "then the active's store unloaded"
    bench.check_invariants(attempts=2)


def test_the_active_version_served_is_a_noop(bench: Bench) -> None:
    bench.registry.add("iris", "champion")
    bench.deploy()
    loads = len(bench.triton.loads)
    report = bench.deploy()
    assert report.outcome == Outcome.NOOP and "nothing to do" in report.warnings[0]
    assert len(bench.triton.loads) == loads
    bench.check_invariants(attempts=2)


def test_the_active_version_not_served_is_proven_and_served_again(bench: Bench) -> None:
    """After a Triton restart nothing serves: a redeploy of the active version must not say all is well."""
    bench.registry.add("iris", "champion")
    bench.deploy()
    bench.triton.models.clear()  # restarted: explicit mode serves nothing
    report = bench.deploy()
    assert report.outcome == Outcome.NOOP and "proven and served again" in report.warnings[0]
    assert {"load", "ready", "smoke", "commit"} <= set(report.steps)
    assert bench.triton.ready_versions("iris") == [1]
    bench.check_invariants(attempts=2)


@pytest.mark.parametrize(("message", "reason"), [  # as the pip server (Triton 2.51) words them
    ("Triton refused loading 'iris_py.versions.3': load failed for model 'iris_py.versions.3': version 3 is at "
     "UNAVAILABLE state: Internal: ValueError: weights.npz holds coef [3, 5]",
     "ValueError: weights.npz holds coef [3, 5]"),
    ("Triton refused loading 'iris_py.versions.4': load failed for model 'iris_py.versions.4': version 4 is at "
     "UNAVAILABLE state: Invalid argument: unable to find backend library for backend 'onnxruntime', try specifying "
     "runtime on the model configuration.;", "the server has no backend 'onnxruntime'"),
    ("Triton refused loading 'e.versions.2': load failed for model 'e.versions.2': ensemble 'e.versions.2' depends "
     "on 'b.versions.2' whose required version 2 is not loaded.",
     "ensemble 'e.versions.2' depends on 'b.versions.2' whose required version 2 is not loaded."),
    ("something else entirely", "something else entirely"),
])
def test_a_load_failure_gives_tritons_reason_once(message: str, reason: str) -> None:
    assert failure_text.load_reason(message) == reason


@pytest.mark.parametrize(("fault", "step", "message"), [
    ("load", "load", "Triton could not load v2"),
    ("hang", "load", "timed out"),
    ("wrong", "smoke", "differs from the golden output"),
    ("shape", "materialize", "does not match the model's config"),
])
def test_a_failing_candidate_is_rolled_back_and_quarantined(bench: Bench, fault: str, step: str,
                                                            message: str) -> None:
    bench.registry.add("iris", "champion")
    bench.deploy()
    before = bench.model_dir.current_path.read_bytes()
    bench.registry.add("iris", "champion", model_bytes=tiny_onnx(outputs=4) if fault == "shape" else None)
    if fault == "load":
        bench.triton.fail_load[2] = "onnxruntime: bad graph\n  At: stack line 1\n  At: stack line 2"
    if fault == "hang":
        bench.triton.hang_load.add(2)
    if fault == "wrong":
        bench.triton.wrong_outputs[2] = {"Y": np.zeros((2, 3), dtype=np.float32)}
    report = bench.deploy()
    assert (report.outcome, report.failed_step) == (Outcome.ROLLED_BACK, step)
    assert message in report.error and "\n" not in report.error
    assert report.hint, "every failure says what to do"
    assert bench.model_dir.current_path.read_bytes() == before
    [quarantined] = report.rollback.quarantined
    reason = QuarantineReason.model_validate_json((bench.model_dir.quarantine_root / quarantined / "reason.json")
                                                  .read_text())
    assert (reason.failed_step, reason.version) == (step, 2) and message in reason.error
    assert not bench.model_dir.version_dir(2).exists()
    bench.check_invariants(attempts=2)


def test_a_failed_first_deploy_leaves_nothing_serving(bench: Bench) -> None:
    bench.registry.add("iris", "champion")
    bench.triton.fail_load[1] = "bad graph"
    report = bench.deploy()
    assert report.outcome == Outcome.ROLLED_BACK and report.previous_version is None
    assert read_current(bench.model_dir) is None and not bench.model_dir.config_path.exists()
    bench.check_invariants(attempts=1)


def test_an_interrupted_step_rolls_back(bench: Bench, monkeypatch: pytest.MonkeyPatch) -> None:
    from ferry.core import steps

    bench.registry.add("iris", "champion")
    bench.deploy()
    bench.registry.add("iris", "champion")

    def interrupted(*args: object) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(steps, "smoke", interrupted)
    report = bench.deploy()
    assert (report.outcome, report.failed_step) == (Outcome.ROLLED_BACK, "smoke")
    assert "interrupted" in report.error
    bench.check_invariants(attempts=2)


def test_an_unknown_alias_is_rejected_with_the_known_ones(bench: Bench) -> None:
    bench.registry.add("iris", "champion")
    report = bench.deploy(alias="nope")
    assert report.outcome == Outcome.REJECTED and "has no alias 'nope'" in report.error
    assert not report.retryable
    bench.check_invariants(attempts=1)


def test_a_model_mlflow_does_not_know_leaves_nothing(bench: Bench) -> None:
    with pytest.raises(NoSuchModel):
        bench.deploy()
    assert not bench.model_dir.exists()


def test_mlflow_unreachable_is_rejected_as_retryable(bench: Bench) -> None:
    bench.registry.add("iris", "champion")
    bench.deploy()
    bench.registry.unreachable = True
    report = bench.deploy()
    assert report.outcome == Outcome.REJECTED and report.retryable and "did not answer" in report.error
    bench.check_invariants(attempts=2)


def test_triton_unreachable_is_rejected_before_anything(bench: Bench) -> None:
    bench.registry.add("iris", "champion")
    bench.triton.unreachable = True
    report = bench.deploy()
    assert report.outcome == Outcome.REJECTED and report.retryable
    assert read_journal(bench.model_dir) is None and read_current(bench.model_dir) is None


def test_a_busy_model_is_refused_at_once(bench: Bench) -> None:
    bench.registry.add("iris", "champion")
    bench.deploy()
    with FileLock(str(bench.model_dir.lock_path)):
        report = bench.deploy()
    assert report.outcome == Outcome.REJECTED and "another deploy of 'iris' is running" in report.error
    assert "FERRY_LOCK_WAIT_S" in report.hint
    bench.check_invariants(attempts=2)


def test_an_unfinished_journal_refuses_deploys_until_recovered(bench: Bench) -> None:
    bench.registry.add("iris", "champion")
    bench.deploy()
    bench.registry.add("iris", "champion")
    runner = Runner(bench.ferry, "iris")
    journal = runner.begin(Target.of_alias("champion"))
    runner.run_step(journal, Step.MATERIALIZE)  # the process "dies" here
    refused = bench.deploy()
    assert refused.outcome == Outcome.REJECTED and "did not finish" in refused.error
    assert "ferry recover iris" in refused.hint
    recovered = Runner(bench.ferry, "iris").recover()
    assert recovered.outcome == Outcome.ROLLED_BACK and "stopped during materialize" in recovered.error
    assert recovered.recovered_by
    bench.check_invariants(attempts=3)


def test_going_back_to_a_kept_version_needs_no_mlflow(bench: Bench) -> None:
    bench.registry.add("iris", "champion")
    bench.deploy()
    bench.registry.add("iris", "champion")
    bench.deploy()
    bench.registry.unreachable = True
    report = bench.deploy(version=1)
    assert report.outcome == Outcome.COMMITTED and report.kind == "rollback", report.error
    assert read_current(bench.model_dir).active_version == 1
    bench.check_invariants(attempts=3)


def test_going_back_to_a_version_that_failed_needs_force(bench: Bench) -> None:
    bench.registry.add("iris", "champion")
    bench.deploy()
    bench.registry.add("iris", "champion")
    bench.triton.fail_load[2] = "bad graph"
    bench.deploy()
    refused = bench.deploy(version=2)
    assert refused.outcome == Outcome.REJECTED and "v2 failed its last deploy" in refused.error
    assert "--force" in refused.hint and "bad graph" in refused.error
    assert bench.triton.loads[-1] == ("iris", [1]), "nothing was loaded for the refused attempt"
    forced = bench.deploy(version=2, force=True)  # MLflow still has it; Triton still refuses it
    assert forced.outcome == Outcome.ROLLED_BACK
    bench.check_invariants(attempts=4)


def test_the_history_record_is_what_the_report_says(bench: Bench) -> None:
    bench.registry.add("iris", "champion")
    report = bench.deploy()
    [record] = read_history(bench.model_dir)
    assert record == json.loads(report.model_dump_json())


def test_a_second_runner_cannot_take_a_model_in_flight(bench: Bench) -> None:
    bench.registry.add("iris", "champion")
    first = Runner(bench.ferry, "iris", via="airflow")
    journal = first.begin(Target.of_alias("champion"))
    with pytest.raises(Busy, match="is in progress"):
        Runner(bench.ferry, "iris").begin(Target.of_alias("champion"))
    first.undo(journal)
    assert read_journal(bench.model_dir) is None


def test_a_warm_previous_version_is_kept_for_its_window_then_reconcile_lets_it_go(bench: Bench) -> None:

    from ferry.core.current import write_current
    from ferry.core.reconcile import reconcile

    bench.settings = bench.settings.with_overrides(keep_previous_s=600)
    bench.registry.add("iris", "champion")
    bench.deploy()
    bench.registry.add("iris", "champion")
    assert bench.deploy().outcome == Outcome.COMMITTED
    assert bench.triton.placement("iris").front == [2] and bench.triton.placement("iris").store == [1, 2]
    assert reconcile(bench.ferry, "iris").action == "in place", "inside its window the warm version is expected"
    current = read_current(bench.model_dir)
    write_current(bench.model_dir, current.model_copy(update={"previous_warm_until_utc": "20000101T000000"}))
    assert reconcile(bench.ferry, "iris").action == "loaded"
    assert bench.triton.placement("iris").store == [2], "past its window the previous version is unloaded"
    assert reconcile(bench.ferry, "iris").action == "in place"
