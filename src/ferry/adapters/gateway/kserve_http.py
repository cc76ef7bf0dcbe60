"""KServe v2 over HTTP, as ``tritonclient.http`` calls it, at the committed version only.

    GET  /v2                                  server metadata (Triton's, with the extensions the gateway serves)
    GET  /v2/health/live, /v2/health/ready    the gateway is up; every committed version answers ready
    GET  /v2/models/<m>[/versions/<v>]        model metadata           } the committed version's, from Triton,
    GET  /v2/models/<m>[/versions/<v>]/config model config (Triton)    } cached per model and version
    GET  /v2/models/<m>[/versions/<v>]/ready  model readiness
    GET  /v2/models/<m>[/versions/<v>]/stats  inference statistics (Triton's, of the committed version alone)
    GET  /v2/models/stats                     every committed model's statistics
    POST /v2/models/<m>[/versions/<v>]/infer  inference: JSON, binary tensor extension, gzip or deflate bodies

A path that names a version is served only if it names the committed version; refusals of model names and
versions are worded as Triton words them (:mod:`.wording`). Every error is ``{"error": "..."}``, which
tritonclient decodes. :meth:`KServeHttp.respond` is what the gateway's HTTP server (:mod:`.http_server`) calls, with
the request read whole; the same handler is an ASGI application too. No FastAPI here: its routing and request
objects cost more than forwarding itself. During a bake, an inference that names no version may be answered
by a canary (``X-Ferry-Canary: 1``) or copied to a shadow candidate (:mod:`.shadow`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from starlette.types import Receive, Scope, Send

from ferry.adapters.gateway.balancer import LAST_REPLICA, committed_versions
from ferry.adapters.gateway.refusals import route_of, status_of
from ferry.adapters.gateway.shadow import Copy, Outputs, Shadowed, http_outputs, json_copy
from ferry.adapters.gateway.upstream import Reply
from ferry.adapters.gateway.wording import UnknownModelError, UnknownVersionError
from ferry.adapters.inference import guard
from ferry.adapters.inference.body import decode_body
from ferry.adapters.inference.routing import CANDIDATE, Route
from ferry.core.errors import FerryError

if TYPE_CHECKING:
    from ferry.adapters.gateway.plane import DataPlane

VERSION_HEADER = b"x-ferry-model-version"
CANARY_HEADER = b"x-ferry-canary"  # "1" on an answer a canary candidate gave
BINARY_HEADER = b"inference-header-content-length"  # KServe v2 binary tensor extension
JSON_TYPE = (b"content-type", b"application/json")
# Of Triton's extensions, those a client of the gateway can use (no model control, shared memory, tracing...).
SERVED_EXTENSIONS = ("classification", "sequence", "schedule_policy", "model_configuration", "binary_tensor_data",
                     "parameters", "statistics")
_PARSE_FAILURES = ("unable to parse", "failed to parse")  # Triton answers 500 to these client errors
# Triton's answers come back uncompressed (no accept-encoding is passed): the gateway names the served model in
# them (served_as), and compressing across the few hops between a gateway and its replicas costs more than it saves.
_PASSED_REQUEST = (b"content-type", BINARY_HEADER)
_PASSED_REPLY = (b"content-type", BINARY_HEADER)



def error_body(message: str) -> bytes:
    return json.dumps({"error": message}).encode()


def triton_message(payload: bytes) -> str:
    try:
        return str(json.loads(payload)["error"])
    except (ValueError, KeyError, TypeError):
        return payload.decode(errors="replace")[:500]


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

    def head(self) -> list[tuple[bytes, bytes]]:
        """Its headers, with those that name the version that answered (and a canary's answer as such)."""
        if self.route is None:
            return self.headers
        named = [(VERSION_HEADER, str(self.route.version).encode())]
        if self.route.role == CANDIDATE:
            named.append((CANARY_HEADER, b"1"))
        return self.headers + named


@dataclass(frozen=True)
class V2Path:
    """What a /v2 path asks for: ``endpoint`` is server, live, ready, model, model_ready, config, infer or stats
    (``model`` empty: every committed model's statistics)."""

    endpoint: str
    model: str = ""
    version: str = ""

    @property
    def method(self) -> str:
        return "POST" if self.endpoint == "infer" else "GET"


_MODEL_ACTIONS = {(): "model", ("ready",): "model_ready", ("config",): "config", ("infer",): "infer",
                  ("stats",): "stats"}
_SERVER = {(): "server", ("",): "server", ("health", "live"): "live", ("health", "ready"): "ready"}


def parse_v2_path(path: str) -> V2Path | None:
    """The endpoint a /v2 path names (None: not one the gateway serves)."""
    parts = tuple(path.split("/")[2:])
    if parts[:1] != ("models",):
        return V2Path(_SERVER[parts]) if parts in _SERVER else None
    if parts == ("models", "stats"):  # as Triton reads it: every model's statistics
        return V2Path("stats")
    if len(parts) < 2 or not parts[1]:
        return None
    model, rest, version = parts[1], parts[2:], ""
    if rest[:1] == ("versions",):
        if len(rest) < 2 or not rest[1]:
            return None
        version, rest = rest[1], rest[2:]
    endpoint = _MODEL_ACTIONS.get(rest)
    return V2Path(endpoint, model, version) if endpoint else None


class KServeHttp:
    """The ASGI handler of every /v2 path."""

    def __init__(self, gateway: DataPlane) -> None:
        self.gateway = gateway

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The same, as an ASGI application (the in-process tests call the gateway so)."""
        headers = dict(scope["headers"])
        answer = await self.respond(scope["method"], scope["path"], headers,
                                    lambda: self.gateway.read_body(receive, headers.get(b"content-length")))
        await send({"type": "http.response.start", "status": answer.status,
                    "headers": [*answer.head(), (b"content-length", b"%d" % len(answer.body))]})
        await send({"type": "http.response.body", "body": answer.body})

    async def respond(self, method: str, path: str, headers: dict[bytes, bytes],
                      body: Callable[[], Awaitable[bytes]]) -> Answer:
        """The answer to a /v2 request (``headers``: lower-case names; ``body`` reads the request's body)."""
        began = time.perf_counter()
        asked = parse_v2_path(path)
        try:
            answer = await self._answer(asked, method, path, headers, body)
        except FerryError as error:
            answer = Answer.error(status_of(error), str(error), route_of(error))
        except Exception as error:  # a bug: still the protocol's error body, and the process serves on
            answer = Answer.error(502, f"the gateway failed: {type(error).__name__}: {error}")
        if asked is not None and asked.endpoint == "infer":
            self.gateway.metrics.count(answer.route, answer.status, began)
        return answer

    async def _answer(self, asked: V2Path | None, method: str, path: str, headers: dict[bytes, bytes],
                      body: Callable[[], Awaitable[bytes]]) -> Answer:
        if asked is None:
            return Answer.error(404, f"the gateway serves no {path[:200]!r}: it serves KServe v2 inference, "
                                     "health, metadata and config (model control goes through ferry)")
        if method != asked.method:
            answer = Answer.error(405, f"{path[:200]!r} takes {asked.method}, not {method[:10]}")
            answer.headers.append((b"allow", asked.method.encode()))
            return answer
        if asked.endpoint in ("server", "live", "ready"):
            return await self._server(asked.endpoint)
        self.gateway.check_token(headers.get(b"authorization", b""))
        if asked.endpoint == "infer":
            return await self._infer(asked, headers, body)
        if asked.endpoint == "model_ready":
            return await self._model_ready(asked)
        if asked.endpoint == "stats":
            return await self._stats(asked)
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

    async def _infer(self, asked: V2Path, headers: dict[bytes, bytes],
                     read_body: Callable[[], Awaitable[bytes]]) -> Answer:
        gateway = self.gateway
        gateway.route(asked.model, asked.version)  # an unknown model or version is a 404 whatever the body holds
        body = decode_body(await read_body(), headers.get(b"content-encoding"), gateway.max_body_bytes)
        request = guard.parse_infer(body, headers.get(BINARY_HEADER))
        passed = [(name, headers[name]) for name in _PASSED_REQUEST if name in headers]
        shadow = self.shadowed()

        async def attempt(route: Route) -> Reply:
            guard.check_infer(request, route, gateway.max_elements)
            if not asked.version:
                shadow.start(route, lambda: self.copy(route.model, *json_copy(request, body,
                                                                             headers.get(b"content-type"))))
            return await gateway.triton_request("POST", f"{route.path}/infer", body, passed)

        with shadow:
            route, reply = await gateway.at_committed(asked.model, asked.version, attempt, _ok, split=True)
            shadow.answered(route, reply)
        if reply.status != 200:
            if route.front:  # a rolling deploy: an error names no version, the replica it came from does
                route = gateway.router.answered_on(route, LAST_REPLICA.get())
            return Answer.error(*triton_failure(route, reply), route)
        if route.front:  # a rolling deploy: the replica's front answered with the version it serves
            route = route.answered_by(answered_version(reply.body))
        body, headers = served_as(route, reply.body, {name: reply.headers[name] for name in _PASSED_REPLY
                                                      if name in reply.headers})
        return Answer(200, body, list(headers.items()), route)

    def shadowed(self) -> Shadowed[Reply]:
        """A request's part in a shadow bake, over HTTP (KServe here, and /predict)."""
        return Shadowed(self.gateway.shadow, "http", _ok, http_outputs)

    def copy(self, model: str, body: bytes, headers: list[tuple[bytes, bytes]]) -> Copy:
        """Send ``body`` to a shadow candidate: its status as the gateway would answer it, and its outputs."""
        async def send(candidate: Route) -> tuple[int, Outputs | None]:
            reply = await self.gateway.triton_request("POST", f"{candidate.path}/infer", body, headers)
            if reply.status != 200:
                return triton_failure(candidate, reply)[0], None
            return 200, http_outputs(reply)

        return send

    async def _model_ready(self, asked: V2Path) -> Answer:
        async def attempt(route: Route) -> Reply:
            return await self.gateway.triton_request("GET", f"{route.path}/ready")

        try:
            route, reply = await self.gateway.at_committed(asked.model, asked.version, attempt, _ok)
        except (UnknownModelError, UnknownVersionError) as error:  # as Triton answers it: 400, not ready
            return Answer.error(400, str(error), route_of(error))
        if reply.status == 200:
            return Answer(200, route=route)
        if "unknown model" in triton_message(reply.body).lower():
            return Answer.error(*triton_failure(route, reply), route)
        return Answer.error(503, f"'{route.model}' v{route.version} is committed but not ready in Triton: "
                                 f"{triton_message(reply.body)}", route)

    async def _metadata(self, asked: V2Path) -> Answer:
        what = asked.endpoint  # model (metadata) or config

        async def attempt(route: Route) -> Reply:
            cached = self.gateway.cached(what, route)
            if cached is not None:
                return Reply(200, cached)
            suffix = "/config" if what == "config" else ""
            reply = await self.gateway.triton_request("GET", f"{route.path}{suffix}")
            if reply.status != 200:
                return reply
            answer = _as_committed(what, reply.body, route)
            if route.front:  # the front's (an ensemble's platform and config): not cached as the store's
                return Reply(200, answer)
            return Reply(200, self.gateway.remember(what, route, answer))

        route, reply = await self.gateway.at_committed(asked.model, asked.version, attempt, _ok)
        if reply.status != 200:
            return Answer.error(*triton_failure(route, reply), route)
        return Answer(200, reply.body, [JSON_TYPE], route)


    async def _stats(self, asked: V2Path) -> Answer:
        """Triton's statistics of the committed version (of every committed model's, if the path names none)."""
        if asked.model:
            return await self._stats_of(asked.model, asked.version)
        stats = []
        for model, _ in committed_versions(self.gateway.router):
            answer = await self._stats_of(model, "")
            if answer.status == 200:  # a model whose files changed meanwhile is left out, as Triton leaves it
                stats += json.loads(answer.body)["model_stats"]
        return Answer(200, json.dumps({"model_stats": stats}, separators=(",", ":")).encode(), [JSON_TYPE])

    async def _stats_of(self, model: str, version: str) -> Answer:
        async def attempt(route: Route) -> Reply:
            return await self.gateway.triton_request("GET", f"{route.path}/stats")

        try:
            route, reply = await self.gateway.at_committed(model, version, attempt, _ok)
        except (UnknownModelError, UnknownVersionError) as error:
            raise error.for_stats() from None
        if reply.status != 200:
            message = triton_message(reply.body)
            if "is not available" in message:  # Triton's words for a model or version it does not serve
                reply = Reply(404, error_body(f"unknown model: {message}"))
            return Answer.error(*triton_failure(route, reply), route)
        return Answer(200, committed_stats(reply.body, route), [JSON_TYPE], route)


def committed_stats(answer: bytes, route: Route) -> bytes:
    """The store's statistics, of the committed version alone, named as the served model (during a rolling
    deploy, the front's, of whichever version the replica's front serves)."""
    document = json.loads(answer)
    stats = [entry for entry in document.get("model_stats", []) if entry.get("name") == route.upstream
             and (route.front or entry.get("version") == str(route.version))]
    document["model_stats"] = [{**entry, "name": route.model} for entry in stats]
    return json.dumps(document, separators=(",", ":")).encode()


def _ok(reply: Reply) -> bool:
    return reply.status == 200


_MODEL_VERSION = b'"model_version":"'


def answered_version(body: bytes) -> int | None:
    """The ``model_version`` of Triton's JSON answer, None if it cannot be read. Triton writes the id, the model's
    name, then its version, before the outputs; inside a JSON string the quotes would be escaped."""
    at = body.find(_MODEL_VERSION)
    if at < 0:
        return None
    start = at + len(_MODEL_VERSION)
    end = body.find(b'"', start, start + 20)
    digits = body[start:end] if end > 0 else b""
    return int(digits) if digits.isdigit() else None


def served_as(route: Route, body: bytes, headers: dict[bytes, bytes]) -> tuple[bytes, dict[bytes, bytes]]:
    """Triton's answer from the store, naming the model the client asked for (Triton writes compact JSON with
    ``model_name`` first)."""
    if route.upstream == route.model:  # the front, or a model not behind one: already so named
        return body, headers
    stored = f'"model_name":"{route.upstream}"'.encode()
    length = headers.get(BINARY_HEADER)
    end = int(length) if length is not None else len(body)
    at = body.find(stored, 0, end)  # the header only; inside a JSON string the quotes would be escaped
    if at < 0:
        return body, headers
    served = f'"model_name":"{route.model}"'.encode()
    body = body[:at] + served + body[at + len(stored):]
    if length is not None:
        headers = {**headers, BINARY_HEADER: str(end - len(stored) + len(served)).encode()}
    return body, headers


def _as_committed(what: str, answer: bytes, route: Route) -> bytes:
    """The store's metadata or config, as the served model's: its name, the committed version alone."""
    document = json.loads(answer)
    document["name"] = route.model
    if what == "config":
        document["version_policy"] = {"specific": {"versions": [route.version]}}
    else:
        document["versions"] = [str(route.version)]
    return json.dumps(document, separators=(",", ":")).encode()
