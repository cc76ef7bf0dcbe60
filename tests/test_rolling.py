"""A rolling deploy on three real Tritons under gateway load: batch by batch, never two versions of the model on
one replica, never fewer than N - batch replicas serving, no failed request; a failure in the last batch puts
the swapped batches back; a deploying process killed mid-roll is undone by `ferry recover`."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from conftest import FAKES, World, assert_invariants, start_fleet, stop_fleet
from ferry.core.current import read_current
from ferry.core.journal import read_journal
from ferry.core.records import RolloutPlan
from ferry.core.runner import Runner, deploy
from ferry.core.services import Services
from ferry.core.target import Target


class Watch:
    """Every replica's repository index every 50 ms: how many stores of the model each holds, and how many
    fronts serve, at each look."""

    def __init__(self, world: World) -> None:
        self.replicas = world.ferry.fleet().replicas
        self.looks: list[tuple[int, int]] = []  # (most stores on one replica, fronts serving)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            placements = [r.placement("iris") for r in self.replicas]
            self.looks.append((max(len(p.store) for p in placements), sum(bool(p.front) for p in placements)))
            time.sleep(0.05)

    def __enter__(self) -> Watch:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=10)


def _rolling(world: World, **overrides: object):
    return deploy(Services(world.settings.with_overrides(**overrides)), "iris", alias="champion", strategy="rolling")


def test_a_rolling_deploy_under_gateway_load_commits_with_no_failed_request(tmp_path: Path) -> None:
    from support.gateway import TOKEN, running_gateway, steady_load

    world = start_fleet(tmp_path, 3)
    try:
        world.register()
        assert world.deploy().outcome == "committed"
        world.register(trees=3)  # v2
        with running_gateway(world) as gateway, steady_load(gateway, http=2, grpc=1) as results:
            time.sleep(1.0)
            with Watch(world) as watch:
                report = _rolling(world, gateways=gateway.url, gateway_token=TOKEN)
            committed_by = time.monotonic()
            time.sleep(1.0)
        assert report.outcome == "committed" and report.strategy == "rolling", report.error
        failed = [r for r in results if r.status != 200]
        assert not failed, f"{len(failed)} of {len(results)} requests failed, e.g. {failed[:3]}"
        assert sum(r.protocol == "grpc" for r in results) > 20 and len(results) > 100
        assert {r.version for r in results} == {1, 2}, "the swapped replicas answer as the candidate"
        assert all(r.version == 2 for r in results if r.began > committed_by), "v1 answered after the commit"
        assert watch.looks and max(stores for stores, _ in watch.looks) == 1, "a replica held two versions"
        assert min(fronts for _, fronts in watch.looks) >= 2, "fewer than N - batch replicas served"
        assert not world.model_dir.rollout_path.exists()
        assert_invariants(world, attempts=2)
    finally:
        stop_fleet(world)


def test_a_failure_in_the_last_batch_puts_the_swapped_batches_back(tmp_path: Path) -> None:
    world = start_fleet(tmp_path, 3, faulty=2)  # only v2's runner fails there (v1 runs the real one)
    try:
        world.register()
        assert world.deploy().outcome == "committed"
        world.register(trees=3)
        faulty = world.settings.triton.urls.split(",")[2]
        position = sorted(world.settings.triton.urls.split(",")).index(faulty) + 1
        with Watch(world) as watch:
            report = _rolling(world, python_runner=FAKES / "fake_faulty_replica_runner.py")
        assert (report.outcome, report.failed_step, report.failed_replica) == ("rolled_back", "smoke", faulty)
        assert f"batch {position}" in (report.error or "") and report.rollback.verified, report
        assert [r.placement("iris").store for r in world.ferry.fleet().replicas] == [[1]] * 3
        assert max(stores for stores, _ in watch.looks) == 1
        assert read_current(world.model_dir).active_version == 1 and not world.model_dir.rollout_path.exists()
        assert_invariants(world, attempts=2)
    finally:
        stop_fleet(world)


def test_a_deploying_process_killed_mid_roll_is_undone_by_recover(tmp_path: Path) -> None:
    world = start_fleet(tmp_path, 3)
    try:
        world.register()
        assert world.deploy().outcome == "committed"
        world.register(trees=3)
        env = {**os.environ, **world.env(), "FERRY_PYTHON_RUNNER": str(FAKES / "fake_slow_start_runner.py")}
        process = subprocess.Popen([sys.executable, "-m", "ferry", "deploy", "iris", "--alias", "champion",
                                    "--strategy", "rolling"], env=env, stdout=subprocess.DEVNULL,
                                   stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # killed once the second batch is under way
            journal = read_journal(world.model_dir)
            if journal is not None and len(journal.record.swapped) >= 2:
                break
            time.sleep(0.05)
        os.kill(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
        assert read_journal(world.model_dir) is not None, "the deploy ended before it could be killed"
        result = world.cli("recover", "iris", "--json")
        assert result.returncode == 0, result.stdout + result.stderr
        assert json.loads(result.stdout)["outcome"] == "rolled_back"
        assert [r.placement("iris").serving for r in world.ferry.fleet().replicas] == [[1]] * 3
        assert [r.placement("iris").store for r in world.ferry.fleet().replicas] == [[1]] * 3
        assert read_current(world.model_dir).active_version == 1 and not world.model_dir.rollout_path.exists()
        assert_invariants(world, attempts=2)
    finally:
        stop_fleet(world)


def test_a_replica_killed_mid_batch_rolls_back_the_others_and_reconcile_brings_it_back(tmp_path: Path) -> None:
    from conftest import replica_settings
    from ferry.core.reconcile import reconcile
    from ferry.runtime import server

    world = start_fleet(tmp_path, 3)
    try:
        world.register()
        assert world.deploy().outcome == "committed"
        world.register(trees=3)
        by_url = {r.triton.endpoint.url: r for r in replica_settings(world.settings)}
        doomed = sorted(by_url)[1]  # batch 2

        def kill_in_batch_two() -> None:
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline:
                journal = read_journal(world.model_dir)
                if journal is not None and doomed in journal.record.swapped:
                    time.sleep(0.5)  # its slow load under way
                    pid = json.loads((by_url[doomed].triton_dir / "tritonserver.pid").read_text())["pid"]
                    os.kill(pid, signal.SIGKILL)
                    return
                time.sleep(0.02)

        killer = threading.Thread(target=kill_in_batch_two)
        killer.start()
        report = _rolling(world, python_runner=FAKES / "fake_slow_start_runner.py")
        killer.join()
        assert (report.outcome, report.failed_replica) == ("rolled_back", doomed), report
        assert "batch 2" in (report.error or "")
        survivors = [url for url in by_url if url != doomed]
        assert all(report.rollback.replicas[url] == [1] for url in survivors), report.rollback
        assert any(doomed in problem for problem in report.rollback.problems)
        server.down(by_url[doomed], grace_s=0)
        server.up(by_url[doomed])
        result = reconcile(world.ferry, "iris")
        assert result.action == "loaded" and result.replicas == {url: [1] for url in by_url}, result
        assert [r.placement("iris").store for r in world.ferry.fleet().replicas] == [[1]] * 3
    finally:
        stop_fleet(world)


OUTSIDE_THE_SAMPLE = {"inputs": [{"name": "X", "shape": [1, 4], "datatype": "FP32", "data": [7.7, 3.8, 6.7, 2.2]}]}


def test_a_candidate_failing_live_traffic_in_batch_two_is_caught_by_its_bake(tmp_path: Path) -> None:
    from support.gateway import TOKEN, client, running_gateway, steady_load

    world = start_fleet(tmp_path, 3, faulty=1)  # only v2's runner fails there, on live rows outside the sample
    try:
        world.register()
        assert world.deploy().outcome == "committed"
        world.register(trees=3)
        urls = world.settings.triton.urls.split(",")
        position = sorted(urls).index(urls[1]) + 1
        outside: list[tuple[float, int, str | None]] = []  # (began, status, version) of rows outside the sample
        stop = threading.Event()

        def outside_load(url: str) -> None:
            with client(url) as session:
                while not stop.is_set():
                    began = time.monotonic()
                    reply = session.post("/v2/models/iris/infer", json=OUTSIDE_THE_SAMPLE)
                    outside.append((began, reply.status_code, reply.headers.get("x-ferry-model-version")))

        with running_gateway(world) as gateway, steady_load(gateway, http=1, grpc=1) as results:
            worker = threading.Thread(target=outside_load, args=(gateway.url,))
            worker.start()
            try:
                ferry = Services(world.settings.with_overrides(
                    gateways=gateway.url, gateway_token=TOKEN, gate_interval_s=1.0, gate_min_requests=10,
                    python_runner=FAKES / "fake_live_fault_on_one_replica_runner.py"))
                target = Target.of_alias("champion", rollout=RolloutPlan(mode="rolling", bake_s=4.0),
                                         strategy="rolling")
                report = Runner(ferry, "iris").deploy(target)
                decided = time.monotonic()
                time.sleep(1.0)
            finally:
                stop.set()
                worker.join(timeout=60)
        assert (report.outcome, report.failed_step) == ("rolled_back", "bake"), (report.error, report.gate)
        assert f"batch {position}" in (report.error or "") and report.rollback.verified, report
        assert report.gate and report.gate[-1].verdict == "fail"
        failed = [o for o in outside if o[1] != 200]
        assert failed and all(version in ("2", None) for _, _, version in failed), "only the candidate failed"
        assert all(version == "1" for began, _, version in outside if began > decided), "v2 answered after"
        assert all(r.status == 200 for r in results), "a row inside the sample failed"
        assert [r.placement("iris").store for r in world.ferry.fleet().replicas] == [[1]] * 3
        assert read_current(world.model_dir).active_version == 1 and not world.model_dir.rollout_path.exists()
        assert_invariants(world, attempts=2)
    finally:
        stop_fleet(world)
