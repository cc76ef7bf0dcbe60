"""The gateway during a rolling deploy (rollout.json, mode rolling): requests go to the model's front and the
answer names the version that served; draining replicas get no new call; the probe asks for the front; the
in-flight gauge the deployer waits on."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from tritonclient.grpc import service_pb2

from ferry.adapters.gateway import kserve_grpc
from ferry.adapters.gateway.app import Gateway
from ferry.adapters.gateway.balancer import HttpBalancer, probe_targets
from ferry.adapters.gateway.kserve_grpc import _at_store
from ferry.adapters.gateway.kserve_http import answered_version
from ferry.adapters.inference.routing import ACTIVE, CANDIDATE, Route, Router, bake_of
from ferry.core.current import write_current
from ferry.core.model_config import Signature
from ferry.core.records import CurrentState, Manifest, RolloutPlan, RolloutState, utc_stamp
from ferry.core.repository import MANIFEST, ModelDir
from ferry.core.rollout import in_flight, remove_rollout, write_rollout
from unit.test_balancer import FAST, FakeReplica, _settings, _until, _value, run

CONFIG = """
input { name: "X" data_type: TYPE_FP32 dims: [-1, 4] }
output { name: "Y" data_type: TYPE_FP32 dims: [-1, 3] }
"""


def _repository(tmp_path: Path, model: str = "m", active: int = 1, candidate: int = 2) -> ModelDir:
    """``model`` with ``active`` committed (behind a front: config.pbtxt names no model) and ``candidate`` staged."""
    model_dir = ModelDir(tmp_path / "repository", model)
    model_dir.ensure()
    for version in (active, candidate):
        folder = model_dir.version_dir(version)
        folder.mkdir(parents=True)
        manifest = Manifest(model=model, version=version, run_id="r", sha256="s", size_bytes=1, deploy_id="d",
                            staged_at_utc=utc_stamp(), flavor="triton", config_pbtxt=CONFIG)
        (folder / MANIFEST).write_text(manifest.model_dump_json())
    model_dir.config_path.write_text(CONFIG)
    write_current(model_dir, CurrentState(active_version=active, run_id="r", alias=None, updated_at_utc=utc_stamp(),
                                          model=model, sha256="s", deploy_id="d"))
    return model_dir


def _rolling(model_dir: ModelDir, draining: Sequence[str] = (), swapped: Sequence[str] = (), active: int = 1,
             candidate: int = 2, mode: str = "rolling") -> RolloutState:
    state = RolloutState(model=model_dir.model, deploy_id="d2", active_version=active, candidate_version=candidate,
                         plan=RolloutPlan(mode=mode, bake_s=0.0 if mode == "rolling" else 60.0, canary_percent=10),
                         started_at_utc=utc_stamp(), draining=list(draining), swapped=list(swapped))
    write_rollout(model_dir, state)
    return state


# ------------------------------------------------------------------ routing


def test_requests_go_to_the_front_during_a_rolling_deploy_and_to_the_store_otherwise(tmp_path: Path) -> None:
    model_dir = _repository(tmp_path)
    router = Router(tmp_path / "repository")
    committed = router.route("m")
    assert router.follow(committed) == (committed, None)
    assert (committed.upstream, committed.path) == ("m.versions.1", "/v2/models/m.versions.1/versions/1")

    state = _rolling(model_dir, swapped=["http://127.0.0.1:8001"])
    served, bake = router.follow(committed)
    assert bake is None and bake_of(committed, state) is None  # no bake is derived from a rolling deploy
    assert served.front and (served.upstream, served.path, served.upstream_version) == ("m", "/v2/models/m", "")
    assert served.version == 1 and served.role == ACTIVE  # checked against the committed version's config
    assert served.answered_by(1) is served and served.answered_by(None) is served
    candidate = served.answered_by(2)
    assert (candidate.version, candidate.role, candidate.model) == (2, CANDIDATE, "m")
    assert served.answered_by(2) is candidate  # made once

    _rolling(model_dir, active=2, candidate=3)  # not from the version committed now (e.g. committed meanwhile)
    assert router.follow(committed)[0] is committed
    _rolling(model_dir, mode="canary")  # a canary is not rolling
    assert router.follow(committed)[0] is committed and router.bake(committed) is not None
    remove_rollout(model_dir)
    assert router.follow(committed) == (committed, None)


def test_a_rolling_request_is_addressed_to_the_front_unversioned_and_its_answer_read_for_its_version() -> None:
    front = Route("iris", 7, Signature((), ()), front=True)
    request = service_pb2.ModelInferRequest(model_name="iris", model_version="7", id="r1")
    sent = service_pb2.ModelInferRequest.FromString(_at_store(request.SerializeToString(), front))
    assert (sent.model_name, sent.model_version, sent.id) == ("iris", "", "r1")
    for model in ("iris", "m" * 200):
        answer = service_pb2.ModelInferResponse(model_name=model, model_version="8", id="x" * 300)
        assert kserve_grpc.answered_version(answer.SerializeToString()) == 8
    assert kserve_grpc.answered_version(b"") is None
    assert kserve_grpc.answered_version(service_pb2.ModelInferResponse(model_name="a").SerializeToString()) is None
    long_id = b'{"id":"' + b"x" * 2000 + b'","model_name":"iris","model_version":"12","outputs":[]}'
    assert answered_version(long_id) == 12
    assert answered_version(b'{"model_name":"iris","outputs":[]}') is None
    assert answered_version(b'{"model_name":"iris","model_version":"x","outputs":[]}') is None


class FrontReplica(FakeReplica):
    """A replica whose front serves ``version``: an inference answers as Triton's front does."""

    def __init__(self, version: int) -> None:
        super().__init__()
        self.version = version

    async def _answer(self, path: str) -> tuple[int, bytes]:
        if not path.endswith("/infer"):
            return await super()._answer(path)
        self.seen.append(path)
        name = path.split("/")[3]
        return 200, (f'{{"model_name":"{name}","model_version":"{self.version}","outputs":[{{"name":"Y",'
                     '"datatype":"FP32","shape":[1,3],"data":[1,2,3]}]}').encode()


def test_a_client_sees_the_version_its_replica_answered_with_and_metrics_its_role(tmp_path: Path) -> None:
    async def scenario() -> None:
        model_dir = _repository(tmp_path)
        active, swapped = await FrontReplica(1).start(), await FrontReplica(2).start()
        gateway = Gateway(_settings(tmp_path, active.url, swapped.url))
        body = {"inputs": [{"name": "X", "datatype": "FP32", "shape": [1, 4], "data": [1, 2, 3, 4]}]}
        registry = gateway.metrics.registry
        try:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=gateway), base_url="http://gw") as client:
                _rolling(model_dir, swapped=[swapped.url])
                answers = [await client.post("/v2/models/m/infer", json=body) for _ in range(10)]
                assert {a.status_code for a in answers} == {200}
                assert {(a.headers["x-ferry-model-version"], a.json()["model_version"], a.json()["model_name"])
                        for a in answers} == {("1", "1", "m"), ("2", "2", "m")}
                assert {*active.seen, *swapped.seen} == {"/v2/models/m/infer"}
                assert all(a.headers.get("x-ferry-canary") == ("1" if a.json()["model_version"] == "2" else None)
                           for a in answers)
                labels = {"model": "m", "code": "200", "protocol": "http"}
                assert _value(registry, "ferry_gateway_requests_total", version="1", role="active", **labels) == 5
                assert _value(registry, "ferry_gateway_requests_total", version="2", role="candidate", **labels) == 5
                named = await client.post("/v2/models/m/versions/2/infer", json=body)
                assert named.status_code == 404  # the candidate is not committed: as outside a rolling deploy

                remove_rollout(model_dir)  # the deploy is over (here: undone): the committed version's store
                active.seen.clear()
                swapped.seen.clear()
                answer = await client.post("/v2/models/m/infer", json=body)
                assert answer.status_code == 200 and answer.headers["x-ferry-model-version"] == "1"
                assert {*active.seen, *swapped.seen} == {"/v2/models/m.versions.1/versions/1/infer"}
        finally:
            await gateway.stop()
            await active.kill()
            await swapped.kill()

    run(scenario)


# ------------------------------------------------------------------ balancing


def test_a_draining_replica_gets_no_new_call_for_any_model_and_comes_back_once_swapped(tmp_path: Path) -> None:
    async def scenario() -> None:
        model_dir = _repository(tmp_path)
        _repository(tmp_path, "other")
        replicas = [await FakeReplica().start() for _ in range(3)]
        pool = HttpBalancer(_settings(tmp_path, *(r.url for r in replicas)), CollectorRegistry(),
                            Router(tmp_path / "repository"), **FAST)
        try:
            _rolling(model_dir, draining=[replicas[0].url])
            await asyncio.sleep(0.15)  # another model's rollout is seen within DRAIN_SCAN_S
            await asyncio.gather(*(pool.request("POST", "/v2/models/other/infer") for _ in range(30)))
            assert not replicas[0].seen and replicas[1].seen and replicas[2].seen
            _rolling(model_dir, swapped=[replicas[0].url])  # swapped: admitted again, answering as the candidate
            await asyncio.sleep(0.15)
            await asyncio.gather(*(pool.request("POST", "/v2/models/other/infer") for _ in range(30)))
            assert replicas[0].seen
        finally:
            pool.close()
            for r in replicas:
                await r.kill()

    run(scenario)


def test_a_call_in_flight_to_a_replica_that_starts_draining_finishes(tmp_path: Path) -> None:
    async def scenario() -> None:
        model_dir = _repository(tmp_path)
        replica = await FakeReplica().start()
        other = await FakeReplica().start()
        replica.mode = other.mode = "slow"
        pool = HttpBalancer(_settings(tmp_path, replica.url, other.url), CollectorRegistry(),
                            Router(tmp_path / "repository"), **FAST)
        try:
            calls = [asyncio.create_task(pool.request("POST", "/v2/models/m/infer")) for _ in range(2)]
            await _until(lambda: replica.seen and other.seen)
            _rolling(model_dir, draining=[replica.url])
            await asyncio.sleep(0.15)
            assert {(await call).status for call in calls} == {200}
            replica.seen.clear()
            await asyncio.gather(*(pool.request("POST", "/v2/models/m/infer") for _ in range(5)))
            assert not replica.seen
        finally:
            pool.close()
            await replica.kill()
            await other.kill()

    run(scenario)


def test_the_probe_asks_for_the_front_of_a_rolling_model(tmp_path: Path) -> None:
    async def scenario() -> None:
        model_dir = _repository(tmp_path)
        swapped, unswapped = await FakeReplica().start(), await FakeReplica().start()
        swapped.models = {"/v2/models/m/ready"}  # its front serves the candidate: the active store is gone
        unswapped.models = {"/v2/models/m/ready", "/v2/models/m.versions.1/versions/1/ready"}
        router = Router(tmp_path / "repository")
        pool = HttpBalancer(_settings(tmp_path, swapped.url, unswapped.url), CollectorRegistry(), router, **FAST)
        try:
            assert probe_targets(router) == [("m.versions.1", "1")]
            pool.start()
            await _until(lambda: [r.up for r in pool.replicas] == [False, True])  # outside a rolling deploy
            _rolling(model_dir, swapped=[swapped.url])
            assert probe_targets(router) == [("m", "")]
            await _until(lambda: all(r.up for r in pool.replicas))
        finally:
            pool.close()
            await swapped.kill()
            await unswapped.kill()

    run(scenario)


# ------------------------------------------------------------------ the in-flight gauge


def test_the_in_flight_gauge_counts_a_call_until_it_is_answered(tmp_path: Path) -> None:
    async def scenario() -> None:
        replica = await FakeReplica().start()
        replica.mode = "slow"
        registry = CollectorRegistry()
        pool = HttpBalancer(_settings(tmp_path, replica.url), registry, **FAST)
        try:
            assert _value(registry, "ferry_gateway_in_flight", replica=replica.url) == 0
            call = asyncio.create_task(pool.request("POST", "/v2/models/m/infer"))
            await _until(lambda: _value(registry, "ferry_gateway_in_flight", replica=replica.url) == 1)
            await call
            assert _value(registry, "ferry_gateway_in_flight", replica=replica.url) == 0
        finally:
            pool.close()
            await replica.kill()

    run(scenario)


@pytest.fixture
def gateways() -> Iterator[list[tuple[str, list[bytes]]]]:
    """Two stand-ins for gateways' /metrics: (url, [the text it serves])."""
    servers = []
    for _ in range(2):
        text: list[bytes] = [b""]

        class Handler(BaseHTTPRequestHandler):
            served = text

            def do_GET(self) -> None:
                self.send_response(200)
                self.end_headers()
                self.wfile.write(self.served[0])

            def log_message(self, *args: object) -> None:
                pass

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append((server, text))
    yield [(f"http://127.0.0.1:{server.server_port}", text) for server, text in servers]
    for server, _ in servers:
        server.shutdown()
        server.server_close()


def test_in_flight_sums_the_gauge_of_every_gateway_for_the_replicas_asked(
        tmp_path: Path, gateways: list[tuple[str, list[bytes]]]) -> None:
    async def scenario() -> None:
        replica = await FakeReplica().start()
        replica.mode = "hang"
        registry = CollectorRegistry()
        pool = HttpBalancer(_settings(tmp_path, replica.url, timeout_s=0.5), registry, **FAST)
        settings = _settings(tmp_path, replica.url).with_overrides(gateways=",".join(url for url, _ in gateways))
        try:
            call = asyncio.create_task(pool.request("POST", "/v2/models/m/infer"))
            await _until(lambda: pool.replicas[0].in_flight == 1)
            for _, text in gateways:
                text[0] = generate_latest(registry)
            assert await asyncio.to_thread(in_flight, settings, [replica.url]) == 2  # one in each gateway
            assert await asyncio.to_thread(in_flight, settings, ["http://127.0.0.1:1"]) == 0
            with pytest.raises(TimeoutError):
                await call
            gateways[0][1][0] = generate_latest(registry)
            assert await asyncio.to_thread(in_flight, settings, [replica.url]) == 1  # the other's still out
            down = settings.with_overrides(gateways=f"{settings.bake.gateways},http://127.0.0.1:1")
            assert await asyncio.to_thread(in_flight, down, [replica.url]) is None  # a gateway did not answer
        finally:
            pool.close()
            await replica.kill()

    run(scenario)
