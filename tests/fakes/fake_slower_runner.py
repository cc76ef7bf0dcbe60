"""Fault injection, not a model: ferry's ONNX runner, slowed by 10 ms a request.

A version that infers right but several times slower than the active one under load (a bigger graph, a
missing optimisation) cannot be trained on demand; this one answers correctly, 10 ms late (the iris model
answers in about 1-3 ms through the gateway). Only the bake's latency criterion can catch it.
"""

import time

from ferry.runtime.onnx_runner import TritonPythonModel as OnnxRunner


class TritonPythonModel(OnnxRunner):
    def execute(self, requests: list) -> list:
        time.sleep(0.010)
        return super().execute(requests)
