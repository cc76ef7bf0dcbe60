"""Fault injection, not a model: ferry's ONNX runner, slowed to 0.4 s a request.

Requests that are still running when a commit retires their version cannot be produced on demand
with a model that answers in a millisecond; this one keeps them in flight long enough.
"""

import time

from ferry.runtime.onnx_runner import TritonPythonModel as OnnxRunner


class TritonPythonModel(OnnxRunner):
    def execute(self, requests: list) -> list:
        time.sleep(0.4)
        return super().execute(requests)
