"""The watcher's HTTP server: uvicorn over h11, with a deadline for a request's headers and a bound on the
connections it holds open.

uvicorn times out a stalled body (the app does, 408 after 10 s) and an idle kept-alive connection (5 s),
but not a request whose headers stall: a client that sends half a request line held its connection
forever. Here, a request's headers must arrive within ``header_timeout_s`` of its first byte (or of the
connection opening), else it gets 408 and the connection is closed; a connection over
``max_connections`` gets 503 and is closed at once.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any, cast

import h11
import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from ferry.adapters.watch.logs import log

HEADER_TIMEOUT_S = 10.0
MAX_CONNECTIONS = 64
MAX_HEADER_BYTES = 16 * 1024  # the request line and headers (h11's own default; MLflow sends about 500 bytes)
KEEP_ALIVE_S = 5


def _answer(status: int, phrase: str, message: str) -> bytes:
    body = json.dumps({"error": message}).encode()
    head = (f"HTTP/1.1 {status} {phrase}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            "connection: close\r\n\r\n")
    return head.encode() + body


class GuardedH11(H11Protocol):
    """uvicorn's h11 protocol, with the header deadline and the connection bound."""

    header_timeout_s = HEADER_TIMEOUT_S
    max_connections = MAX_CONNECTIONS
    _last_warning = 0.0  # over the bound, said at most once every 10 s (a flood must not flood the log)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        stream = cast(asyncio.Transport, transport)  # a TCP server's transport is a stream, as uvicorn assumes
        self._head_timer: asyncio.TimerHandle | None = None
        super().connection_made(stream)
        if len(self.connections) > self.max_connections:
            self._warn_full()
            stream.write(_answer(503, "Service Unavailable", f"ferry watch holds {self.max_connections} "
                                 "connections already; try again"))
            stream.close()
            return
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self._head_timer is None and self.conn.their_state is h11.IDLE:
            self._arm()  # the first byte of the next request on a kept-alive connection
        super().data_received(data)
        if self._head_timer is not None and self.conn.their_state is not h11.IDLE:
            self._disarm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._head_timer = self.loop.call_later(self.header_timeout_s, self._head_timed_out)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
            self.transport.write(_answer(408, "Request Timeout", "the request's headers did not arrive within "
                                         f"{self.header_timeout_s:g} s"))
            self.transport.close()

    @classmethod
    def _warn_full(cls) -> None:
        now = time.monotonic()
        if now - GuardedH11._last_warning > 10:
            GuardedH11._last_warning = now
            log.warning("%d connections are open: refusing more (503) until some close", cls.max_connections)


def server_options(header_timeout_s: float = HEADER_TIMEOUT_S,
                   max_connections: int = MAX_CONNECTIONS) -> dict[str, Any]:
    """uvicorn's options for ``ferry watch`` (``uvicorn.run`` and ``uvicorn.Config`` take the same)."""
    protocol = type("GuardedH11", (GuardedH11,), {"header_timeout_s": header_timeout_s,
                                                  "max_connections": max_connections})
    return {"http": protocol, "ws": "none", "log_level": "warning", "access_log": False, "proxy_headers": False,
            "server_header": False, "timeout_keep_alive": KEEP_ALIVE_S,
            "h11_max_incomplete_event_size": MAX_HEADER_BYTES}


def server_config(app: Any, host: str, port: int, **options: Any) -> uvicorn.Config:
    """How ``ferry watch`` serves ``app``, as a config (the tests serve it the same way, in a thread)."""
    return uvicorn.Config(app, host=host, port=port, **server_options(**options))
