"""The first member of examples/release.py's pipeline: scales the iris features (Z = X * factor).

``factor`` comes from params.json beside this file. Each answer carries the version Triton loaded this
model as (VERSION), so that a client can tell which member versions answered it.
"""

import json
import os

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "params.json")) as file:
            self.factor = np.float32(json.load(file)["factor"])
        self.version = np.array([int(args["model_version"])], dtype=np.int32)

    def execute(self, requests: list) -> list:
        responses = []
        for request in requests:
            features = pb_utils.get_input_tensor_by_name(request, "X").as_numpy()
            scaled = (features * self.factor).astype(np.float32)
            responses.append(pb_utils.InferenceResponse(
                output_tensors=[pb_utils.Tensor("Z", scaled), pb_utils.Tensor("VERSION", self.version)]))
        return responses
