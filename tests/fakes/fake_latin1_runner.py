"""Fault injection, not a model: a backend whose string answers are not UTF-8.

ferry's ONNX runner can only answer UTF-8 (onnxruntime's strings are text), but a backend that passes bytes
through can answer anything. This one echoes each element of INPUT0 as OUTPUT0 re-encoded in Latin-1: ASCII
comes back unchanged (the smoke sample passes), "caf\u00e9" comes back as b"caf\xe9", which is not UTF-8.
"""

import numpy as np
import triton_python_backend_utils as pb_utils

from ferry.runtime.onnx_runner import TritonPythonModel as OnnxRunner


class TritonPythonModel(OnnxRunner):
    def _run(self, request):
        texts = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
        out = np.empty(texts.size, dtype=np.object_)
        out[:] = [item.decode("utf-8").encode("latin-1") for item in texts.ravel()]
        return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("OUTPUT0", out.reshape(texts.shape))])
