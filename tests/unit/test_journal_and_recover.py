"""The journal is the file crash safety rests on: typed, versioned, and a journal of the earlier code still recovers."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from ferry.core.current import read_current
from ferry.core.errors import InvalidInput
from ferry.core.journal import read_journal
from ferry.core.records import Outcome, Step
from ferry.core.runner import Runner
from ferry.core.services import Services
from ferry.core.target import Target
from unit.fakes import tiny_onnx, write_version_files
from unit.support import Bench

FIXTURE = Path(__file__).parent / "data" / "journal-written-before-format.json"


def test_a_journal_written_before_the_format_field_is_read_as_format_1(bench: Bench) -> None:
    bench.model_dir.state_dir.mkdir(parents=True)
    shutil.copy(FIXTURE, bench.model_dir.journal_path)
    journal = read_journal(bench.model_dir)
    record = journal.record
    assert (record.format, record.step, record.owner.via) == (1, Step.LOAD, "airflow")
    assert record.snapshot.active_version == 1 and record.candidate.version == 2 and record.failure is None


def test_a_journal_written_before_the_format_field_is_recovered(bench: Bench) -> None:
    """An Airflow worker of the earlier code died after loading v2: recover rolls it back to v1."""
    for version in (1, 2):
        write_version_files(bench.model_dir.version_dir(version), tiny_onnx())
    bench.model_dir.state_dir.mkdir(parents=True)
    shutil.copy(FIXTURE, bench.model_dir.journal_path)
    bench.triton.models["iris"] = {1: "READY", 2: "READY"}
    report = Runner(bench.ferry, "iris").recover()
    assert report.outcome == Outcome.ROLLED_BACK and report.failed_step == "load"
    assert "stopped during load" in report.error and report.deploy_id == "20261129T070200-6abe8f"
    assert read_current(bench.model_dir).active_version == 1
    assert bench.triton.ready_versions("iris") == [1] and not bench.model_dir.version_dir(2).exists()
    assert read_journal(bench.model_dir) is None
    assert Runner(bench.ferry, "iris").recover() is None, "recover is idempotent"


def test_a_damaged_journal_is_refused_not_guessed(bench: Bench) -> None:
    bench.model_dir.state_dir.mkdir(parents=True)
    bench.model_dir.journal_path.write_text('{"deploy_id": ')
    with pytest.raises(InvalidInput, match="is damaged"):
        read_journal(bench.model_dir)


@pytest.mark.parametrize("stop_after", [None, Step.MATERIALIZE, Step.LOAD, Step.READY, Step.SMOKE])
def test_a_deploy_stopped_before_its_commit_is_undone(bench: Bench, stop_after: Step | None) -> None:
    bench.registry.add("iris", "champion")
    bench.deploy()
    bench.registry.add("iris", "champion")
    runner = Runner(bench.ferry, "iris", via="airflow")
    journal = runner.begin(Target.of_alias("champion"))
    for step in (Step.MATERIALIZE, Step.LOAD, Step.READY, Step.SMOKE):
        if stop_after is None:
            break
        runner.run_step(journal, step)
        if step == stop_after:
            break
    report = Runner(bench.ferry, "iris").recover()
    assert report.outcome == Outcome.ROLLED_BACK
    assert read_current(bench.model_dir).active_version == 1
    bench.check_invariants(attempts=2)


def test_the_journal_names_the_process_of_the_step_in_progress(bench: Bench, monkeypatch: pytest.MonkeyPatch) -> None:
    """An Airflow task runs one step: the process a recover names as stopped is the one of the step it stopped in."""
    import os

    bench.registry.add("iris", "champion")
    runner = Runner(bench.ferry, "iris", via="airflow")
    journal = runner.begin(Target.of_alias("champion"))
    assert read_journal(bench.model_dir).record.owner.pid == os.getpid()
    monkeypatch.setattr(os, "getpid", lambda: 424242)  # the next task's process
    runner.run_step(journal, Step.MATERIALIZE)
    assert read_journal(bench.model_dir).record.owner.pid == 424242
    report = Runner(bench.ferry, "iris").recover()
    assert report.outcome == Outcome.ROLLED_BACK and "pid 424242" in (report.error or ""), report.error


def test_a_deploy_stopped_after_its_commit_point_is_finished(bench: Bench, monkeypatch: pytest.MonkeyPatch) -> None:
    from ferry.core import steps

    bench.registry.add("iris", "champion")
    bench.deploy()
    bench.registry.add("iris", "champion")
    runner = Runner(bench.ferry, "iris")
    journal = runner.begin(Target.of_alias("champion"))
    for step in (Step.MATERIALIZE, Step.LOAD, Step.READY, Step.SMOKE):
        runner.run_step(journal, step)

    def died_after_writing_current(*args: object) -> None:
        raise SystemExit("killed")

    monkeypatch.setattr(steps, "pin_after_commit", died_after_writing_current)
    with pytest.raises(SystemExit):
        runner.run_step(journal, Step.COMMIT)
    monkeypatch.undo()
    assert bench.triton.placement("iris").front == [1], "committed, the front not yet repointed"
    report = Runner(bench.ferry, "iris").recover()
    assert report.outcome == Outcome.COMMITTED and report.recovered_by
    assert bench.triton.ready_versions("iris") == [2]
    bench.check_invariants(attempts=2)


def test_a_deploy_refused_for_one_in_progress_answers_without_starting_mlflows_client(bench: Bench) -> None:
    bench.registry.add("iris", "champion")
    Runner(bench.ferry, "iris", via="airflow").begin(Target.of_alias("champion"))  # an Airflow run deploying
    services = Services(bench.settings, given_replicas=[bench.triton])  # MLflow's own client, started on demand
    report = Runner(services, "iris").deploy(Target.of_alias("champion"))
    assert report.outcome == Outcome.REJECTED and "is in progress (an Airflow run)" in report.error
    assert services._registry_future is None, "importing mlflow (seconds) for a deploy refused at once"
