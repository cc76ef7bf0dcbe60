"""Fault injection, not a model: ferry's ONNX runner that agrees with the golden sample and nowhere else.

A version that passes smoke (the sample, iris rows 0, 60 and 120, infers exactly the golden outputs) but
answers differently from the active version on other inputs cannot be trained on demand: this one shifts
the label (and rolls the probabilities with it) of every row that is not a sample row. Only shadow's
comparison with the active version's answers can catch it.
"""

import numpy as np
import triton_python_backend_utils as pb_utils

from ferry.runtime.onnx_runner import TritonPythonModel as OnnxRunner

SAMPLE = np.array([[5.1, 3.5, 1.4, 0.2], [5.0, 2.0, 3.5, 1.0], [6.9, 3.2, 5.7, 2.3]], dtype=np.float32)


class TritonPythonModel(OnnxRunner):
    def _run(self, request):
        rows = pb_utils.get_input_tensor_by_name(request, "X").as_numpy()
        results = dict(zip(self.output_names, self.session.run(self.output_names, {"X": rows}), strict=True))
        other = ~np.isclose(rows[:, None, :], SAMPLE[None, :, :]).all(axis=2).any(axis=1)
        label, probabilities = results["label"], results["probabilities"]
        label[other] = (label[other] + 1) % probabilities.shape[1]
        probabilities[other] = np.roll(probabilities[other], 1, axis=1)
        tensors = [pb_utils.Tensor(name, np.ascontiguousarray(results[name])) for name in self.output_names]
        return pb_utils.InferenceResponse(output_tensors=tensors)
