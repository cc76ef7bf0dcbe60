"""The gateway's HTTP/1.1 server: httptools parses, one handler answers, one write sends the answer.

uvicorn's ASGI cycle cost the gateway about a third of its CPU per forwarded request (the scope, the receive
and send coroutines, and the head and body of each answer written apart: two system calls, bench/perf.py
--profile). This server does what a forwarding hop needs and no more: a request is read whole (within
``max_body_bytes`` and ``body_timeout_s``), handed to ``respond``, and its answer written with one call.
Requests on one connection are answered in order (pipelined ones wait their turn, with reading paused);
a connection idle for ``KEEP_ALIVE_S`` is closed, as uvicorn closes it.

Paths the gateway does not serve on this fast path go to an ASGI application (:func:`asgi_responder`):
the few admin endpoints (/predict, /healthz, /readyz, /metrics) keep FastAPI.
"""

from __future__ import annotations

import asyncio
import json
import signal
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Any, cast
from urllib.parse import unquote

import httptools
from starlette.types import ASGIApp, Message

KEEP_ALIVE_S = 5.0  # uvicorn's default
MAX_HEAD_BYTES = 64 * 1024  # the request line and headers together
SHUTDOWN_GRACE_S = 10.0  # on SIGTERM, requests in flight get this long to finish


@dataclass
class Request:
    method: str
    path: str  # percent-decoded, as ASGI's scope["path"]
    query: bytes
    headers: list[tuple[bytes, bytes]]  # names in lower case
    body: bytes = b""
    client: tuple[str, int] | None = None


@dataclass
class Answer:
    status: int
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)  # without content-length: it is added
    body: bytes = b""


Responder = Callable[[Request], Awaitable[Answer]]


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int
    body_timeout_s: float


_REASONS = {status.value: status.phrase.encode() for status in HTTPStatus}


def _head(answer: Answer, keep_alive: bool) -> bytes:
    lines = [b"HTTP/1.1 %d %s\r\ncontent-length: %d\r\n" % (answer.status, _REASONS.get(answer.status, b""),
                                                             len(answer.body))]
    lines += [b"%s: %s\r\n" % header for header in answer.headers]
    if not keep_alive:
        lines.append(b"connection: close\r\n")
    lines.append(b"\r\n")
    return b"".join(lines)


def error_answer(status: int, message: str) -> Answer:
    return Answer(status, [(b"content-type", b"application/json")], json.dumps({"error": message}).encode())


class _Connection(asyncio.Protocol):
    transport: asyncio.Transport  # set by connection_made, before any data

    def __init__(self, server: HttpServer) -> None:
        self.server = server
        self.parser = httptools.HttpRequestParser(self)
        self.ready: deque[tuple[Request, bool]] = deque()  # complete requests, and whether to keep alive after
        self.worker: asyncio.Task[None] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.closing = self.eof = False
        self._reset()

    def _reset(self) -> None:
        self.url, self.size, self.head_size = b"", 0, 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.chunks: list[bytes] = []

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # a TCP connection's transport is a stream
        self.server.connections.add(self)
        self._expire(KEEP_ALIVE_S)

    def connection_lost(self, error: Exception | None) -> None:
        self.closing = True
        self.server.connections.discard(self)
        self._stop_timer()
        if self.worker is not None:
            self.worker.cancel()  # the client is gone: nobody reads the answer

    def data_received(self, data: bytes) -> None:
        if self.closing:
            return
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._refuse(error_answer(400, "the gateway does not upgrade connections: send HTTP/1.1 requests"))
        except httptools.HttpParserError as error:
            # httptools wraps what a callback raised; the callback's own exception is its context
            cause = error.__context__ if isinstance(error, httptools.HttpParserCallbackError) else error
            if isinstance(cause, _Refused):
                self._refuse(cause.answer)
            else:
                self._refuse(error_answer(400, f"the request is not valid HTTP/1.1: {str(cause)[:200]}"))

    def eof_received(self) -> bool | None:
        """The client sent all it will send: answer what it asked (keep the transport open), then close."""
        self.eof = True
        return True if self.worker is not None else None

    # httptools callbacks
    def on_message_begin(self) -> None:
        self._reset()
        self._expire(self.server.limits.body_timeout_s, 408,
                     f"the request did not arrive within {self.server.limits.body_timeout_s:g} s: send the whole "
                     "request promptly")

    def on_url(self, url: bytes) -> None:
        self.url += url
        self._count_head(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name.lower(), value))
        self._count_head(len(name) + len(value))

    def on_headers_complete(self) -> None:
        limit = self.server.limits.max_body_bytes
        for name, value in self.headers:
            if name == b"content-length" and value.isdigit() and int(value) > limit:
                raise _Refused(error_answer(413, f"the body is {int(value)} bytes, over the gateway's limit of "
                                                 f"{limit}: split the request"))
            if name == b"expect" and value.lower() == b"100-continue":
                self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")

    def on_body(self, body: bytes) -> None:
        self.size += len(body)
        if self.size > self.server.limits.max_body_bytes:
            raise _Refused(error_answer(413, f"the body is over the gateway's limit of "
                                             f"{self.server.limits.max_body_bytes} bytes: split the request"))
        self.chunks.append(body)

    def on_message_complete(self) -> None:
        self._stop_timer()
        url = httptools.parse_url(self.url) if self.url else None
        raw_path = url.path.decode("latin-1") if url is not None and url.path else "/"
        request = Request(self.parser.get_method().decode("latin-1"),
                          unquote(raw_path) if "%" in raw_path else raw_path,
                          url.query or b"" if url is not None else b"", self.headers, b"".join(self.chunks),
                          self.transport.get_extra_info("peername"))
        self.ready.append((request, self.parser.should_keep_alive()))
        self._reset()
        if self.worker is None:
            self.transport.pause_reading()  # one request at a time: the next waits in the kernel's buffer
            self.worker = asyncio.get_running_loop().create_task(self._serve())

    # answering
    async def _serve(self) -> None:
        while self.ready and not self.closing:
            request, keep_alive = self.ready.popleft()
            try:
                answer = await self.server.respond(request)
            except Exception as error:  # a bug in a handler: the protocol's error body, and the server serves on
                answer = error_answer(502, f"the gateway failed: {type(error).__name__}: {error}")
            keep_alive = keep_alive and not self.server.stopping and not (self.eof and not self.ready)
            self.transport.writelines([_head(answer, keep_alive), answer.body])
            if not keep_alive:
                self._close()
                return
        self.worker = None
        if not self.closing:
            self.transport.resume_reading()
            self._expire(KEEP_ALIVE_S)

    def _refuse(self, answer: Answer) -> None:
        self.transport.write(_head(answer, keep_alive=False) + answer.body)
        self._close()

    def _close(self) -> None:
        self.closing = True
        self._stop_timer()
        self.transport.close()

    def _count_head(self, size: int) -> None:
        self.head_size += size
        if self.head_size > MAX_HEAD_BYTES:
            raise _Refused(error_answer(431, f"the request line and headers are over {MAX_HEAD_BYTES} bytes"))

    def _expire(self, seconds: float, status: int = 0, message: str = "") -> None:
        """Close the connection in ``seconds`` (with an answer of ``status``, if one), unless the timer stops."""
        self._stop_timer()

        def expired() -> None:
            self.timer = None
            if self.worker is None and not self.closing:
                self._refuse(error_answer(status, message)) if status else self._close()

        self.timer = asyncio.get_running_loop().call_later(seconds, expired)

    def _stop_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


class _Refused(Exception):
    """Raised inside a parser callback: answer this, then close the connection."""

    def __init__(self, answer: Answer) -> None:
        self.answer = answer


class HttpServer:
    def __init__(self, respond: Responder, limits: Limits) -> None:
        self.respond, self.limits = respond, limits
        self.connections: set[_Connection] = set()
        self.stopping = False

    async def serve(self, host: str, port: int, started: Callable[[], Awaitable[None]],
                    stopped: Callable[[], Awaitable[None]]) -> None:
        """Listen until SIGTERM or SIGINT; ``started`` runs before the first request, ``stopped`` after the last."""
        loop = asyncio.get_running_loop()
        await started()
        server = await self.listen(host, port)
        stop = asyncio.Event()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        try:
            await stop.wait()
        finally:
            await self.shutdown(server)
            await stopped()

    async def listen(self, host: str, port: int) -> asyncio.Server:
        return await asyncio.get_running_loop().create_server(lambda: _Connection(self), host, port, backlog=2048,
                                                              reuse_address=True)

    async def shutdown(self, server: asyncio.Server) -> None:
        self.stopping = True
        server.close()
        await self._drain()

    async def _drain(self) -> None:
        """Idle connections close now; those answering get ``SHUTDOWN_GRACE_S`` to finish."""
        for connection in list(self.connections):
            if connection.worker is None:
                connection._close()
        workers = [c.worker for c in self.connections if c.worker is not None]
        if workers:
            await asyncio.wait(workers, timeout=SHUTDOWN_GRACE_S)
        for connection in list(self.connections):
            connection._close()


def asgi_responder(app: ASGIApp, server: tuple[str, int]) -> Responder:
    """An ASGI application answering a whole :class:`Request` (an answer's body chunks are joined)."""

    async def respond(request: Request) -> Answer:
        scope: dict[str, Any] = {
            "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
            "method": request.method, "scheme": "http", "path": request.path, "raw_path": request.path.encode(),
            "query_string": request.query, "root_path": "", "headers": request.headers, "server": server,
            "client": request.client, "state": {}}
        answer, chunks, sent = Answer(500), [], asyncio.Event()
        unread = [{"type": "http.request", "body": request.body, "more_body": False}]

        async def receive() -> Message:
            if unread:
                return unread.pop()
            await sent.wait()  # then, as a server says once the answer is out: the client is gone
            return {"type": "http.disconnect"}

        async def send(message: Message) -> None:
            if message["type"] == "http.response.start":
                answer.status = message["status"]
                answer.headers = [(name.lower(), value) for name, value in message.get("headers", [])
                                  if name.lower() != b"content-length"]
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))
                if not message.get("more_body"):
                    sent.set()

        try:
            await app(scope, receive, send)
        except Exception:  # the application raised after answering (Starlette re-raises a handled error)
            if not sent.is_set():
                raise
        answer.body = b"".join(chunks)
        return answer

    return respond
