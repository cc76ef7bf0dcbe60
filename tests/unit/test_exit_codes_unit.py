"""The README's exit codes where they are decided by logic alone (the real-server table is in
tests/test_user_path.py): a version directory ferry did not write, status, sync; and the CLI's JSON and wording."""

from __future__ import annotations

import io
import json
import re
from contextlib import redirect_stdout
from pathlib import Path

import pytest

from ferry.adapters import cli, cli_mlflow, cli_rollout
from ferry.core import writeback
from ferry.core.current import read_current, read_history
from ferry.core.records import CurrentState, Outcome, Step
from ferry.core.status import UNKNOWN, ModelStatus, ReplicaStatus
from strict_json import loads
from unit.fakes import FakeRegistry, tiny_onnx
from unit.support import Bench
from unit.test_writeback_unit import FakeMlflowClient

BAKE_DOC = Path(__file__).resolve().parents[2] / "docs" / "bake.md"


# ---------------------------------------------------------------- a version directory ferry did not write


def test_a_hand_made_version_directory_is_refused_and_left_untouched(bench: Bench) -> None:
    bench.registry.add("iris", "champion")
    bench.deploy()
    bench.registry.add("iris", "champion")
    hand_made = bench.model_dir.version_dir(2)
    hand_made.mkdir()
    (hand_made / "model.onnx").write_bytes(tiny_onnx())
    (hand_made / "notes.txt").write_text("copied here by hand")
    before = {p.name: p.read_bytes() for p in hand_made.iterdir()}

    report = bench.deploy()
    assert report.outcome == Outcome.REJECTED and not report.retryable, "refused: exit 2, not a rollback (exit 1)"
    assert f"{hand_made} exists but holds no ferry manifest" in report.error and "move" in report.hint
    assert Step.ROLLBACK not in report.steps and report.rollback is None
    assert {p.name: p.read_bytes() for p in hand_made.iterdir()} == before, "left exactly as it was"
    assert not bench.model_dir.quarantine_root.exists() or not any(bench.model_dir.quarantine_root.iterdir())
    assert read_history(bench.model_dir)[-1]["outcome"] == "rejected"
    assert read_current(bench.model_dir).active_version == 1
    bench.check_invariants(attempts=2)


def test_a_version_directory_changed_since_ferry_staged_it_is_refused_too(bench: Bench) -> None:
    bench.registry.add("iris", "champion")
    bench.deploy()
    bench.registry.add("iris", "champion")
    bench.deploy()
    (bench.model_dir.version_dir(1) / "model.onnx").write_bytes(tiny_onnx(outputs=3) + b"\0")
    report = bench.deploy(version=1)
    assert report.outcome == Outcome.REJECTED and "changed since ferry staged it" in report.error
    assert read_history(bench.model_dir)[-1]["outcome"] == "rejected"
    bench.check_invariants(attempts=3)


# ---------------------------------------------------------------- ferry status


def _status(*replicas: ReplicaStatus, **fields: object) -> ModelStatus:
    return ModelStatus(model="iris", replicas=list(replicas), **fields)


SERVES = ReplicaStatus(url="http://a:8000", serving=[1])
DOWN = ReplicaStatus(url="http://b:8000", error="Triton at http://b:8000 is not reachable", drift=UNKNOWN)
DRIFTED = ReplicaStatus(url="http://c:8000", drift="current.json names [1], Triton serves nothing")


@pytest.mark.parametrize(("reports", "code"), [
    ([_status(SERVES)], 0),
    ([_status(DRIFTED, drift=DRIFTED.drift)], 1),
    ([_status(SERVES, current_error="current.json is not JSON", drift=UNKNOWN)], 1),
    ([_status(SERVES, in_flight="deploy x is unfinished")], 1),
    ([_status(DOWN, drift=UNKNOWN)], 3),
    ([_status(SERVES, DOWN, drift=UNKNOWN)], 3),
    ([_status(DRIFTED, DOWN, drift=DRIFTED.drift)], 1),  # a drift found on a replica that answered is a finding
])
def test_status_exit_codes(reports: list[ModelStatus], code: int) -> None:
    assert cli._status_exit_code(reports) == code


# ---------------------------------------------------------------- ferry sync


@pytest.fixture
def committed(bench: Bench) -> FakeMlflowClient:
    client = FakeMlflowClient(bench.registry)
    bench.registry.client = client  # type: ignore[attr-defined]
    bench.registry.add("iris", "champion")
    assert bench.deploy().outcome == Outcome.COMMITTED
    return client


def test_sync_against_a_registry_without_the_version_is_not_in_sync(bench: Bench, committed: FakeMlflowClient,
                                                                    tmp_path: Path) -> None:
    committed.registry = FakeRegistry(tmp_path / "another")  # MLFLOW_TRACKING_URI names another registry
    result = writeback.sync(bench.settings, bench.registry, bench.model_dir)
    assert result.refused == ["v1", "@serving"] and not result.in_sync and not result.unavailable
    line = cli_mlflow._sync_state(result, "http://elsewhere:5000")
    assert "already in sync" not in line and "does not have v1, @serving of 'iris'" in line
    assert cli_mlflow.sync_exit_code([result]) == 1


def test_sync_exit_codes(bench: Bench, committed: FakeMlflowClient) -> None:
    synced = writeback.sync(bench.settings, bench.registry, bench.model_dir)
    assert synced.in_sync and cli_mlflow._sync_state(synced, "") == "already in sync"
    assert cli_mlflow.sync_exit_code([synced]) == 0
    committed.down = True
    down = writeback.sync(bench.settings, bench.registry, bench.model_dir)
    assert down.unavailable and "NOT in sync: MLflow did not answer" in cli_mlflow._sync_state(down, "")
    refused = synced.model_copy(update={"refused": ["v9"]})
    busy = synced.model_copy(update={"skipped": "a deploy of 'iris' is running"})
    assert cli_mlflow.sync_exit_code([synced, refused, down]) == 3
    assert cli_mlflow.sync_exit_code([synced, refused, busy]) == 1
    assert cli_mlflow.sync_exit_code([synced, busy]) == 2
    assert loads(json.dumps(refused.model_dump(mode="json")))["in_sync"] is False


# ---------------------------------------------------------------- --json is JSON, and the words match the README


def test_json_output_has_null_where_a_figure_is_not_a_number() -> None:
    printed = io.StringIO()
    with redirect_stdout(printed):
        cli.print_json([{"live": {"p95_ms": float("nan"), "rate": float("inf"), "ratio": 0.5}}, (float("-inf"),)])
    assert loads(printed.getvalue()) == [{"live": {"p95_ms": None, "rate": None, "ratio": 0.5}}, [None]]
    with pytest.raises(ValueError, match="NaN is not JSON"):
        loads('{"p95_ms": NaN}')


def test_rollout_promote_and_abort_say_what_the_readme_says(bench: Bench, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    bench.model_dir.ensure()
    monkeypatch.setattr(cli_rollout, "read_rollout", lambda model_dir: object())  # a bake in progress
    runner = CliRunner()
    env = {"FERRY_HOME": str(bench.settings.home), "FERRY_REPOSITORY": str(bench.settings.repository)}
    (bench.model_dir.path / "config.pbtxt").write_text("")  # the repository knows the model
    promised = re.search(r"The deploying process acts on it within ([\d.]+ s)", BAKE_DOC.read_text()).group(1)
    for action in ("promote", "abort"):
        result = runner.invoke(cli.app, ["rollout", action, "iris"], env=env)
        assert result.exit_code == 0, result.output
        assert f"acts on it within {promised}" in result.output and "within a second" not in result.output
        control = json.loads(bench.model_dir.rollout_control_path.read_text())
        assert control["action"] == action


def test_sync_of_a_model_whose_current_json_is_damaged_skips_it_with_the_reason(
        bench: Bench, committed: FakeMlflowClient, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from ferry.core import services

    monkeypatch.setattr(services.Services, "registry", property(lambda self: bench.registry))
    bench.model_dir.current_path.write_text("{not json")
    env = {"FERRY_HOME": str(bench.settings.home), "FERRY_REPOSITORY": str(bench.settings.repository)}
    result = CliRunner().invoke(cli.app, ["sync", "iris", "--json"], env=env)
    assert result.exit_code == 2, result.output
    [skipped] = json.loads(result.output)
    assert "current.json is unreadable" in skipped["skipped"] and "restore it" in skipped["skipped"], skipped
    assert bench.model_dir.current_path.read_text() == "{not json", "nothing was written"


def test_a_current_state_dumps_as_strict_json() -> None:
    state = CurrentState(active_version=1, run_id="r", alias=None, updated_at_utc="20260101T000000", model="iris",
                         previous_version=None, sha256="0" * 64, deploy_id="d")
    printed = io.StringIO()
    with redirect_stdout(printed):
        cli.print_json(state.model_dump(mode="json"))
    assert loads(printed.getvalue())["active_version"] == 1
