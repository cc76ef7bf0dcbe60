"""What the protocol modules (KServe HTTP and gRPC, the shadow copies) use of the gateway: its data plane.

:class:`ferry.adapters.gateway.app.Gateway` is the one implementation; the protocols name this interface
instead of the application, so that they do not import the module that imports them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

from starlette.types import Receive

from ferry.adapters.gateway.metrics import Metrics
from ferry.adapters.gateway.upstream import Reply
from ferry.adapters.inference.routing import Route, Router
from ferry.core.config import Settings

T = TypeVar("T")


class DataPlane(Protocol):
    settings: Settings
    router: Router
    metrics: Metrics
    token: bytes
    max_body_bytes: int
    max_elements: int
    http: Any  # the KServe HTTP protocol (kserve_http.KServeHttp): gRPC's shadow copies go out over HTTP
    shadow: Any  # the shadow copies' limiter (shadow.Shadow)

    def check_token(self, authorization: bytes) -> None: ...

    async def read_body(self, receive: Receive, length: bytes | None) -> bytes: ...

    def route(self, model: str, version: str = "") -> Route: ...

    async def at_committed(self, model: str, version: str, call: Callable[[Route], Awaitable[T]],
                           done: Callable[[T], bool], split: bool = False) -> tuple[Route, T]: ...

    def cached(self, what: str, route: Route) -> bytes | None: ...

    def remember(self, what: str, route: Route, answer: bytes) -> bytes: ...

    async def ready(self) -> tuple[dict[str, int], list[str]]: ...

    async def triton_request(self, method: str, path: str, body: bytes = b"",
                             headers: list[tuple[bytes, bytes]] | tuple = ()) -> Reply: ...
