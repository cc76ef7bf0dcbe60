"""Hostile requests against the real gateway in front of the real Triton: nothing may crash either.

A seeded generator (replay one run with FERRY_FUZZ_SEED=<seed>) mutates good requests: shapes (huge, negative,
of the wrong rank or type), datatypes, data (too few or too many values, wrong kinds, nesting, NaN and
out-of-range literals), the binary tensor extension (header length, binary_data_size, BYTES length prefixes),
encodings (invalid UTF-8, deep nesting, gzip bombs), paths, methods and tokens, on KServe HTTP, /predict and
gRPC. After each batch: every answer was a 4xx or a success (gRPC: a client-error code or OK), none hung,
Triton is up and serves the committed version, and a good request still succeeds on both protocols. The same
inputs sent to /predict, to /v2 infer (as the KServe request they stand for) and to the MLflow plugin's predict
get the same verdict on every path.
"""

from __future__ import annotations

import gzip
import json
import os
import random
import socket
import struct
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cache

import grpc
import httpx
import numpy as np
import pytest
from tritonclient.grpc import service_pb2

from conftest import World
from ferry.adapters.gateway.refusals import status_of
from ferry.adapters.mlflow_plugin import predict_committed
from ferry.core.errors import GatewayError
from ferry.core.services import Services
from support.gateway import IRIS_ROW, KSERVE_BODY, TOKEN, Running, running_gateway

SEED = int(os.environ.get("FERRY_FUZZ_SEED", "20261129"))
BATCHES, HTTP_PER_BATCH, GRPC_PER_BATCH = 8, 150, 80
TIMEOUT_S = 20.0  # an answer slower than this counts as a hang
BODY_TIMEOUT_S = 1.0  # how long the gateway under test waits for a stalled body (production: 30 s)
BUDGET_S = 60.0
SERVICE = "/inference.GRPCInferenceService/"
CLIENT_ERRORS = {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.UNAUTHENTICATED,
                 grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.OUT_OF_RANGE,
                 grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.PERMISSION_DENIED}

SHAPES = [[10**12, 4], [1_000_000, 4_000_000], [2**63, 4], [2**64, 4], [-1, 4], [0, 4], [1], [4], [1, 4, 1], [],
          [1.5, 4], ["1", 4], [True, 4], None, "1,4", {"a": 1}, [1, 4] * 10, [2, 4], [3, 4], [1, -4], [None, 4]]
DATATYPES = ["FP32", "FP64", "FP16", "BF16", "INT64", "INT8", "UINT8", "BOOL", "BYTES", "fp32", "", None, 7, "X" * 500]
NAMES = ["X", "Y", "", None, 7, ["X"], "X" * 5000, "x", "../X", "\ud800"]
DATA = [[], [1.0] * 3, [1.0] * 5, [[1.0, 2.0], [3.0, 4.0]], [IRIS_ROW], [[[[IRIS_ROW]]]], ["a"] * 4, [None] * 4,
        [True] * 4, [1, 2, 3, 4], [10**30] * 4, [2**64] * 4, [1.0, [2.0], 3.0, 4.0], {"a": 1}, "abcd", None,
        [3.5e38] * 4, [1.0] * 8]
PARAMETERS = [{"binary_data_size": 16}, {"shared_memory_region": "r", "shared_memory_byte_size": 16}, "p", [],
              {"binary_data_size": -1}, {"x": 1}]
OUTPUTS = [[{"name": "nosuch"}], [{"name": "probabilities", "parameters": {"classification": 10**9}}],
           [{"name": "label", "parameters": {"binary_data": True}}], "x", [1], [{"name": ["label"]}],
           [{"name": "label", "parameters": {"shared_memory_region": "r"}}]]
REQUEST_PARAMETERS = [{"binary_data_output": True}, {"sequence_id": 5, "sequence_start": True}, {"priority": 2**63},
                      {"timeout": -1}, "p", {"binary_data_output": "yes"}]
LITERALS = [b"NaN", b"Infinity", b"-Infinity", b"1e400", b"-1e400", b"1e-400", b"3.5e38", b"9" * 5000, b'"\\ud800"',
            b"true", b"null", b"[]", b"{}"]


@dataclass
class Hostile:
    what: str  # enough to tell which request it was
    method: str
    path: str
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=lambda: {"authorization": f"Bearer {TOKEN}"})


@cache
def gzip_bomb() -> bytes:
    return zlib.compress(b"\0" * (64 * 1024 * 1024), 9)  # 64 MB inflated, about 64 KB sent


def good_tensor(rows: int = 1) -> dict:
    return {"name": "X", "shape": [rows, 4], "datatype": "FP32", "data": IRIS_ROW * rows}


class HttpFuzzer:
    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.kinds: list[Callable[[], Hostile]] = [self.kserve_json, self.kserve_json, self.kserve_binary,
                                                   self.kserve_binary, self.literal, self.encoded, self.path,
                                                   self.predict, self.auth]

    def one(self) -> Hostile:
        return self.rng.choice(self.kinds)()

    def _mutate_tensor(self, tensor: dict) -> str:
        key = self.rng.choice(["shape", "datatype", "name", "data", "parameters", "del"])
        pool = {"shape": SHAPES, "datatype": DATATYPES, "name": NAMES, "data": DATA, "parameters": PARAMETERS}
        if key == "del":
            gone = self.rng.choice(["name", "shape", "datatype", "data"])
            tensor.pop(gone, None)
            return f"no {gone}"
        tensor[key] = self.rng.choice(pool[key])
        return f"{key}={str(tensor[key])[:60]}"

    def kserve_json(self) -> Hostile:
        tensor = good_tensor(self.rng.choice([1, 1, 2, 0, 50]))
        document: object = {"inputs": [tensor]}
        changes = [self._mutate_tensor(tensor) for _ in range(self.rng.randint(0, 3))]
        if self.rng.random() < 0.3:
            key, pool = self.rng.choice([("outputs", OUTPUTS), ("parameters", REQUEST_PARAMETERS),
                                         ("inputs", [[], {}, None, "X", [tensor, tensor], [tensor, 7]]),
                                         ("id", ["x" * 10000, 7])])
            document[key] = self.rng.choice(pool)  # type: ignore[index]
            changes.append(f"{key}={str(document[key])[:60]}")  # type: ignore[index]
        if self.rng.random() < 0.05:
            document = self.rng.choice([[tensor], "inputs", 7])
            changes.append(f"document={str(document)[:40]}")
        version = self.rng.choice(["", "", "", "/versions/1", "/versions/2", "/versions/x"])
        return Hostile(f"json {changes} {version}", "POST", f"/v2/models/iris{version}/infer",
                       json.dumps(document).encode())

    def kserve_binary(self) -> Hostile:
        rows = self.rng.choice([1, 1, 2, 0, 1000])
        datatype, blob = "FP32", struct.pack(f"<{4 * rows}f", *(IRIS_ROW * rows))
        tensor = {"name": "X", "shape": [rows, 4], "datatype": datatype, "parameters": {"binary_data_size": len(blob)}}
        change = self.rng.choice(["none", "shape", "size", "blob", "bytes", "length", "data"])
        if change == "shape":
            tensor["shape"] = self.rng.choice(SHAPES)
        elif change == "size":
            tensor["parameters"]["binary_data_size"] = self.rng.choice([0, 8, 15, 17, 2**63, -16, "16", 16.0, None])
        elif change == "blob":
            blob = blob[: self.rng.randint(0, len(blob))] if self.rng.random() < 0.5 else blob + os.urandom(8)
        elif change == "bytes":
            tensor["datatype"] = "BYTES"
            blob = b"".join(struct.pack("<I", self.rng.choice([0, 3, 2**32 - 1, 100])) + b"abc" for _ in range(4))
            tensor["parameters"]["binary_data_size"] = len(blob)
        elif change == "data":
            tensor["data"] = IRIS_ROW
        header = json.dumps({"inputs": [tensor], "outputs": [{"name": "probabilities",
                                                              "parameters": {"binary_data": True}}]}).encode()
        length = str(len(header))
        if change == "length":
            length = self.rng.choice([str(len(header) + 1), str(len(header) - 1), "0", "-1", "abc", "",
                                      str(len(header) + len(blob) + 1), "1e3", str(2**70)])
        return Hostile(f"binary {change} {str(tensor)[:120]} length={length}", "POST", "/v2/models/iris/infer",
                       header + blob, {"authorization": f"Bearer {TOKEN}", "inference-header-content-length": length})

    def literal(self) -> Hostile:
        good = json.dumps(KSERVE_BODY).encode()
        choice = self.rng.randrange(6)
        if choice == 0:
            literal = self.rng.choice(LITERALS)
            body = b'{"inputs":[{"name":"X","shape":[1,4],"datatype":"FP32","data":[%s,1,2,3]}]}' % literal
        elif choice == 1:
            body = self.rng.choice([b"[", b'{"a":', b'{"inputs":[']) * self.rng.choice([100, 5000, 200000])
        elif choice == 2:
            body = good[: self.rng.randrange(len(good))]
        elif choice == 3:
            position = self.rng.randrange(len(good))
            body = good[:position] + bytes([self.rng.randrange(256)]) + good[position + 1:]
        elif choice == 4:
            body = os.urandom(self.rng.randrange(512))
        else:
            body = self.rng.choice([b"", b"null", b"0", b"[]", b'{"inputs": null}', b"\xef\xbb\xbf" + good,
                                    b'{"inputs": "\xc3\x28"}'])
        return Hostile(f"literal {body[:80]!r}", "POST", "/v2/models/iris/infer", body)

    def encoded(self) -> Hostile:
        good = json.dumps(KSERVE_BODY).encode()
        encoding, body = self.rng.choice([("gzip", gzip.compress(good)), ("deflate", zlib.compress(good)),
                                          ("gzip", gzip_bomb()), ("deflate", gzip_bomb()), ("gzip", os.urandom(64)),
                                          ("gzip", gzip.compress(good)[:20]), ("br", good), ("gzip, deflate", good)])
        return Hostile(f"encoded {encoding} {len(body)} bytes", "POST", "/v2/models/iris/infer", body,
                       {"authorization": f"Bearer {TOKEN}", "content-encoding": encoding})

    def path(self) -> Hostile:
        method, path = self.rng.choice([
            ("GET", "/v2/models/iris/versions/1"), ("GET", "/v2/models/iris/versions/99999999999999999999999/config"),
            ("GET", "/v2/models/%2e%2e/ready"), ("POST", "/v2/models/" + "a" * 5000 + "/infer"),
            ("GET", "/v2/models/iris/versions/-1"), ("POST", "/v2/models/iris%00/infer"), ("DELETE", "/v2/models/iris"),
            ("POST", "/v2/repository/models/iris/unload"), ("POST", "/v2/systemsharedmemory/region/r/register"),
            ("GET", "/v2/models/iris/versions/1/stats"), ("GET", "/v2/models/..%2F..%2Fetc/config"),
            ("POST", "/v2/logging"), ("GET", "/v2/health/ready"), ("GET", "/v2"), ("PATCH", "/v2/models/iris/infer"),
            ("GET", "/v2/models/iris/config"), ("GET", "/v2/models//ready"), ("POST", "/predict/"),
            ("POST", "/predict/nosuch"), ("GET", "/v2/models/iris/versions/1/ready")])
        return Hostile(f"path {method} {path[:80]}", method, path, json.dumps(KSERVE_BODY).encode())

    def predict(self) -> Hostile:
        value = self.rng.choice([[IRIS_ROW] * self.rng.choice([1, 3, 1000]), [[1, 2], [3]], [[["a"]]], "abc", None,
                                 {"a": 1}, [[1e39] * 4], [[10**400, 1, 2, 3]], [["1", "2", "3", "4"]], [],
                                 [[True, False, True, False]], json.loads("[" * 40 + "1" + "]" * 40)])
        document = self.rng.choice([{"inputs": {"X": value}}, {"inputs": {"X": value, "Y": value}},
                                    {"inputs": [value]}, {"X": value}])
        body = json.dumps(document).encode()
        if self.rng.random() < 0.1:
            body = self.rng.choice([b'{"inputs": {"X": [[NaN, 1, 2, 3]]}}', b"[" * 100000,
                                    b'{"inputs": {"X": [[' + b"9" * 5000 + b", 1, 2, 3]]}}"])
        return Hostile(f"predict {body[:100]!r}", "POST", "/predict/iris", body)

    def auth(self) -> Hostile:
        value = self.rng.choice(["", "Bearer", "Bearer wrong", f"bearer {TOKEN}", f"Bearer {TOKEN}x", TOKEN,
                                 f"Basic {TOKEN}"])
        headers = {"authorization": value} if value else {}
        return Hostile(f"auth {value!r}", "POST", "/v2/models/iris/infer", json.dumps(KSERVE_BODY).encode(), headers)


@dataclass
class HostileCall:
    what: str
    method: str
    request: bytes
    metadata: tuple[tuple[str, str], ...] = (("authorization", f"Bearer {TOKEN}"),)


def good_grpc_request() -> service_pb2.ModelInferRequest:
    request = service_pb2.ModelInferRequest(model_name="iris")
    request.inputs.add(name="X", datatype="FP32", shape=[1, 4]).contents.fp32_contents.extend(IRIS_ROW)
    return request


def grpc_request(rng: random.Random) -> tuple[service_pb2.ModelInferRequest, str]:
    rows = rng.choice([1, 1, 2, 0, 100])
    request = service_pb2.ModelInferRequest(model_name="iris")
    tensor = request.inputs.add(name="X", datatype="FP32", shape=[rows, 4])
    tensor.contents.fp32_contents.extend(IRIS_ROW * rows)
    change = rng.choice(["none", "shape", "rank", "datatype", "count", "raw", "raw-count", "bytes", "name", "version",
                         "output", "shm", "both", "none-data"])
    if change == "shape":
        tensor.shape[:] = [rng.choice([-1, 0, 2**62, 10**12, 3, -(2**63)]), 4]
    elif change == "rank":
        tensor.shape[:] = rng.choice([[], [4], [1, 4, 1], [1] * 64])
    elif change == "datatype":
        tensor.datatype = rng.choice(["FP64", "INT64", "BYTES", "BF16", "", "x" * 300])
    elif change == "count":
        values = list(tensor.contents.fp32_contents)
        tensor.contents.fp32_contents[:] = [*values, 1.0] if rng.random() < 0.5 else values[:-1]
    elif change in ("raw", "raw-count", "both"):
        if change != "both":
            tensor.ClearField("contents")
        request.raw_input_contents.append(struct.pack(f"<{4 * rows}f", *(IRIS_ROW * rows))[: rng.choice([None, 3])])
        if change == "raw-count":
            request.raw_input_contents.append(b"\0" * 16)
    elif change == "bytes":
        tensor.datatype = "BYTES"
        tensor.ClearField("contents")
        request.raw_input_contents.append(struct.pack("<I", rng.choice([2**32 - 1, 5, 0])) + b"abc")
    elif change == "name":
        request.model_name = rng.choice(["", "nosuch", "../iris", "iris\0", "i" * 5000])
    elif change == "version":
        request.model_version = rng.choice(["1", "2", "x", "-1", "99999999999999999999"])
    elif change == "output":
        request.outputs.add(name=rng.choice(["nosuch", "probabilities", ""]))
    elif change == "shm":
        tensor.parameters["shared_memory_region"].string_param = "r"
    elif change == "none-data":
        tensor.ClearField("contents")
    return request, change


def grpc_hostile(rng: random.Random) -> HostileCall:
    choice = rng.randrange(10)
    if choice < 6:
        request, change = grpc_request(rng)
        return HostileCall(f"infer {change} {str(request)[:150]!r}", "ModelInfer", request.SerializeToString())
    if choice == 6:
        method = rng.choice(["ModelInfer", "ModelMetadata", "ModelConfig", "ModelReady"])
        return HostileCall(f"{method} random bytes", method, os.urandom(rng.randrange(1, 300)))
    if choice == 7:
        method = rng.choice(["RepositoryIndex", "RepositoryModelLoad", "SystemSharedMemoryRegister", "ModelStatistics",
                             "TraceSetting", "LogSettings"])
        return HostileCall(f"{method} (not served)", method, b"")
    if choice == 8:
        method = rng.choice(["ModelMetadata", "ModelConfig", "ModelReady"])
        name, version = rng.choice(["iris", "", "nosuch", "../x"]), rng.choice(["", "1", "2", "x"])
        return HostileCall(f"{method} {name!r} {version!r}", method,
                           service_pb2.ModelMetadataRequest(name=name, version=version).SerializeToString())
    request = good_grpc_request()
    token = rng.choice([(), (("authorization", "Bearer wrong"),), (("authorization", TOKEN),)])
    return HostileCall(f"infer token {token}", "ModelInfer", request.SerializeToString(), token)


def send_http(session: httpx.Client, hostile: Hostile) -> tuple[str, object]:
    try:
        reply = session.request(hostile.method, hostile.path, content=hostile.body, headers=hostile.headers)
    except httpx.TimeoutException:
        return hostile.what, "hang"
    try:
        body = reply.json()
    except ValueError:
        body = None
    if reply.status_code != 200 and (not isinstance(body, dict) or list(body) != ["error"]):
        return hostile.what, f"{reply.status_code} without an error body: {reply.text[:100]}"
    return hostile.what, reply.status_code


def send_grpc(channel: grpc.Channel, call: HostileCall) -> tuple[str, object]:
    try:
        channel.unary_unary(SERVICE + call.method)(call.request, metadata=call.metadata, timeout=TIMEOUT_S)
    except grpc.RpcError as error:
        code = error.code()
        return call.what, "hang" if code is grpc.StatusCode.DEADLINE_EXCEEDED else code
    return call.what, grpc.StatusCode.OK


def bad_answers(answers: list[tuple[str, object]]) -> list[tuple[str, object]]:
    def fine(status: object) -> bool:
        if isinstance(status, int):
            return status == 200 or 400 <= status < 500
        return status is grpc.StatusCode.OK or status in CLIENT_ERRORS

    return [(what, status) for what, status in answers if not fine(status)]


def assert_still_serving(world: World, gateway: Running, session: httpx.Client, channel: grpc.Channel) -> None:
    assert gateway.process.poll() is None, "the gateway process is gone"
    assert httpx.get(f"{world.settings.triton.urls}/v2/health/live", timeout=5).status_code == 200, "Triton is down"
    assert world.ferry.triton.ready_versions("iris") == [1], "Triton does not serve the committed version alone"
    good = session.post("/v2/models/iris/infer", json=KSERVE_BODY, headers={"authorization": f"Bearer {TOKEN}"})
    assert good.status_code == 200 and good.headers["x-ferry-model-version"] == "1", good.text
    answer = channel.unary_unary(SERVICE + "ModelInfer")(good_grpc_request().SerializeToString(), timeout=TIMEOUT_S,
                                                         metadata=(("authorization", f"Bearer {TOKEN}"),))
    assert service_pb2.ModelInferResponse.FromString(answer).model_version == "1"


@pytest.fixture
def served(world: World) -> Iterator[tuple[World, Running]]:
    world.register()
    assert world.deploy().outcome == "committed"
    with running_gateway(world, TOKEN, FERRY_GATEWAY_BODY_TIMEOUT_S=str(BODY_TIMEOUT_S)) as gateway:
        yield world, gateway


def test_no_hostile_request_crashes_the_gateway_or_triton(served: tuple[World, Running]) -> None:
    world, gateway = served
    rng = random.Random(SEED)
    fuzzer, tally = HttpFuzzer(rng), Counter()
    began = time.monotonic()
    options = [("grpc.max_send_message_length", 64 * 1024 * 1024)]
    with httpx.Client(base_url=gateway.url, timeout=TIMEOUT_S) as session, \
            grpc.insecure_channel(gateway.grpc, options=options) as channel, ThreadPoolExecutor(4) as pool:
        assert_still_serving(world, gateway, session, channel)
        for batch in range(BATCHES):
            hostile = [fuzzer.one() for _ in range(HTTP_PER_BATCH)]
            calls = [grpc_hostile(rng) for _ in range(GRPC_PER_BATCH)]
            if batch == 0:  # once: over the size limits of both protocols
                hostile.append(Hostile("17 MB", "POST", "/v2/models/iris/infer", b" " * (17 * 1024 * 1024)))
                calls.append(HostileCall("17 MB", "ModelInfer", b"\0" * (17 * 1024 * 1024)))
            answers = list(pool.map(lambda h: send_http(session, h), hostile))
            answers += list(pool.map(lambda c: send_grpc(channel, c), calls))
            tally.update(str(status) for _, status in answers)
            assert not bad_answers(answers), f"seed {SEED}, batch {batch}: {bad_answers(answers)[:5]}"
            assert_still_serving(world, gateway, session, channel)
    print(f"seed {SEED}: {sum(tally.values())} hostile requests in {time.monotonic() - began:.1f} s: {dict(tally)}")
    assert time.monotonic() - began < BUDGET_S
    assert tally["200"] and tally["400"] and tally["StatusCode.OK"] and tally["StatusCode.INVALID_ARGUMENT"], tally


def test_the_requests_that_kill_triton_are_refused(served: tuple[World, Running]) -> None:
    """Measured with Triton 2.51: it aborts (std::bad_alloc) on a JSON shape of ~4e12 elements with 4 values of
    data, and dies on a body of 200,000 nested '[' (its JSON parser recurses); either takes the whole server."""
    world, gateway = served
    hostile = {"inputs": [{"name": "X", "shape": [1_000_000_000_000, 4], "datatype": "FP32", "data": IRIS_ROW}]}
    with httpx.Client(base_url=gateway.url, timeout=TIMEOUT_S, headers={"authorization": f"Bearer {TOKEN}"}) as session:
        for path in ("/v2/models/iris/infer", "/v2/models/iris/versions/1/infer"):
            reply = session.post(path, json=hostile)
            assert reply.status_code == 400 and "over the gateway's limit" in reply.json()["error"]
            reply = session.post(path, content=b"[" * 200_000)
            assert reply.status_code == 400 and "nests arrays or objects too deeply" in reply.json()["error"]
        assert session.post("/v2/models/iris/infer", json=KSERVE_BODY).status_code == 200
    assert world.ferry.triton.ready_versions("iris") == [1]


def _raw_exchange(gateway: Running, request: bytes) -> bytes:
    """Send bytes as they are (no client library would send these) and read the answer."""
    host, port = gateway.host_port.split(":")
    with socket.create_connection((host, int(port)), timeout=TIMEOUT_S) as connection:
        connection.sendall(request)
        answer = b""
        while not answer.endswith(b"}"):
            chunk = connection.recv(65536)
            if not chunk:
                break
            answer += chunk
    return answer


def test_a_stalled_or_abandoned_body_does_not_hold_the_gateway(served: tuple[World, Running]) -> None:
    world, gateway = served
    assert world.ferry.triton.ready_versions("iris") == [1]
    head = (b"POST /v2/models/iris/infer HTTP/1.1\r\nHost: gateway\r\nAuthorization: Bearer " + TOKEN.encode() +
            b"\r\nContent-Length: 100\r\n\r\n")
    began = time.monotonic()
    answer = _raw_exchange(gateway, head + b'{"inputs"')  # 9 of the 100 bytes it announced, then silence
    assert answer.startswith(b"HTTP/1.1 408") and b'"error"' in answer, answer[:300]
    assert time.monotonic() - began < BODY_TIMEOUT_S + 5
    host, port = gateway.host_port.split(":")
    for _ in range(20):  # clients that go away mid-body
        with socket.create_connection((host, int(port)), timeout=TIMEOUT_S) as gone:
            gone.sendall(head + b"{")
    answer = _raw_exchange(gateway, b"GARBAGE / HTTP/9\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
    with httpx.Client(base_url=gateway.url, timeout=TIMEOUT_S, headers={"authorization": f"Bearer {TOKEN}"}) as session:
        assert session.post("/v2/models/iris/infer", json=KSERVE_BODY).status_code == 200
    assert gateway.process.poll() is None
    assert world.ferry.triton.ready_versions("iris") == [1]


# ---------------------------------------------------------------- one decoder, one check: the paths agree

ELEMENTS = [0, 7, -3, True, False, "a", "1.5", None, 1e39, -1e39, 10**30, 3.5e38, 1e-300, -0.0, [1.0], {"a": 1}]
ENCODINGS = ["gzip", "deflate", "identity", "br", "gzip, deflate", "compress", ""]


def rectangular_shape(value: object) -> list[int] | None:
    """The shape of a nested list whose rows at each level have one length ([] for a value that is not a list);
    None for a ragged one (not a tensor)."""
    if not isinstance(value, list):
        return []
    shapes = [rectangular_shape(item) for item in value]
    if any(shape is None or shape != shapes[0] for shape in shapes):
        return None
    return [len(value), *(shapes[0] if shapes else [])]


def predict_value(rng: random.Random) -> object:
    """A value for /predict's input X: mostly nested lists of iris rows, some with hostile elements, ragged rows,
    the wrong depth or width, or no list at all."""
    if rng.random() < 0.05:
        return rng.choice(["abc", None, 7, {"a": 1}, [], [[]]])
    hostile = rng.random() < 0.5
    rows, width = rng.choice([1, 1, 2, 3, 0]), rng.choice([4, 4, 4, 4, 3, 5])
    value: list = [[rng.choice(ELEMENTS) if hostile and rng.random() < 0.3 else rng.choice(IRIS_ROW)
                    for _ in range(width)] for _ in range(rows)]
    change = rng.random()
    if change < 0.1 and value:
        value[rng.randrange(len(value))].append(1.0)  # ragged
    elif change < 0.15 and len(value) > 1:
        value[0] += value.pop()  # ragged, with as many values as a rectangle
        value.append([])
    elif change < 0.22:
        value = [value]  # one level too deep
    elif change < 0.27 and value:
        value = value[0]  # one level too shallow
    return value


def predict_inputs(rng: random.Random) -> dict:
    value = predict_value(rng)
    return rng.choice([{"X": value}] * 8 + [{"X": value, "Y": value}, {"Y": value}])


def kserve_of(inputs: dict) -> dict:
    """The KServe v2 request a /predict document stands for, written here independently of the gateway."""
    return {"inputs": [{"name": name, "shape": rectangular_shape(value), "datatype": "FP32",
                        "data": value if isinstance(value, list) else [value]} for name, value in inputs.items()]}


def http_verdict(reply: httpx.Response) -> tuple[int, object]:
    body = reply.json()
    if reply.status_code != 200:
        return reply.status_code, body["error"]
    if "outputs" in body and isinstance(body["outputs"], dict):  # /predict
        return 200, {name: np.asarray(value, dtype=float).ravel() for name, value in body["outputs"].items()}
    return 200, {o["name"]: np.asarray(o["data"], dtype=float).ravel() for o in body["outputs"]}


def plugin_verdict(ferry: Services, inputs: dict) -> tuple[int, object]:
    try:
        answer = predict_committed(ferry, "iris", inputs)
    except GatewayError as error:
        return status_of(error), str(error)
    return 200, {name: np.asarray(value, dtype=float).ravel() for name, value in answer["predictions"].items()}


def same_verdict(one: tuple[int, object], other: tuple[int, object]) -> bool:
    if one[0] != other[0]:
        return False
    if one[0] != 200:
        return one[1] == other[1]
    outputs, others = one[1], other[1]
    return outputs.keys() == others.keys() and all(np.allclose(outputs[k], others[k], rtol=1e-6) for k in outputs)


def test_predict_kserve_and_the_plugin_give_the_same_verdicts(served: tuple[World, Running]) -> None:
    """Item 2 of issue 20: one body decoder and one input check for /v2 infer, /predict and the MLflow plugin's
    predict. The same inputs get the same status and the same words on every path (or the same outputs), and the
    same body gets the same answer to its Content-Encoding."""
    world, gateway = served
    rng, ferry = random.Random(SEED), Services(world.settings)
    disagree, tally = [], Counter()
    with httpx.Client(base_url=gateway.url, timeout=TIMEOUT_S, headers={"authorization": f"Bearer {TOKEN}"}) as session:
        for _ in range(150):
            inputs = predict_inputs(rng)
            predict = http_verdict(session.post("/predict/iris", json={"inputs": inputs}))
            plugin = plugin_verdict(ferry, inputs)
            tally[predict[0]] += 1
            if not same_verdict(predict, plugin):
                disagree.append(("plugin", inputs, predict, plugin))
            if any(rectangular_shape(value) is None for value in inputs.values()):
                if predict[0] != 400:  # a ragged list is no tensor: /predict cannot say which shape it meant
                    disagree.append(("ragged", inputs, predict))
                continue
            kserve = http_verdict(session.post("/v2/models/iris/infer", json=kserve_of(inputs)))
            if not same_verdict(predict, kserve):
                disagree.append(("kserve", inputs, predict, kserve))
        for encoding in ENCODINGS:
            for payload in (b"", os.urandom(64), None):
                verdicts = []
                for path, document in (("/predict/iris", {"inputs": {"X": [IRIS_ROW]}}),
                                       ("/v2/models/iris/infer", KSERVE_BODY)):
                    body = payload if payload is not None else json.dumps(document).encode()
                    if payload is None and encoding in ("gzip", "deflate"):
                        body = gzip.compress(body) if encoding == "gzip" else zlib.compress(body)
                    reply = session.post(path, content=body, headers={"content-encoding": encoding})
                    verdicts.append((reply.status_code, reply.json().get("error", "") if reply.status_code != 200
                                     else ""))
                if verdicts[0] != verdicts[1]:
                    disagree.append(("encoding", encoding, payload, verdicts))
    assert not disagree, f"seed {SEED}: {len(disagree)} disagreements, the first: {disagree[:3]}"
    assert tally[200] >= 20 and tally[400] >= 20, tally  # both verdicts were exercised
