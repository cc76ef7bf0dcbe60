"""Fault injection, not a model: ferry's ONNX runner that fails every inference on one replica only.

A replica whose hardware or libraries make a version fail while the others serve it cannot be produced
on demand; the replica started with FAKE_FAULTY_REPLICA=1 in its environment (its backend stubs inherit
it) fails here, the others run the real runner.
"""

import os

from ferry.runtime.onnx_runner import TritonPythonModel as OnnxRunner


class TritonPythonModel(OnnxRunner):
    def execute(self, requests: list) -> list:
        if os.environ.get("FAKE_FAULTY_REPLICA") == "1":
            raise RuntimeError("this replica cannot run the model (fake fault)")
        return super().execute(requests)
