"""``ferry gateway``: production traffic to the version current.json commits, and to nothing else.

An adapter (uvicorn, FastAPI) over :mod:`ferry.routing`. Every request is routed afresh, so a commit
takes effect from the next request on, without a restart; the answer names the version that served it
in the ``X-Ferry-Model-Version`` header. A client cannot pick a version: the KServe path with
``/versions/<N>`` is not served.

The KServe v2 inference path is a plain ASGI handler over a pool of kept-alive connections
(:mod:`ferry.upstream`): it forwards the bytes without parsing them, and looks into a request only
when Triton refused it, to tell the client what was wrong. The rest (/predict, health, metrics) is FastAPI.

Draining: Triton unloads a retired version only once the requests it is running have finished. A
request routed to the old version just before a commit can still reach Triton after the version is
gone; Triton then refuses it before running it, and the gateway sends it again, once, to the version
now committed.
"""

from __future__ import annotations

import hmac
import json
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import numpy as np
from fastapi import FastAPI, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from tritonclient.utils import triton_to_np_dtype

from ferry.adapters.gateway.routing import Route, Router, UnknownModel
from ferry.adapters.gateway.upstream import Reply, UpstreamPool
from ferry.core.config import Settings
from ferry.core.errors import GatewayError
from ferry.core.model_config import Signature, shape_fits
from ferry.core.status import list_models

VERSION_HEADER = b"x-ferry-model-version"
BINARY_HEADER = b"inference-header-content-length"  # KServe v2 binary tensor extension: passed through as is
KSERVE_PREFIX, KSERVE_SUFFIX = "/v2/models/", "/infer"

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("ferry_gateway_requests", "Requests by model, served version and HTTP status",
                                ["model", "version", "code"], registry=self.registry)
        self.seconds = Histogram("ferry_gateway_request_seconds", "Time to answer, Triton included", ["model"],
                                 registry=self.registry,
                                 buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5))
        self.rerouted = Counter("ferry_gateway_rerouted", "Requests sent again to the version a commit made active "
                                "after the version they were routed to had been retired", ["model"],
                                registry=self.registry)
        self._children: dict[tuple[str, int, int], tuple[Any, Any]] = {}

    def count(self, route: Route | None, status: int, began: float) -> None:
        # Labelled by the routed model only: a name from the URL would let any client grow the label set.
        model, version = (route.model, route.version) if route else ("", 0)
        children = self._children.get((model, version, status))
        if children is None:  # labels() costs more than the increment itself: look each child up once
            children = (self.requests.labels(model, str(version) if route else "", str(status)),
                        self.seconds.labels(model))
            self._children[(model, version, status)] = children
        children[0].inc()
        children[1].observe(time.perf_counter() - began)


def _to_tensors(body: bytes, signature: Signature) -> dict:
    """A /predict body ``{"inputs": {name: nested list}}`` as a KServe v2 request, checked against the model."""
    try:
        document = json.loads(body)
    except ValueError as error:
        raise GatewayError(400, f"the body is not valid JSON: {error}") from None
    inputs = document.get("inputs") if isinstance(document, dict) else None
    if not isinstance(inputs, dict):
        raise GatewayError(400, 'the body must be {"inputs": {"<input name>": <nested list>}}')
    wanted = {t.name: t for t in signature.inputs}
    if set(inputs) != set(wanted):
        raise GatewayError(400, f"the model takes inputs {sorted(wanted)}, the request gives {sorted(inputs)}")
    tensors = []
    for name, value in inputs.items():
        spec = wanted[name]
        try:
            array = np.asarray(value, dtype=triton_to_np_dtype(spec.datatype))
        except (ValueError, TypeError) as error:
            raise GatewayError(400, f"input '{name}' is not a {spec.datatype} tensor: {error}") from None
        if not shape_fits(list(array.shape), spec.dims):
            raise GatewayError(400, f"input '{name}' has shape {list(array.shape)}, the model takes {list(spec.dims)}")
        tensors.append({"name": name, "shape": list(array.shape), "datatype": spec.datatype,
                        "data": array.flatten().tolist()})
    return {"inputs": tensors}


def _count(data: object) -> int:
    return sum(_count(item) for item in data) if isinstance(data, list) else 1


def _request_problem(body: bytes, headers: dict[bytes, bytes], signature: Signature) -> str | None:
    """What is wrong with a KServe v2 request, if anything. Checked only after Triton failed on it
    (Triton answers 500 to many bad requests), so it costs nothing on the hot path."""
    length = headers.get(BINARY_HEADER, b"").decode()
    try:
        document = json.loads(body[: int(length)] if length and length.isdigit() else body)
    except ValueError as error:
        return f"the body is not valid JSON: {error}"
    inputs = document.get("inputs") if isinstance(document, dict) else None
    if not isinstance(inputs, list):
        return 'the body must be a KServe v2 request: {"inputs": [{"name", "shape", "datatype", "data"}]}'
    wanted = {t.name: t for t in signature.inputs}
    for tensor in inputs:
        spec = wanted.get(tensor.get("name")) if isinstance(tensor, dict) else None
        if spec is None:
            return f"the model takes inputs {sorted(wanted)}; the request gives {tensor!r:.100}"
        name, shape = spec.name, tensor.get("shape")
        if tensor.get("datatype") != spec.datatype:
            return f"input '{name}' is {tensor.get('datatype')}, the model takes {spec.datatype}"
        if not shape_fits(shape, spec.dims):
            return f"input '{name}' has shape {shape}, the model takes {list(spec.dims)}"
        if "data" in tensor and _count(tensor["data"]) != math.prod(shape):
            return f"input '{name}' has {_count(tensor['data'])} values, its shape {shape} holds {math.prod(shape)}"
    return None


def _triton_message(payload: bytes) -> str:
    try:
        return str(json.loads(payload)["error"])
    except (ValueError, KeyError, TypeError):
        return payload.decode(errors="replace")[:500]


def _outputs(answer: bytes) -> dict:
    outputs = json.loads(answer).get("outputs", [])
    return {o["name"]: np.asarray(o["data"]).reshape(o["shape"]).tolist() for o in outputs}


class Gateway:
    """The ASGI application: the KServe hot path here, everything else in a FastAPI app."""

    def __init__(self, settings: Settings, token: str = "", max_body_bytes: int = 16 * 1024 * 1024) -> None:
        self.settings = settings
        self.router = Router(settings.repository)
        self.metrics = Metrics()
        self.token = token.encode()
        self.max_body_bytes = max_body_bytes
        self.triton = UpstreamPool(settings.triton.host, settings.triton.port, settings.triton_timeout_s)
        self.app = _admin_app(self)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "")
        if scope["type"] == "http" and scope["method"] == "POST" and path.startswith(KSERVE_PREFIX) \
                and path.endswith(KSERVE_SUFFIX) and "/" not in path[len(KSERVE_PREFIX):-len(KSERVE_SUFFIX)]:
            await self._kserve(path[len(KSERVE_PREFIX):-len(KSERVE_SUFFIX)], scope, receive, send)
        else:
            await self.app(scope, receive, send)

    def check_token(self, authorization: bytes) -> None:
        if self.token and not (authorization.startswith(b"Bearer ")
                               and hmac.compare_digest(authorization[7:], self.token)):
            raise GatewayError(401, "missing or wrong bearer token")

    async def _kserve(self, model: str, scope: Scope, receive: Receive, send: Send) -> None:
        began = time.perf_counter()
        headers = dict(scope["headers"])
        route = None
        try:
            self.check_token(headers.get(b"authorization", b""))
            body = await self.read_body(receive, headers.get(b"content-length"))
            passed = [(b"content-type", headers.get(b"content-type", b"application/json"))]
            if BINARY_HEADER in headers:
                passed.append((BINARY_HEADER, headers[BINARY_HEADER]))
            route, reply = await self.forward(model, body, passed)
            status, payload = reply.status, reply.body
            out = [(b"content-type", reply.headers.get(b"content-type", b"application/json"))]
            if BINARY_HEADER in reply.headers:
                out.append((BINARY_HEADER, reply.headers[BINARY_HEADER]))
            if status >= 500:
                status, payload, out = self._explain(route, reply, body, passed)
        except UnknownModel as error:
            status, payload, out = 404, _error_body(str(error)), [(b"content-type", b"application/json")]
        except GatewayError as error:
            status, payload, out = error.status, _error_body(str(error)), [(b"content-type", b"application/json")]
        if route is not None:
            out.append((VERSION_HEADER, str(route.version).encode()))
        await send({"type": "http.response.start", "status": status, "headers": out})
        await send({"type": "http.response.body", "body": payload})
        self.metrics.count(route, status, began)

    async def read_body(self, receive: Receive, length: bytes | None) -> bytes:
        if length is not None and length.isdigit() and int(length) > self.max_body_bytes:
            raise GatewayError(413, f"the body is {int(length)} bytes, over the gateway's limit of "
                                    f"{self.max_body_bytes}")
        chunks, size = [], 0
        while True:
            message = await receive()
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                raise GatewayError(413, f"the body is over the gateway's limit of {self.max_body_bytes} bytes")
            chunks.append(chunk)
            if not message.get("more_body"):
                return b"".join(chunks)

    async def forward(self, model: str, body: bytes, headers: list[tuple[bytes, bytes]]) -> tuple[Route, Reply]:
        """Send an inference to the committed version; once more to the new one if a commit retired it meanwhile."""
        route = self.router.route(model)
        for attempt in (1, 2):
            path = f"/v2/models/{model}/versions/{route.version}/infer"
            try:
                reply = await self.triton.request("POST", path, body, headers)
            except (OSError, TimeoutError) as error:
                raise GatewayError(503, f"Triton at {self.settings.triton_url} did not answer: "
                                        f"{type(error).__name__} {error}") from None
            if reply.status == 200 or attempt == 2:
                return route, self._served(route, reply)
            newer = self.router.route(model)
            if newer.version == route.version:
                return route, self._served(route, reply)
            self.metrics.rerouted.labels(model).inc()
            route = newer
        raise AssertionError("unreachable")

    def _served(self, route: Route, reply: Reply) -> Reply:
        """The reply, unless Triton does not serve the committed version at all (restarted, not reconciled)."""
        if reply.status in (400, 404) and b"unknown model" in reply.body[:300].lower():
            raise GatewayError(503, f"'{route.model}' v{route.version} is committed but Triton does not serve it",
                               "run `ferry reconcile` (after a Triton restart, it serves nothing until then)")
        return reply

    def _explain(self, route: Route, reply: Reply, body: bytes,
                 headers: list[tuple[bytes, bytes]]) -> tuple[int, bytes, list[tuple[bytes, bytes]]]:
        """Triton answers 500 to many bad requests: say what is wrong with it (400), or that Triton failed (502)."""
        json_type = [(b"content-type", b"application/json")]
        if problem := _request_problem(body, dict(headers), route.signature):
            return 400, _error_body(problem), json_type
        return 502, _error_body(f"Triton failed: {_triton_message(reply.body)}"), json_type

    async def ready(self) -> tuple[dict[str, int], list[str]]:
        """Every committed model's active version, if it answers ready in Triton, and what does not."""
        serving, problems = {}, []
        for model in list_models(self.settings.repository):
            try:
                route = self.router.route(model)
                reply = await self.triton.request("GET", f"/v2/models/{model}/versions/{route.version}/ready")
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


def _error_body(message: str) -> bytes:
    return json.dumps({"error": message}).encode()


def _error(status: int, message: str, route: Route | None = None) -> JSONResponse:
    headers = {VERSION_HEADER.decode(): str(route.version)} if route else None
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def _admin_app(gateway: Gateway) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        gateway.triton.close()

    app = FastAPI(title="ferry gateway", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)

    @app.post("/predict/{model}")
    async def predict(model: str, request: Request) -> Response:
        """``{"inputs": {name: nested list}}`` in, ``{"model", "version", "outputs": {name: nested list}}`` out."""
        began, route = time.perf_counter(), None
        try:
            gateway.check_token(request.headers.get("authorization", "").encode())
            body = await gateway.read_body(request.receive, request.headers.get("content-length", "").encode() or None)
            route = gateway.router.route(model)
            tensors = json.dumps(_to_tensors(body, route.signature)).encode()
            route, reply = await gateway.forward(model, tensors, [(b"content-type", b"application/json")])
            if reply.status == 200:
                response = JSONResponse({"model": model, "version": route.version, "outputs": _outputs(reply.body)},
                                        headers={VERSION_HEADER.decode(): str(route.version)})
            elif reply.status < 500:
                response = _error(reply.status, _triton_message(reply.body), route)
            else:
                response = _error(502, f"Triton failed: {_triton_message(reply.body)}", route)
        except UnknownModel as error:
            response = _error(404, str(error))
        except GatewayError as error:
            response = _error(error.status, str(error), route)
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

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception) -> JSONResponse:
        return _error(502, f"the gateway failed: {type(error).__name__}: {error}")

    return app
