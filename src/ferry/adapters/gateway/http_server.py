"""The gateway's HTTP/1.1 server: httptools parses, one handler answers, one write sends the answer.

uvicorn's ASGI cycle cost the gateway about a third of its CPU per forwarded request (the scope, the receive
and send coroutines, and the head and body of each answer written apart: two system calls, bench/perf.py
--profile). This server does what a forwarding hop needs and no more: a request is read whole (within
``max_body_bytes`` and ``body_timeout_s``), handed to ``respond``, and its answer written with one call.
Requests on one connection are answered in order (pipelined ones wait their turn, up to ``MAX_QUEUED``
read ahead; reading also pauses while the client does not take its answers); a connection idle for
``KEEP_ALIVE_S`` is closed, as uvicorn closes it. Reading goes on while a request is answered, so that a
client that goes away cancels its request.

Paths the gateway does not serve on this fast path go to an ASGI application (:func:`asgi_responder`):
the few admin endpoints (/predict, /healthz, /readyz, /metrics) keep FastAPI.
"""

from __future__ import annotations

import asyncio
import signal
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, cast
from urllib.parse import unquote

import httptools
from starlette.types import ASGIApp, Message

from ferry.adapters.gateway.http_wire import Answer, Limits, Request, Responder, encode, error_answer, head

KEEP_ALIVE_S = 5.0  # uvicorn's default
MAX_HEAD_BYTES = 64 * 1024  # the request line and headers together
MAX_HEADERS = 100
MAX_QUEUED = 16  # pipelined requests read ahead of the one being answered; then reading pauses
LINGER_S = 2.0  # after a refusal, what the client still sends is read and dropped this long
SHUTDOWN_GRACE_S = 10.0  # on SIGTERM, requests in flight (or still arriving) get this long to finish


class _Connection(asyncio.Protocol):
    """One client connection: requests parsed as they arrive (up to ``MAX_QUEUED`` ahead), answered in order by
    one worker task; a request refused while earlier ones are being answered is answered after them."""

    transport: asyncio.Transport  # set by connection_made, before any data

    def __init__(self, server: HttpServer) -> None:
        self.server = server
        self.parser = httptools.HttpRequestParser(self)
        self.ready: deque[tuple[Request, bool]] = deque()  # complete requests, and whether to keep alive after
        self.worker: asyncio.Task[None] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.closing = self.eof = self.paused = False
        self.last = False  # a request without keep-alive was read: what follows it is ignored (RFC 9112 9.6)
        self.refusal: Answer | None = None  # owed after the answers queued before it; nothing more is read
        self.continue_owed = False
        self.writable = asyncio.Event()
        self.writable.set()
        self.messages = self.completed = 0  # requests begun, and read whole
        self.in_message = self.head_done = False
        self._reset()

    def _reset(self) -> None:
        self.url, self.size, self.head_size, self.header_count = b"", 0, 0, 0
        self.headers: list[tuple[bytes, bytes]] = []
        self.chunks: list[bytes] = []

    @property
    def busy(self) -> bool:
        """Answering, or reading a request: shutdown lets it finish."""
        return self.worker is not None or self.in_message or bool(self.ready)

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # a TCP connection's transport is a stream
        self.server.connections.add(self)
        self._expire(KEEP_ALIVE_S)

    def connection_lost(self, error: Exception | None) -> None:
        self.closing = True
        self.server.connections.discard(self)
        self._stop_timer()
        self.writable.set()
        if self.worker is not None:
            self.worker.cancel()  # the client is gone: nobody reads the answer

    def pause_writing(self) -> None:
        self.writable.clear()  # the client reads slower than it asks: answer no more until it catches up
        self._flow()

    def resume_writing(self) -> None:
        self.writable.set()
        self._flow()

    def data_received(self, data: bytes) -> None:
        if self.closing or self.last or self.refusal is not None:
            return
        message, completed = self.messages, self.completed
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._refuse(error_answer(400, "the gateway does not upgrade connections: send HTTP/1.1 requests"))
        except httptools.HttpParserError as error:
            if self.last:
                return  # bytes after a request that closes the connection
            # httptools wraps what a callback raised; the callback's own exception is its context
            cause = error.__context__ if isinstance(error, httptools.HttpParserCallbackError) else error
            self._refuse(cause.answer if isinstance(cause, _Refused)
                         else error_answer(400, f"the request is not valid HTTP/1.1: {str(cause)[:200]}"))
        else:
            whole = message == self.messages or completed == self.completed  # no other request in these bytes
            if self.in_message and not self.head_done and whole:
                # All of this was one head still unfinished: httptools buffers a header until its end of line.
                self.head_size += len(data)
                if self.head_size > MAX_HEAD_BYTES:
                    self._refuse(_head_too_large())
            self._flow()

    def eof_received(self) -> bool | None:
        """The client sent all it will send: answer what it asked (keep the transport open), then close."""
        self.eof = True
        return True if self.worker is not None and not self.closing else None

    # httptools callbacks
    def on_message_begin(self) -> None:
        self.messages += 1
        self.in_message, self.head_done = True, False
        self._reset()
        self._expire(self.server.limits.body_timeout_s, 408,
                     f"the request did not arrive within {self.server.limits.body_timeout_s:g} s: send the whole "
                     "request promptly")

    def on_url(self, url: bytes) -> None:
        self.url += url
        self._count_head(len(url))

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.head_done:
            return  # a chunked body's trailer: never a header of the request
        self.header_count += 1
        if self.header_count > MAX_HEADERS:
            raise _Refused(error_answer(431, f"the request has over {MAX_HEADERS} headers"))
        self.headers.append((name.lower(), value))
        self._count_head(len(name) + len(value))

    def on_headers_complete(self) -> None:
        self.head_done = True
        version = self.parser.get_http_version()
        if version not in ("1.0", "1.1"):
            raise _Refused(error_answer(505, f"HTTP/{version} is not served here: send HTTP/1.1"))
        limit, host, expects = self.server.limits.max_body_bytes, False, False
        for name, value in self.headers:  # one pass: the head's checks run on every request
            if name == b"content-length" and value.isdigit() and int(value) > limit:
                raise _Refused(error_answer(413, f"the body is {int(value)} bytes, over the gateway's limit of "
                                                 f"{limit}: split the request"))
            host = host or name == b"host"
            expects = expects or (name == b"expect" and value.lower() == b"100-continue")
        if version == "1.1" and not host:
            raise _Refused(error_answer(400, "an HTTP/1.1 request needs a Host header"))
        if expects:
            if self.worker is None and not self.ready:
                self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            else:
                self.continue_owed = True  # once the answers before it are out

    def on_body(self, body: bytes) -> None:
        self.size += len(body)
        if self.size > self.server.limits.max_body_bytes:
            raise _Refused(error_answer(413, f"the body is over the gateway's limit of "
                                             f"{self.server.limits.max_body_bytes} bytes: split the request"))
        self.chunks.append(body)

    def on_message_complete(self) -> None:
        self._stop_timer()
        self.in_message = False
        self.completed += 1
        url = httptools.parse_url(self.url) if self.url else None
        raw_path = url.path if url is not None and url.path else b"/"
        path = raw_path.decode("latin-1")
        peer = self.transport.get_extra_info("peername")
        request = Request(self.parser.get_method().decode("latin-1"), unquote(path) if "%" in path else path,
                          url.query or b"" if url is not None else b"", self.headers, b"".join(self.chunks),
                          tuple(peer[:2]) if peer else None, raw_path, self.parser.get_http_version())
        keep_alive = self.parser.should_keep_alive()
        self.last = not keep_alive
        self.ready.append((request, keep_alive))
        self._reset()
        if self.worker is None:
            self.worker = asyncio.get_running_loop().create_task(self._serve())

    # answering
    async def _serve(self) -> None:
        while self.ready and not self.closing:
            request, keep_alive = self.ready.popleft()
            self._flow()
            try:
                answer = await self.server.respond(request)
            except Exception as error:  # a bug in a handler: the protocol's error body, and the server serves on
                answer = error_answer(502, f"the gateway failed: {type(error).__name__}: {error}")
            keep_alive = keep_alive and not self.server.stopping and not (self.eof and not self.ready)
            self.transport.writelines(encode(request, answer, keep_alive))
            if not keep_alive:
                self._close()
                return
            await self.writable.wait()
        self.worker = None
        if self.closing:
            return
        if self.refusal is not None:
            self._refuse(self.refusal)
            return
        if self.continue_owed:
            self.continue_owed = False
            self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        if not self.in_message:  # else the request arriving keeps its own deadline
            self._expire(KEEP_ALIVE_S)
        self._flow()

    def _flow(self) -> None:
        """Read while fewer than MAX_QUEUED requests wait and the client takes its answers."""
        stop = len(self.ready) >= MAX_QUEUED or not self.writable.is_set() or self.refusal is not None
        if self.closing or stop == self.paused:
            return
        self.paused = stop
        if stop:
            self.transport.pause_reading()
        else:
            self.transport.resume_reading()

    def _refuse(self, answer: Answer) -> None:
        """Answer ``answer`` and close: now, or after the answers owed for the requests before it."""
        if self.worker is not None:
            self.refusal = answer
            self._flow()
            return
        self.transport.write(head(answer, keep_alive=False) + answer.body)
        self._linger()

    def _linger(self) -> None:
        """Close once the client can have read the refusal: a close with its request still arriving would reset
        the connection, and the client might never read why. Half-close, then drop what arrives for LINGER_S."""
        self.closing = True
        self._stop_timer()
        if not self.transport.can_write_eof():
            self.transport.close()
            return
        self.transport.write_eof()
        if self.paused:
            self.transport.resume_reading()
        self.timer = asyncio.get_running_loop().call_later(LINGER_S, self.transport.close)

    def _close(self) -> None:
        self.closing = True
        self._stop_timer()
        self.transport.close()

    def _count_head(self, size: int) -> None:
        self.head_size += size
        if self.head_size > MAX_HEAD_BYTES:
            raise _Refused(_head_too_large())

    def _expire(self, seconds: float, status: int = 0, message: str = "") -> None:
        """Close the connection in ``seconds`` (with an answer of ``status``, if one), unless the timer stops."""
        self._stop_timer()

        def expired() -> None:
            self.timer = None
            if self.closing:
                return
            if status:
                self._refuse(error_answer(status, message))
            elif self.worker is None:
                self._close()

        self.timer = asyncio.get_running_loop().call_later(seconds, expired)

    def _stop_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


def _head_too_large() -> Answer:
    return error_answer(431, f"the request line and headers are over {MAX_HEAD_BYTES} bytes")


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
        """Listen until SIGTERM or SIGINT; ``started`` runs before the first request, ``stopped`` after the last.
        A second signal during the shutdown's grace ends the process at once."""
        loop = asyncio.get_running_loop()
        server = await self.listen(host, port, start_serving=False)  # a port in use fails before anything starts
        stop = asyncio.Event()
        try:
            await started()
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(signum, stop.set)
            await server.start_serving()
            await stop.wait()
        finally:
            for signum in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(signum)
            await self.shutdown(server)
            await stopped()

    async def listen(self, host: str, port: int, start_serving: bool = True) -> asyncio.Server:
        return await asyncio.get_running_loop().create_server(lambda: _Connection(self), host, port, backlog=2048,
                                                              reuse_address=True, start_serving=start_serving)

    async def shutdown(self, server: asyncio.Server) -> None:
        self.stopping = True
        server.close()
        await self._drain()

    async def _drain(self) -> None:
        """Idle connections close now; those answering, or reading a request, get ``SHUTDOWN_GRACE_S`` to finish
        (each answer then says ``connection: close``)."""
        for connection in list(self.connections):
            if not connection.busy:
                connection._close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + SHUTDOWN_GRACE_S
        while any(c.busy for c in self.connections) and loop.time() < deadline:
            await asyncio.sleep(0.02)
        for connection in list(self.connections):
            if connection.in_message and connection.worker is None and not connection.closing:
                # a request still arriving at the end of the grace: a status, so the client can tell it from a crash
                answer = error_answer(503, "the gateway is shutting down: send the request again")
                connection.transport.write(head(answer, keep_alive=False) + answer.body)
            connection._close()


def asgi_responder(app: ASGIApp, server: tuple[str, int]) -> Responder:
    """An ASGI application answering a whole :class:`Request` (an answer's body chunks are joined)."""

    async def respond(request: Request) -> Answer:
        # A HEAD is answered as its GET (the server sends the head alone): FastAPI's routes know GET only.
        scope: dict[str, Any] = {
            "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": request.http_version,
            "method": "GET" if request.method == "HEAD" else request.method, "scheme": "http",
            "path": request.path, "raw_path": request.raw_path,
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
