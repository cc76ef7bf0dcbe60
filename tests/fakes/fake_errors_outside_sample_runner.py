"""Fault injection, not a model: ferry's ONNX runner that fails every input outside the smoke sample's range.

A version that passes smoke (the sample, iris rows 0, 60 and 120, infers right) but fails on a share of
live inputs cannot be trained on demand; this one answers an error for any row with a feature outside the
sample's range, and the real answer for the rest. The bake's gate has to catch it on live traffic.
"""

import numpy as np
import triton_python_backend_utils as pb_utils

from ferry.runtime.onnx_runner import TritonPythonModel as OnnxRunner

SAMPLE = np.array([[5.1, 3.5, 1.4, 0.2], [5.0, 2.0, 3.5, 1.0], [6.9, 3.2, 5.7, 2.3]], dtype=np.float32)
LOW, HIGH = SAMPLE.min(axis=0), SAMPLE.max(axis=0)


class TritonPythonModel(OnnxRunner):
    def _run(self, request):
        rows = pb_utils.get_input_tensor_by_name(request, "X").as_numpy()
        if not ((rows >= LOW) & (rows <= HIGH)).all():
            return pb_utils.InferenceResponse(error=pb_utils.TritonError("an input outside the sample (fake fault)"))
        return super()._run(request)
