"""Triton Python-backend model that runs ``model.onnx`` with onnxruntime.

ferry copies this file as ``model.py`` into every version directory it stages
for the ``python`` runtime. It runs inside Triton's Python stub, so it may only
import what the stub's environment has (numpy, onnxruntime, the backend utils).

BYTES tensors: Triton hands a Python model object arrays of bytes, and onnxruntime's string tensors hold
text (str, UTF-8 inside). Each element of a string input is decoded as UTF-8 (embedded NULs kept), and each
element of a string output encoded back, so a UTF-8 byte string comes back byte for byte. An element that is
not UTF-8 cannot reach onnxruntime unchanged: the request is refused with an error that names it, rather than
answered for different bytes. Which tensors are strings is decided once, in ``initialize``.
"""

import json
import os

import numpy as np
import onnxruntime as ort
import triton_python_backend_utils as pb_utils


def _expected_dims(config: dict) -> dict:
    return {out["name"]: [int(d) for d in out["dims"]] for out in config.get("output", [])}


STRING = "tensor(string)"  # onnxruntime's type name of a string tensor


def _objects(items: list, shape: tuple) -> np.ndarray:
    out = np.empty(len(items), dtype=np.object_)
    out[:] = items
    return out.reshape(shape)


def _as_text(name: str, value: np.ndarray) -> np.ndarray:
    """Triton's BYTES as onnxruntime's strings; ValueError naming the first element that is not UTF-8."""
    items = []
    for index, item in enumerate(value.ravel()):
        try:
            items.append(item.decode("utf-8"))
        except UnicodeDecodeError as error:
            where = [int(i) for i in np.unravel_index(index, value.shape)]
            raise ValueError(f"input '{name}' at {where} is not UTF-8 ({item!r:.40}: {error.reason}); ferry's "
                             "python runtime gives onnxruntime string tensors as text: send UTF-8 bytes") from None
    return _objects(items, value.shape)


def _as_bytes(value: np.ndarray) -> np.ndarray:
    return _objects([item.encode("utf-8") for item in value.ravel()], value.shape)


def _shape_matches(shape: tuple, dims: list) -> bool:
    return len(shape) == len(dims) and all(d == -1 or d == s for s, d in zip(shape, dims, strict=False))


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        path = os.path.join(args["model_repository"], args["model_version"], "model.onnx")
        options = ort.SessionOptions()
        threads = config.get("parameters", {}).get("intra_op_threads", {}).get("string_value", "1")
        options.intra_op_num_threads = int(threads)
        self.session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]
        self.text_inputs = frozenset(i.name for i in self.session.get_inputs() if i.type == STRING)
        self.text_outputs = frozenset(o.name for o in self.session.get_outputs() if o.type == STRING)
        self.output_dims = _expected_dims(config)
        if config.get("max_batch_size", 0) > 0:
            self.output_dims = {name: [-1, *dims] for name, dims in self.output_dims.items()}

    def execute(self, requests: list) -> list:
        return [self._run(request) for request in requests]

    def _run(self, request):
        feeds = {name: pb_utils.get_input_tensor_by_name(request, name).as_numpy() for name in self.input_names}
        if self.text_inputs:
            try:
                for name in self.text_inputs:
                    feeds[name] = _as_text(name, feeds[name])
            except ValueError as error:
                return pb_utils.InferenceResponse(error=pb_utils.TritonError(str(error)))
        try:
            results = self.session.run(self.output_names, feeds)
        except Exception as error:  # onnxruntime raises its own exception types
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(f"onnxruntime: {error}"))
        tensors = []
        for name, value in zip(self.output_names, results, strict=False):
            dims = self.output_dims.get(name)
            # Triton does not check a Python model's output shape: refuse to answer with the wrong shape.
            if dims is not None and not _shape_matches(value.shape, dims):
                message = f"output '{name}' has shape {list(value.shape)}, the model config says {dims}"
                return pb_utils.InferenceResponse(error=pb_utils.TritonError(message))
            if name in self.text_outputs:
                value = _as_bytes(value)
            tensors.append(pb_utils.Tensor(name, np.ascontiguousarray(value)))
        return pb_utils.InferenceResponse(output_tensors=tensors)
