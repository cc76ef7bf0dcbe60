"""Fault injection, not a model: a Python-backend model whose initialize() never returns.

A real backend stub that cannot start hangs Triton's load the same way; that cannot be
produced on demand, so tests stage this file as a version's model.py instead.
"""

import time


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        time.sleep(3600)
