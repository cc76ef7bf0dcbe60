"""The request guard: every inference is checked against the committed version's config before Triton sees it.

Triton trusts the shape a request declares. Measured with 2.51: a KServe JSON request whose shape declares
~4·10^12 elements with 4 values of data makes it allocate 16 TB and abort (``std::bad_alloc``); the whole
server is gone until restarted. So before forwarding, on both protocols and on /predict, the gateway checks
each input: a known name, its datatype, its shape against the config (rank, fixed dimensions,
``max_batch_size``), that the data holds exactly the elements the shape declares (JSON: the number of
values, of the right kind and range; binary: ``binary_data_size`` = elements x the datatype's size; BYTES:
the 4-byte length prefixes add up), and a ceiling on the elements of one request. Shared-memory
parameters are refused: a client of the gateway has no business reading Triton's shared memory.

Every refusal is a :class:`~ferry.core.errors.BadRequest` that says what was wrong. The JSON is parsed once,
here, and the request is forwarded as the bytes the client sent. /predict and the MLflow plugin's predict come
through :mod:`.body` as KServe requests, so :func:`check_infer` is the one input check of every JSON path.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from typing import Any

from tritonclient.grpc import service_pb2

from ferry.adapters.inference.routing import Route
from ferry.core.errors import BadRequest
from ferry.core.model_config import TensorSpec, shape_fits

ELEMENTS_SETTING = "FERRY_GATEWAY_MAX_ELEMENTS"
KSERVE_HINT = 'send {"inputs": [{"name", "shape", "datatype", "data"}]} (KServe v2)'

ITEM_BYTES = {"BOOL": 1, "INT8": 1, "UINT8": 1, "INT16": 2, "UINT16": 2, "FP16": 2, "BF16": 2,
              "INT32": 4, "UINT32": 4, "FP32": 4, "INT64": 8, "UINT64": 8, "FP64": 8}  # BYTES: variable
_INTS = {f"{sign}INT{bits}": ((0, 2**bits - 1) if sign else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1))
         for sign in ("", "U") for bits in (8, 16, 32, 64)}
_FLOATS = {"FP16": 65504.0, "BF16": 3.3895313892515355e38, "FP32": 3.4028234663852886e38,
           "FP64": 1.7976931348623157e308}
_BOUNDS = {**_INTS, **{name: (-largest, largest) for name, largest in _FLOATS.items()}}
# The JSON values each datatype takes (bool is not an int here: Triton refuses true for a number).
_KINDS: dict[str, frozenset[type]] = {**{name: frozenset({int}) for name in _INTS},
                                      **{name: frozenset({int, float}) for name in _FLOATS},
                                      "BOOL": frozenset({bool}), "BYTES": frozenset({str})}
# Where gRPC's typed contents carry each datatype (FP16 and BF16 travel only as raw bytes).
GRPC_CONTENTS = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents",
                 "INT32": "int_contents", "INT64": "int64_contents", "UINT8": "uint_contents",
                 "UINT16": "uint_contents", "UINT32": "uint_contents", "UINT64": "uint64_contents",
                 "FP32": "fp32_contents", "FP64": "fp64_contents", "BYTES": "bytes_contents"}
_SHARED_MEMORY = "shared_memory_region"


def refused(message: str, hint: str = "") -> BadRequest:
    return BadRequest(message, hint)


class _NotJson(ValueError):
    pass


def _no_constant(name: str) -> float:
    raise _NotJson(f"{name} is not a JSON number (RFC 8259)")


_DECODER = json.JSONDecoder(parse_constant=_no_constant)


def parse_json(text: bytes) -> Any:
    """Strict JSON: NaN and Infinity literals are refused (RFC 8259 has no such numbers), as is deep nesting."""
    try:
        return _DECODER.decode(text.decode())
    except _NotJson as error:
        raise refused(f"the body is not valid JSON: {error}",
                      "send non-finite values in the binary tensor extension or over gRPC") from None
    except ValueError as error:  # JSONDecodeError, UnicodeDecodeError
        raise refused(f"the body is not valid JSON: {error}", "send UTF-8 JSON (RFC 8259)") from None
    except RecursionError:
        raise refused("the body nests arrays or objects too deeply to be a tensor", KSERVE_HINT) from None


@dataclass
class HttpInfer:
    """A KServe v2 HTTP inference request, parsed once: its JSON document and the binary tensors after it."""

    document: dict
    binary: memoryview  # the body after the JSON header (empty without the binary tensor extension)
    header_length: int


def parse_infer(body: bytes, header_length: bytes | None) -> HttpInfer:
    """Split and parse a request body; ``header_length`` is the Inference-Header-Content-Length header."""
    if header_length is None:
        length = len(body)
    elif header_length.isdigit() and 0 < int(header_length) <= len(body):
        length = int(header_length)
    else:
        raise refused(f"Inference-Header-Content-Length is {header_length.decode(errors='replace')!r:.40}, the "
                      f"body has {len(body)} bytes", "give the length in bytes of the JSON part, which starts the body")
    document = parse_json(body[:length] if length < len(body) else body)
    if not isinstance(document, dict) or not isinstance(document.get("inputs"), list) or not document["inputs"]:
        raise refused("the body is not a KServe v2 inference request", KSERVE_HINT)
    if not isinstance(document.get("id", ""), str):
        raise refused(f"the request's id is {type(document['id']).__name__}, not a string", "send a string id, or none")
    _check_parameters("the request", document.get("parameters", {}))
    return HttpInfer(document, memoryview(body)[length:], length)


def _check_parameters(owner: str, parameters: object) -> dict:
    """KServe parameters: an object whose values are booleans, numbers or strings; no shared memory."""
    if not isinstance(parameters, dict):
        raise refused(f"the parameters of {owner} are {type(parameters).__name__}, not an object", KSERVE_HINT)
    if _SHARED_MEMORY in parameters:
        raise _shared_memory(owner)
    for name, value in parameters.items():
        if not isinstance(value, (bool, int, float, str)):
            raise refused(f"parameter {name!r:.40} of {owner} is {type(value).__name__}",
                          "give parameters as booleans, numbers or strings")
    return parameters


def _shared_memory(owner: str) -> BadRequest:
    return refused(f"{owner} names a shared-memory region",
                   "the gateway does not serve shared memory: send the tensor's data in the request")


def check_infer(request: HttpInfer, route: Route, max_elements: int) -> None:
    """Refuse (400, with the reason) a KServe HTTP request Triton should not be sent."""
    seen: set[str] = set()
    offset, total = 0, 0
    for tensor in request.document["inputs"]:
        if not isinstance(tensor, dict):
            raise refused(f"an input is {type(tensor).__name__}, not an object", KSERVE_HINT)
        spec = _spec(tensor.get("name"), tensor.get("datatype"), route, seen)
        elements = _elements(spec, tensor.get("shape"), route)
        total = _within(total + elements, max_elements)
        size = _json_data(spec, tensor, elements)
        if size is not None:
            _check_blob(spec, elements, request.binary, offset, size)
            offset += size
    if offset != len(request.binary):
        raise refused(f"the inputs' binary_data_size add up to {offset} bytes, the body carries {len(request.binary)} "
                      "after the JSON header", "give each binary input's exact size, in the order of the inputs")
    _check_outputs(request.document.get("outputs", []), route)


def _json_data(spec: TensorSpec, tensor: dict, elements: int) -> int | None:
    """Check the input's JSON ``data``, or return its ``binary_data_size`` for the caller to check."""
    size = _check_parameters(f"input '{spec.name}'", tensor.get("parameters", {})).get("binary_data_size")
    if ("data" in tensor) == (size is not None):
        raise refused(f"input '{spec.name}' must carry either 'data' or parameters.binary_data_size, and not both",
                      KSERVE_HINT)
    if size is None:
        _check_values(spec, tensor["data"], elements)
    elif type(size) is not int or size < 0:
        raise refused(f"input '{spec.name}' has binary_data_size {size!r:.40}", "give a size in bytes")
    return size


def _spec(name: object, datatype: object, route: Route, seen: set[str]) -> TensorSpec:
    if not isinstance(name, str) or (spec := route.inputs.get(name)) is None:
        raise refused(f"model '{route.model}' has no input {name!r:.80}", f"its inputs are {sorted(route.inputs)}")
    if name in seen:
        raise refused(f"input '{name}' is given twice", "give each input once")
    seen.add(name)
    if datatype != spec.datatype:
        raise refused(f"input '{name}' is {datatype!r:.40}, the model takes {spec.datatype}",
                      f"send '{name}' as {spec.datatype}")
    return spec


def _elements(spec: TensorSpec, shape: object, route: Route) -> int:
    """The elements a shape declares, once it fits the config (rank, fixed dimensions, max_batch_size)."""
    if not shape_fits(shape, spec.dims):
        if not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape):
            raise refused(f"input '{spec.name}' has shape {shape!r:.100}", "give the shape as a list of non-negative "
                          f"integers that fits {list(spec.dims)} (-1: any size)")
        raise refused(f"input '{spec.name}' has shape {shape!r:.100}, the model takes {list(spec.dims)}",
                      "-1 is any size; every other dimension must be as given")
    if route.max_batch_size and shape[0] > route.max_batch_size:
        raise refused(f"input '{spec.name}' has a batch of {shape[0]}, the model takes at most "
                      f"{route.max_batch_size}", "split the request")
    return math.prod(shape)


def _within(total: int, max_elements: int) -> int:
    if total > max_elements:
        raise refused(f"the request declares {total} elements, over the gateway's limit of {max_elements}",
                      f"split the request, or raise {ELEMENTS_SETTING}")
    return total


def _check_outputs(outputs: object, route: Route) -> None:
    if not isinstance(outputs, list):
        raise refused(f"'outputs' is {type(outputs).__name__}, not a list", 'send [{"name": "<output>"}] or nothing')
    for output in outputs:
        name = output.get("name") if isinstance(output, dict) else None
        if not isinstance(name, str) or name not in route.outputs:
            raise refused(f"model '{route.model}' has no output {name!r:.80}",
                          f"its outputs are {sorted(route.outputs)}")
        _check_parameters(f"output '{name}'", output.get("parameters", {}))


def _check_values(spec: TensorSpec, data: object, elements: int) -> None:
    """The JSON ``data`` holds ``elements`` values, flat or nested no deeper than the shape, of the right kind."""
    if not isinstance(data, list):
        raise refused(f"input '{spec.name}' has data {type(data).__name__}, not a list", KSERVE_HINT)
    leaves: list[list] = []
    _collect(data, max(len(spec.dims), 1), leaves, spec.name)
    count = sum(map(len, leaves))
    if count != elements:
        raise refused(f"input '{spec.name}' has {count} values, its shape holds {elements}",
                      "make the shape and the data agree")
    for values in leaves:
        _check_kind(spec, values)


def _collect(data: list, depth: int, leaves: list[list], name: str) -> None:
    if not data or type(data[0]) is not list:
        leaves.append(data)
        return
    if depth <= 1:
        raise refused(f"input '{name}' has data nested deeper than its shape",
                      "send the values flat, in row-major order")
    for item in data:
        if type(item) is not list:
            raise refused(f"input '{name}' mixes lists and values at one level", "send the values flat")
        _collect(item, depth - 1, leaves, name)


def _check_kind(spec: TensorSpec, values: list) -> None:
    kinds = _KINDS.get(spec.datatype, frozenset())
    if not kinds.issuperset(map(type, values)):
        value = next(v for v in values if type(v) not in kinds)
        raise refused(f"input '{spec.name}' is {spec.datatype}, and holds {value!r:.40}",
                      f"send {spec.datatype} values ({'/'.join(sorted(k.__name__ for k in kinds))})")
    bounds = _BOUNDS.get(spec.datatype)
    if bounds is not None and values and (min(values) < bounds[0] or max(values) > bounds[1]):
        raise refused(f"input '{spec.name}' holds a value outside the range of {spec.datatype}",
                      f"send values from {bounds[0]} to {bounds[1]}")


def _check_blob(spec: TensorSpec, elements: int, blob: bytes | memoryview, offset: int, size: int) -> None:
    """Binary data: the size the shape implies, or for BYTES length prefixes that add up to ``size``."""
    if offset + size > len(blob):
        raise refused(f"input '{spec.name}' declares {size} bytes, the body has {len(blob) - offset} left",
                      "give each binary input's exact size")
    item = ITEM_BYTES.get(spec.datatype)
    if item is not None and size != elements * item:
        raise refused(f"input '{spec.name}' has {size} bytes, its shape holds {elements} {spec.datatype} "
                      f"= {elements * item} bytes", "make the shape and the data agree")
    if item is None and not _strings_fit(blob, offset, size, elements):
        raise refused(f"input '{spec.name}' is BYTES: its {size} bytes are not {elements} length-prefixed strings",
                      "prefix each string with its length (4 bytes, little-endian)")


def _strings_fit(blob: bytes | memoryview, offset: int, size: int, elements: int) -> bool:
    """Whether ``elements`` strings, each a 4-byte little-endian length then the bytes, fill blob[offset:+size]."""
    end = offset + size
    if size < 4 * elements:
        return False
    for _ in range(elements):
        if offset + 4 > end:
            return False
        offset += 4 + struct.unpack_from("<I", blob, offset)[0]
        if offset > end:
            return False
    return offset == end


# ---------------------------------------------------------------- gRPC


def check_grpc_infer(request: service_pb2.ModelInferRequest, route: Route, max_elements: int) -> None:
    """Refuse (400: INVALID_ARGUMENT) a gRPC ModelInferRequest Triton should not be sent."""
    raw = request.raw_input_contents
    typed = next((tensor.name for tensor in request.inputs if tensor.HasField("contents")), None) if raw else None
    if typed is not None:  # Triton's own words, which its clients check
        raise refused(f"contents field must not be specified when using raw_input_contents for '{typed[:100]}' for "
                      f"model '{route.model}'", "give every input in raw_input_contents, or every one in contents")
    if raw and len(raw) != len(request.inputs):
        raise refused(f"the request has {len(request.inputs)} inputs and {len(raw)} raw_input_contents",
                      "give one raw_input_contents per input, in order, or use the typed contents")
    seen: set[str] = set()
    total = 0
    for i, tensor in enumerate(request.inputs):
        spec = _spec(tensor.name, tensor.datatype, route, seen)
        if _SHARED_MEMORY in tensor.parameters:
            raise _shared_memory(f"input '{spec.name}'")
        elements = _elements(spec, list(tensor.shape), route)
        total = _within(total + elements, max_elements)
        if raw:
            blob = raw[i]
            _check_blob(spec, elements, blob, 0, len(blob))
        else:
            _check_contents(spec, tensor.contents, elements)
    for output in request.outputs:
        if output.name not in route.outputs:
            raise refused(f"model '{route.model}' has no output {output.name!r:.80}",
                          f"its outputs are {sorted(route.outputs)}")
        if _SHARED_MEMORY in output.parameters:
            raise _shared_memory(f"output '{output.name}'")


def _check_contents(spec: TensorSpec, contents: service_pb2.InferTensorContents, elements: int) -> None:
    field = GRPC_CONTENTS.get(spec.datatype)
    if field is None:
        raise refused(f"input '{spec.name}' is {spec.datatype}, which gRPC carries only in raw_input_contents",
                      "send it in raw_input_contents")
    count = len(getattr(contents, field))
    if count != elements:
        raise refused(f"input '{spec.name}' has {count} values in contents.{field}, its shape holds {elements}",
                      "make the shape and the data agree")
