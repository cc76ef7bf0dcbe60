"""A fleet of real Triton servers sharing one repository: every replica proves and serves the version, or none."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from conftest import FAKES, World, assert_invariants, replica_settings, start_fleet, stop_fleet
from ferry.core.current import read_current
from ferry.core.front import store_name
from ferry.core.reconcile import reconcile
from ferry.runtime import server


def _pid(settings) -> int:
    return json.loads((settings.triton_dir / "tritonserver.pid").read_text())["pid"]


def test_a_good_deploy_is_served_by_every_replica(fleet: World) -> None:
    fleet.register()
    assert fleet.deploy().outcome == "committed"
    fleet.register(trees=3)
    report = fleet.deploy()
    assert report.outcome == "committed" and report.version == 2
    assert [r.ready_versions("iris") for r in fleet.ferry.fleet().replicas] == [[2], [2], [2]]
    assert_invariants(fleet, attempts=2)
    status = fleet.cli("status", "iris", "--json")
    assert status.returncode == 0, status.stderr
    assert [r["serving"] for r in json.loads(status.stdout)[0]["replicas"]] == [[2], [2], [2]]


def test_a_candidate_that_fails_on_one_replica_is_rolled_back_on_all(tmp_path: Path) -> None:
    world = start_fleet(tmp_path, 3, faulty=2, python_runner=FAKES / "fake_faulty_replica_runner.py")
    try:
        faulty = world.settings.triton.urls.split(",")[2]
        world.register()
        first = world.deploy()
        assert first.outcome == "rolled_back" and first.failed_replica == faulty  # even v1 cannot run there
        assert read_current(world.model_dir) is None
        result = world.cli("deploy", "iris", "--alias", "champion")
        assert result.returncode == 1 and f"failed at smoke on replica {faulty}:" in result.stderr
        assert all(r.ready_versions("iris") == [] for r in world.ferry.fleet().replicas)
        assert_invariants(world, attempts=2)
    finally:
        stop_fleet(world)


def test_a_replica_killed_during_the_load_rolls_back_the_others_and_reconcile_brings_it_back(tmp_path: Path) -> None:
    world = start_fleet(tmp_path, 2, python_runner=FAKES / "fake_slow_start_runner.py")
    try:
        world.register()
        assert world.deploy().outcome == "committed"
        world.register(trees=3)
        doomed = replica_settings(world.settings)[1]
        killer = threading.Timer(0.8, lambda: os.kill(_pid(doomed), signal.SIGKILL))
        killer.start()
        report = world.deploy()
        killer.join()
        assert report.outcome == "rolled_back" and report.failed_step == "load"
        assert report.failed_replica == doomed.triton.endpoint.url
        survivor = world.settings.triton.urls.split(",")[0]
        assert report.rollback.replicas[survivor] == [1]
        assert any(doomed.triton.endpoint.url in problem for problem in report.rollback.problems)
        server.down(doomed, grace_s=0)
        server.up(doomed)
        result = reconcile(world.ferry, "iris")
        assert result.action == "loaded" and result.replicas == {survivor: [1], doomed.triton.endpoint.url: [1]}
        assert [r.ready_versions("iris") for r in world.ferry.fleet().replicas] == [[1], [1]]
    finally:
        stop_fleet(world)


def test_an_unreachable_replica_rejects_the_deploy_and_changes_nothing(fleet: World) -> None:
    fleet.register()
    fleet.deploy()
    before = fleet.current_bytes()
    fleet.register(trees=3)
    down = replica_settings(fleet.settings)[1]
    server.down(down, grace_s=0)
    result = fleet.cli("deploy", "iris", "--alias", "champion")
    assert result.returncode == 3 and f"on replica {down.triton.endpoint.url}" in result.stderr
    assert fleet.current_bytes() == before
    assert not fleet.model_dir.version_dir(2).exists(), "nothing was staged"
    status = fleet.cli("status", "iris")
    assert status.returncode == 3 and "unreachable" in status.stdout  # a replica did not answer: retry later
    server.up(down)
    reconciled = fleet.cli("reconcile", "--json")
    assert reconciled.returncode == 0 and json.loads(reconciled.stdout)[0]["action"] == "loaded"
    assert_invariants(fleet, attempts=2)


def test_reconcile_every_keeps_a_restarted_replica_serving(fleet: World) -> None:
    import subprocess
    import sys

    fleet.register()
    fleet.deploy()
    restarted = replica_settings(fleet.settings)[2]
    watcher = subprocess.Popen([sys.executable, "-m", "ferry", "reconcile", "--every", "0.5s"],
                               env={**os.environ, **fleet.env()},
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        server.down(restarted, grace_s=0)
        server.up(restarted)
        deadline = time.monotonic() + 30
        while fleet.ferry.fleet().replicas[2].ready_versions("iris") != [1] and time.monotonic() < deadline:
            time.sleep(0.2)
        assert fleet.ferry.fleet().replicas[2].ready_versions("iris") == [1]
    finally:
        watcher.send_signal(signal.SIGINT)
        # A load under way finishes first (at most FERRY_LOAD_TIMEOUT_S, 30 s here); then the loop stops.
        output, _ = watcher.communicate(timeout=30 + fleet.settings.triton.load_timeout_s)
    assert watcher.returncode == 0 and "loaded" in output, output
    assert_invariants(fleet, attempts=1)


def test_a_dns_name_is_resolved_to_its_replicas(world: World) -> None:
    port = world.settings.triton.endpoint.port
    world.register()
    by_name = world.cli("deploy", "iris", "--alias", "champion", FERRY_TRITON_URL=f"dns+http://localhost:{port}")
    assert by_name.returncode == 0, by_name.stderr
    status = world.cli("status", "iris", "--json", FERRY_TRITON_URL=f"dns+http://localhost:{port}")
    replicas = json.loads(status.stdout)[0]["replicas"]
    assert [r["url"] for r in replicas] == [f"http://127.0.0.1:{port}"], "localhost is one replica, not two"
    assert_invariants(world, attempts=1)


@pytest.mark.parametrize("replicas", [2])
def test_the_dag_steps_run_on_every_replica(tmp_path: Path, replicas: int) -> None:
    from ferry.adapters import dag_steps

    world = start_fleet(tmp_path, replicas)
    try:
        world.register()
        handle = dag_steps.snapshot_current(world.ferry, "iris", "champion")
        handle = dag_steps.materialize_repo(world.ferry, handle)
        for step in (dag_steps.triton_load, dag_steps.triton_ready, dag_steps.triton_infer_smoke):
            handle = step(world.ferry, handle)
        assert handle["smoke"]["replicas"] == replicas
        assert dag_steps.commit_current(world.ferry, handle)["outcome"] == "committed"
        assert_invariants(world, attempts=1)
    finally:
        stop_fleet(world)


def test_demo_fleet_tells_its_story(tmp_path: Path) -> None:
    from conftest import ROOT, _free_port_block
    from support.processes import run_demo

    result = run_demo(ROOT / "scripts" / "demo_fleet.sh", tmp_path / "demo", _free_port_block(9))
    out = result.stdout
    assert out.count("Triton ready at") == 4 and out.count("Triton stopped") == 3
    assert "committed iris v1 (was nothing)" in out
    assert "failed at smoke on replica" in result.stderr
    assert "(drift on replica" in out and "loaded    iris v1  all 3 replicas serve v1" in out


def _triton_successes(settings, version: int) -> float:
    """Inferences of iris ``version`` one replica ran, from its Triton's metrics port."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(settings.triton.metrics_url, timeout=5).text
    return sum(sample.value for family in text_string_to_metric_families(text) for sample in family.samples
               if sample.name.startswith("nv_inference_request_success")
               and sample.labels.get("model") == store_name("iris", version)
               and sample.labels.get("version") == str(version))


def test_the_gateway_balances_over_the_replicas_through_a_killed_replica_and_a_deploy(tmp_path: Path) -> None:
    """Steady HTTP and gRPC load through `ferry gateway` over three replicas while one is SIGKILLed (a deploy
    then is rejected), comes back, is reconciled, and a deploy commits: no failed request, no answer from a
    version that was not committed, and every replica takes its share."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    from support.gateway import TOKEN, running_gateway, steady_load

    world = start_fleet(tmp_path, 3)
    replicas = replica_settings(world.settings)
    try:
        world.register()
        assert world.deploy().outcome == "committed"
        world.register(trees=3)  # v2
        with running_gateway(world) as gateway:
            with steady_load(gateway, http=3, grpc=2) as results:
                time.sleep(1.0)
                os.kill(_pid(replicas[0]), signal.SIGKILL)  # the one a single-server gateway would use
                time.sleep(1.0)  # the load goes on over two replicas
                before = world.current_bytes()
                assert world.deploy().outcome == "rejected", "a deploy must not go on with a replica unreachable"
                assert world.current_bytes() == before
                server.down(replicas[0], grace_s=0)
                server.up(replicas[0])  # serves nothing: the gateway must not send it anything yet
                assert reconcile(world.ferry, "iris").action == "loaded"
                time.sleep(1.5)  # probed back in
                began = time.monotonic()
                report = world.deploy()
                committed_by = time.monotonic()
                assert report.outcome == "committed" and report.version == 2, report.error
                time.sleep(1.5)
            metrics = httpx.get(f"{gateway.url}/metrics", headers={"Authorization": f"Bearer {TOKEN}"}, timeout=5).text

        assert sum(r.protocol == "http" for r in results) > 100 and sum(r.protocol == "grpc" for r in results) > 30
        failed = [r for r in results if r.status != 200]
        assert not failed, f"{len(failed)} of {len(results)} requests failed, e.g. {failed[:3]}"
        assert {r.version for r in results} <= {1, 2}
        assert all(r.version == 1 for r in results if r.ended < began), "v2 answered before its deploy"
        assert all(r.version == 2 for r in results if r.began > committed_by), "v1 answered after the commit"
        samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
                   for family in text_string_to_metric_families(metrics) for s in family.samples}

        def gateway_metric(name: str, **labels: str) -> float:
            return samples.get((name, tuple(sorted(labels.items()))), 0.0)

        doomed = replicas[0].triton.endpoint.url
        ejected = sum(gateway_metric("ferry_gateway_replica_ejections_total", replica=doomed, protocol=p, reason=r)
                      for p in ("http", "grpc") for r in ("connect", "probe"))
        assert ejected >= 2, "the killed replica was not taken out of both protocols' balancing"
        assert all(gateway_metric("ferry_gateway_replica_up", replica=r.triton.endpoint.url, protocol=p) == 1
                   for r in replicas for p in ("http", "grpc")), "a replica was not admitted again"
        urls = [r.triton.endpoint.url for r in replicas]
        sent = {url: sum(gateway_metric("ferry_gateway_replica_requests_total", replica=url, protocol=p)
                         for p in ("http", "grpc")) for url in urls}
        assert all(count > sum(sent.values()) / 10 for count in sent.values()), f"the load was not spread: {sent}"
        served_v2 = [_triton_successes(r, 2) for r in replicas]
        assert all(count > 20 for count in served_v2), f"each replica's Triton ran v2 {served_v2} times"
        assert_invariants(world, attempts=3)
    finally:
        stop_fleet(world)
