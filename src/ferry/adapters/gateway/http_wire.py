"""The records of the gateway's HTTP/1.1 server (a request read whole, its answer) and the bytes of an answer."""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from email.utils import formatdate
from http import HTTPStatus


@dataclass
class Request:
    method: str
    path: str  # percent-decoded, as ASGI's scope["path"]
    query: bytes
    headers: list[tuple[bytes, bytes]]  # names in lower case
    body: bytes = b""
    client: tuple[str, int] | None = None
    raw_path: bytes = b"/"  # as the client sent it
    http_version: str = "1.1"


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


@functools.lru_cache(maxsize=1)
def _http_date(second: int) -> bytes:
    return formatdate(second, usegmt=True).encode()


def head(answer: Answer, keep_alive: bool, announce_keep_alive: bool = False) -> bytes:
    """The status line and headers; no content-length where HTTP forbids one (1xx, 204)."""
    lines = [b"HTTP/1.1 %d %s\r\ndate: %s\r\n" % (answer.status, _REASONS.get(answer.status, b""),
                                                   _http_date(int(time.time())))]
    if answer.status >= 200 and answer.status != 204:
        lines.append(b"content-length: %d\r\n" % len(answer.body))
    lines += [b"%s: %s\r\n" % header for header in answer.headers]
    if not keep_alive:
        lines.append(b"connection: close\r\n")
    elif announce_keep_alive:
        lines.append(b"connection: keep-alive\r\n")  # an HTTP/1.0 client reuses the connection only if told
    lines.append(b"\r\n")
    return b"".join(lines)


def encode(request: Request, answer: Answer, keep_alive: bool) -> list[bytes]:
    lines = head(answer, keep_alive, request.http_version == "1.0")
    if request.method == "HEAD" or answer.status < 200 or answer.status in (204, 304):
        return [lines]  # a body here would be read as the start of the next answer
    return [lines, answer.body]


def error_answer(status: int, message: str) -> Answer:
    return Answer(status, [(b"content-type", b"application/json")], json.dumps({"error": message}).encode())
