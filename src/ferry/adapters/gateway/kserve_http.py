"""KServe v2 over HTTP, as ``tritonclient.http`` calls it, at the committed version only.

    GET  /v2                                  server metadata (Triton's, with the extensions the gateway serves)
    GET  /v2/health/live, /v2/health/ready    the gateway is up; every committed version answers ready
    GET  /v2/models/<m>[/versions/<v>]        model metadata           } the committed version's, from Triton,
    GET  /v2/models/<m>[/versions/<v>]/config model config (Triton)    } cached per model and version
    GET  /v2/models/<m>[/versions/<v>]/ready  model readiness
    POST /v2/models/<m>[/versions/<v>]/infer  inference: JSON, binary tensor extension, gzip or deflate bodies

A path that names a version is served only if it names the committed version (else 404). Every error is
``{"error": "..."}``, which tritonclient decodes. A plain ASGI handler: FastAPI's routing and request
objects cost more than forwarding itself. During a bake, an inference that names no version may be answered
by a canary (``X-Ferry-Canary: 1``) or copied to a shadow candidate (:mod:`.shadow`).
"""

from __future__ import annotations

import json
import time
import zlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ferry.adapters.gateway import guard
from ferry.adapters.gateway.routing import CANDIDATE, Route, UnknownModel
from ferry.adapters.gateway.shadow import Copy, Outputs, Shadowed, http_outputs, json_copy
from ferry.adapters.gateway.upstream import Reply
from ferry.core.errors import FerryError, GatewayError

if TYPE_CHECKING:
    from ferry.adapters.gateway.app import Gateway

VERSION_HEADER = b"x-ferry-model-version"
CANARY_HEADER = b"x-ferry-canary"  # "1" on an answer a canary candidate gave
BINARY_HEADER = b"inference-header-content-length"  # KServe v2 binary tensor extension
JSON_TYPE = (b"content-type", b"application/json")
# Of Triton's extensions, those a client of the gateway can use (no model control, shared memory, statistics...).
SERVED_EXTENSIONS = ("classification", "sequence", "schedule_policy", "model_configuration", "binary_tensor_data",
                     "parameters")
_PARSE_FAILURES = ("unable to parse", "failed to parse")  # Triton answers 500 to these client errors
_PASSED_REQUEST = (b"content-type", BINARY_HEADER, b"accept-encoding")
_PASSED_REPLY = (b"content-type", BINARY_HEADER, b"content-encoding")

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


def error_body(message: str) -> bytes:
    return json.dumps({"error": message}).encode()


def triton_message(payload: bytes) -> str:
    try:
        return str(json.loads(payload)["error"])
    except (ValueError, KeyError, TypeError):
        return payload.decode(errors="replace")[:500]


def status_of(error: FerryError) -> int:
    """The HTTP status a gateway request that failed with ``error`` answers."""
    if isinstance(error, GatewayError):
        return error.status
    return 404 if isinstance(error, UnknownModel) else 503  # else the repository's files could not be read


def served_by(route: Route | None) -> dict[str, str] | None:
    """The headers that name the version that answered (and a canary's answer as such), for a Starlette response."""
    if route is None:
        return None
    headers = {VERSION_HEADER.decode(): str(route.version)}
    if route.role == CANDIDATE:
        headers[CANARY_HEADER.decode()] = "1"
    return headers


def triton_failure(route: Route, reply: Reply) -> tuple[int, str]:
    """The status and message to answer when Triton did not answer 200."""
    message = triton_message(reply.body)
    if reply.status in (400, 404, 503) and "unknown model" in message.lower():
        return 503, (f"'{route.model}' v{route.version} is committed but Triton does not serve it (run `ferry "
                     "reconcile`: after a restart Triton serves nothing until then)")
    if reply.status < 500:
        return reply.status, message
    if any(marker in message.lower() for marker in _PARSE_FAILURES):
        return 400, f"Triton refused the request: {message}"
    return 502, f"Triton failed: {message}"


@dataclass
class Answer:
    status: int
    body: bytes = b""
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    route: Route | None = None

    @classmethod
    def error(cls, status: int, message: str, route: Route | None = None) -> Answer:
        return cls(status, error_body(message), [JSON_TYPE], route)


@dataclass(frozen=True)
class Target:
    """What a /v2 path asks for: ``endpoint`` is server, live, ready, model, model_ready, config or infer."""

    endpoint: str
    model: str = ""
    version: str = ""

    @property
    def method(self) -> str:
        return "POST" if self.endpoint == "infer" else "GET"


_MODEL_ACTIONS = {(): "model", ("ready",): "model_ready", ("config",): "config", ("infer",): "infer"}
_SERVER = {(): "server", ("",): "server", ("health", "live"): "live", ("health", "ready"): "ready"}


def target(path: str) -> Target | None:
    """The endpoint a /v2 path names (None: not one the gateway serves)."""
    parts = tuple(path.split("/")[2:])
    if parts[:1] != ("models",):
        return Target(_SERVER[parts]) if parts in _SERVER else None
    if len(parts) < 2 or not parts[1]:
        return None
    model, rest, version = parts[1], parts[2:], ""
    if rest[:1] == ("versions",):
        if len(rest) < 2 or not rest[1]:
            return None
        version, rest = rest[1], rest[2:]
    endpoint = _MODEL_ACTIONS.get(rest)
    return Target(endpoint, model, version) if endpoint else None


def _decoded(body: bytes, encoding: bytes | None, limit: int) -> bytes:
    """The body, inflated if the client compressed it (tritonclient's request_compression_algorithm)."""
    if encoding is None or encoding == b"identity":
        return body
    if encoding not in (b"gzip", b"deflate"):
        raise GatewayError(415, f"Content-Encoding {encoding.decode(errors='replace')!r:.40} is not served",
                           "send the body as is, or with gzip or deflate")
    inflater = zlib.decompressobj(wbits=47)  # a gzip or zlib header, whichever it is
    try:
        plain = inflater.decompress(body, limit + 1)
    except zlib.error as error:
        raise GatewayError(400, f"the {encoding.decode()} body does not inflate: {error}",
                           "compress the whole body, or send it as is") from None
    if len(plain) > limit:
        raise GatewayError(413, f"the body inflates to over the gateway's limit of {limit} bytes", "split the request")
    if not inflater.eof:
        raise GatewayError(400, f"the {encoding.decode()} body is truncated", "send the whole compressed body")
    return plain


class KServeHttp:
    """The ASGI handler of every /v2 path."""

    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        began = time.perf_counter()
        asked = target(scope["path"])
        try:
            answer = await self._answer(asked, scope, receive)
        except FerryError as error:
            answer = Answer.error(status_of(error), str(error), getattr(error, "route", None))
        except Exception as error:  # a bug: still the protocol's error body, and the process serves on
            answer = Answer.error(502, f"the gateway failed: {type(error).__name__}: {error}")
        headers = answer.headers
        headers.append((b"content-length", b"%d" % len(answer.body)))  # else uvicorn sends it chunked
        if answer.route is not None:
            headers.append((VERSION_HEADER, str(answer.route.version).encode()))
            if answer.route.role == CANDIDATE:
                headers.append((CANARY_HEADER, b"1"))
        await send({"type": "http.response.start", "status": answer.status, "headers": headers})
        await send({"type": "http.response.body", "body": answer.body})
        if asked is not None and asked.endpoint == "infer":
            self.gateway.metrics.count(answer.route, answer.status, began)

    async def _answer(self, asked: Target | None, scope: Scope, receive: Receive) -> Answer:
        if asked is None:
            return Answer.error(404, f"the gateway serves no {scope['path'][:200]!r}: it serves KServe v2 inference, "
                                     "health, metadata and config (model control goes through ferry)")
        if scope["method"] != asked.method:
            answer = Answer.error(405, f"{scope['path'][:200]!r} takes {asked.method}, not {scope['method'][:10]}")
            answer.headers.append((b"allow", asked.method.encode()))
            return answer
        if asked.endpoint in ("server", "live", "ready"):
            return await self._server(asked.endpoint)
        headers = dict(scope["headers"])
        self.gateway.check_token(headers.get(b"authorization", b""))
        if asked.endpoint == "infer":
            return await self._infer(asked, headers, receive)
        if asked.endpoint == "model_ready":
            return await self._model_ready(asked)
        return await self._metadata(asked)

    async def _server(self, endpoint: str) -> Answer:
        if endpoint == "live":
            return Answer(200)
        if endpoint == "ready":
            serving, problems = await self.gateway.ready()
            if problems or not serving:
                return Answer.error(503, "; ".join(problems) or "no committed model to serve")
            return Answer(200)
        reply = await self.gateway.triton_request("GET", "/v2")
        if reply.status != 200:
            return Answer.error(502, f"Triton failed: {triton_message(reply.body)}")
        metadata = json.loads(reply.body)
        metadata["extensions"] = [e for e in metadata.get("extensions", []) if e in SERVED_EXTENSIONS]
        return Answer(200, json.dumps(metadata).encode(), [JSON_TYPE])

    async def _infer(self, asked: Target, headers: dict[bytes, bytes], receive: Receive) -> Answer:
        gateway = self.gateway
        body = await gateway.read_body(receive, headers.get(b"content-length"))
        body = _decoded(body, headers.get(b"content-encoding"), gateway.max_body_bytes)
        request = guard.parse_infer(body, headers.get(BINARY_HEADER))
        passed = [(name, headers[name]) for name in _PASSED_REQUEST if name in headers]
        shadow = self.shadowed()

        async def attempt(route: Route) -> Reply:
            guard.check_infer(request, route, gateway.max_elements)
            if not asked.version:
                shadow.start(route, lambda: self.copy(route.model, *json_copy(request, body,
                                                                             headers.get(b"content-type"))))
            path = f"/v2/models/{asked.model}/versions/{route.version}/infer"
            return await gateway.triton_request("POST", path, body, passed)

        with shadow:
            route, reply = await gateway.at_committed(asked.model, asked.version, attempt, _ok, split=True)
            shadow.answered(route, reply)
        if reply.status != 200:
            return Answer.error(*triton_failure(route, reply), route)
        return Answer(200, reply.body, [(name, reply.headers[name]) for name in _PASSED_REPLY if name in reply.headers],
                      route)

    def shadowed(self) -> Shadowed[Reply]:
        """A request's part in a shadow bake, over HTTP (KServe here, and /predict)."""
        return Shadowed(self.gateway.shadow, "http", _ok, http_outputs)

    def copy(self, model: str, body: bytes, headers: list[tuple[bytes, bytes]]) -> Copy:
        """Send ``body`` to a shadow candidate: its status as the gateway would answer it, and its outputs."""
        async def send(candidate: Route) -> tuple[int, Outputs | None]:
            path = f"/v2/models/{model}/versions/{candidate.version}/infer"
            reply = await self.gateway.triton_request("POST", path, body, headers)
            if reply.status != 200:
                return triton_failure(candidate, reply)[0], None
            return 200, http_outputs(reply)

        return send

    async def _model_ready(self, asked: Target) -> Answer:
        async def attempt(route: Route) -> Reply:
            return await self.gateway.triton_request("GET", f"/v2/models/{route.model}/versions/{route.version}/ready")

        route, reply = await self.gateway.at_committed(asked.model, asked.version, attempt, _ok)
        if reply.status == 200:
            return Answer(200, route=route)
        if "unknown model" in triton_message(reply.body).lower():
            return Answer.error(*triton_failure(route, reply), route)
        return Answer.error(503, f"'{route.model}' v{route.version} is committed but not ready in Triton: "
                                 f"{triton_message(reply.body)}", route)

    async def _metadata(self, asked: Target) -> Answer:
        what = asked.endpoint  # model (metadata) or config

        async def attempt(route: Route) -> Reply:
            cached = self.gateway.cached(what, route)
            if cached is not None:
                return Reply(200, cached)
            suffix = "/config" if what == "config" else ""
            reply = await self.gateway.triton_request("GET", f"/v2/models/{route.model}/versions/{route.version}"
                                                             f"{suffix}")
            if reply.status != 200:
                return reply
            return Reply(200, self.gateway.remember(what, route, _as_committed(what, reply.body, route.version)))

        route, reply = await self.gateway.at_committed(asked.model, asked.version, attempt, _ok)
        if reply.status != 200:
            return Answer.error(*triton_failure(route, reply), route)
        return Answer(200, reply.body, [JSON_TYPE], route)


def _ok(reply: Reply) -> bool:
    return reply.status == 200


def _as_committed(what: str, answer: bytes, version: int) -> bytes:
    """Triton's metadata or config, naming the committed version alone (a deploy may have loaded another beside)."""
    document = json.loads(answer)
    if what == "config":
        document["version_policy"] = {"specific": {"versions": [version]}}
    else:
        document["versions"] = [str(version)]
    return json.dumps(document, separators=(",", ":")).encode()
