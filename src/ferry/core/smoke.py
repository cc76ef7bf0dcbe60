"""The smoke sample (``smoke.json``): a sample input and the golden outputs recorded at training time.

Tensors use the KServe v2 JSON form: {"name": {"datatype": "FP32", "shape": [1, 4], "data": [...]}}.
A BYTES element is a JSON string when it is UTF-8 text (as in KServe v2; NUL included, as ``\\u0000``) and
``{"b64": "<base64>"}`` when it is not, so that any byte string survives the file. Both read back as bytes.
"""

from __future__ import annotations

import base64
import binascii
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray
from tritonclient.utils import np_to_triton_dtype, triton_to_np_dtype

from ferry.core.errors import InvalidInput
from ferry.core.model_config import Signature, shape_fits

Array = NDArray[Any]  # a tensor of any element type
SMOKE_FILE = "smoke.json"
B64 = "b64"  # the key of a BYTES element that is not UTF-8 text: {"b64": "<base64 of the bytes>"}


@dataclass
class SmokeSample:
    inputs: dict[str, Array]
    golden: dict[str, Array] | None  # None: no golden outputs were recorded
    rtol: float | None = None
    atol: float | None = None


def is_bytes(value: Array) -> bool:
    """A BYTES tensor: object arrays (of bytes or str, as Triton's clients build them), numpy bytes or str."""
    return value.dtype.kind in "OSU"


def as_bytes(value: Array) -> Array:
    """A BYTES tensor as an object array of bytes (what Triton's clients answer); str items as UTF-8."""
    items = [item if isinstance(item, bytes) else _text_bytes(item) for item in value.ravel().tolist()]
    out = np.empty(len(items), dtype=np.object_)
    out[:] = items
    return out.reshape(value.shape)


def _text_bytes(item: object) -> bytes:
    if not isinstance(item, str):
        raise ValueError(f"a BYTES tensor holds {type(item).__name__} {item!r:.40}, not bytes or str")
    return item.encode("utf-8")  # a lone surrogate raises: it is not text


def bytes_to_json(item: bytes) -> str | dict[str, str]:
    """One BYTES element as JSON: the text when it is UTF-8, else {"b64": ...}."""
    try:
        return item.decode("utf-8")
    except UnicodeDecodeError:
        return {B64: base64.b64encode(item).decode("ascii")}


def bytes_from_json(item: object) -> bytes:
    if isinstance(item, str):
        return item.encode("utf-8")
    if isinstance(item, dict) and set(item) == {B64} and isinstance(item[B64], str):
        try:
            return base64.b64decode(item[B64], validate=True)
        except binascii.Error as error:
            raise ValueError(f"{item[B64]!r:.40} is not base64: {error}") from None
    raise ValueError(f'a BYTES element is a string or {{"{B64}": "<base64>"}}, not {item!r:.40}')


def _tensor_json(value: Array) -> dict[str, Any]:
    if is_bytes(value):
        data = [bytes_to_json(item) for item in as_bytes(value).ravel()]
        return {"datatype": "BYTES", "shape": list(value.shape), "data": data}
    return {"datatype": np_to_triton_dtype(value.dtype), "shape": list(value.shape), "data": value.ravel().tolist()}


def _tensor_from_json(t: dict[str, Any]) -> Array:
    if t["datatype"] != "BYTES":
        return np.asarray(t["data"], dtype=triton_to_np_dtype(t["datatype"])).reshape(t["shape"])
    if not isinstance(t["data"], list):
        raise TypeError(f"BYTES data is a list, not {type(t['data']).__name__}")
    items = [bytes_from_json(item) for item in t["data"]]
    out = np.empty(len(items), dtype=np.object_)
    out[:] = items
    return out.reshape(t["shape"])


def _to_json(tensors: dict[str, Array]) -> dict[str, Any]:
    return {name: _tensor_json(np.asarray(value)) for name, value in tensors.items()}


def _from_json(tensors: dict[str, Any]) -> dict[str, Array]:
    return {name: _tensor_from_json(t) for name, t in tensors.items()}


def dump_sample(sample: SmokeSample) -> str:
    body: dict[str, Any] = {"inputs": _to_json(sample.inputs)}
    if sample.golden is not None:
        body["outputs"] = _to_json(sample.golden)
    body.update({k: v for k, v in (("rtol", sample.rtol), ("atol", sample.atol)) if v is not None})
    return json.dumps(body, indent=1)


def load_sample(path: Path) -> SmokeSample:
    try:
        body = json.loads(path.read_text())
        golden = _from_json(body["outputs"]) if "outputs" in body else None
        return SmokeSample(_from_json(body["inputs"]), golden, body.get("rtol"), body.get("atol"))
    except (KeyError, TypeError, ValueError) as error:
        raise InvalidInput(f"{path.name} is not a valid smoke sample: {type(error).__name__}: {error}",
                           "log the smoke sample again with ferry.publish.log_onnx_model") from None


def synthetic_sample(signature: Signature) -> SmokeSample:
    """Zeros of the configured shapes (a free dimension becomes 1), for a version without a recorded sample."""
    inputs = {t.name: _zeros([d if d > 0 else 1 for d in t.dims], t.datatype) for t in signature.inputs}
    return SmokeSample(inputs, None)


def _zeros(shape: list[int], datatype: str) -> Array:
    if datatype == "BYTES":  # the text "0": the zero a string model most likely parses (Cast to a number)
        return np.full(shape, b"0", dtype=np.object_)
    return np.zeros(shape, dtype=triton_to_np_dtype(datatype))


def output_problems(
    signature: Signature, outputs: dict[str, Array], golden: dict[str, Array] | None, rtol: float, atol: float
) -> list[str]:
    """Everything wrong with an inference's outputs: missing, dtype, shape, and distance from golden."""
    problems = []
    for spec in signature.outputs:
        value = outputs.get(spec.name)
        if value is None:
            problems.append(f"output '{spec.name}' is missing from the response")
            continue
        if np_to_triton_dtype(value.dtype) != spec.datatype:
            got = np_to_triton_dtype(value.dtype)
            problems.append(f"output '{spec.name}' is {got}, the config says {spec.datatype}")
        if not shape_fits(value.shape, spec.dims):
            problems.append(f"output '{spec.name}' has shape {list(value.shape)}, the config says {list(spec.dims)}")
        elif golden is not None and spec.name in golden:
            problems += _golden_problems(spec.name, value, golden[spec.name], rtol, atol)
    return problems


def _golden_problems(name: str, value: Array, want: Array, rtol: float, atol: float) -> list[str]:
    if value.shape != want.shape:
        return [f"output '{name}' has shape {list(value.shape)}, the golden output has {list(want.shape)}"]
    if is_bytes(value) or is_bytes(want):
        try:
            value, want = as_bytes(value), as_bytes(want)
        except ValueError as error:
            return [f"output '{name}' cannot be compared with the golden output: {error}"]
    if value.dtype.kind in "fc":
        if np.allclose(value, want, rtol=rtol, atol=atol, equal_nan=True):
            return []
        worst = float(np.nanmax(np.abs(value.astype(np.float64) - want.astype(np.float64))))
        return [f"output '{name}' differs from the golden output by up to {worst:.3g} (rtol {rtol:g}, atol {atol:g})"]
    differs = value != want
    wrong = int(np.count_nonzero(differs))
    if not wrong:
        return []
    first = tuple(int(i) for i in np.argwhere(differs)[0])
    return [f"output '{name}' differs from the golden output in {wrong} of {value.size} values "
            f"(first at {list(first)}: {value[first]!r:.60}, golden {want[first]!r:.60})"]
