"""The watcher's dispatcher and ferry's own deploy behind it, over the unit tier's fakes of Triton and MLflow:
a trigger deploys exactly the version its alias moved to, or is refused with the reason, and every
trigger that ends is written down."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

from ferry.adapters.watch import Dispatcher, LocalDeployer, Trigger, TriggerLog
from ferry.adapters.watch.metrics import WatchMetrics
from ferry.core.current import read_current, read_history
from unit.support import Bench


def trigger(version: int, key: str, model: str = "iris", alias: str = "champion") -> Trigger:
    return Trigger(model, alias, version, "webhook", key)


def dispatcher(bench: Bench, ended: Path) -> Dispatcher:
    deployer = LocalDeployer(bench.settings, registry=bench.registry, replicas=[bench.triton])
    return Dispatcher(deployer, WatchMetrics(), TriggerLog(ended))


def test_a_trigger_deploys_the_version_its_alias_moved_to(bench: Bench, tmp_path: Path) -> None:
    bench.registry.add("iris", "champion")
    dispatch = dispatcher(bench, tmp_path / "triggers.jsonl")
    dispatch.submit(trigger(1, "d1"))
    assert dispatch.drain(30)
    [done] = dispatch.recent
    assert (done.state, done.outcome) == ("done", "committed"), done
    assert read_current(bench.model_dir).active_version == 1


def test_a_trigger_whose_alias_moved_since_is_refused_and_deploys_nothing(bench: Bench, tmp_path: Path) -> None:
    bench.registry.add("iris", "champion")
    bench.registry.add("iris", "champion")  # @champion -> v2 before the trigger for v1 runs
    dispatch = dispatcher(bench, tmp_path / "triggers.jsonl")
    dispatch.submit(trigger(1, "late"))
    assert dispatch.drain(30)
    [late] = dispatch.recent
    assert late.outcome == "refused" and "names v2 now, not v1" in late.detail, late
    assert bench.triton.loads == [] and read_current(bench.model_dir) is None
    [record] = TriggerLog(tmp_path / "triggers.jsonl").read()
    assert (record["key"], record["outcome"], record["version"]) == ("late", "refused", 1)


def test_an_alias_that_moves_during_the_deploy_is_rejected_inside_the_transaction(bench: Bench,
                                                                                   tmp_path: Path) -> None:
    bench.registry.add("iris", "champion")
    resolve = bench.registry.resolve_alias
    calls: list[str] = []

    def moving(model: str, alias: str):  # the watcher's check sees v1; by the snapshot, @champion names v2
        calls.append(alias)
        if len(calls) == 2:
            bench.registry.add("iris", "champion")
        return resolve(model, alias)

    bench.registry.resolve_alias = moving  # type: ignore[method-assign]
    dispatch = dispatcher(bench, tmp_path / "triggers.jsonl")
    dispatch.submit(trigger(1, "raced"))
    assert dispatch.drain(30)
    [raced] = dispatch.recent
    assert raced.outcome == "rejected" and "names v2 now, not v1" in raced.detail, raced
    [attempt] = read_history(bench.model_dir)
    assert attempt["outcome"] == "rejected" and "not v1" in attempt["error"], attempt
    assert bench.triton.loads == []


def test_an_unknown_model_is_refused_with_the_reason_and_written_down(bench: Bench, tmp_path: Path) -> None:
    ended = tmp_path / "watch" / "triggers.jsonl"
    dispatch = dispatcher(bench, ended)
    dispatch.submit(trigger(1, "ghost", model="ghost"))
    assert dispatch.drain(30)
    [ghost] = dispatch.recent
    assert ghost.outcome == "refused" and "no model named 'ghost'" in ghost.detail, ghost
    [record] = TriggerLog(ended).read()
    assert (record["model"], record["outcome"]) == ("ghost", "refused") and "no model named" in record["detail"]
    assert not (bench.settings.repository / "ghost").exists()


class Gate:
    """A deployer that holds its first deploy until released, and records every trigger it ran."""

    via = "test"

    def __init__(self) -> None:
        self.release, self.started, self.ran = threading.Event(), threading.Event(), []

    def run(self, trigger: Trigger) -> tuple[str, str]:
        self.started.set()
        self.release.wait(10)
        self.ran.append(trigger.key)
        return "committed", "recorded"


def test_a_newer_move_takes_the_place_of_the_waiting_one(tmp_path: Path) -> None:
    gate = Gate()
    ended = tmp_path / "triggers.jsonl"
    dispatch = Dispatcher(gate, WatchMetrics(), TriggerLog(ended))
    dispatch.submit(trigger(1, "first"))
    assert gate.started.wait(5)
    assert dispatch.submit(trigger(2, "waiting")) == "queued"
    assert dispatch.submit(trigger(3, "newest")) == "queued"
    gate.release.set()
    assert dispatch.drain(10)
    assert gate.ran == ["first", "newest"], "the move to v2 was overtaken before it started"
    states = {t.key: (t.state, t.detail) for t in dispatch.recent}
    assert states["waiting"] == ("superseded", "by newest (v3) before it started"), states
    assert [r["key"] for r in TriggerLog(ended).read()] == ["waiting", "first", "newest"]


def test_the_trigger_file_keeps_the_newest(tmp_path: Path) -> None:
    path = tmp_path / "triggers.jsonl"
    log = TriggerLog(path, keep=3)
    for number in range(7):
        log.append(trigger(number + 1, f"k{number}"))
    assert [r["key"] for r in TriggerLog(path).read()][-3:] == ["k4", "k5", "k6"]
    assert len(path.read_text().splitlines()) <= 6
    with path.open("a") as handle:
        handle.write('{"torn')
    assert len(TriggerLog(path).read()) == len(path.read_text().splitlines()) - 1, "a torn line is skipped"


class SlowHandler(logging.Handler):
    """A log that takes a while to write (a slow disk): the worker runs meanwhile."""

    def emit(self, record: logging.LogRecord) -> None:
        time.sleep(0.02)


def test_a_trigger_taken_at_once_is_still_answered_as_queued() -> None:
    gate = Gate()
    gate.release.set()
    dispatch = Dispatcher(gate, WatchMetrics(), TriggerLog(None))
    handler, logger = SlowHandler(), logging.getLogger("ferry.watch")
    logger.addHandler(handler)
    level, logger.level = logger.level, logging.INFO
    try:
        states = [dispatch.submit(trigger(number, f"k{number}", model=f"m{number}")) for number in range(1, 6)]
        assert dispatch.drain(10)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    assert set(states) == {"queued"}, states  # not "running": the delivery's answer says accepted
