"""The smoke sample (``smoke.json``): a sample input and the golden outputs recorded at training time.

Tensors use the KServe v2 JSON form: {"name": {"datatype": "FP32", "shape": [1, 4], "data": [...]}}.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tritonclient.utils import np_to_triton_dtype, triton_to_np_dtype

from ferry.core.errors import InvalidInput
from ferry.core.model_config import Signature, shape_fits

SMOKE_FILE = "smoke.json"


@dataclass
class SmokeSample:
    inputs: dict[str, np.ndarray]
    golden: dict[str, np.ndarray] | None  # None: no golden outputs were recorded
    rtol: float | None = None
    atol: float | None = None


def _to_json(tensors: dict[str, np.ndarray]) -> dict:
    return {
        name: {"datatype": np_to_triton_dtype(value.dtype), "shape": list(value.shape), "data": value.ravel().tolist()}
        for name, value in tensors.items()
    }


def _from_json(tensors: dict) -> dict[str, np.ndarray]:
    return {
        name: np.asarray(t["data"], dtype=triton_to_np_dtype(t["datatype"])).reshape(t["shape"])
        for name, t in tensors.items()
    }


def dump_sample(sample: SmokeSample) -> str:
    body: dict = {"inputs": _to_json(sample.inputs)}
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
    inputs = {
        t.name: np.zeros([d if d > 0 else 1 for d in t.dims], dtype=triton_to_np_dtype(t.datatype))
        for t in signature.inputs
    }
    return SmokeSample(inputs, None)


def output_problems(
    signature: Signature, outputs: dict[str, np.ndarray], golden: dict[str, np.ndarray] | None, rtol: float, atol: float
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


def _golden_problems(name: str, value: np.ndarray, want: np.ndarray, rtol: float, atol: float) -> list[str]:
    if value.shape != want.shape:
        return [f"output '{name}' has shape {list(value.shape)}, the golden output has {list(want.shape)}"]
    if value.dtype.kind in "fc":
        if np.allclose(value, want, rtol=rtol, atol=atol, equal_nan=True):
            return []
        worst = float(np.nanmax(np.abs(value.astype(np.float64) - want.astype(np.float64))))
        return [f"output '{name}' differs from the golden output by up to {worst:.3g} (rtol {rtol:g}, atol {atol:g})"]
    wrong = int(np.count_nonzero(value != want))
    return [f"output '{name}' differs from the golden output in {wrong} of {value.size} values"] if wrong else []
