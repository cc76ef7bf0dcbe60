"""The gateway's gRPC calls to Triton, balanced over the replicas: one grpc.aio channel per replica.

The same choice, admission, probing and DNS refresh as HTTP (:mod:`.balancer`). A call that fails with
``UNAVAILABLE`` because the connection failed (refused, reset, closed: grpc's own words for it, never
Triton's: Triton's ``UNAVAILABLE`` "unknown model" is an answer) takes its replica out and is sent once more,
to another replica. The probe is ``ModelReady`` for each committed model's active version (its front, during
its rolling deploy), or ``ServerReady``.

:class:`GrpcBalancer` looks like the one channel it replaces: ``unary_unary(method)`` gives a callable taking
``(request, timeout=..., metadata=...)``; ``await close()``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import grpc
from prometheus_client import CollectorRegistry
from tritonclient.grpc import service_pb2

from ferry.adapters.gateway.balancer import Balancer, ConnectFailed, Replica
from ferry.adapters.inference.routing import Router
from ferry.core.addresses import Endpoint
from ferry.core.config import Settings

SERVICE = "inference.GRPCInferenceService"
MAX_MESSAGE = 2**31 - 1
# A replica that comes back is reconnected to within a second (grpc's default backoff grows to two minutes).
CHANNEL_OPTIONS = (("grpc.max_send_message_length", MAX_MESSAGE), ("grpc.max_receive_message_length", MAX_MESSAGE),
                   ("grpc.initial_reconnect_backoff_ms", 250), ("grpc.min_reconnect_backoff_ms", 250),
                   ("grpc.max_reconnect_backoff_ms", 1000))
# How grpc words an UNAVAILABLE that is a connection failing, not an answer (lower case).
TRANSPORT_FAILURES = ("failed to connect", "connection refused", "connection reset", "socket closed", "stream removed",
                      "broken pipe", "goaway", "endpoint closing", "transport closed", "connection aborted",
                      "no route to host", "dns resolution failed", "keepalive watchdog timeout")

Call = Callable[..., Awaitable[Any]]


def connection_failed(error: BaseException) -> bool:
    """Whether a gRPC call failed because its connection did (so it may go to another replica)."""
    if isinstance(error, ConnectFailed):
        return True
    if not isinstance(error, grpc.aio.AioRpcError) or error.code() != grpc.StatusCode.UNAVAILABLE:
        return False
    details = (error.details() or "").lower()
    return any(marker in details for marker in TRANSPORT_FAILURES)


@dataclass(eq=False)
class _GrpcClient:
    channel: grpc.aio.Channel
    calls: dict[tuple[str, Any, Any], grpc.aio.UnaryUnaryMultiCallable] = field(default_factory=dict)

    def method(self, name: str, serializer: Any = None, deserializer: Any = None) -> grpc.aio.UnaryUnaryMultiCallable:
        key = (name, serializer, deserializer)
        call = self.calls.get(key)
        if call is None:
            call = self.calls[key] = self.channel.unary_unary(name, request_serializer=serializer,
                                                              response_deserializer=deserializer)
        return call


class GrpcBalancer(Balancer[_GrpcClient]):
    """A channel's ``unary_unary`` and ``close``, balanced over the replicas' gRPC ports (Triton's HTTP port + 1,
    or FERRY_TRITON_GRPC_PORT). Make it in the running event loop (grpc.aio channels belong to one)."""

    protocol = "grpc"

    def __init__(self, settings: Settings, registry: CollectorRegistry | None = None, router: Router | None = None,
                 options: Sequence[tuple[str, Any]] = (), **tuning: Any) -> None:
        super().__init__(settings, registry, router, **tuning)
        self.options = [*CHANNEL_OPTIONS, *options]
        self.grpc_port = settings.triton.grpc_port
        self._closing: set[asyncio.Task] = set()
        self.resolve_now()

    def _endpoint(self, replica: Endpoint) -> Endpoint:
        return replica.with_port(self.grpc_port or replica.port + 1)

    def _open(self, endpoint: Endpoint) -> _GrpcClient:
        return _GrpcClient(grpc.aio.insecure_channel(endpoint.host_port, options=self.options))

    def _close_client(self, client: _GrpcClient) -> None:
        with contextlib.suppress(RuntimeError):  # no loop runs: the channel goes with the process
            task = asyncio.get_running_loop().create_task(client.channel.close())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    def _unreachable(self, error: BaseException) -> bool:
        return connection_failed(error)

    def _describe(self, error: BaseException) -> str:
        if isinstance(error, grpc.aio.AioRpcError):
            return f"{error.code().name}: {error.details()}"
        return super()._describe(error)

    async def _ready(self, replica: Replica[_GrpcClient], committed: Sequence[tuple[str, str]]) -> bool:
        if not committed:
            return await self._ask(replica, "ServerReady", b"")
        for name, version in committed:
            request = service_pb2.ModelReadyRequest(name=name, version=version).SerializeToString()
            if not await self._ask(replica, "ModelReady", request):
                return False
        return True

    async def _ask(self, replica: Replica[_GrpcClient], method: str, request: bytes) -> bool:
        """A readiness answer (``ready`` is field 1 of both responses); an error Triton answered is a no."""
        try:
            raw = await replica.client.method(f"/{SERVICE}/{method}")(request, timeout=self.probe_timeout_s)
        except grpc.aio.AioRpcError as error:
            if error.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                raise TimeoutError from None
            if connection_failed(error):
                raise
            return False
        return service_pb2.ModelReadyResponse.FromString(raw).ready

    def unary_unary(self, method: str, request_serializer: Any = None, response_deserializer: Any = None) -> Call:
        """A callable like a channel's: ``await call(request, timeout=..., metadata=...)``, on a replica."""
        async def call(request: Any, timeout: float | None = None, metadata: Any = None) -> Any:
            async def send(replica: Replica[_GrpcClient]) -> Any:
                unary = replica.client.method(method, request_serializer, response_deserializer)
                return await unary(request, timeout=timeout, metadata=metadata)

            return await self.call(send)

        return call

    async def close(self, grace: float | None = None) -> None:
        self._stop()
        await asyncio.gather(*(replica.client.channel.close(grace) for replica in self.replicas),
                             *self._closing, return_exceptions=True)
