"""``ferry gateway``: production traffic to the version current.json commits, and to nothing else.

An adapter (its own HTTP/1.1 server, FastAPI, grpc.aio) over :mod:`ferry.adapters.inference.routing`. Every
request is routed afresh, so a commit takes effect from the next request on, without a restart; the answer names
the version that served it (the ``X-Ferry-Model-Version`` header, gRPC trailing metadata of the same name). A
client may name a version only if it is the committed one.

KServe v2 over HTTP is answered by :mod:`.kserve_http`, called by the gateway's HTTP server (:mod:`.http_server`:
httptools, one write per answer) with each request read whole, over a pool of kept-alive connections
(:mod:`.upstream`) per Triton replica, balanced (:mod:`.balancer`); KServe v2 over gRPC is a grpc.aio server in the
same event loop (:mod:`.kserve_grpc`), over a channel per replica. Both check every inference against the model's
config first (:mod:`.guard`). The rest (/predict, /healthz, /readyz, /metrics) is FastAPI, which the server calls as
an ASGI application.

Draining: Triton unloads a retired version only once the requests it is running have finished. A
request routed to the old version just before a commit can still reach Triton after the version is
gone; Triton then refuses it before running it, and the gateway sends it again, once, to the version
now committed (:meth:`Gateway.at_committed`).

During a bake (rollout.json, :meth:`.routing.Router.bake`), an inference that names no version may be the
candidate's: in canary mode the candidate answers that share of them (``X-Ferry-Canary: 1``, gRPC trailing
metadata ``x-ferry-canary``); in shadow mode the active version answers every one and a copy of that share
goes to the candidate off the response path (:mod:`.shadow`). Metrics carry the role of each answer:
``active``, ``candidate`` (a canary's answer, or a swapped replica's in a rolling deploy) or ``shadow`` (a copy,
never seen by a client).

During a rolling deploy (rollout.json, mode ``rolling``), every call for the model goes to its front, naming no
version, and the answer names the version the replica's front served; replicas listed ``draining`` get no new
call for any model (:mod:`.balancer`).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import TypeVar

import numpy as np
import uvloop
from fastapi import FastAPI, Response
from fastapi import Request as FastApiRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException
from starlette.types import Receive, Scope, Send

from ferry.adapters.gateway.balancer import LAST_REPLICA, HttpBalancer
from ferry.adapters.gateway.http_server import HttpServer, asgi_responder
from ferry.adapters.gateway.http_wire import Answer as ServerAnswer
from ferry.adapters.gateway.http_wire import Limits, Request
from ferry.adapters.gateway.kserve_grpc import KServeGrpc
from ferry.adapters.gateway.kserve_http import KServeHttp, answered_version, served_by, triton_failure
from ferry.adapters.gateway.metrics import Metrics
from ferry.adapters.gateway.refusals import route_of, status_of
from ferry.adapters.gateway.shadow import Shadow
from ferry.adapters.gateway.upstream import Reply
from ferry.adapters.gateway.wording import UnknownModelError, UnknownVersionError, version_number
from ferry.adapters.inference import guard
from ferry.adapters.inference.body import check_rows, decode_body, predict_document, predict_infer
from ferry.adapters.inference.routing import CANDIDATE, Route, Router, UnknownModel
from ferry.core.config import Settings
from ferry.core.errors import (
    BackendDown,
    BodyTimeout,
    FerryError,
    GatewayError,
    InvalidInput,
    NotServed,
    TooLarge,
    Unauthorized,
)
from ferry.core.smoke import bytes_to_json
from ferry.core.status import list_models

T = TypeVar("T")


class Gateway:
    """The ASGI application: KServe v2 (HTTP here, gRPC beside it in the same loop), the rest in FastAPI."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.router = Router(settings.repository)
        self.metrics = Metrics()
        limits = settings.gateway
        self.token = limits.token.encode()
        self.max_body_bytes, self.max_elements, self.body_timeout_s = (limits.max_body_bytes, limits.max_elements,
                                                                       limits.body_timeout_s)
        self.host, self.grpc_port = limits.host, limits.grpc_port
        self.triton = HttpBalancer(settings, self.metrics.registry, self.router)  # over every replica
        self.cache: dict[tuple[str, str, int], bytes] = {}  # (what, model, version) -> metadata or config answer
        self.http = KServeHttp(self)
        self.shadow = Shadow(self)
        self.grpc: KServeGrpc | None = None  # the gRPC server, started with the application (lifespan)
        self.app = _admin_app(self)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and is_v2(scope["path"]):
            await self.http(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    def check_token(self, authorization: bytes) -> None:
        if self.token and not (authorization.startswith(b"Bearer ")
                               and hmac.compare_digest(authorization[7:], self.token)):
            raise Unauthorized("missing or wrong bearer token", "send the header 'Authorization: Bearer <token>'")

    async def read_body(self, receive: Receive, length: bytes | None) -> bytes:
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            raise TooLarge(f"the body is {int(length)} bytes, over the gateway's limit of {self.max_body_bytes}",
                           "split the request")
        try:
            async with asyncio.timeout(self.body_timeout_s):
                return await self._receive_body(receive)
        except TimeoutError:
            raise BodyTimeout(f"the body did not arrive within {self.body_timeout_s:g} s",
                              "send the whole body promptly") from None

    async def _receive_body(self, receive: Receive) -> bytes:
        message = await receive()
        if not message.get("more_body"):
            return message.get("body", b"")
        chunks, size = [message.get("body", b"")], len(message.get("body", b""))
        while message.get("more_body"):
            message = await receive()
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_body_bytes:
                raise TooLarge(f"the body is over the gateway's limit of {self.max_body_bytes} bytes",
                               "split the request")
        return b"".join(chunks)

    def route(self, model: str, version: str = "") -> Route:
        """The committed version of ``model``, refused in Triton's words (:mod:`.wording`): a version string that
        is not a number (400), a model with nothing committed (404), a version named that is not the committed
        one (404). ``version``: an HTTP path's digits, or gRPC's string once read as Triton reads it."""
        number = version_number(version, path=True)
        try:
            route = self.router.route(model)
        except UnknownModel as error:
            raise UnknownModelError(model, error) from None
        if number is not None and number != route.version:
            raise UnknownVersionError(model, number, route)
        return route

    async def at_committed(self, model: str, version: str, call: Callable[[Route], Awaitable[T]],
                           done: Callable[[T], bool], split: bool = False) -> tuple[Route, T]:
        """``call`` at the committed version; if it fails and a commit retired that version meanwhile, once
        more at the version now committed (a client that named the old version gets a 404 instead).

        ``split`` (inference): during a canary bake, a request that names no version is the candidate's with
        the canary's probability; its failure is the client's answer, unless the bake was decided meanwhile."""
        route, bake = self.router.follow(self.route(model, version))  # during a rolling deploy: the front
        if split and not version and bake is not None and bake.canary and bake.takes():
            route = bake.candidate
        answer = await _attempt(call, route)
        if done(answer):
            return route, answer
        newer = self.router.route(model)
        if newer.version == route.version or (route.role == CANDIDATE and self._still_canary(newer, route)):
            return route, answer
        if version:
            raise NotServed(f"model '{model}' v{version} was retired by a commit while the request ran",
                            f"v{newer.version} is committed now: name it, or no version")
        self.metrics.rerouted.labels(model).inc()
        newer = self.router.follow(newer)[0]
        return newer, await _attempt(call, newer)

    def _still_canary(self, committed: Route, candidate: Route) -> bool:
        bake = self.router.bake(committed)
        return bake is not None and bake.candidate.version == candidate.version

    def cached(self, what: str, route: Route) -> bytes | None:
        return self.cache.get((what, route.model, route.version))

    def remember(self, what: str, route: Route, answer: bytes) -> bytes:
        if len(self.cache) > 4096:  # model names and versions are bounded by the repository; be safe anyway
            self.cache.clear()
        self.cache[(what, route.model, route.version)] = answer
        return answer

    async def ready(self) -> tuple[dict[str, int], list[str]]:
        """Every committed model's active version, if it answers ready in Triton, and what does not."""
        serving, problems = {}, []
        for model in list_models(self.settings.repository):
            try:
                route = self.router.follow(self.router.route(model))[0]
                reply = await self.triton.request("GET", f"{route.path}/ready")
            except UnknownModel:
                continue
            except (OSError, TimeoutError) as error:
                problems.append(f"Triton did not answer: {type(error).__name__} {error}")
                continue
            if reply.status == 200:
                serving[model] = route.version
            else:
                problems.append(f"{model} v{route.version} is not ready in Triton")
        return serving, problems

    async def triton_request(self, method: str, path: str, body: bytes = b"",
                             headers: list[tuple[bytes, bytes]] | tuple = ()) -> Reply:
        try:
            return await self.triton.request(method, path, body, headers)
        except (OSError, TimeoutError) as error:
            raise BackendDown(f"Triton at {self.settings.triton.urls} did not answer: {type(error).__name__} {error}",
                              "check that Triton runs") from None

    async def start(self) -> None:
        if self.grpc_port:
            self.grpc = KServeGrpc(self, self.host, self.grpc_port)
            await self.grpc.start()

    async def stop(self) -> None:
        if self.grpc is not None:
            await self.grpc.stop()
        await self.shadow.close()
        self.triton.close()


async def _attempt(call: Callable[[Route], Awaitable[T]], route: Route) -> T:
    try:
        return await call(route)
    except GatewayError as error:
        raise error.on_route(route) from error.__cause__  # a refusal names the version it was checked against


def _error(status: int, message: str, route: Route | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=served_by(route))


def _outputs(answer: bytes) -> dict:
    """{output: nested list}; a BYTES element is its text, or {"b64": ...} when it is not UTF-8 (as in smoke.json)."""
    # Triton writes a BYTES element's bytes into its JSON unescaped: surrogateescape keeps any byte for bytes_to_json.
    outputs = json.loads(answer.decode("utf-8", "surrogateescape")).get("outputs", [])
    values = {}
    for o in outputs:
        data = o["data"]
        if o["datatype"] == "BYTES":  # an object array: a numpy str array would drop trailing NULs
            data = np.empty(len(o["data"]), dtype=np.object_)
            data[:] = [bytes_to_json(item.encode("utf-8", "surrogateescape")) for item in o["data"]]
        values[o["name"]] = np.asarray(data).reshape(o["shape"]).tolist()
    return values


async def _predict(gateway: Gateway, model: str, request: FastApiRequest) -> tuple[Route | None, Response]:
    """/predict: the same body decoder and input check as KServe's infer (:mod:`.body`), then Triton."""
    gateway.check_token(request.headers.get("authorization", "").encode())
    gateway.route(model)  # an unknown model is a 404 whatever the body holds
    body = await gateway.read_body(request.receive, request.headers.get("content-length", "").encode() or None)
    encoding = request.headers.get("content-encoding")
    document = predict_document(decode_body(body, encoding.encode() if encoding is not None else None,
                                            gateway.max_body_bytes))
    json_type = [(b"content-type", b"application/json")]
    shadow = gateway.http.shadowed()

    async def attempt(route: Route) -> Reply:
        infer = predict_infer(document, route)
        guard.check_infer(infer, route, gateway.max_elements)
        check_rows(infer)
        tensors = json.dumps(infer.document, separators=(",", ":")).encode()
        shadow.start(route, lambda: gateway.http.copy(model, tensors, json_type))
        path = f"{route.path}/infer"  # the store (the front during a rolling deploy): see Route.upstream
        return await gateway.triton_request("POST", path, tensors, json_type)

    with shadow:
        route, reply = await gateway.at_committed(model, "", attempt, lambda reply: reply.status == 200, split=True)
        shadow.answered(route, reply)
    if reply.status == 200:
        route = route.answered_by(answered_version(reply.body)) if route.front else route
        return route, JSONResponse({"model": model, "version": route.version, "outputs": _outputs(reply.body)},
                                   headers=served_by(route))
    if route.front:  # a rolling deploy: an error names no version, the replica it came from does
        route = gateway.router.answered_on(route, LAST_REPLICA.get())
    status, message = triton_failure(route, reply)
    return route, _error(status, message, route)


def _admin_app(gateway: Gateway) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await gateway.start()
        yield
        await gateway.stop()

    app = FastAPI(title="ferry gateway", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)

    @app.post("/predict/{model}")
    async def predict(model: str, request: FastApiRequest) -> Response:
        """``{"inputs": {name: nested list}}`` in, ``{"model", "version", "outputs": {name: nested list}}`` out."""
        began, route = time.perf_counter(), None
        try:
            route, response = await _predict(gateway, model, request)
        except FerryError as error:
            route = route_of(error) or route  # a refusal names the version it was checked against
            response = _error(status_of(error), str(error), route)
        gateway.metrics.count(route, response.status_code, began)
        return response

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> Response:
        """Ready when every committed model's active version answers ready in Triton."""
        serving, problems = await gateway.ready()
        if problems or not serving:
            return _error(503, "; ".join(problems) or "no committed model to serve")
        return JSONResponse({"status": "ready", "serving": serving})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(generate_latest(gateway.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    _error_handlers(app)
    return app


def _error_handlers(app: FastAPI) -> None:
    """Every answer that is not a success is ``{"error": "..."}``, FastAPI's own 404, 405 and 422 included."""

    @app.exception_handler(HTTPException)
    async def http_error(request: FastApiRequest, error: HTTPException) -> JSONResponse:
        message = {404: f"the gateway serves no {request.url.path[:200]!r}",
                   405: f"{request.url.path[:200]!r} does not take {request.method}"}.get(error.status_code,
                                                                                   str(error.detail))
        response = _error(error.status_code, message)
        response.headers.update(error.headers or {})
        return response

    @app.exception_handler(RequestValidationError)
    async def invalid(request: FastApiRequest, error: RequestValidationError) -> JSONResponse:
        return _error(400, f"the request is not valid: {str(error.errors())[:300]}")

    @app.exception_handler(Exception)
    async def unexpected(request: FastApiRequest, error: Exception) -> JSONResponse:
        return _error(502, f"the gateway failed: {type(error).__name__}: {error}")


def serve(settings: Settings) -> None:
    """Run the gateway (what ``ferry gateway`` does): HTTP and, if its port is set, gRPC, as ``settings.gateway``
    says, in one uvloop event loop, until SIGTERM or SIGINT."""
    gateway = Gateway(settings)
    host, port = settings.gateway.host, settings.gateway.port
    admin = asgi_responder(gateway.app, (host, port))

    async def respond(request: Request) -> ServerAnswer:
        if not is_v2(request.path):
            return await admin(request)
        answer = await gateway.http.respond(request.method, request.path, dict(request.headers),
                                            lambda: _whole(request.body))
        return ServerAnswer(answer.status, answer.head(), answer.body)

    server = HttpServer(respond, Limits(gateway.max_body_bytes, gateway.body_timeout_s))
    try:
        uvloop.run(server.serve(host, port, gateway.start, gateway.stop))
    except OSError as error:
        raise InvalidInput(f"the gateway cannot listen on {host}:{port}: {error.strerror or error}",
                           "give another --port or --host (FERRY_GATEWAY_PORT, FERRY_GATEWAY_HOST), or stop what "
                           "holds the port") from None


async def _whole(body: bytes) -> bytes:
    return body  # the gateway's own server reads a request whole, within its limits, before it answers


def is_v2(path: str) -> bool:
    """A KServe v2 path (/v2, /v2/...): the protocol handler's, not FastAPI's."""
    return path.startswith("/v2") and path[3:4] in ("", "/")
