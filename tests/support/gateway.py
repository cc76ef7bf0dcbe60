"""The gateway as the tests run it: in its own process (HTTP and gRPC), and the loads that call it."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import httpx
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from conftest import World, _free_port_block

IRIS_ROW = [5.1, 3.5, 1.4, 0.2]
KSERVE_BODY = {"inputs": [{"name": "X", "shape": [1, 4], "datatype": "FP32", "data": IRIS_ROW}]}
TOKEN = "s3cret-token"
GATEWAY_COMMAND = [sys.executable, "-m", "ferry", "gateway"]


@dataclass
class Running:
    """A gateway process: its HTTP base URL and its gRPC address."""

    url: str
    grpc: str
    process: subprocess.Popen

    @property
    def host_port(self) -> str:
        return self.url.removeprefix("http://")


@contextmanager
def running_gateway(world: World, token: str = TOKEN, **env: str) -> Iterator[Running]:
    """The gateway in its own process, HTTP and gRPC, as production runs it (``env``: FERRY_GATEWAY_* settings)."""
    port = _free_port_block(2)
    process = subprocess.Popen([*GATEWAY_COMMAND, "--port", str(port), "--grpc-port", str(port + 1)],
                               env={**os.environ, **world.env(), "FERRY_GATEWAY_TOKEN": token, **env},
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    gateway = Running(f"http://127.0.0.1:{port}", f"127.0.0.1:{port + 1}", process)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{gateway.url}/healthz", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.2)
    else:
        process.kill()
        pytest.fail(f"the gateway did not start: {process.communicate(timeout=10)[0]}")
    try:
        yield gateway
    finally:
        process.terminate()
        process.wait(timeout=10)


def client(url: str) -> httpx.Client:
    return httpx.Client(base_url=url, headers={"Authorization": f"Bearer {TOKEN}"}, timeout=30)


def auth() -> dict[str, str]:
    """Headers for tritonclient (a fresh dict each call: tritonclient adds its own headers to the one it is given)."""
    return {"authorization": f"Bearer {TOKEN}"}


@dataclass
class Sent:
    began: float
    ended: float
    status: int | str  # HTTP status, or the gRPC code's name
    version: int | None
    protocol: str = "http"


def load(url: str, stop: threading.Event, results: list[Sent]) -> None:
    with client(url) as session:
        while not stop.is_set():
            began = time.monotonic()
            reply = session.post("/v2/models/iris/infer", json=KSERVE_BODY)
            version = reply.headers.get("x-ferry-model-version")
            results.append(Sent(began, time.monotonic(), reply.status_code, int(version) if version else None))


def binary_load(host_port: str, stop: threading.Event, results: list[Sent]) -> None:
    """tritonclient.http, unchanged, with the binary tensor extension both ways."""
    triton = httpclient.InferenceServerClient(host_port, network_timeout=30)
    tensor = httpclient.InferInput("X", [1, 4], "FP32")
    tensor.set_data_from_numpy(np.array([IRIS_ROW], dtype=np.float32), binary_data=True)
    while not stop.is_set():
        began = time.monotonic()
        try:
            answer = triton.infer("iris", [tensor], headers=auth())
            results.append(Sent(began, time.monotonic(), 200, int(answer.get_response()["model_version"]), "binary"))
        except InferenceServerException as error:
            results.append(Sent(began, time.monotonic(), f"{error.status()} {error.message()}", None, "binary"))
    triton.close()


def grpc_load(address: str, stop: threading.Event, results: list[Sent]) -> None:
    """tritonclient.grpc, unchanged."""
    triton = grpcclient.InferenceServerClient(address)
    tensor = grpcclient.InferInput("X", [1, 4], "FP32")
    tensor.set_data_from_numpy(np.array([IRIS_ROW], dtype=np.float32))
    while not stop.is_set():
        began = time.monotonic()
        try:
            answer = triton.infer("iris", [tensor], headers=auth(), client_timeout=30)
            results.append(Sent(began, time.monotonic(), 200, int(answer.get_response().model_version), "grpc"))
        except InferenceServerException as error:
            results.append(Sent(began, time.monotonic(), f"{error.status()} {error.message()}", None, "grpc"))
    triton.close()


@contextmanager
def steady_load(gateway: Running, http: int = 2, grpc: int = 1) -> Iterator[list[Sent]]:
    """``http`` HTTP and ``grpc`` gRPC clients calling the gateway without pause until the block ends; what
    each request got (the list fills while the block runs; complete once it has ended)."""
    results: list[Sent] = []
    stop = threading.Event()
    workers = [threading.Thread(target=load, args=(gateway.url, stop, results)) for _ in range(http)]
    workers += [threading.Thread(target=grpc_load, args=(gateway.grpc, stop, results)) for _ in range(grpc)]
    for worker in workers:
        worker.start()
    try:
        yield results
    finally:
        stop.set()
        for worker in workers:
            worker.join(timeout=60)
