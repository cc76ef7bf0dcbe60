"""KServe v2 over gRPC (``inference.GRPCInferenceService``), as ``tritonclient.grpc`` calls it, at the committed
version only: ServerLive, ServerReady, ServerMetadata, ModelReady, ModelMetadata, ModelConfig, ModelStatistics,
ModelInfer (any other method: UNIMPLEMENTED). Refusals of model names and versions are worded as Triton words them
(:mod:`.wording`).

A grpc.aio server in the gateway's own event loop (uvloop), forwarding to Triton's gRPC ports over one
grpc.aio channel per replica, balanced (:mod:`.grpc_balancer`). Handlers take and return serialized messages: a
request is parsed once (for routing and the guard) and forwarded as the bytes the client sent with the committed
version appended (in protobuf the last value of a field wins, and ``version`` is field 2 of every request forwarded
here); Triton's answer goes back as it came, except metadata and config, which name the committed version alone and
are cached per version.

The same routing, reroute-once, bearer token (``authorization: Bearer <token>`` metadata), bake (canary
split, shadow copies) and metrics as HTTP; the version that served is in the trailing metadata
``x-ferry-model-version``, and a canary's answer carries ``x-ferry-canary: 1``.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc
from google.protobuf.message import DecodeError, Message
from tritonclient.grpc import service_pb2

from ferry.adapters.gateway.balancer import LAST_REPLICA, committed_versions
from ferry.adapters.gateway.grpc_balancer import GrpcBalancer
from ferry.adapters.gateway.kserve_http import SERVED_EXTENSIONS
from ferry.adapters.gateway.refusals import route_of, status_of
from ferry.adapters.gateway.shadow import Outputs, Shadowed, grpc_outputs, http_copy_of_grpc
from ferry.adapters.gateway.wording import UnknownModelError, UnknownVersionError, version_number
from ferry.adapters.inference import guard
from ferry.adapters.inference.routing import CANDIDATE, Route
from ferry.core.addresses import Endpoint
from ferry.core.errors import BadRequest, FerryError, InvalidInput

if TYPE_CHECKING:
    from ferry.adapters.gateway.plane import DataPlane

SERVICE = "inference.GRPCInferenceService"
VERSION_KEY = "x-ferry-model-version"
CANARY_KEY = "x-ferry-canary"
MAX_MESSAGE = 2**31 - 1
OK = grpc.StatusCode.OK
_CODES = {400: grpc.StatusCode.INVALID_ARGUMENT, 401: grpc.StatusCode.UNAUTHENTICATED, 404: grpc.StatusCode.NOT_FOUND,
          408: grpc.StatusCode.DEADLINE_EXCEEDED, 413: grpc.StatusCode.RESOURCE_EXHAUSTED,
          415: grpc.StatusCode.INVALID_ARGUMENT, 502: grpc.StatusCode.INTERNAL, 503: grpc.StatusCode.UNAVAILABLE}
_STATUSES = {code: status for status, code in _CODES.items() if status not in (415,)} | {OK: 200}
_PARSE_FAILURES = ("unable to parse", "failed to parse")


@dataclass
class Result:
    """What a handler answers: the serialized response, or a code and details; the route that served."""

    code: grpc.StatusCode = OK
    payload: bytes = b""
    details: str = ""
    route: Route | None = None


def _parse(kind: type[Message], raw: bytes) -> Message:
    try:
        return kind.FromString(raw)
    except DecodeError as error:
        raise BadRequest(f"the request is not a valid {kind.__name__} message: {error}",
                         f"send an {SERVICE} {kind.__name__}") from None


def _field(number: int, value: str) -> bytes:
    """A string field, serialized: appended to a message, it wins over the same field before it."""
    data = value.encode()
    return bytes((number << 3 | 2,)) + _varint(len(data)) + data


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _at_store(raw: bytes, route: Route) -> bytes:
    """The serialized request addressed to the route's store (field 1, the model's name) at the route's version
    (field 2: ``model_version`` or ``version``)."""
    return raw + _field(1, route.upstream) + _field(2, route.upstream_version)


def answered_version(payload: bytes) -> int | None:
    """The ``model_version`` (field 2) of a serialized infer response, None if it cannot be read: Triton writes
    the fields in order, so it follows the model's name (field 1)."""
    at = 0
    while at < len(payload):
        tag = payload[at]
        if tag not in (0x0A, 0x12):  # not a length-delimited field 1 or 2: past them
            return None
        length, at = _read_varint(payload, at + 1)
        if tag == 0x12:
            digits = payload[at:at + length]
            return int(digits) if digits.isdigit() else None
        at += length
    return None


def _read_varint(data: bytes, at: int) -> tuple[int, int]:
    value = shift = 0
    while at < len(data):
        byte = data[at]
        value |= (byte & 0x7F) << shift
        at += 1
        if not byte & 0x80:
            break
        shift += 7
    return value, at


def _named(payload: bytes, route: Route) -> bytes:
    """Triton's answer from the store (an infer response), naming the model the client asked for (field 1)."""
    return payload + _field(1, route.model)


class KServeGrpc:
    """The gRPC server of the gateway, started and stopped with the ASGI application (its lifespan)."""

    def __init__(self, gateway: DataPlane, host: str, port: int) -> None:
        self.gateway = gateway
        self.address = Endpoint(host, port).host_port
        self.timeout_s = gateway.settings.triton.timeout_s
        self.triton_address = gateway.settings.triton.grpc.host_port
        self.server = grpc.aio.server(options=[("grpc.max_receive_message_length", gateway.max_body_bytes),
                                               ("grpc.max_send_message_length", MAX_MESSAGE),
                                               ("grpc.so_reuseport", 0)])  # a port in use is refused, not shared
        methods: dict[str, tuple[Callable[[bytes, grpc.aio.ServicerContext], Awaitable[Result]], bool]] = {
            "ServerLive": (self.server_live, False), "ServerReady": (self.server_ready, False),
            "ServerMetadata": (self.server_metadata, False), "ModelReady": (self.model_ready, False),
            "ModelMetadata": (self.model_metadata, False), "ModelConfig": (self.model_config, False),
            "ModelStatistics": (self.model_statistics, False), "ModelInfer": (self.model_infer, True)}
        handlers = {name: grpc.unary_unary_rpc_method_handler(self._rpc(method, counted))
                    for name, (method, counted) in methods.items()}
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE, handlers),))
        self.channel: GrpcBalancer | None = None
        self.calls: dict[str, Callable[..., Awaitable[bytes]]] = {}

    async def start(self) -> None:
        try:
            bound = self.server.add_insecure_port(self.address)
        except RuntimeError as error:
            bound, reason = 0, str(error)
        else:
            reason = "the port is taken"
        if not bound:
            raise InvalidInput(f"the gateway cannot listen for gRPC on {self.address}: {reason}",
                               "choose another gRPC port")
        self.channel = GrpcBalancer(self.gateway.settings, self.gateway.metrics.registry, self.gateway.router)
        self.calls = {name: self.channel.unary_unary(f"/{SERVICE}/{name}") for name in
                      ("ServerMetadata", "ModelReady", "ModelMetadata", "ModelConfig", "ModelStatistics",
                                   "ModelInfer")}
        await self.server.start()

    async def stop(self) -> None:
        await self.server.stop(grace=1.0)
        if self.channel is not None:
            await self.channel.close()

    def _rpc(self, method: Callable[[bytes, grpc.aio.ServicerContext], Awaitable[Result]],
             counted: bool) -> Callable[[bytes, grpc.aio.ServicerContext], Awaitable[bytes]]:
        async def handle(raw: bytes, context: grpc.aio.ServicerContext) -> bytes:
            began = time.perf_counter()
            try:
                result = await method(raw, context)
            except FerryError as error:
                result = Result(_CODES.get(status_of(error), grpc.StatusCode.UNKNOWN), details=str(error),
                                route=route_of(error))
            except Exception as error:  # a bug: a clear INTERNAL rather than grpcio's UNKNOWN
                result = Result(grpc.StatusCode.INTERNAL, details=f"the gateway failed: {type(error).__name__}: "
                                f"{error}")
            if counted:
                self.gateway.metrics.count(result.route, _STATUSES.get(result.code, 500), began, "grpc")
            trailing = _served_by(result.route)
            if result.code is not OK:
                await context.abort(result.code, result.details, trailing)
            context.set_trailing_metadata(trailing)
            return result.payload

        return handle

    def _authorize(self, context: grpc.aio.ServicerContext) -> None:
        if self.gateway.token:
            given = next((value for key, value in context.invocation_metadata() or () if key == "authorization"), "")
            self.gateway.check_token(given.encode() if isinstance(given, str) else given)

    async def _triton(self, method: str, raw: bytes) -> Result:
        try:
            return Result(payload=await self.calls[method](raw, timeout=self.timeout_s))
        except grpc.aio.AioRpcError as error:
            return Result(error.code(), details=error.details() or "")

    def _failure(self, route: Route | None, reply: Result) -> Result:
        """What to answer when Triton did not answer OK."""
        details = reply.details
        not_served = reply.code in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAVAILABLE)
        if route is not None and not_served and "unknown model" in details.lower():
            return Result(grpc.StatusCode.UNAVAILABLE, details=f"'{route.model}' v{route.version} is committed but "
                          "Triton does not serve it (run `ferry reconcile`: after a restart Triton serves nothing "
                          "until then)", route=route)
        if reply.code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
            return Result(grpc.StatusCode.UNAVAILABLE, details=f"Triton at {self.triton_address} did not answer: "
                          f"{reply.code.name} {details}", route=route)
        if reply.code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
            if any(marker in details.lower() for marker in _PARSE_FAILURES):
                return Result(grpc.StatusCode.INVALID_ARGUMENT, details=f"Triton refused the request: {details}",
                              route=route)
            return Result(grpc.StatusCode.INTERNAL, details=f"Triton failed: {details}", route=route)
        return Result(reply.code, details=details, route=route)

    async def _at_committed(self, model: str, version: str, call: Callable[[Route], Awaitable[Result]],
                            split: bool = False) -> Result:
        number = version_number(version, path=False)  # as Triton reads it: "1x" is version 1
        version = "" if number is None else str(number)
        route, reply = await self.gateway.at_committed(model, version, call, lambda reply: reply.code is OK, split)
        if reply.code is not OK:
            return self._failure(route, reply)
        reply.route = reply.route or route  # an answer by a rolling deploy's front names its own version
        return reply

    # ------------------------------------------------------------ the service's methods

    async def server_live(self, raw: bytes, context: grpc.aio.ServicerContext) -> Result:
        return Result(payload=service_pb2.ServerLiveResponse(live=True).SerializeToString())

    async def server_ready(self, raw: bytes, context: grpc.aio.ServicerContext) -> Result:
        serving, problems = await self.gateway.ready()
        ready = bool(serving) and not problems
        return Result(payload=service_pb2.ServerReadyResponse(ready=ready).SerializeToString())

    async def server_metadata(self, raw: bytes, context: grpc.aio.ServicerContext) -> Result:
        reply = await self._triton("ServerMetadata", b"")
        if reply.code is not OK:
            return self._failure(None, reply)
        metadata = service_pb2.ServerMetadataResponse.FromString(reply.payload)
        served = [e for e in metadata.extensions if e in SERVED_EXTENSIONS]
        del metadata.extensions[:]
        metadata.extensions.extend(served)
        return Result(payload=metadata.SerializeToString())

    async def model_ready(self, raw: bytes, context: grpc.aio.ServicerContext) -> Result:
        self._authorize(context)
        request = _parse(service_pb2.ModelReadyRequest, raw)

        async def attempt(route: Route) -> Result:
            return await self._triton("ModelReady", _at_store(raw, route))

        try:
            return await self._at_committed(request.name, request.version, attempt)
        except (UnknownModelError, UnknownVersionError) as error:  # as Triton answers it: not ready
            return Result(payload=service_pb2.ModelReadyResponse(ready=False).SerializeToString(),
                          route=route_of(error))

    async def model_statistics(self, raw: bytes, context: grpc.aio.ServicerContext) -> Result:
        """Triton's statistics of the committed version (of every committed model's, if the request names none)."""
        self._authorize(context)
        request = _parse(service_pb2.ModelStatisticsRequest, raw)
        if request.name:
            return await self._statistics(request.name, request.version, raw)
        answer = service_pb2.ModelStatisticsResponse()
        for model, _ in committed_versions(self.gateway.router):
            one = service_pb2.ModelStatisticsRequest(name=model).SerializeToString()
            result = await self._statistics(model, "", one)
            if result.code is OK:  # a model whose files changed meanwhile is left out, as Triton leaves it
                answer.MergeFromString(result.payload)
        return Result(payload=answer.SerializeToString())

    async def _statistics(self, model: str, version: str, raw: bytes) -> Result:
        async def attempt(route: Route) -> Result:
            reply = await self._triton("ModelStatistics", _at_store(raw, route))
            if reply.code is not OK and "is not available" in reply.details:  # Triton's words: it does not serve it
                reply.code, reply.details = grpc.StatusCode.NOT_FOUND, f"unknown model: {reply.details}"
            return reply

        try:
            result = await self._at_committed(model, version, attempt)
        except (UnknownModelError, UnknownVersionError) as error:
            raise error.for_stats() from None
        if result.code is OK and result.route is not None:
            result.payload = _committed_statistics(result.payload, result.route)
        return result

    async def model_metadata(self, raw: bytes, context: grpc.aio.ServicerContext) -> Result:
        self._authorize(context)
        request = _parse(service_pb2.ModelMetadataRequest, raw)
        return await self._at_committed(request.name, request.version, self._cached("ModelMetadata", raw))

    async def model_config(self, raw: bytes, context: grpc.aio.ServicerContext) -> Result:
        self._authorize(context)
        request = _parse(service_pb2.ModelConfigRequest, raw)
        return await self._at_committed(request.name, request.version, self._cached("ModelConfig", raw))

    def _cached(self, method: str, raw: bytes) -> Callable[[Route], Awaitable[Result]]:
        async def attempt(route: Route) -> Result:
            cached = self.gateway.cached(method, route)
            if cached is not None:
                return Result(payload=cached)
            reply = await self._triton(method, _at_store(raw, route))
            if reply.code is OK:
                reply.payload = _as_committed(method, reply.payload, route)
                if not route.front:  # the front's (an ensemble's platform and config): not cached as the store's
                    self.gateway.remember(method, route, reply.payload)
            return reply

        return attempt

    async def model_infer(self, raw: bytes, context: grpc.aio.ServicerContext) -> Result:
        self._authorize(context)
        request = _parse(service_pb2.ModelInferRequest, raw)
        shadow = Shadowed(self.gateway.shadow, "grpc", _succeeded, _outputs)

        async def attempt(route: Route) -> Result:
            guard.check_grpc_infer(request, route, self.gateway.max_elements)
            if not request.model_version:
                shadow.start(route, lambda: self.gateway.http.copy(route.model, *http_copy_of_grpc(request)))
            reply = await self._triton("ModelInfer", _at_store(raw, route))
            if reply.code is OK:
                if route.front:  # a rolling deploy: the replica's front answered with the version it serves
                    reply.route = route.answered_by(answered_version(reply.payload))
                else:
                    reply.payload = _named(reply.payload, route)
            elif route.front:  # an error names no version, the replica it came from does
                reply.route = self.gateway.router.answered_on(route, LAST_REPLICA.get())
            return reply

        with shadow:
            result = await self._at_committed(request.model_name, request.model_version, attempt, split=True)
            shadow.answered(result.route, result)
        return result


def _committed_statistics(payload: bytes, route: Route) -> bytes:
    """The store's statistics, of the committed version alone, named as the served model."""
    kept = service_pb2.ModelStatisticsResponse()
    for entry in service_pb2.ModelStatisticsResponse.FromString(payload).model_stats:
        if entry.name == route.upstream and (route.front or entry.version == str(route.version)):
            copy = kept.model_stats.add()
            copy.CopyFrom(entry)
            copy.name = route.model
    return kept.SerializeToString()


def _succeeded(result: Result) -> bool:
    return result.code is OK


def _outputs(result: Result) -> Outputs:
    return grpc_outputs(result.payload)


def _served_by(route: Route | None) -> tuple[tuple[str, str], ...]:
    """The trailing metadata that names the version that answered (and a canary's answer as such)."""
    if route is None:
        return ()
    if route.role == CANDIDATE:
        return (VERSION_KEY, str(route.version)), (CANARY_KEY, "1")
    return ((VERSION_KEY, str(route.version)),)


def _as_committed(method: str, payload: bytes, route: Route) -> bytes:
    """Triton's metadata or config, naming the committed version alone (a deploy may have loaded another beside)."""
    if method == "ModelConfig":
        answer = service_pb2.ModelConfigResponse.FromString(payload)
        answer.config.name = route.model
        answer.config.version_policy.Clear()
        answer.config.version_policy.specific.versions.append(route.version)
    else:
        answer = service_pb2.ModelMetadataResponse.FromString(payload)
        answer.name = route.model
        del answer.versions[:]
        answer.versions.append(str(route.version))
    return answer.SerializeToString()
