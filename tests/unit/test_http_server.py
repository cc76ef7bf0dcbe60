"""The gateway's HTTP/1.1 server over a real socket: keep-alive, pipelining, limits, timeouts and hostile bytes.

The handler here echoes what it was given; the gateway's own handler runs over this server in the real-Triton
tests (tests/test_gateway*.py).
"""

from __future__ import annotations

import asyncio
import json
import socket
import struct
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
from fastapi import FastAPI
from fastapi import Request as FastApiRequest

from ferry.adapters.gateway.http_server import HttpServer, asgi_responder
from ferry.adapters.gateway.http_wire import Answer, Limits, Request

MAX_BODY = 1000
BODY_TIMEOUT_S = 0.5


CALLS: dict[str, int] = {}  # answers the echo handler started, per path
CANCELLED: list[str] = []  # paths whose handler was cancelled


async def echo(request: Request) -> Answer:
    CALLS[request.path] = CALLS.get(request.path, 0) + 1
    if request.path == "/fail":
        raise RuntimeError("a handler's bug")
    if request.path == "/slow":
        await asyncio.sleep(0.2)
    if request.path == "/big":
        return Answer(200, [], b"x" * 1024 * 1024)
    if request.path.startswith("/hang"):
        try:
            await asyncio.sleep(3)
        except asyncio.CancelledError:
            CANCELLED.append(request.path)
            raise
    document = {"method": request.method, "path": request.path, "query": request.query.decode(),
                "body": request.body.decode(errors="replace"), "headers": {k.decode(): v.decode()
                                                                          for k, v in request.headers}}
    return Answer(200, [(b"content-type", b"application/json")], json.dumps(document).encode())


class Served:
    def __init__(self, server: HttpServer) -> None:
        self.server = server
        self.loop = asyncio.new_event_loop()
        self.listening = self.loop.run_until_complete(server.listen("127.0.0.1", 0))
        self.port = self.listening.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def raw(self, data: bytes, *, shut: bool = False, timeout: float = 5) -> bytes:
        """Send ``data`` as it is and read until the server closes the connection."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as connection:
            connection.sendall(data)
            if shut:
                connection.shutdown(socket.SHUT_WR)
            answer = b""
            while chunk := connection.recv(65536):
                answer += chunk
        return answer

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.shutdown(self.listening), self.loop).result(timeout=15)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)


@pytest.fixture
def served() -> Iterator[Served]:
    running = Served(HttpServer(echo, Limits(MAX_BODY, BODY_TIMEOUT_S)))
    yield running
    running.stop()


def test_requests_on_one_kept_alive_connection_are_answered_in_order(served: Served) -> None:
    with httpx.Client(base_url=served.url, timeout=5) as client:
        answers = [client.post(f"/v2/models/m%20{i}/infer?x={i}", content=b"body %d" % i) for i in range(5)]
    for i, answer in enumerate(answers):
        assert answer.status_code == 200 and answer.headers["content-length"] == str(len(answer.content))
        echoed = answer.json()
        assert (echoed["method"], echoed["path"], echoed["query"], echoed["body"]) == \
            ("POST", f"/v2/models/m {i}/infer", f"x={i}", f"body {i}")
        assert echoed["headers"]["content-length"] == str(len(f"body {i}"))


def test_pipelined_requests_get_their_answers_in_order_and_close_closes(served: Served) -> None:
    one = b"GET /slow HTTP/1.1\r\nHost: a\r\n\r\n"
    two = b"POST /two HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\n\r\nabc"
    last = b"GET /three HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n"
    answer = served.raw(one + two + last)
    assert answer.count(b"HTTP/1.1 200 OK") == 3
    assert answer.index(b'"/slow"') < answer.index(b'"/two"') < answer.index(b'"/three"')
    assert b'"body": "abc"' in answer and answer.rstrip().endswith(b"}")
    assert b"connection: close" in answer.rsplit(b"HTTP/1.1", 1)[1]


def test_a_body_over_the_limit_is_refused_before_it_is_read(served: Served) -> None:
    announced = served.raw(b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 5000\r\n\r\nabc")
    assert announced.startswith(b"HTTP/1.1 413 ") and b"5000 bytes, over the gateway's limit of 1000" in announced
    chunked = b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n"
    chunked += b"".join(b"200\r\n" + b"x" * 512 + b"\r\n" for _ in range(3)) + b"0\r\n\r\n"
    assert served.raw(chunked).startswith(b"HTTP/1.1 413 ")
    small = b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n"
    assert b'"body": "abc"' in served.raw(small + b"GET /x HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")


def test_a_request_that_stalls_gets_a_408_and_an_idle_connection_is_closed(served: Served) -> None:
    stalled = served.raw(b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\n{", timeout=BODY_TIMEOUT_S + 5)
    assert stalled.startswith(b"HTTP/1.1 408 ") and b"did not arrive within 0.5 s" in stalled
    half_a_head = served.raw(b"GET /x HTTP/1.1\r\nHost:", timeout=BODY_TIMEOUT_S + 5)
    assert half_a_head.startswith(b"HTTP/1.1 408 ")


def test_hostile_bytes_get_a_400_or_431_and_the_server_serves_on(served: Served) -> None:
    for garbage in (b"GARBAGE / HTTP/9\r\n\r\n", b"GET / HTTP/1.1\r\nHost a\r\n\r\n", b"\x00\xff" * 50 + b"\r\n\r\n",
                    b"POST / HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd",
                    b"GET / HTTP/1.1\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n"):
        answer = served.raw(garbage)
        assert answer.startswith(b"HTTP/1.1 400 ") and b'{"error": ' in answer, (garbage, answer[:200])
    long_head = b"GET / HTTP/1.1\r\n" + b"X-A: " + b"a" * 70_000 + b"\r\n\r\n"
    assert served.raw(long_head).startswith(b"HTTP/1.1 431 ")
    assert httpx.get(f"{served.url}/fine", timeout=5).json()["path"] == "/fine"


def test_a_handler_bug_is_a_502_with_an_error_body(served: Served) -> None:
    answer = httpx.get(f"{served.url}/fail", timeout=5)
    assert answer.status_code == 502 and "RuntimeError: a handler's bug" in answer.json()["error"]
    assert httpx.get(f"{served.url}/fine", timeout=5).status_code == 200


def test_expect_continue_and_a_half_closed_client_are_answered(served: Served) -> None:
    answer = served.raw(b"POST /x HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 2\r\n"
                        b"Connection: close\r\n\r\nhi")
    assert answer.startswith(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK") and b'"body": "hi"' in answer
    shut = served.raw(b"GET /slow HTTP/1.1\r\nHost: a\r\n\r\n", shut=True)  # returns once the server closes
    assert shut.startswith(b"HTTP/1.1 200 OK") and shut.endswith(b"}")


def test_shutdown_lets_a_request_in_flight_finish() -> None:
    running = Served(HttpServer(echo, Limits(MAX_BODY, BODY_TIMEOUT_S)))
    answers: list[httpx.Response] = []
    caller = threading.Thread(target=lambda: answers.append(httpx.get(f"{running.url}/slow", timeout=5)))
    caller.start()
    while not any(connection.worker for connection in list(running.server.connections)):
        time.sleep(0.01)  # the request is being answered
    running.stop()
    caller.join(timeout=5)
    assert answers and answers[0].status_code == 200 and answers[0].headers["connection"] == "close"


def test_the_asgi_bridge_answers_as_the_application_does() -> None:
    app = FastAPI()

    @app.post("/predict/{model}")
    async def predict(model: str, request: FastApiRequest) -> dict:
        return {"model": model, "body": (await request.body()).decode(), "q": request.query_params.get("q")}

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/boom")
    async def boom() -> dict:
        raise RuntimeError("inside the application")

    running = Served(HttpServer(asgi_responder(app, ("127.0.0.1", 0)), Limits(MAX_BODY, BODY_TIMEOUT_S)))
    try:
        answer = httpx.post(f"{running.url}/predict/iris?q=1", content=b"rows", timeout=5)
        assert answer.status_code == 200 and answer.json() == {"model": "iris", "body": "rows", "q": "1"}
        assert httpx.get(f"{running.url}/nowhere", timeout=5).status_code == 404
        head = httpx.head(f"{running.url}/health", timeout=5)
        assert head.status_code == 200 and head.content == b"" and int(head.headers["content-length"]) > 0
        failed = httpx.get(f"{running.url}/boom", timeout=5)
        assert failed.status_code == 500 and failed.text == "Internal Server Error"  # what Starlette answers
    finally:
        running.stop()


def test_a_head_answer_has_no_body_and_the_connection_serves_on(served: Served) -> None:
    with socket.create_connection(("127.0.0.1", served.port), timeout=5) as connection:
        connection.sendall(b"HEAD /x HTTP/1.1\r\nHost: a\r\n\r\n"
                           b"GET /y HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
        answer = b""
        while chunk := connection.recv(65536):
            answer += chunk
    head, rest = answer.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 200 OK") and b"content-length: " in head and b"date: " in head
    assert rest.startswith(b"HTTP/1.1 200 OK"), "the HEAD answer carried a body"
    assert b'"path": "/y"' in rest


def test_a_refusal_after_pipelined_requests_comes_after_their_answers(served: Served) -> None:
    answer = served.raw(b"GET /slow HTTP/1.1\r\nHost: a\r\n\r\nGARBAGE\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200 OK") and b'"path": "/slow"' in answer
    assert b"HTTP/1.1 400 Bad Request" in answer.split(b'"path": "/slow"', 1)[1]
    after_close = served.raw(b"GET /slow HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\nGARBAGE")
    assert after_close.startswith(b"HTTP/1.1 200 OK") and after_close.count(b"HTTP/1.1") == 1, "data after close"


def test_a_chunked_bodys_trailer_never_becomes_a_header(served: Served) -> None:
    request = (b"POST /x HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer real\r\nTransfer-Encoding: chunked\r\n"
               b"Connection: close\r\n\r\n3\r\nabc\r\n0\r\nAuthorization: Bearer smuggled\r\n\r\n")
    echoed = json.loads(served.raw(request).split(b"\r\n\r\n", 1)[1])
    assert echoed["body"] == "abc" and echoed["headers"]["authorization"] == "Bearer real"


def test_a_header_that_never_ends_is_refused_as_it_grows(served: Served) -> None:
    with socket.create_connection(("127.0.0.1", served.port), timeout=5) as connection:
        connection.sendall(b"GET / HTTP/1.1\r\nHost: a\r\nX-Big: ")
        for _ in range(4):
            connection.sendall(b"a" * 32 * 1024)  # no end of line: httptools would buffer it whole
        assert connection.recv(65536).startswith(b"HTTP/1.1 431 ")
    many = b"GET / HTTP/1.1\r\nHost: a\r\n" + b"a: \r\n" * 500 + b"\r\n"
    assert served.raw(many).startswith(b"HTTP/1.1 431 ")


@pytest.mark.parametrize(("request_bytes", "status"), [
    (b"GET / HTTP/1.1\r\n\r\n", b"400"),  # HTTP/1.1 without Host
    (b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", b"505"),
])
def test_requests_outside_http_1_1_are_refused(served: Served, request_bytes: bytes, status: bytes) -> None:
    assert served.raw(request_bytes).startswith(b"HTTP/1.1 " + status)


def test_an_http_1_0_client_is_told_its_connection_is_kept(served: Served) -> None:
    with socket.create_connection(("127.0.0.1", served.port), timeout=5) as connection:
        connection.sendall(b"GET /x HTTP/1.0\r\nConnection: keep-alive\r\n\r\n")
        assert b"connection: keep-alive" in connection.recv(65536)


def test_a_client_that_reads_nothing_gets_no_more_answers_computed(served: Served) -> None:
    CALLS.pop("/big", None)
    with socket.create_connection(("127.0.0.1", served.port), timeout=5) as connection:
        connection.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        connection.sendall(b"GET /big HTTP/1.1\r\nHost: a\r\n\r\n" * 100)
        time.sleep(1.0)  # 100 MB of answers asked for; the server must wait for the client to read
        assert CALLS["/big"] < 10, f"{CALLS['/big']} answers of 1 MB computed for a client that reads none"


def test_a_client_that_goes_away_cancels_its_request(served: Served) -> None:
    CANCELLED.clear()
    connection = socket.create_connection(("127.0.0.1", served.port), timeout=5)
    connection.sendall(b"GET /hang-gone HTTP/1.1\r\nHost: a\r\n\r\n")
    time.sleep(0.3)
    connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    connection.close()  # a reset, as a client's timeout or a killed client sends
    deadline = time.monotonic() + 2
    while not CANCELLED and time.monotonic() < deadline:
        time.sleep(0.05)
    assert CANCELLED == ["/hang-gone"]


def test_shutdown_lets_a_request_still_arriving_finish() -> None:
    running = Served(HttpServer(echo, Limits(MAX_BODY, BODY_TIMEOUT_S * 4)))
    with socket.create_connection(("127.0.0.1", running.port), timeout=5) as connection:
        connection.sendall(b"POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nhal")
        while not running.server.connections:
            time.sleep(0.01)
        stopping = threading.Thread(target=running.stop)
        stopping.start()
        time.sleep(0.2)
        connection.sendall(b"f!")
        answer = b""
        while chunk := connection.recv(65536):
            answer += chunk
    stopping.join(timeout=15)
    assert answer.startswith(b"HTTP/1.1 200 OK") and b"connection: close" in answer and b'"body": "half!"' in answer


def test_a_request_still_arriving_when_the_grace_ends_gets_a_503(monkeypatch: pytest.MonkeyPatch) -> None:
    from ferry.adapters.gateway import http_server

    monkeypatch.setattr(http_server, "SHUTDOWN_GRACE_S", 0.3)
    running = Served(HttpServer(echo, Limits(MAX_BODY, BODY_TIMEOUT_S * 10)))
    with socket.create_connection(("127.0.0.1", running.port), timeout=5) as connection:
        connection.sendall(b"POST /upload HTTP/1.1\r\nHost: a\r\nContent-Length: 50\r\n\r\nslow")
        while not any(c.in_message for c in list(running.server.connections)):
            time.sleep(0.01)
        running.stop()
        answer = connection.recv(65536)
    assert answer.startswith(b"HTTP/1.1 503 ") and b"shutting down" in answer and b"connection: close" in answer
