"""Fault injection, not a model: ferry's ONNX runner whose start takes 2 s.

A load long enough to kill a replica in the middle of it cannot be produced on demand with a model
that starts in 0.2 s; this one keeps the load going.
"""

import time

from ferry.runtime.onnx_runner import TritonPythonModel as OnnxRunner


class TritonPythonModel(OnnxRunner):
    def initialize(self, args: dict) -> None:
        time.sleep(2)
        super().initialize(args)
