"""The gateway's balancing over Triton replicas, against small local fake servers (HTTP and gRPC): spread,
ejection on a connection failure with one retry elsewhere, probing back in, DNS refresh."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path

import grpc
import pytest
from prometheus_client import CollectorRegistry
from tritonclient.grpc import service_pb2

from ferry.adapters.gateway import balancer
from ferry.adapters.gateway.balancer import ConnectFailed, HttpBalancer
from ferry.adapters.gateway.grpc_balancer import SERVICE, GrpcBalancer, connection_failed
from ferry.core.addresses import Endpoint
from ferry.core.config import Settings
from ferry.core.errors import Unavailable

FAST = {"probe_interval_s": 0.05, "probe_timeout_s": 0.5}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class FakeReplica:
    """A Triton-like HTTP/1.1 server (keep-alive): answers its name; ``mode`` makes it misbehave."""

    def __init__(self, port: int = 0) -> None:
        self.port = port or _free_port()
        self.mode = "ok"  # ok | hang (never answers) | reset (closes without answering) | slow
        self.ready = True  # /v2/health/ready
        self.ready_delay_s = 0.0
        self.models: set[str] = {"/v2/models/iris.versions.1/versions/1/ready"}  # the model ready paths that answer 200
        self.seen: list[str] = []
        self.server: asyncio.Server | None = None
        self.writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> FakeReplica:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", self.port)
        return self

    async def kill(self) -> None:
        """Gone at once, as a SIGKILLed server: listening stops, open connections are dropped."""
        self.server.close()
        for writer in list(self.writers):
            writer.transport.abort()
        await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.add(writer)
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode().split("\r\n")
                length = next((int(line.split(":")[1]) for line in lines if line.lower().startswith("content-length")),
                              0)
                await reader.readexactly(length)
                status, body = await self._answer(lines[0].split(" ")[1])
                writer.write(b"HTTP/1.1 %d X\r\nContent-Length: %d\r\n\r\n%s" % (status, len(body), body))
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            self.writers.discard(writer)
            writer.close()

    async def _answer(self, path: str) -> tuple[int, bytes]:
        if path == "/v2/health/ready":
            await asyncio.sleep(self.ready_delay_s)
            return (200 if self.ready else 503), b""
        if path.endswith("/ready") and path.startswith("/v2/models/"):
            return (200 if path in self.models else 400), b""
        self.seen.append(path)
        if self.mode == "hang":
            await asyncio.sleep(3600)
        if self.mode == "reset":
            raise ConnectionResetError("told to drop it")
        if self.mode == "slow":
            await asyncio.sleep(0.05)
        return 200, self.url.encode()


def _settings(tmp_path: Path, *urls: str, timeout_s: float = 5.0) -> Settings:
    return Settings(home=tmp_path, repository=tmp_path / "repository", tracking_uri="fake://mlflow",
                    triton_url=",".join(urls), triton_timeout_s=timeout_s)


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(scenario(), timeout=30))


async def _until(condition: Callable[[], bool], within_s: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + within_s
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "the condition did not come true in time"
        await asyncio.sleep(0.02)


def _value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def test_calls_spread_over_the_replicas_in_turn_and_to_the_least_busy(tmp_path: Path) -> None:
    async def scenario() -> None:
        replicas = [await FakeReplica().start() for _ in range(3)]
        registry = CollectorRegistry()
        pool = HttpBalancer(_settings(tmp_path, *(r.url for r in replicas)), registry, **FAST)
        try:
            answers = [(await pool.request("POST", "/v2/models/iris/infer", b"{}")).body for _ in range(30)]
            assert sorted(answers.count(r.url.encode()) for r in replicas) == [10, 10, 10]
            replicas[0].mode = "slow"  # 50 ms per call: the others take what it cannot
            for r in replicas:
                r.seen.clear()

            async def worker() -> None:
                for _ in range(10):
                    await pool.request("POST", "/v2/models/iris/infer")

            await asyncio.gather(*(worker() for _ in range(6)))
            assert len(replicas[0].seen) < len(replicas[1].seen) and len(replicas[0].seen) < len(replicas[2].seen)
            assert _value(registry, "ferry_gateway_replica_requests_total", replica=replicas[1].url,
                          protocol="http") == 10 + len(replicas[1].seen)
            assert _value(registry, "ferry_gateway_replica_up", replica=replicas[2].url, protocol="http") == 1
        finally:
            pool.close()

    run(scenario)


def test_a_replica_that_refuses_is_taken_out_the_call_retried_elsewhere_and_probed_back_in(tmp_path: Path) -> None:
    async def scenario() -> None:
        alive = await FakeReplica().start()
        down = FakeReplica()  # nothing listens on its port yet
        registry = CollectorRegistry()
        pool = HttpBalancer(_settings(tmp_path, down.url, alive.url), registry, **FAST)
        try:
            for _ in range(10):
                assert (await pool.request("GET", "/v2/models/iris/versions/1")).body == alive.url.encode()
            assert _value(registry, "ferry_gateway_replica_retried_total", protocol="http") == 1, "sent there once"
            assert _value(registry, "ferry_gateway_replica_up", replica=down.url, protocol="http") == 0
            assert _value(registry, "ferry_gateway_replica_ejections_total", replica=down.url, protocol="http",
                          reason="connect") == 1
            await down.start()
            await _until(lambda: pool.replicas[0].up)
            await asyncio.gather(*(pool.request("POST", "/v2/models/iris/infer") for _ in range(10)))
            assert down.seen, "the replica that came back gets calls again"
        finally:
            pool.close()
            await alive.kill()
            await down.kill()

    run(scenario)


def test_a_replica_killed_with_calls_in_flight_loses_none_of_them(tmp_path: Path) -> None:
    async def scenario() -> None:
        replicas = [await FakeReplica().start() for _ in range(3)]
        pool = HttpBalancer(_settings(tmp_path, *(r.url for r in replicas)), **FAST)
        try:
            replicas[0].mode = "hang"
            calls = [asyncio.ensure_future(pool.request("POST", "/v2/models/iris/infer")) for _ in range(9)]
            await _until(lambda: len(replicas[0].seen) == 3)  # its share is in flight there
            await replicas[0].kill()
            answers = await asyncio.gather(*calls)
            assert all(a.status == 200 and a.body != replicas[0].url.encode() for a in answers)
            assert not pool.replicas[0].up
            replicas[1].mode = "reset"  # closes the connection without an answer
            answers = await asyncio.gather(*(pool.request("POST", "/v2/models/iris/infer") for _ in range(6)))
            assert {a.body for a in answers} == {replicas[2].url.encode()}
        finally:
            pool.close()
            for r in replicas[1:]:
                await r.kill()

    run(scenario)


def test_a_call_that_times_out_waiting_for_its_answer_is_not_sent_again(tmp_path: Path) -> None:
    async def scenario() -> None:
        slow, other = await FakeReplica().start(), await FakeReplica().start()
        slow.mode = "hang"
        registry = CollectorRegistry()
        pool = HttpBalancer(_settings(tmp_path, slow.url, other.url, timeout_s=0.2), registry, probe_interval_s=60)
        try:
            pool.pick()  # the next turn is the slow one's
            with pytest.raises(TimeoutError):
                await pool.request("POST", "/v2/models/iris/infer")
            assert len(slow.seen) == 1 and not other.seen, "it may still run there: not sent twice"
            assert _value(registry, "ferry_gateway_replica_retried_total", protocol="http") == 0
        finally:
            pool.close()
            await slow.kill()
            await other.kill()

    run(scenario)


def test_the_probe_takes_out_an_unready_replica_and_one_that_lacks_a_committed_version(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def scenario() -> None:
        replicas = [await FakeReplica().start() for _ in range(3)]
        registry = CollectorRegistry()
        pool = HttpBalancer(_settings(tmp_path, *(r.url for r in replicas)), registry, **FAST)
        try:
            replicas[0].ready = False
            pool.start()
            await _until(lambda: not pool.replicas[0].up)
            assert _value(registry, "ferry_gateway_replica_ejections_total", replica=replicas[0].url,
                          protocol="http", reason="probe") == 1
            await asyncio.gather(*(pool.request("POST", "/v2/models/iris/infer") for _ in range(10)))
            assert not replicas[0].seen
            # With a router, the probe asks for each committed version instead: a restarted Triton serves nothing.
            monkeypatch.setattr(balancer, "committed_versions", lambda router: [("iris", 1)])
            pool.router = object()  # type: ignore[assignment]
            replicas[1].models.clear()
            await _until(lambda: [r.up for r in pool.replicas] == [True, False, True])
            replicas[1].models.add("/v2/models/iris.versions.1/versions/1/ready")
            await _until(lambda: all(r.up for r in pool.replicas))
        finally:
            pool.close()
            for r in replicas:
                await r.kill()

    run(scenario)


def test_a_probe_answered_late_once_takes_no_replica_out_twice_in_a_row_does(tmp_path: Path) -> None:
    async def scenario() -> None:
        busy = await FakeReplica().start()
        pool = HttpBalancer(_settings(tmp_path, busy.url), probe_interval_s=60, probe_timeout_s=0.1)
        try:
            busy.ready_delay_s = 0.2
            await pool.probe()
            assert pool.replicas[0].up, "one late answer: a busy host, not a dead one"
            busy.ready_delay_s = 0.0
            await pool.probe()
            busy.ready_delay_s = 0.2
            await pool.probe()
            assert pool.replicas[0].up, "the count starts again after an answer in time"
            await pool.probe()
            assert not pool.replicas[0].up
            busy.ready = False
            busy.ready_delay_s = 0.0
            await pool.probe()
            assert not pool.replicas[0].up
            busy.ready = True
            await pool.probe()
            assert pool.replicas[0].up
        finally:
            pool.close()
            await busy.kill()

    run(scenario)


def test_with_every_replica_taken_out_calls_still_go_to_those_that_answer(tmp_path: Path) -> None:
    async def scenario() -> None:
        replicas = [await FakeReplica().start() for _ in range(2)]
        down = FakeReplica()  # nothing listens there
        registry = CollectorRegistry()
        pool = HttpBalancer(_settings(tmp_path, *(r.url for r in replicas), down.url), registry, **FAST)
        try:
            for r in replicas:
                r.ready = False
            pool.start()
            await _until(lambda: not any(r.up for r in pool.replicas))
            answers = await asyncio.gather(*(pool.request("POST", "/v2/models/iris/infer") for _ in range(10)))
            assert all(a.status == 200 for a in answers) and all(r.seen for r in replicas)
            assert _value(registry, "ferry_gateway_replica_retried_total", protocol="http") == 0, \
                "the one that does not answer its probes at all is tried last"
        finally:
            pool.close()
            for r in replicas:
                await r.kill()

    run(scenario)


def test_a_dns_name_is_resolved_again_and_the_replicas_follow_it(tmp_path: Path) -> None:
    async def scenario() -> None:
        replicas = [await FakeReplica().start() for _ in range(3)]
        published = [Endpoint("127.0.0.1", r.port) for r in replicas[:2]]

        def resolve(sources: object) -> list[Endpoint]:
            if not published:
                raise Unavailable("triton.example resolves to no address", "")
            return list(published)

        settings = _settings(tmp_path, "dns+http://triton.example:8000")
        pool = HttpBalancer(settings, probe_interval_s=0.05, probe_timeout_s=0.5, refresh_s=0.1, resolve=resolve)
        try:
            assert [r.name for r in pool.replicas] == [replicas[0].url, replicas[1].url]
            published[:] = [Endpoint("127.0.0.1", replicas[1].port), Endpoint("127.0.0.1", replicas[2].port)]
            pool.start()
            await _until(lambda: [r.name for r in pool.replicas if r.up] == [replicas[1].url, replicas[2].url])
            published.clear()  # the name stops resolving: keep the replicas known
            await asyncio.sleep(0.3)
            assert len(pool.replicas) == 2
            await asyncio.gather(*(pool.request("POST", "/v2/models/iris/infer") for _ in range(10)))
            assert not replicas[0].seen and replicas[2].seen
        finally:
            pool.close()
            for r in replicas:
                await r.kill()

    run(scenario)


def test_with_no_replica_known_a_call_fails_as_a_connection_failure(tmp_path: Path) -> None:
    def resolve(sources: object) -> list[Endpoint]:
        raise Unavailable("triton.example does not resolve", "")

    async def scenario() -> None:
        pool = HttpBalancer(_settings(tmp_path, "dns+http://triton.example:8000"), resolve=resolve, **FAST)
        try:
            with pytest.raises(ConnectFailed, match="no Triton replica is known"):
                await pool.request("GET", "/v2")
        finally:
            pool.close()

    run(scenario)


# ------------------------------------------------------------------ gRPC


class FakeGrpcReplica:
    """ServerReady, ModelReady and ModelInfer of inference.GRPCInferenceService; ModelInfer answers its port."""

    def __init__(self, http_port: int) -> None:
        self.http_port = http_port
        self.seen = 0
        self.unknown_model = False  # ModelInfer answers Triton's UNAVAILABLE "unknown model"
        self.serves = True  # ModelReady: ready, or Triton's error for a model it does not serve
        self.server: grpc.aio.Server | None = None

    async def start(self) -> FakeGrpcReplica:
        self.server = grpc.aio.server()

        async def ready(raw: bytes, context: grpc.aio.ServicerContext) -> bytes:
            if not self.serves:
                await context.abort(grpc.StatusCode.UNAVAILABLE, "Request for unknown model: 'iris' is not found")
            return service_pb2.ModelReadyResponse(ready=True).SerializeToString()

        async def infer(raw: bytes, context: grpc.aio.ServicerContext) -> bytes:
            self.seen += 1
            if self.unknown_model:
                await context.abort(grpc.StatusCode.UNAVAILABLE, "Request for unknown model: 'iris' is not found")
            return str(self.http_port).encode()

        handlers = {name: grpc.unary_unary_rpc_method_handler(handler)
                    for name, handler in (("ServerReady", ready), ("ModelReady", ready), ("ModelInfer", infer))}
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        self.server.add_insecure_port(f"127.0.0.1:{self.http_port + 1}")
        await self.server.start()
        return self

    async def kill(self) -> None:
        await self.server.stop(grace=None)


def _port_pair() -> int:
    for _ in range(100):
        port = _free_port()
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no free pair of ports")


def test_grpc_calls_spread_and_survive_a_replica_that_is_gone(tmp_path: Path) -> None:
    async def scenario() -> None:
        replicas = [await FakeGrpcReplica(_port_pair()).start() for _ in range(3)]
        registry = CollectorRegistry()
        settings = _settings(tmp_path, *(f"http://127.0.0.1:{r.http_port}" for r in replicas))
        channel = GrpcBalancer(settings, registry, **FAST)
        infer = channel.unary_unary(f"/{SERVICE}/ModelInfer")
        try:
            answers = [await infer(b"", timeout=5) for _ in range(30)]
            assert sorted(answers.count(str(r.http_port).encode()) for r in replicas) == [10, 10, 10]
            await replicas[0].kill()
            answers = await asyncio.gather(*(infer(b"", timeout=5) for _ in range(20)))
            assert str(replicas[0].http_port).encode() not in answers
            assert not channel.replicas[0].up
            assert _value(registry, "ferry_gateway_replica_retried_total", protocol="grpc") >= 1
            replicas[0] = await FakeGrpcReplica(replicas[0].http_port).start()
            await _until(lambda: channel.replicas[0].up)
            await asyncio.gather(*(infer(b"", timeout=5) for _ in range(10)))
            assert replicas[0].seen
        finally:
            await channel.close()
            for r in replicas:
                await r.kill()

    run(scenario)


def test_grpc_an_unavailable_answer_from_triton_is_an_answer_not_a_connection_failure(tmp_path: Path) -> None:
    async def scenario() -> None:
        replicas = [await FakeGrpcReplica(_port_pair()).start() for _ in range(2)]
        for r in replicas:
            r.unknown_model = True
        channel = GrpcBalancer(_settings(tmp_path, *(f"http://127.0.0.1:{r.http_port}" for r in replicas)), **FAST)
        try:
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await channel.unary_unary(f"/{SERVICE}/ModelInfer")(b"", timeout=5)
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE and not connection_failed(refused.value)
            assert sum(r.seen for r in replicas) == 1 and all(r.up for r in channel.replicas)
        finally:
            await channel.close()
            for r in replicas:
                await r.kill()

    run(scenario)


def test_grpc_the_probe_takes_out_a_replica_that_does_not_serve_a_committed_version(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def scenario() -> None:
        monkeypatch.setattr(balancer, "committed_versions", lambda router: [("iris", 1)])
        replicas = [await FakeGrpcReplica(_port_pair()).start() for _ in range(2)]
        settings = _settings(tmp_path, *(f"http://127.0.0.1:{r.http_port}" for r in replicas))
        channel = GrpcBalancer(settings, router=object(), **FAST)  # type: ignore[arg-type]
        try:
            replicas[0].serves = False  # restarted: serves nothing until reconciled
            channel.start()
            await _until(lambda: not channel.replicas[0].up)
            assert channel.replicas[0].reachable, "it answered: it is up, it only lacks the model"
            infer = channel.unary_unary(f"/{SERVICE}/ModelInfer")
            await asyncio.gather(*(infer(b"", timeout=5) for _ in range(10)))
            assert replicas[0].seen == 0
            replicas[0].serves = True
            await _until(lambda: channel.replicas[0].up)
        finally:
            await channel.close()
            for r in replicas:
                await r.kill()

    run(scenario)
