"""The gateway under load: traffic follows current.json through commits, failed deploys and rollbacks,
over HTTP (JSON and binary) and gRPC, with the official Triton clients among the load."""

from __future__ import annotations

import gzip
import json
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import pytest
from tritonclient.grpc import service_pb2

from conftest import FAKES, World, assert_invariants
from ferry.adapters.gateway.refusals import status_of
from ferry.adapters.inference import guard
from ferry.adapters.inference.routing import Route
from ferry.core.errors import GatewayError
from ferry.core.model_config import Signature, TensorSpec
from ferry.core.runner import deploy
from support.gateway import (
    IRIS_ROW,
    KSERVE_BODY,
    Running,
    Sent,
    binary_load,
    client,
    grpc_load,
    load,
    running_gateway,
)


@pytest.fixture
def gateway(world: World) -> Iterator[Running]:
    with running_gateway(world) as running:
        yield running


@dataclass
class Switch:
    """A deploy while traffic runs: the committed version is ``before`` until ``began`` and ``after`` from ``ended``."""

    began: float
    ended: float
    before: int
    after: int


def test_traffic_follows_every_commit_and_never_reaches_an_uncommitted_version(world: World, gateway: Running) -> None:
    world.register()
    world.deploy()
    world.register(trees=5)  # v2, good
    results: list[Sent] = []
    stop = threading.Event()
    workers = [threading.Thread(target=load, args=(gateway.url, stop, results)) for _ in range(2)]
    workers.append(threading.Thread(target=binary_load, args=(gateway.host_port, stop, results)))
    workers += [threading.Thread(target=grpc_load, args=(gateway.grpc, stop, results)) for _ in range(2)]
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
    for protocol in ("http", "binary", "grpc"):
        assert sum(r.protocol == protocol for r in results) > 20, f"too few {protocol} requests to show anything"
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
        assert after and {r.version for r in after} == {s.after}, \
            f"after switch {i}, not every request reached v{s.after}"
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


def test_bad_requests_get_a_clear_4xx(world: World, gateway: Running) -> None:
    with client(gateway.url) as session:
        assert session.get("/readyz").status_code == 503  # nothing committed yet
        world.register()
        world.deploy()
        ready = session.get("/readyz")
        assert ready.status_code == 200 and ready.json()["serving"] == {"iris": 1}

        good = session.post("/predict/iris", json={"inputs": {"X": [IRIS_ROW]}})
        assert good.status_code == 200 and good.headers["x-ferry-model-version"] == "1"
        assert len(good.json()["outputs"]["probabilities"][0]) == 3
        for encoding, compress in (("gzip", gzip.compress), ("deflate", zlib.compress)):
            packed = compress(json.dumps({"inputs": {"X": [IRIS_ROW]}}).encode())
            inflated = session.post("/predict/iris", content=packed, headers={"content-encoding": encoding})
            assert inflated.status_code == 200 and inflated.json() == good.json(), (encoding, inflated.text)

        x = KSERVE_BODY["inputs"][0]
        cases = [
            (session.post("/predict/iris", json={"inputs": {"X": [[1.0, 2.0]]}}), 400, "has shape [1, 2]"),
            (session.post("/predict/iris", json={"inputs": {"X": [["a", "b", "c", "d"]]}}), 400,
             "input 'X' is FP32, and holds 'a'"),
            # /predict checks as /v2 does (one decoder, one check): booleans are not FP32, encodings are honoured.
            (session.post("/predict/iris", json={"inputs": {"X": [[True, False, True, False]]}}), 400,
             "input 'X' is FP32, and holds True"),
            (session.post("/predict/iris", content=b"x", headers={"content-encoding": "br"}), 415,
             "'br' is not served"),
            (session.post("/predict/iris", json={"inputs": {"X": [IRIS_ROW, IRIS_ROW + [1.0] * 4, []]}}), 400,
             "rows are not all of length [4]"),
            (session.post("/predict/iris", json={"inputs": {"Y": [IRIS_ROW]}}), 400, "model 'iris' has no input 'Y'"),
            (session.post("/predict/iris", content=b"{not json"), 400, "not valid JSON"),
            (session.post("/predict/iris", content=b'{"inputs": {"X": [[NaN, 1, 2, 3]]}}'), 400, "NaN is not a JSON"),
            (session.post("/predict/iris", content=b"[" * 100_000), 400, "nests"),
            (session.post("/v2/models/iris/infer", content=b"{not json"), 400, "not valid JSON"),
            (session.post("/v2/models/iris/infer", json={"inputs": [{**x, "shape": [2, 4]}]}),
             400, "has 4 values, its shape holds 8"),
            # Triton 2.51 aborts on this one (std::bad_alloc): the gateway must not forward it.
            (session.post("/v2/models/iris/infer", json={"inputs": [{**x, "shape": [1_000_000_000_000, 4]}]}),
             400, "over the gateway's limit of 16777216"),
            (session.post("/v2/models/iris/infer", content=b'{"inputs": [{"name": "X", "shape": [1, 4], '
                          b'"datatype": "FP32", "data": [Infinity, 1, 2, 3]}]}'), 400, "Infinity is not a JSON number"),
            (session.post("/v2/models/iris/infer", json={"inputs": [{**x, "datatype": "FP64"}]}), 400, "takes FP32"),
            (session.post("/v2/models/iris/infer", json={"inputs": [{**x, "parameters": {
                "shared_memory_region": "r", "shared_memory_byte_size": 16}}]}), 400, "shared-memory"),
            (session.post("/v2/models/iris/versions/2/infer", json=KSERVE_BODY), 404,
             "Request for unknown model: 'iris' version 2 is not found (the gateway serves the committed version, v1"),
            (session.post("/v2/models/iris/versions/x/infer", json=KSERVE_BODY), 400,
             "failed to get model version from specified version string 'x'"),
            (session.post("/v2/models/nosuch/infer", json=KSERVE_BODY), 404,
             "Request for unknown model: 'nosuch' is not found (model 'nosuch' has no committed version"),
            # The model is checked before the body: an unknown one is a 404 whatever the body holds.
            (session.post("/v2/models/.ferry/infer", content=b"{not json"), 404, "Request for unknown model: '.ferry'"),
            (session.post("/v2/models/iris/versions/2/infer", content=b"{not json"), 404, "version 2 is not found"),
            (session.post("/predict/.ferry", content=b"{not json"), 404, "Request for unknown model: '.ferry'"),
            (session.get("/v2/models/iris/infer"), 405, "takes POST"),
            (session.post("/v2/repository/index"), 404, "model control goes through ferry"),
            (session.get("/nowhere"), 404, "serves no '/nowhere'"),
            (session.get("/predict/iris"), 405, "does not take GET"),
            (session.post("/predict/..%2Fetc", json={"inputs": {}}), 404, ""),
            (session.post("/predict/iris", content=b" " * (17 * 1024 * 1024)), 413, "over the gateway's limit"),
            (session.post("/v2/models/iris/infer", content=b"x", headers={"content-encoding": "br"}), 415, "br"),
            (httpx.post(f"{gateway.url}/predict/iris", json={"inputs": {"X": [IRIS_ROW]}}), 401, "bearer token"),
        ]
        for reply, status, message in cases:
            assert reply.status_code == status, (reply.request.url, reply.text)
            assert message in reply.text, reply.text
            assert list(reply.json()) == ["error"], f"not the protocol's error body: {reply.text}"
        metrics = session.get("/metrics").text
        assert ('ferry_gateway_requests_total{code="200",model="iris",protocol="http",role="active",version="1"}'
                in metrics)
        assert ('ferry_gateway_requests_total{code="400",model="iris",protocol="http",role="active",version="1"}'
                in metrics)
    assert world.ferry.triton.ready_versions("iris") == [1], "Triton is not serving the committed version any more"


def test_requests_in_flight_at_a_commit_finish_on_the_old_version(world: World, gateway: Running) -> None:
    world.settings = world.settings.with_overrides(python_runner=FAKES / "fake_slow_runner.py")
    world.register()
    assert world.deploy().outcome == "committed"
    world.register(trees=5)
    results: list[Sent] = []  # wall-clock times here, to compare with current.json's mtime
    deploying = threading.Event()

    def one() -> None:
        with client(gateway.url) as session:
            began = time.time()
            reply = session.post("/v2/models/iris/infer", json=KSERVE_BODY)
            version = int(reply.headers["x-ferry-model-version"])
            results.append(Sent(began, time.time(), reply.status_code, version))

    def keep_sending() -> None:  # however long the deploy takes on a loaded machine, some request spans its commit
        while deploying.is_set():
            one()

    deploying.set()
    in_flight = [threading.Thread(target=keep_sending) for _ in range(4)]
    for thread in in_flight:
        thread.start()
    report = world.deploy()  # commits v2 and retires v1 while they run
    committed_at = world.model_dir.current_path.stat().st_mtime
    deploying.clear()
    for thread in in_flight:
        thread.join()
    assert report.outcome == "committed"
    assert all(r.status == 200 for r in results), results
    # Routed well before the commit (a request that starts just before it may be routed just after it).
    before = [r for r in results if r.began < committed_at - 0.25]
    assert before and {r.version for r in before} == {1}, "a request sent before the commit was moved elsewhere"
    assert max(r.ended for r in before) - min(r.began for r in before) > 1.2, "the runner was not slowed down"
    assert any(r.ended > committed_at for r in before), "no request was in flight at the commit"
    one()
    assert results[-1].version == 2
    assert_invariants(world, attempts=2)


def _route() -> Route:
    """A model with batching (max 8), a FP32 and a BYTES input, as the router reads it from config.pbtxt."""
    inputs = (TensorSpec("X", "FP32", (-1, 4)), TensorSpec("S", "BYTES", (-1,)))
    return Route("m", 3, Signature(inputs, (TensorSpec("Y", "FP32", (-1,)),)), max_batch_size=8)


def _refusal(check, *args) -> str:
    with pytest.raises(GatewayError) as refused:
        check(*args)
    assert status_of(refused.value) == 400
    return str(refused.value)


def _binary(*tensors: tuple[dict, bytes]) -> guard.HttpInfer:
    header = json.dumps({"inputs": [t for t, _ in tensors]}).encode()
    return guard.parse_infer(header + b"".join(blob for _, blob in tensors), str(len(header)).encode())


def test_the_guard_checks_batch_sizes_byte_strings_and_the_element_ceiling() -> None:
    """The checks the iris model cannot show: max_batch_size, BYTES length prefixes, gRPC typed contents."""
    route, limit = _route(), 1 << 24
    strings = struct.pack("<I", 2) + b"ab" + struct.pack("<I", 0)
    good = _binary(({"name": "X", "shape": [2, 4], "datatype": "FP32", "parameters": {"binary_data_size": 32}},
                    bytes(32)),
                   ({"name": "S", "shape": [2], "datatype": "BYTES", "parameters": {"binary_data_size": 10}}, strings))
    guard.check_infer(good, route, limit)
    assert "at most 8" in _refusal(guard.check_infer, guard.parse_infer(json.dumps({"inputs": [
        {"name": "X", "shape": [9, 4], "datatype": "FP32", "data": [0.0] * 36}]}).encode(), None), route, limit)
    lying = _binary(({"name": "S", "shape": [3], "datatype": "BYTES", "parameters": {"binary_data_size": 10}},
                     strings))
    assert "are not 3 length-prefixed strings" in _refusal(guard.check_infer, lying, route, limit)
    huge_prefix = _binary(({"name": "S", "shape": [1], "datatype": "BYTES", "parameters": {"binary_data_size": 5}},
                           struct.pack("<I", 2**32 - 1) + b"a"))
    assert "length-prefixed" in _refusal(guard.check_infer, huge_prefix, route, limit)
    assert "over the gateway's limit of 7" in _refusal(guard.check_infer, good, route, 7)
    request = service_pb2.ModelInferRequest(model_name="m")
    request.inputs.add(name="X", datatype="FP32", shape=[1, 4]).contents.fp32_contents.extend(IRIS_ROW)
    guard.check_grpc_infer(request, route, limit)
    request.inputs[0].shape[:] = [2, 4]
    assert "has 4 values in contents.fp32_contents, its shape holds 8" in _refusal(guard.check_grpc_infer, request,
                                                                                   route, limit)
    request.inputs[0].ClearField("contents")
    request.raw_input_contents.append(bytes(16))
    assert "has 16 bytes, its shape holds 8 FP32 = 32 bytes" in _refusal(guard.check_grpc_infer, request, route, limit)
    half = Route("h", 1, Signature((TensorSpec("H", "FP16", (2,)),), ()))
    request = service_pb2.ModelInferRequest(model_name="h")
    request.inputs.add(name="H", datatype="FP16", shape=[2]).contents.fp32_contents.extend([1.0, 2.0])
    assert "only in raw_input_contents" in _refusal(guard.check_grpc_infer, request, half, limit)
