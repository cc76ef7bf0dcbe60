"""The write-back to MLflow over fakes: the tags and the serving alias after each outcome, a write-back that
fails (the commit stands, the warning is recorded), and ``sync`` (the same state from the files, idempotent)."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from ferry.core import writeback
from ferry.core.current import read_current, read_history
from ferry.core.records import Outcome
from ferry.core.runner import Runner
from ferry.core.target import Target
from ferry.core.writeback import read_write_backs
from unit.fakes import FakeRegistry
from unit.support import Bench


class MlflowError(Exception):
    def __init__(self, message: str, error_code: str = "INTERNAL_ERROR") -> None:
        super().__init__(message)
        self.error_code = error_code


@dataclass
class FakeVersion:
    version: str
    tags: dict[str, str] = field(default_factory=dict)


@dataclass
class FakeModel:
    aliases: dict[str, str] = field(default_factory=dict)


class FakeMlflowClient:
    """The part of MlflowClient the write-back uses: version tags and aliases of one registry."""

    def __init__(self, registry: FakeRegistry) -> None:
        self.registry = registry
        self.tags: dict[tuple[str, int], dict[str, str]] = {}
        self.aliases: dict[str, dict[str, int]] = {}
        self.down = False
        self.writes = 0

    def _check(self, model: str, version: str | None = None) -> None:
        if self.down:
            raise MlflowError("Connection refused")
        if model not in self.registry.versions or (version and int(version) not in self.registry.versions[model]):
            raise MlflowError(f"{model} v{version} not found", "RESOURCE_DOES_NOT_EXIST")

    def get_registered_model(self, model: str) -> FakeModel:
        self._check(model)
        return FakeModel({a: str(v) for a, v in self.aliases.get(model, {}).items()})

    def get_model_version(self, model: str, version: str) -> FakeVersion:
        self._check(model, version)
        return FakeVersion(version, dict(self.tags.get((model, int(version)), {})))

    def search_model_versions(self, filter_string: str, max_results: int) -> list[FakeVersion]:
        model = filter_string.split("'")[1]
        self._check(model)
        return [FakeVersion(str(v), t) for (m, v), t in self.tags.items()
                if m == model and t.get(writeback.STATUS) == writeback.SERVING]

    def set_model_version_tag(self, model: str, version: str, key: str, value: str) -> None:
        self._check(model, version)
        self.writes += 1
        self.tags.setdefault((model, int(version)), {})[key] = value

    def delete_model_version_tag(self, model: str, version: str, key: str) -> None:
        self._check(model, version)
        self.writes += 1
        self.tags.get((model, int(version)), {}).pop(key, None)

    def set_registered_model_alias(self, model: str, alias: str, version: str) -> None:
        self._check(model, version)
        self.writes += 1
        self.aliases.setdefault(model, {})[alias] = int(version)


@pytest.fixture
def mlflow(bench: Bench) -> FakeMlflowClient:
    """The bench's fake registry with an MLflow client behind it (FakeRegistry alone has none: no write-back)."""
    client = FakeMlflowClient(bench.registry)
    bench.registry.client = client  # type: ignore[attr-defined]
    return client


def status(mlflow: FakeMlflowClient, version: int) -> dict[str, str]:
    return mlflow.tags.get(("iris", version), {})


def test_a_commit_tags_the_version_serving_and_moves_the_alias(bench: Bench, mlflow: FakeMlflowClient) -> None:
    bench.registry.add("iris", "champion")
    report = bench.deploy()
    assert report.outcome == Outcome.COMMITTED and report.warnings == []
    current = read_current(bench.model_dir)
    assert status(mlflow, 1) == {"ferry.status": "serving", "ferry.deploy_id": current.deploy_id,
                                 "ferry.updated_at_utc": current.updated_at_utc}
    assert mlflow.aliases["iris"] == {"serving": 1}


def test_the_write_back_comes_after_the_record_and_leaves_its_own_line(bench: Bench,
                                                                        mlflow: FakeMlflowClient) -> None:
    """The attempt is over (history record written, journal gone) before MLflow is called (docs/design.md)."""
    bench.registry.add("iris", "champion")
    seen: list[tuple[bool, bool]] = []
    write = mlflow.set_registered_model_alias

    def alias_after_the_record(model: str, alias: str, version: str) -> None:
        seen.append((bool(read_history(bench.model_dir)), bench.model_dir.journal_path.exists()))
        write(model, alias, version)

    mlflow.set_registered_model_alias = alias_after_the_record  # type: ignore[method-assign]
    report = bench.deploy()
    assert report.outcome == Outcome.COMMITTED and seen == [(True, False)]
    [told] = read_write_backs(bench.model_dir)
    assert (told.deploy_id, told.by, told.told, told.warnings) == (report.deploy_id, "deploy", True, [])
    assert told.seconds >= 0 and read_history(bench.model_dir)[-1]["warnings"] == []
    writeback.sync(bench.settings, bench.registry, bench.model_dir)
    synced = read_write_backs(bench.model_dir)[-1]
    assert (synced.by, synced.told, synced.deploy_id) == ("sync", True, report.current.deploy_id)


def test_a_rejected_attempt_tells_mlflow_nothing(bench: Bench, mlflow: FakeMlflowClient) -> None:
    bench.registry.add("iris", "champion")
    assert bench.deploy(alias="nope").outcome == Outcome.REJECTED
    assert read_write_backs(bench.model_dir) == [] and mlflow.writes == 0


def test_the_next_commit_retires_the_previous_version(bench: Bench, mlflow: FakeMlflowClient) -> None:
    bench.registry.add("iris", "champion")
    bench.deploy()
    bench.registry.add("iris", "champion")
    second = bench.deploy()
    assert status(mlflow, 2)["ferry.status"] == "serving" and mlflow.aliases["iris"]["serving"] == 2
    assert status(mlflow, 1) == {"ferry.status": "retired", "ferry.deploy_id": second.deploy_id,
                                 "ferry.updated_at_utc": second.current.updated_at_utc}


def test_a_refused_version_says_where_and_why_and_the_alias_stays(bench: Bench, mlflow: FakeMlflowClient) -> None:
    bench.registry.add("iris", "champion")
    bench.deploy()
    bench.registry.add("iris", "champion")
    bench.triton.fail_load[2] = "onnxruntime: bad graph " + "x" * 2000 + "\n  At: stack line 1"
    report = bench.deploy()
    assert report.outcome == Outcome.ROLLED_BACK and report.warnings == []
    tags = status(mlflow, 2)
    assert tags["ferry.status"] == "refused" and tags["ferry.failed_step"] == "load"
    assert tags["ferry.deploy_id"] == report.deploy_id and tags["ferry.updated_at_utc"] == report.finished_at_utc
    assert tags["ferry.error"].startswith("Triton could not load v2") and "\n" not in tags["ferry.error"]
    assert len(tags["ferry.error"]) <= writeback.ERROR_CHARS and tags["ferry.error"].endswith("…")
    assert mlflow.aliases["iris"] == {"serving": 1} and status(mlflow, 1)["ferry.status"] == "serving"


def test_a_refused_version_that_serves_later_loses_its_failure_tags(bench: Bench, mlflow: FakeMlflowClient) -> None:
    bench.registry.add("iris", "champion")
    bench.triton.fail_load[1] = "bad graph"
    bench.deploy()
    assert status(mlflow, 1)["ferry.status"] == "refused"
    del bench.triton.fail_load[1]
    assert bench.deploy().outcome == Outcome.COMMITTED
    assert set(status(mlflow, 1)) == {"ferry.status", "ferry.deploy_id", "ferry.updated_at_utc"}


def test_a_rejected_attempt_writes_nothing(bench: Bench, mlflow: FakeMlflowClient) -> None:
    bench.registry.add("iris", "champion")
    assert bench.deploy(alias="nope").outcome == Outcome.REJECTED
    assert mlflow.writes == 0


def test_mlflow_down_after_the_commit_is_a_warning_and_sync_repairs_it(bench: Bench,
                                                                        mlflow: FakeMlflowClient) -> None:
    bench.registry.add("iris", "champion")
    bench.deploy()
    bench.registry.add("iris", "champion")
    mlflow.down = True
    report = bench.deploy()
    assert report.outcome == Outcome.COMMITTED and read_current(bench.model_dir).active_version == 2
    [warning] = report.warnings
    assert "was not told of the outcome" in warning and "ferry sync iris" in warning
    assert read_history(bench.model_dir)[-1]["outcome"] == "committed", "the attempt's record comes first"
    [told] = [r for r in read_write_backs(bench.model_dir) if r.deploy_id == report.deploy_id]
    assert not told.told and told.warnings == [warning] and told.by == "deploy"
    assert status(mlflow, 1)["ferry.status"] == "serving", "nothing could be written"

    mlflow.down = False
    result = writeback.sync(bench.settings, bench.registry, bench.model_dir)
    assert result.warnings == [] and not result.unavailable and result.serving_version == 2
    assert status(mlflow, 2)["ferry.status"] == "serving" and status(mlflow, 1)["ferry.status"] == "retired"
    assert status(mlflow, 1)["ferry.deploy_id"] == report.deploy_id and mlflow.aliases["iris"]["serving"] == 2
    writes = mlflow.writes
    again = writeback.sync(bench.settings, bench.registry, bench.model_dir)
    assert again.changes == [] and mlflow.writes == writes, "a second sync writes nothing"


def test_going_back_to_a_kept_version_with_mlflow_down_stays_fast(bench: Bench, mlflow: FakeMlflowClient) -> None:
    bench.registry.add("iris", "champion")
    bench.deploy()
    bench.registry.add("iris", "champion")
    bench.deploy()
    bench.registry.unreachable, mlflow.down = True, True
    report = bench.deploy(version=1)
    assert report.outcome == Outcome.COMMITTED and len(report.warnings) == 1
    assert "was not told" in report.warnings[0]


def test_sync_from_the_files_gives_what_the_write_back_gave(bench: Bench, mlflow: FakeMlflowClient) -> None:
    """Deploys with the write-back on, and the same deploys with it off followed by one sync: same tags."""
    def story() -> None:
        bench.registry.add("iris", "champion")
        bench.deploy()
        bench.registry.add("iris", "champion")
        bench.deploy()
        bench.registry.add("iris", "champion")
        bench.triton.fail_load[3] = "bad graph"
        bench.deploy()
        bench.deploy(version=1)

    story()
    written = {k: dict(v) for k, v in mlflow.tags.items()}, dict(mlflow.aliases["iris"])
    mlflow.tags.clear()
    mlflow.aliases.clear()
    assert written[1] == {"serving": 1} and written[0][("iris", 3)]["ferry.status"] == "refused"
    assert written[0][("iris", 2)]["ferry.status"] == "retired"
    result = writeback.sync(bench.settings, bench.registry, bench.model_dir)
    assert ({k: dict(v) for k, v in mlflow.tags.items()}, dict(mlflow.aliases["iris"])) == written
    assert len(result.changes) == 4  # three versions and the alias


def test_a_version_mlflow_no_longer_has_is_a_warning_the_rest_is_written(bench: Bench,
                                                                         mlflow: FakeMlflowClient) -> None:
    bench.registry.add("iris", "champion")
    bench.deploy()
    bench.registry.add("iris", "champion")
    del bench.registry.versions["iris"][1]  # deleted in MLflow after it served
    report = bench.deploy()
    assert report.outcome == Outcome.COMMITTED
    assert status(mlflow, 2)["ferry.status"] == "serving" and mlflow.aliases["iris"]["serving"] == 2
    assert any("v1" in w and "refused" in w for w in report.warnings), report.warnings


def test_no_serving_alias_means_no_write_back(bench: Bench, mlflow: FakeMlflowClient) -> None:
    bench.registry.add("iris", "champion")
    ferry = bench.ferry
    ferry.settings = bench.settings.with_overrides(serving_alias="")
    Runner(ferry, "iris").deploy(Target.of_alias("champion"))
    assert mlflow.writes == 0


def test_one_line() -> None:
    assert writeback.one_line("\n  first\x1b[31m line \nsecond") == "first [31m line"
    assert writeback.one_line("x" * 600, writeback.ERROR_CHARS) == "x" * 499 + "…"
    assert writeback.one_line(None) == ""


def test_the_dag_steps_write_back_too(bench: Bench, mlflow: FakeMlflowClient) -> None:
    from ferry.adapters import dag_steps

    bench.registry.add("iris", "champion")
    handle = dag_steps.snapshot_current(bench.ferry, "iris", "champion")
    for step in (dag_steps.materialize_repo, dag_steps.triton_load, dag_steps.triton_ready,
                 dag_steps.triton_infer_smoke):
        handle = step(bench.ferry, handle)
    report = dag_steps.commit_current(bench.ferry, handle)
    assert report["outcome"] == "committed" and report["warnings"] == []
    assert status(mlflow, 1)["ferry.deploy_id"] == handle["deploy_id"] and mlflow.aliases["iris"]["serving"] == 1


@pytest.mark.parametrize("committed", [False, True])
def test_recover_writes_back_the_outcome_it_decides(bench: Bench, mlflow: FakeMlflowClient, committed: bool) -> None:
    from ferry.core.records import Step

    bench.registry.add("iris", "champion")
    bench.deploy()
    bench.registry.add("iris", "champion")
    runner = Runner(bench.ferry, "iris")
    journal = runner.begin(Target.of_alias("champion"))
    for step in (Step.MATERIALIZE, Step.LOAD, Step.READY, Step.SMOKE, *([Step.COMMIT] if committed else [])):
        runner.run_step(journal, step)
    # The process died here: no history record, no write-back.
    assert status(mlflow, 2) == {}
    report = Runner(bench.ferry, "iris").recover()
    assert report.outcome == (Outcome.COMMITTED if committed else Outcome.ROLLED_BACK)
    assert status(mlflow, 2)["ferry.status"] == ("serving" if committed else "refused")
    assert mlflow.aliases["iris"]["serving"] == (2 if committed else 1)
    assert status(mlflow, 1)["ferry.status"] == ("retired" if committed else "serving")
