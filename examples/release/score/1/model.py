"""The second member of examples/release.py's pipeline: a linear score of the scaled features (Z @ w).

``weights`` (four numbers) come from params.json beside this file; a params.json without them makes
initialize() raise. Each answer carries the version Triton loaded this model as (VERSION).
"""

import json
import os

import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "params.json")) as file:
            params = json.load(file)
        if "weights" not in params:
            raise ValueError(f"params.json holds {sorted(params)}, not the four 'weights' of the score")
        self.weights = np.asarray(params["weights"], dtype=np.float32).reshape(4, 1)
        self.version = np.array([int(args["model_version"])], dtype=np.int32)

    def execute(self, requests: list) -> list:
        responses = []
        for request in requests:
            scaled = pb_utils.get_input_tensor_by_name(request, "Z").as_numpy()
            score = (scaled @ self.weights).astype(np.float32)
            responses.append(pb_utils.InferenceResponse(
                output_tensors=[pb_utils.Tensor("SCORE", score), pb_utils.Tensor("VERSION", self.version)]))
        return responses
