"""The gateway under load: traffic follows current.json through commits, failed deploys and rollbacks."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass

import httpx
import pytest

from conftest import FAKES, World, _free_port_block, assert_invariants
from ferry.core.runner import deploy

IRIS_ROW = [5.1, 3.5, 1.4, 0.2]
KSERVE_BODY = {"inputs": [{"name": "X", "shape": [1, 4], "datatype": "FP32", "data": IRIS_ROW}]}
TOKEN = "s3cret-token"


@pytest.fixture
def gateway(world: World):
    """`ferry gateway` in its own process, as production runs it."""
    port = _free_port_block(1)
    process = subprocess.Popen([sys.executable, "-m", "ferry", "gateway", "--port", str(port)],
                               env={**os.environ, **world.env(), "FERRY_GATEWAY_TOKEN": TOKEN},
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.2)
    else:
        process.kill()
        pytest.fail(f"the gateway did not start: {process.stdout.read()}")
    yield url
    process.terminate()
    process.wait(timeout=10)


def client(url: str) -> httpx.Client:
    return httpx.Client(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)


@dataclass
class Sent:
    began: float
    ended: float
    status: int
    version: int | None


@dataclass
class Switch:
    """A deploy while traffic runs: the committed version is ``before`` until ``began`` and ``after`` from ``ended``."""

    began: float
    ended: float
    before: int
    after: int


def load(url: str, stop: threading.Event, results: list[Sent]) -> None:
    with client(url) as session:
        while not stop.is_set():
            began = time.monotonic()
            reply = session.post("/v2/models/iris/infer", json=KSERVE_BODY)
            version = reply.headers.get("x-ferry-model-version")
            results.append(Sent(began, time.monotonic(), reply.status_code, int(version) if version else None))


def test_traffic_follows_every_commit_and_never_reaches_an_uncommitted_version(world: World, gateway: str) -> None:
    world.register()
    world.deploy()
    world.register(trees=5)  # v2, good
    results: list[Sent] = []
    stop = threading.Event()
    workers = [threading.Thread(target=load, args=(gateway, stop, results)) for _ in range(4)]
    for worker in workers:
        worker.start()
    switches: list[Switch] = []

    def switch(action, before: int, expected_outcome: str) -> None:
        time.sleep(0.5)  # traffic before and between the switches too
        began = time.monotonic()
        report = action()
        ended = time.monotonic()
        assert report.outcome == expected_outcome, report.error
        switches.append(Switch(began, ended, before, report.version if report.outcome == "committed" else before))

    try:
        switch(lambda: world.deploy(), 1, "committed")  # v1 -> v2
        world.register("golden-mismatch")  # v3, broken
        switch(lambda: world.deploy(), 2, "rolled_back")  # v3 fails smoke, v2 stays
        switch(lambda: deploy(world.ferry, "iris", version=1), 2, "committed")  # manual rollback to v1
        time.sleep(0.5)
    finally:
        stop.set()
        for worker in workers:
            worker.join()

    assert len(results) > 100, f"only {len(results)} requests: the load is too light to show anything"
    failed = [r for r in results if r.status != 200]
    assert not failed, f"{len(failed)} failed requests, e.g. {failed[:3]}"
    assert 3 not in {r.version for r in results}, "a request reached the uncommitted, broken v3"
    for r in results:
        assert r.version in allowed_versions(r, switches), f"{r} answered by a version not committed then"
    for i, s in enumerate(switches):
        during = [r for r in results if r.began < s.ended and r.ended > s.began]
        assert during, f"no request overlapped switch {i}: the test did not exercise it"
        next_began = switches[i + 1].began if i + 1 < len(switches) else float("inf")
        after = [r for r in results if s.ended <= r.began and r.ended < next_began]
        assert after and {r.version for r in after} == {s.after}, f"after switch {i}, not every request reached v{s.after}"
    assert_invariants(world, attempts=4)


def allowed_versions(request: Sent, switches: list[Switch]) -> set[int]:
    """The versions committed at some moment while the request was in flight (a switch's commit instant
    lies somewhere inside its deploy)."""
    committed = switches[0].before
    allowed = set()
    for s in switches:
        if s.ended <= request.began:
            committed = s.after
        elif s.began < request.ended:
            allowed |= {s.before, s.after}
    return allowed | {committed}


def test_bad_requests_get_a_clear_4xx(world: World, gateway: str) -> None:
    with client(gateway) as session:
        assert session.get("/readyz").status_code == 503  # nothing committed yet
        world.register()
        world.deploy()
        ready = session.get("/readyz")
        assert ready.status_code == 200 and ready.json()["serving"] == {"iris": 1}

        good = session.post("/predict/iris", json={"inputs": {"X": [IRIS_ROW]}})
        assert good.status_code == 200 and good.headers["x-ferry-model-version"] == "1"
        assert len(good.json()["outputs"]["probabilities"][0]) == 3

        cases = [
            (session.post("/predict/iris", json={"inputs": {"X": [[1.0, 2.0]]}}), 400, "has shape [1, 2]"),
            (session.post("/predict/iris", json={"inputs": {"X": [["a", "b", "c", "d"]]}}), 400, "is not a FP32 tensor"),
            (session.post("/predict/iris", json={"inputs": {"Y": [IRIS_ROW]}}), 400, "takes inputs ['X']"),
            (session.post("/predict/iris", content=b"{not json"), 400, "not valid JSON"),
            (session.post("/v2/models/iris/infer", content=b"{not json"), 400, "not valid JSON"),
            (session.post("/v2/models/iris/infer", json={"inputs": [{**KSERVE_BODY["inputs"][0], "shape": [2, 4]}]}),
             400, "has 4 values, its shape [2, 4] holds 8"),
            (session.post("/v2/models/nosuch/infer", json=KSERVE_BODY), 404, "'nosuch' has no committed version"),
            (session.post("/predict/..%2Fetc", json={"inputs": {}}), 404, ""),
            (session.post("/predict/iris", content=b" " * (17 * 1024 * 1024)), 413, "over the gateway's limit"),
            (httpx.post(f"{gateway}/predict/iris", json={"inputs": {"X": [IRIS_ROW]}}), 401, "bearer token"),
        ]
        for reply, status, message in cases:
            assert reply.status_code == status, (reply.request.url, reply.text)
            assert message in reply.text, reply.text
        metrics = session.get("/metrics").text
        assert 'ferry_gateway_requests_total{code="200",model="iris",version="1"}' in metrics


def test_requests_in_flight_at_a_commit_finish_on_the_old_version(world: World, gateway: str) -> None:
    world.settings = world.settings.with_overrides(python_runner=FAKES / "fake_slow_runner.py")
    world.register()
    assert world.deploy().outcome == "committed"
    world.register(trees=5)
    results: list[Sent] = []

    def one() -> None:
        with client(gateway) as session:
            began = time.monotonic()
            reply = session.post("/v2/models/iris/infer", json=KSERVE_BODY)
            results.append(Sent(began, time.monotonic(), reply.status_code, int(reply.headers["x-ferry-model-version"])))

    in_flight = [threading.Thread(target=one) for _ in range(4)]
    for thread in in_flight:
        thread.start()
    time.sleep(0.1)  # they are in Triton, each for 0.4 s (one instance: queued behind each other)
    report = world.deploy()  # commits v2 and retires v1 while they run
    committed_at = time.monotonic()
    for thread in in_flight:
        thread.join()
    assert report.outcome == "committed"
    assert [r.status for r in results] == [200] * 4, results
    assert {r.version for r in results} == {1}, "a request sent before the commit was moved to another version"
    assert max(r.ended for r in results) - min(r.began for r in results) > 1.2, "the runner was not slowed down"
    assert any(r.ended > committed_at - report.steps["commit"] for r in results), "no request was in flight at the commit"
    one()
    assert results[-1].version == 2
    assert_invariants(world, attempts=2)
