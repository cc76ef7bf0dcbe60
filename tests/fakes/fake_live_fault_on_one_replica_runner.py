"""Fault injection, not a model: ferry's ONNX runner that fails live inputs outside the smoke sample's range, on
one replica only (the one started with FAKE_FAULTY_REPLICA=1).

A version that passes smoke everywhere and serves one replica's live traffic well but fails another's cannot
be trained on demand; a rolling deploy's bake must catch it in the batch of that replica.
"""

import os

import numpy as np
import triton_python_backend_utils as pb_utils

from ferry.runtime.onnx_runner import TritonPythonModel as OnnxRunner

SAMPLE = np.array([[5.1, 3.5, 1.4, 0.2], [5.0, 2.0, 3.5, 1.0], [6.9, 3.2, 5.7, 2.3]], dtype=np.float32)
LOW, HIGH = SAMPLE.min(axis=0), SAMPLE.max(axis=0)


class TritonPythonModel(OnnxRunner):
    def _run(self, request):
        rows = pb_utils.get_input_tensor_by_name(request, "X").as_numpy()
        if os.environ.get("FAKE_FAULTY_REPLICA") == "1" and not ((rows >= LOW) & (rows <= HIGH)).all():
            return pb_utils.InferenceResponse(error=pb_utils.TritonError("an input outside the sample (fake fault)"))
        return super()._run(request)
