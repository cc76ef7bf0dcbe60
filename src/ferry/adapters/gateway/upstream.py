"""A pool of kept-alive HTTP/1.1 connections to one server (Triton), for the gateway's hot path.

General-purpose clients (aiohttp, httpx) spend 0.3-0.5 ms of CPU per request on sessions, cookies,
tracing and header objects; on a machine whose cores Triton also needs, that showed as a 40 %
throughput loss (bench/gateway_overhead.py). This does only what forwarding needs: write the request,
let httptools parse the answer. A connection the server closed while idle is replaced and the
request sent once more on a fresh one, before any answer was read.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import cast

import httptools


@dataclass
class Reply:
    status: int
    body: bytes
    headers: dict[bytes, bytes] = field(default_factory=dict)  # lower-case names


class UpstreamConnection(asyncio.Protocol):
    # Set by connection_made, which create_connection calls before it hands the protocol over.
    transport: asyncio.Transport

    def __init__(self) -> None:
        self.closed = False
        self.parser = httptools.HttpResponseParser(self)
        self.waiter: asyncio.Future[Reply] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.reply = Reply(0, b"")
        self.chunks: list[bytes] = []
        self.header_name = b""
        self.received = False

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # a TCP connection's transport is a stream

    def connection_lost(self, error: Exception | None) -> None:
        self.closed = True
        self._fail(ConnectionResetError("the server closed the connection"))

    def data_received(self, data: bytes) -> None:
        self.received = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as error:
            self._fail(ConnectionError(f"unreadable answer: {error}"))
            self.transport.close()

    # httptools callbacks
    def on_header(self, name: bytes, value: bytes) -> None:
        self.reply.headers[name.lower()] = value

    def on_body(self, body: bytes) -> None:
        self.chunks.append(body)

    def on_message_complete(self) -> None:
        self.reply.status = self.parser.get_status_code()
        self.reply.body = b"".join(self.chunks)
        if not self.parser.should_keep_alive():
            self.closed = True
            self.transport.close()
        self._stop_timer()
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(self.reply)

    def send(self, request: bytes, deadline: float) -> asyncio.Future[Reply]:
        """Write ``request``; the answer, or TimeoutError at ``deadline`` (the loop's clock). A timer handle, not
        asyncio.timeout: one per request on the hot path, at a fraction of its cost."""
        self.reply, self.chunks, self.received = Reply(0, b""), [], False
        loop = asyncio.get_running_loop()
        self.waiter = loop.create_future()
        self.timer = loop.call_at(deadline, self._fail, TimeoutError("the server did not answer in time"))
        self.transport.write(request)
        return self.waiter

    def _fail(self, error: Exception) -> None:
        self._stop_timer()
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_exception(error)

    def _stop_timer(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None


class UpstreamPool:
    def __init__(self, host: str, port: int, timeout_s: float) -> None:
        self.host, self.port, self.timeout_s = host, port, timeout_s
        self._idle: list[UpstreamConnection] = []
        self._host_header = f"{host}:{port}".encode()

    def _reused(self) -> UpstreamConnection | None:
        while self._idle:
            connection = self._idle.pop()
            if not connection.closed:
                return connection
        return None

    async def connect(self) -> UpstreamConnection:
        """A new connection (a subclass may bound it with its own timeout and error)."""
        _, connection = await asyncio.get_running_loop().create_connection(UpstreamConnection, self.host, self.port)
        return connection

    async def request(self, method: str, path: str, body: bytes = b"",
                      headers: Sequence[tuple[bytes, bytes]] = ()) -> Reply:
        """Send one request and read its answer; raises OSError or TimeoutError if the server does not answer."""
        head = [b"%s %s HTTP/1.1\r\nHost: %s\r\nContent-Length: %d\r\n" % (
            method.encode(), path.encode(), self._host_header, len(body))]
        head += [b"%s: %s\r\n" % (name, value) for name, value in headers]
        message = b"".join(head) + b"\r\n" + body
        deadline = asyncio.get_running_loop().time() + self.timeout_s
        for _ in range(2):
            connection = self._reused()
            reused = connection is not None
            if connection is None:
                async with asyncio.timeout_at(deadline):
                    connection = await self.connect()
            try:
                reply = await connection.send(message, deadline)
            except ConnectionError:
                connection.transport.close()
                if reused and not connection.received:  # it had gone stale while idle: once more, fresh
                    continue
                raise
            except BaseException:  # a timeout or a cancel midway: the connection's state is unknown
                connection.transport.close()
                raise
            if not connection.closed:
                self._idle.append(connection)
            return reply
        raise ConnectionResetError("the server closed two connections in a row")

    def close(self) -> None:
        for connection in self._idle:
            connection.transport.close()
        self._idle.clear()
