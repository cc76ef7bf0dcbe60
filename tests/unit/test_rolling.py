"""A rolling deploy over three fake replicas: never two versions of the model on one replica, never fewer than
N - batch replicas serving, a failure in any batch swapped back everywhere, a crash mid-roll undone by recover."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ferry.core.current import read_current
from ferry.core.errors import InvalidInput
from ferry.core.journal import read_journal
from ferry.core.records import Outcome
from ferry.core.rolling import batch_size, batches
from ferry.core.runner import Runner, deploy
from ferry.core.services import Services
from unit.fakes import FakeTriton
from unit.support import Bench

URLS = [f"http://replica-{i}:8000" for i in range(3)]


class Watched(FakeTriton):
    """A replica that records, at every change, how many stores of the model it holds and whether its front
    serves: what the rolling deploy must keep in bounds."""

    def __init__(self, *args: object, log: list[tuple[str, int, bool]], **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.log = log

    def _note(self) -> None:
        where = self.placement("iris")
        self.log.append((self.url, len(where.store), bool(where.front)))

    def load(self, model: str, config_json: str, files: dict[str, bytes] | None = None) -> None:
        super().load(model, config_json, files)
        self._note()

    def unload(self, model: str) -> None:
        super().unload(model)
        self._note()


@pytest.fixture
def fleet(bench: Bench) -> tuple[list[Watched], list[tuple[str, int, bool]]]:
    log: list[tuple[str, int, bool]] = []
    return [Watched(bench.settings.repository, url=url, log=log) for url in URLS], log


def _services(bench: Bench, replicas: list[Watched]) -> Services:
    settings = bench.settings.with_overrides(gateways="http://127.0.0.1:9", drain_timeout_s=1.0)  # no gateway
    return Services(settings, given_replicas=replicas, given_registry=bench.registry)


def _roll(bench: Bench, replicas: list[Watched], batch: str = "1"):
    return deploy(_services(bench, replicas), "iris", alias="champion", strategy="rolling", batch=batch)


def _serving(replicas: list[Watched]) -> list[list[int]]:
    return [r.placement("iris").serving for r in replicas]


def test_batches_leave_replicas_serving_and_refuse_what_would_leave_none() -> None:
    assert batches(URLS, "1") == [[u] for u in URLS]
    assert batches(URLS, "2") == [URLS[:2], URLS[2:]]
    assert batch_size(8, "25%") == 2 and batch_size(3, "10%") == 1
    for urls, batch in ((URLS[:1], "1"), (URLS, "3"), (URLS, "100%")):
        with pytest.raises(InvalidInput, match="nowhere to move the traffic"):
            batches(urls, batch)
    for bad in ("0", "x", "-1", "0%", "200%"):
        with pytest.raises(InvalidInput, match="not a number of replicas"):
            batch_size(3, bad)


def test_a_good_candidate_rolls_batch_by_batch_and_commits(bench: Bench, fleet) -> None:
    replicas, log = fleet
    bench.registry.add("iris", "champion")
    assert deploy(_services(bench, replicas), "iris", alias="champion").outcome == Outcome.COMMITTED
    bench.registry.add("iris", "champion")
    log.clear()
    report = _roll(bench, replicas)
    assert report.outcome == Outcome.COMMITTED and report.strategy == "rolling", report
    assert _serving(replicas) == [[2]] * 3 and all(r.placement("iris").store == [2] for r in replicas)
    assert max(stores for _, stores, _ in log) == 1, "a replica held two versions of the model"
    # Never fewer than N - batch replicas serving: replay the log, one replica's front at a time.
    fronts = dict.fromkeys(URLS, True)
    for url, _, serves in log:
        fronts[url] = serves
        assert sum(fronts.values()) >= len(URLS) - 1
    assert not bench.model_dir.rollout_path.exists() and read_current(bench.model_dir).active_version == 2


def test_a_failure_in_batch_two_swaps_batch_one_back(bench: Bench, fleet) -> None:
    replicas, log = fleet
    bench.registry.add("iris", "champion")
    deploy(_services(bench, replicas), "iris", alias="champion")
    bench.registry.add("iris", "champion")
    replicas[1].fail_load[2] = "CUDA out of memory (fake)"
    report = _roll(bench, replicas)
    assert (report.outcome, report.failed_step, report.failed_replica) == (Outcome.ROLLED_BACK, "load", URLS[1])
    assert "batch 2" in report.error and report.rollback.verified, report
    assert _serving(replicas) == [[1]] * 3 and all(r.placement("iris").store == [1] for r in replicas)
    assert max(stores for _, stores, _ in log) == 1
    assert not bench.model_dir.rollout_path.exists() and read_current(bench.model_dir).active_version == 1
    assert json.loads(next(bench.model_dir.quarantine_root.glob("2.failed_*/reason.json")).read_text())["error"]


def test_a_fleet_of_one_is_refused_before_anything(bench: Bench) -> None:
    bench.registry.add("iris", "champion")
    bench.deploy()
    bench.registry.add("iris", "champion")
    loads = len(bench.triton.loads)
    report = bench.deploy(strategy="rolling")
    assert report.outcome == Outcome.REJECTED and "nowhere to move the traffic" in (report.error or "")
    assert len(bench.triton.loads) == loads and read_current(bench.model_dir).active_version == 1


def test_a_deploy_killed_mid_roll_is_undone_by_recover(bench: Bench, fleet, tmp_path: Path) -> None:
    replicas, _ = fleet
    bench.registry.add("iris", "champion")
    deploy(_services(bench, replicas), "iris", alias="champion")
    bench.registry.add("iris", "champion")
    replicas[2].hang_load.add(2)  # the last batch never loads: the process "dies" there
    from ferry.core.target import Target

    runner = Runner(_services(bench, replicas), "iris")
    journal = runner.begin(Target.of_alias("champion", strategy="rolling"))
    from ferry.core.records import Step

    runner.run_step(journal, Step.MATERIALIZE)
    with pytest.raises(Exception, match="did not answer"):
        runner.run_step(journal, Step.LOAD)
    assert read_journal(bench.model_dir).record.swapped == URLS, "the journal names every replica touched"
    replicas[2].hang_load.clear()
    report = Runner(_services(bench, replicas), "iris").recover()
    assert report is not None and report.outcome == Outcome.ROLLED_BACK
    assert _serving(replicas) == [[1]] * 3 and read_journal(bench.model_dir) is None


def test_the_dags_steps_roll_like_one_deploy(bench: Bench, fleet) -> None:
    from ferry.adapters import dag_steps

    replicas, log = fleet
    ferry = _services(bench, replicas)
    bench.registry.add("iris", "champion")
    deploy(ferry, "iris", alias="champion")
    bench.registry.add("iris", "champion")
    log.clear()
    handle = dag_steps.snapshot_current(ferry, "iris", "champion", None, False, "rolling", "2")
    handle = dag_steps.materialize_repo(ferry, handle)
    for step in (dag_steps.triton_load, dag_steps.triton_ready, dag_steps.triton_infer_smoke):
        handle = step(ferry, handle)
    report = dag_steps.commit_current(ferry, handle)
    assert report["outcome"] == "committed" and report["strategy"] == "rolling"
    assert _serving(replicas) == [[2]] * 3 and max(stores for _, stores, _ in log) == 1
    with pytest.raises(InvalidInput, match="nowhere to move the traffic"):
        dag_steps.snapshot_current(ferry, "iris", "champion", None, False, "rolling", "3")
    assert read_journal(bench.model_dir) is None, "a refused snapshot leaves no journal"


def test_a_batch_without_rolling_or_unreadable_is_refused_before_anything(bench: Bench) -> None:
    from ferry.core.target import Target

    with pytest.raises(InvalidInput, match="applies to rolling deploys only"):
        Target.of_alias("champion", batch="0")
    with pytest.raises(InvalidInput, match="applies to rolling deploys only"):
        Target.of_version(1, batch="2")
    with pytest.raises(InvalidInput, match="not a number of replicas"):
        Target.of_alias("champion", strategy="rolling", batch="0")
    bench.registry.add("iris", "champion")
    with pytest.raises(InvalidInput, match="applies to rolling deploys only"):
        bench.deploy(batch="3")
    assert not bench.model_dir.exists() or read_current(bench.model_dir) is None
