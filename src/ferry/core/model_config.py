"""The model's signature (read from ONNX) and its one Triton ``config.pbtxt``.

The config is kept as Triton's own protobuf message so that the file on disk and
the JSON config override sent with every load are rendered from the same object.
Triton restarts an already-loaded version when a load brings a config that differs
in more than its version policy, so ferry always renders configs the same way.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import mmap
import sys
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, TypeGuard

from ferry.core.errors import NotOnnx

if TYPE_CHECKING:
    from tritonclient.grpc import model_config_pb2 as model_config_pb2

_PB2 = "tritonclient.grpc.model_config_pb2"
_PB2_LOADING = threading.Lock()  # replicas' threads may read a config at once: one loads, the others wait


def _load_model_config_pb2() -> ModuleType:
    """Triton's generated ``model_config_pb2``, loaded from its file under its own name.

    Importing it the usual way runs ``tritonclient.grpc``'s ``__init__`` first, which imports gRPC and numpy
    (over 0.1 s) that a config has no use for. Registered in sys.modules under its own name, it is the very
    module ``tritonclient.grpc`` picks up if that is imported later: one descriptor, one ModelConfig class.
    """
    module = sys.modules.get(_PB2)
    if module is None:
        with _PB2_LOADING:
            module = sys.modules.get(_PB2) or _exec_model_config_pb2()
    return module


def _exec_model_config_pb2() -> ModuleType:
    package = importlib.util.find_spec("tritonclient")
    if package is None or not package.submodule_search_locations:
        raise ModuleNotFoundError(f"no module named '{_PB2}': install tritonclient[grpc]", name=_PB2)
    path = Path(package.submodule_search_locations[0]) / "grpc" / "model_config_pb2.py"
    spec = importlib.util.spec_from_file_location(_PB2, path)
    if spec is None or spec.loader is None:
        raise ModuleNotFoundError(f"no module named '{_PB2}' at {path}: install tritonclient[grpc]", name=_PB2)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return sys.modules.setdefault(_PB2, module)  # registered once whole: no thread sees half a module


class _ModelConfigPb2:
    """Stands for ``model_config_pb2`` until an attribute of it is first read: a command that reads no config
    (``ferry status``, ``ferry history``) does not load protobuf's descriptors."""

    def __getattr__(self, name: str) -> Any:
        return getattr(_load_model_config_pb2(), name)


if not TYPE_CHECKING:
    model_config_pb2 = _ModelConfigPb2()

# ONNX element type (TensorProto.DataType, fixed by onnx.proto) -> Triton API datatype. BYTES is Triton's name
# for strings. onnx itself (150 ms to import) is imported only where a signature is read, not by every command.
_ONNX_TO_TRITON = {
    1: "FP32", 11: "FP64", 10: "FP16", 3: "INT8", 5: "INT16", 6: "INT32", 7: "INT64",
    2: "UINT8", 4: "UINT16", 12: "UINT32", 13: "UINT64", 9: "BOOL", 8: "BYTES",
}


def config_type(datatype: str) -> str:
    return "TYPE_STRING" if datatype == "BYTES" else f"TYPE_{datatype}"


def api_datatype(config_data_type: int) -> str:
    name = model_config_pb2.DataType.Name(config_data_type).removeprefix("TYPE_")
    return "BYTES" if name == "STRING" else name


@dataclass(frozen=True)
class TensorSpec:
    name: str
    datatype: str  # Triton API datatype: FP32, INT64, ...
    dims: tuple[int, ...]  # -1 for a dimension that is not fixed

    def describe(self) -> str:
        return f"{self.name} {self.datatype}{list(self.dims)}"


@dataclass(frozen=True)
class Signature:
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]


def _tensor_spec(value: Any) -> TensorSpec:  # an onnx.ValueInfoProto
    tensor = value.type.tensor_type
    if tensor.elem_type not in _ONNX_TO_TRITON:
        raise ValueError(f"tensor '{value.name}' has an ONNX type ({tensor.elem_type}) Triton cannot carry")
    dims = tuple(d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim)
    return TensorSpec(value.name, _ONNX_TO_TRITON[tensor.elem_type], dims)


def _signature(inputs: list[Any], outputs: list[Any], initializers: set[str]) -> Signature:
    return Signature(
        tuple(_tensor_spec(v) for v in inputs if v.name not in initializers),
        tuple(_tensor_spec(v) for v in outputs),
    )


def onnx_signature(model: Any) -> Signature:  # an onnx.ModelProto
    return _signature(list(model.graph.input), list(model.graph.output), {i.name for i in model.graph.initializer})


# Protobuf field numbers in onnx.proto.
_MODEL_GRAPH, _GRAPH_INITIALIZER, _GRAPH_INPUT, _GRAPH_OUTPUT, _TENSOR_NAME = 7, 5, 11, 12, 8


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(buf: memoryview, start: int, end: int) -> Iterator[tuple[int, int, int]]:
    """(field number, value start, value end) of the length-delimited fields in buf[start:end]; others skipped."""
    pos = start
    while pos < end:
        key, pos = _varint(buf, pos)
        wire = key & 7
        if wire == 0:
            pos = _varint(buf, pos)[1]
        elif wire in (1, 5):
            pos += 8 if wire == 1 else 4
        elif wire == 2:
            length, pos = _varint(buf, pos)
            yield key >> 3, pos, pos + length
            pos += length
        else:
            raise ValueError(f"unexpected protobuf wire type {wire}")
    if pos != end:
        raise ValueError("truncated protobuf message")


def read_onnx_signature(path: Path) -> Signature:
    """The declared inputs and outputs of an ONNX file, read without parsing its nodes and weights.

    A full parse in Python costs seconds and gigabytes on a large model; this reads only
    ``graph.input``, ``graph.output`` and the initializers' names. Raises NotOnnx with the reason.
    """
    from google.protobuf.message import DecodeError

    try:
        return _read_onnx_signature(path)
    except (ValueError, IndexError, DecodeError, UnicodeDecodeError) as error:
        raise NotOnnx(f"{path.name} is not a valid ONNX model: {error or type(error).__name__}",
                      "the registered artifact is damaged: log the model again") from None


def _read_onnx_signature(path: Path) -> Signature:
    import onnx

    if path.stat().st_size == 0:
        raise ValueError("the file is empty")
    with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        buf = memoryview(mapped)
        try:
            graph = [(s, e) for field, s, e in _fields(buf, 0, len(buf)) if field == _MODEL_GRAPH]
            if not graph:
                raise ValueError("it has no graph")
            inputs: list[Any] = []
            outputs: list[Any] = []
            initializers: set[str] = set()
            for field, s, e in _fields(buf, *graph[-1]):
                if field == _GRAPH_INPUT:
                    inputs.append(onnx.ValueInfoProto.FromString(bytes(buf[s:e])))
                elif field == _GRAPH_OUTPUT:
                    outputs.append(onnx.ValueInfoProto.FromString(bytes(buf[s:e])))
                elif field == _GRAPH_INITIALIZER:
                    initializers.update(bytes(buf[a:b]).decode() for f, a, b in _fields(buf, s, e) if f == _TENSOR_NAME)
            if not outputs:
                raise ValueError("its graph declares no outputs")
            return _signature(inputs, outputs, initializers)
        finally:
            buf.release()


def config_signature(config: model_config_pb2.ModelConfig) -> Signature:
    """The full tensor shapes a config describes: with batching on, Triton's dims leave out the batch dimension."""
    batch = (-1,) if config.max_batch_size > 0 else ()

    def specs(tensors: Any) -> tuple[TensorSpec, ...]:
        return tuple(TensorSpec(t.name, api_datatype(t.data_type), (*batch, *t.dims)) for t in tensors)

    return Signature(specs(config.input), specs(config.output))


def shape_fits(shape: object, dims: tuple[int, ...]) -> TypeGuard[Sequence[int]]:
    """Whether a concrete shape fits the dims a config declares (-1: any size). The one shape rule of ferry."""
    return (isinstance(shape, (list, tuple)) and len(shape) == len(dims)
            and all(type(s) is int and s >= 0 and d in (-1, s) for d, s in zip(dims, shape, strict=False)))


def _dims_compatible(declared: tuple[int, ...], configured: tuple[int, ...]) -> bool:
    """Two declarations agree where both are fixed (either may leave a dimension free)."""
    return len(declared) == len(configured) and all(d == c or -1 in (d, c) for d, c in zip(declared, configured))


def _paired(first: Signature, second: Signature) -> Iterator[tuple[str, TensorSpec | None, TensorSpec | None]]:
    """Each tensor of either signature by name, as ("input" or "output", first's, second's); None where absent."""
    for kind, ours, theirs in (("input", first.inputs, second.inputs), ("output", first.outputs, second.outputs)):
        mine = {t.name: t for t in ours}
        for other in theirs:
            yield kind, mine.pop(other.name, None), other
        for left in mine.values():
            yield kind, left, None


def signature_mismatches(declared: Signature, configured: Signature) -> list[str]:
    """What in an ONNX model's declared signature contradicts the model's config (empty when they agree)."""
    problems = []
    for kind, got, want in _paired(declared, configured):
        if want is None:
            problems.append(f"{kind} '{got.name if got else ''}' is not in the config")
        elif got is None:
            problems.append(f"{kind} '{want.name}' is missing")
        elif got.datatype != want.datatype or not _dims_compatible(got.dims, want.dims):
            problems.append(f"{kind} is {got.describe()}, the config says {want.describe()}")
    return problems


def build_config(model: str, signature: Signature, runtime: str) -> model_config_pb2.ModelConfig:
    def tensors(specs: tuple[TensorSpec, ...]) -> list[dict[str, Any]]:
        return [{"name": t.name, "data_type": config_type(t.datatype), "dims": list(t.dims)} for t in specs]

    fields: dict[str, Any] = {
        "name": model,
        "max_batch_size": 0,
        "input": tensors(signature.inputs),
        "output": tensors(signature.outputs),
        "instance_group": [{"kind": "KIND_CPU", "count": 1}],
    }
    if runtime == "python":
        fields["backend"] = "python"
    else:
        fields["platform"] = "onnxruntime_onnx"
        fields["default_model_filename"] = "model.onnx"
    from google.protobuf import json_format

    return json_format.ParseDict(fields, model_config_pb2.ModelConfig())


def with_versions(config: model_config_pb2.ModelConfig, versions: list[int]) -> model_config_pb2.ModelConfig:
    pinned = model_config_pb2.ModelConfig()
    pinned.CopyFrom(config)
    pinned.version_policy.specific.versions[:] = sorted(set(versions))
    return pinned


def to_pbtxt(config: model_config_pb2.ModelConfig) -> str:
    from google.protobuf import text_format

    return str(text_format.MessageToString(config))


def from_pbtxt(text: str) -> model_config_pb2.ModelConfig:
    from google.protobuf import text_format

    return text_format.Parse(text, model_config_pb2.ModelConfig())


def to_override_json(config: model_config_pb2.ModelConfig) -> str:
    """The config as the JSON body of a load request. Triton replaces the whole config with it."""
    from google.protobuf import json_format

    return json.dumps(json_format.MessageToDict(config, preserving_proto_field_name=True))


def config_digest(text: str) -> str:
    """The sha256 of a config as a version runs under it: its canonical text, without version policy or name
    (what the version brings, not how ferry pins it)."""
    config = from_pbtxt(text)
    config.ClearField("name")
    config.ClearField("version_policy")
    return hashlib.sha256(to_pbtxt(config).encode()).hexdigest()


def signature_changes(active: model_config_pb2.ModelConfig, candidate: model_config_pb2.ModelConfig) -> list[str]:
    """What in the candidate's config would break the active version's clients: an input or output added,
    removed, or of another datatype or shape (batch dimension included), or a max_batch_size that shrinks."""
    changes = []
    for kind, new, old in _paired(config_signature(candidate), config_signature(active)):
        if old is None and new is not None:
            changes.append(f"{kind} {new.describe()} is new")
        elif new is None and old is not None:
            changes.append(f"{kind} '{old.name}' is gone")
        elif new != old and new is not None and old is not None:
            changes.append(f"{kind} {old.describe()} becomes {new.describe()}")
    if 0 < candidate.max_batch_size < active.max_batch_size:
        changes.append(f"max_batch_size shrinks from {active.max_batch_size} to {candidate.max_batch_size}")
    return changes
