"""Shadow mode: copies of live requests go to the baking candidate off the response path, and its answers are
compared with the active version's.

The client's answer comes from the active version, as without a bake. A share of the requests
(``mirror_percent`` of rollout.json) is also sent to the candidate, by an asyncio task that no request awaits:
it starts once the request has been sent to the active version (both inferences then run at once) and
compares the two answers once both are in. At most :data:`SHADOW_LIMIT` copies are in flight; beyond that a
copy is dropped and counted (``ferry_gateway_shadow_dropped_total``), so a slow candidate cannot pile work up
in the gateway. Each copy is counted under ``role="shadow"`` with the candidate's status and its own
latency, and compared (``ferry_gateway_shadow_comparisons_total{result="agree|disagree|error"}``):

- a classifier's output (named ``label``, or a 2-D floating-point output with more than one column): the
  argmax of each row (``label``: the values themselves) must be the same;
- any other numeric output: ``numpy.allclose`` with the smoke tolerances (FERRY_RTOL, FERRY_ATOL);
- anything else (BYTES): equal;
- the same output names and shapes. A candidate that failed, or an answer that cannot be decoded: ``error``.
  A request whose active answer failed is not compared (the copy is still counted).

Copies go over HTTP, as JSON-output requests (binary output parameters removed; binary inputs as they came;
gRPC requests converted: a grpcio call costs the gateway about 300 us of CPU, the HTTP pool a fraction of
it), so the candidate's answer is always JSON; the active answer is decoded as the client asked for it (JSON
or binary outputs, gzip or deflate, gRPC).
"""

from __future__ import annotations

import asyncio
import json
import struct
import time
import zlib
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Generic, TypeVar

import numpy as np
from tritonclient.grpc import service_pb2
from tritonclient.utils import deserialize_bytes_tensor, triton_to_np_dtype

from ferry.adapters.gateway.upstream import Reply
from ferry.adapters.inference import guard
from ferry.adapters.inference.routing import ACTIVE, Route
from ferry.core.errors import FerryError

if TYPE_CHECKING:
    from ferry.adapters.gateway.plane import DataPlane

SHADOW_LIMIT = 64  # copies in flight at once; more are dropped (and counted), never queued
AGREE, DISAGREE, ERROR = "agree", "disagree", "error"
BINARY_HEADER = b"inference-header-content-length"

Outputs = dict[str, np.ndarray]
Copy = Callable[[Route], Awaitable[tuple[int, Outputs | None]]]  # send to the candidate: its status, its outputs
A = TypeVar("A")  # a protocol's answer from Triton (an HTTP Reply, a gRPC Result)


class Pending:
    """One request's shadow copy, already on its way: told the active answer once the request has it."""

    def __init__(self, future: asyncio.Future) -> None:
        self.future = future

    def answered(self, active: Callable[[], Outputs] | None) -> None:
        """``active()`` decodes the active answer's outputs; None: nothing to compare with (the request failed)."""
        if not self.future.done():
            self.future.set_result(active)


class Shadow:
    """The gateway's shadow copies: started by the protocol handlers, awaited by nobody."""

    def __init__(self, gateway: DataPlane, limit: int = SHADOW_LIMIT) -> None:
        self.gateway = gateway
        self.limit = limit
        self.tasks: set[asyncio.Task] = set()

    def start(self, route: Route, copy: Callable[[], Copy], protocol: str) -> Pending | None:
        """If a shadow bake beside ``route`` takes this request, send ``copy()`` to the candidate in a task of its
        own (it starts as soon as the request waits for Triton, so that both run at once); the task compares
        the outputs once the request calls :meth:`Pending.answered`."""
        bake = self.gateway.router.bake(route)
        if bake is None or bake.canary or not bake.takes():
            return None
        if len(self.tasks) >= self.limit:
            self.gateway.metrics.dropped(route.model)
            return None
        loop = asyncio.get_running_loop()
        pending = Pending(loop.create_future())
        task = loop.create_task(self._run(bake.candidate, copy(), pending.future, protocol))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return pending

    async def _run(self, candidate: Route, copy: Copy, answered: asyncio.Future, protocol: str) -> None:
        began = time.perf_counter()
        try:
            status, outputs = await copy(candidate)
        except FerryError as error:
            status, outputs = getattr(error, "status", 503), None
        except Exception:  # a bug here must not reach any client: the copy counts as the candidate's failure
            status, outputs = 502, None
        metrics = self.gateway.metrics
        metrics.count(candidate, status, began, protocol)
        try:
            async with asyncio.timeout(self.gateway.settings.triton.timeout_s + 5):
                active = await answered
            expected = active() if active is not None else None
        except TimeoutError:
            return  # the request never said (it cannot happen: it tells in a finally); nothing to compare
        except Exception:  # the active answer could not be decoded: no verdict either way, fail closed
            metrics.compared(candidate, ERROR)
            return
        if expected is None:
            return  # the request failed: nothing to compare with (its error is counted as its own)
        settings = self.gateway.settings
        agreed = outputs is not None and outputs_agree(expected, outputs, settings.deploy.rtol, settings.deploy.atol)
        metrics.compared(candidate, ERROR if outputs is None else AGREE if agreed else DISAGREE)

    async def close(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


class Shadowed(Generic[A]):
    """One request's part in a shadow bake, for a protocol handler: :meth:`start` at its first attempt at the
    committed version (the copy leaves while the request waits for its answer), :meth:`answered` with the
    answer that version gave; leaving the ``with`` block without one (an error) leaves nothing to compare."""

    def __init__(self, shadow: Shadow, protocol: str, ok: Callable[[A], bool], outputs: Callable[[A], Outputs]) -> None:
        self.shadow, self.protocol, self.ok, self.outputs = shadow, protocol, ok, outputs
        self.route: Route | None = None
        self.pending: Pending | None = None

    def start(self, route: Route, copy: Callable[[], Copy]) -> None:
        if self.route is None and route.role == ACTIVE:
            self.route, self.pending = route, self.shadow.start(route, copy, self.protocol)

    def answered(self, route: Route | None, answer: A) -> None:
        """Compare with ``answer`` if it is the one the copy was made for (not rerouted) and a success."""
        if self.pending is not None:
            same = route is self.route and self.ok(answer)
            self.pending.answered((lambda: self.outputs(answer)) if same else None)

    def __enter__(self) -> Shadowed[A]:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.pending is not None:
            self.pending.answered(None)  # nothing once answered


# ---------------------------------------------------------------- what a copy is, per protocol


def json_copy(request: guard.HttpInfer, body: bytes, content_type: bytes | None) -> tuple[bytes, list]:
    """A KServe HTTP request as the candidate is sent it: outputs as JSON (binary inputs kept as they are)."""
    headers = [(b"content-type", content_type)] if content_type else []
    document = request.document
    parameters = document.get("parameters") or {}
    outputs = document.get("outputs") or []
    binary_out = bool(parameters.get("binary_data_output")) or any(
        isinstance(o, dict) and isinstance(o.get("parameters"), dict) and o["parameters"].get("binary_data")
        for o in outputs)
    if not binary_out:
        if request.binary:
            headers.append((BINARY_HEADER, b"%d" % request.header_length))
        return body, headers
    copy = {**document, "parameters": {k: v for k, v in parameters.items() if k != "binary_data_output"}}
    copy["outputs"] = [_json_output(o) for o in outputs]
    header = json.dumps(copy, separators=(",", ":")).encode()
    if request.binary:
        headers.append((BINARY_HEADER, b"%d" % len(header)))
        return header + bytes(request.binary), headers
    return header, headers


def http_copy_of_grpc(request: service_pb2.ModelInferRequest) -> tuple[bytes, list]:
    """A gRPC ModelInferRequest as a KServe HTTP request (binary inputs, JSON outputs): the gateway sends shadow
    copies over HTTP, whose pool costs far less CPU per call than a grpcio call (about 300 us here)."""
    raw, blobs, inputs = request.raw_input_contents, [], []
    for i, tensor in enumerate(request.inputs):
        entry: dict = {"name": tensor.name, "shape": list(tensor.shape), "datatype": tensor.datatype}
        parameters = _grpc_parameters(tensor.parameters)
        blob = raw[i] if raw else _contents_blob(tensor)
        if blob is None:
            entry["data"] = list(getattr(tensor.contents, guard.GRPC_CONTENTS[tensor.datatype]))
        else:
            parameters["binary_data_size"] = len(blob)
            blobs.append(blob)
        inputs.append({**entry, "parameters": parameters} if parameters else entry)
    document: dict = {"inputs": inputs}
    if request.id:
        document["id"] = request.id
    if parameters := _grpc_parameters(request.parameters):
        document["parameters"] = parameters
    if request.outputs:
        document["outputs"] = [{"name": o.name, "parameters": _grpc_parameters(o.parameters)} for o in request.outputs]
    header = json.dumps(document, separators=(",", ":")).encode()
    headers = [(b"content-type", b"application/json")]
    if blobs:
        headers.append((BINARY_HEADER, b"%d" % len(header)))
    return header + b"".join(blobs), headers


def _contents_blob(tensor: service_pb2.ModelInferRequest.InferInputTensor) -> bytes | None:
    """Typed BYTES contents as the binary extension carries them (length-prefixed); None for numbers (JSON)."""
    if tensor.datatype != "BYTES":
        return None
    return b"".join(struct.pack("<I", len(value)) + value for value in tensor.contents.bytes_contents)


def _grpc_parameters(parameters: Mapping[str, service_pb2.InferParameter]) -> dict[str, object]:
    """gRPC InferParameter values as KServe JSON parameters."""
    return {name: getattr(value, value.WhichOneof("parameter_choice")) for name, value in parameters.items()
            if value.WhichOneof("parameter_choice")}


def _json_output(output: object) -> object:
    if not isinstance(output, dict) or not isinstance(output.get("parameters"), dict):
        return output
    return {**output, "parameters": {k: v for k, v in output["parameters"].items() if k != "binary_data"}}


# ---------------------------------------------------------------- decoding answers


def http_outputs(reply: Reply) -> Outputs:
    """The outputs of Triton's KServe HTTP answer: JSON or the binary tensor extension, compressed or not."""
    body = reply.body
    if reply.headers.get(b"content-encoding") in (b"gzip", b"deflate"):
        body = zlib.decompress(body, wbits=47)
    length = reply.headers.get(BINARY_HEADER)
    split = int(length) if length else len(body)
    document = json.loads(body[:split])
    blob, offset, outputs = memoryview(body)[split:], 0, {}
    for output in document.get("outputs", []):
        shape, datatype = [int(d) for d in output["shape"]], output["datatype"]
        size = (output.get("parameters") or {}).get("binary_data_size")
        if size is None:
            outputs[output["name"]] = _from_values(output["data"], datatype, shape)
        else:
            outputs[output["name"]] = _from_bytes(blob[offset:offset + int(size)], datatype, shape)
            offset += int(size)
    return outputs


def grpc_outputs(payload: bytes) -> Outputs:
    """The outputs of Triton's ModelInferResponse (raw contents, or the typed contents)."""
    response = service_pb2.ModelInferResponse.FromString(payload)
    raw = response.raw_output_contents
    outputs = {}
    for i, output in enumerate(response.outputs):
        shape = [int(d) for d in output.shape]
        if raw:
            outputs[output.name] = _from_bytes(raw[i], output.datatype, shape)
        else:
            values = list(getattr(output.contents, guard.GRPC_CONTENTS[output.datatype]))
            outputs[output.name] = _from_values(values, output.datatype, shape)
    return outputs


def _from_values(values: list, datatype: str, shape: list[int]) -> np.ndarray:
    dtype = object if datatype == "BYTES" else triton_to_np_dtype(datatype)
    return np.asarray(values, dtype=dtype).reshape(shape)


def _from_bytes(raw: bytes | memoryview, datatype: str, shape: list[int]) -> np.ndarray:
    if datatype == "BYTES":
        return deserialize_bytes_tensor(bytes(raw)).reshape(shape)
    dtype = np.uint16 if datatype == "BF16" else triton_to_np_dtype(datatype)  # BF16: compared bit for bit
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


# ---------------------------------------------------------------- the comparison


def outputs_agree(active: Outputs, candidate: Outputs, rtol: float, atol: float) -> bool:
    """Whether the candidate's outputs agree with the active version's (see the module's docstring)."""
    if active.keys() != candidate.keys():
        return False
    return all(_agree(name, active[name], candidate[name], rtol, atol) for name in active)


def _agree(name: str, active: np.ndarray, candidate: np.ndarray, rtol: float, atol: float) -> bool:
    if active.shape != candidate.shape:
        return False
    scores = active.dtype.kind == "f" and candidate.dtype.kind == "f" and active.ndim == 2 and active.shape[1] > 1
    if scores and active.shape[0] > 0:
        return bool(np.array_equal(active.argmax(axis=1), candidate.argmax(axis=1)))
    numeric = active.dtype.kind in "biuf" and candidate.dtype.kind in "biuf"
    if name == "label" or not numeric:
        return bool(np.array_equal(active, candidate))
    return bool(np.allclose(active, candidate, rtol=rtol, atol=atol, equal_nan=True))
