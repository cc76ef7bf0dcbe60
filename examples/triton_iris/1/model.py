"""Triton Python-backend model of examples/train_triton_model.py: a logistic-regression classifier in numpy.

It reads the weights written beside it (``weights.npz``: ``coef`` of shape [classes, features] and
``intercept`` of shape [classes]) and answers, for an input ``X`` of shape [rows, features], the softmax of
``X @ coef.T + intercept``: the classifier's probabilities, one row per input row. The tensor names come from
the model's config, so the same file serves whatever the config calls them.
"""

import json
import os

import numpy as np
import triton_python_backend_utils as pb_utils


def probabilities(features: np.ndarray, coef: np.ndarray, intercept: np.ndarray) -> np.ndarray:
    """Softmax of the linear scores, as scikit-learn's multinomial LogisticRegression.predict_proba."""
    scores = features.astype(np.float64) @ coef.T + intercept
    scores -= scores.max(axis=1, keepdims=True)  # exp of large scores overflows; the softmax does not change
    exp = np.exp(scores)
    return (exp / exp.sum(axis=1, keepdims=True)).astype(np.float32)


class TritonPythonModel:
    def initialize(self, args: dict) -> None:
        config = json.loads(args["model_config"])
        self.input_name = config["input"][0]["name"]
        self.output_name = config["output"][0]["name"]
        features = int(config["input"][0]["dims"][-1])
        classes = int(config["output"][0]["dims"][-1])
        path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights.npz")
        with np.load(path) as weights:
            self.coef, self.intercept = weights["coef"], weights["intercept"]
        if self.coef.shape != (classes, features) or self.intercept.shape != (classes,):
            raise ValueError(f"weights.npz holds coef {list(self.coef.shape)} and intercept "
                             f"{list(self.intercept.shape)}, the config takes {features} features to {classes} "
                             f"classes: coef [{classes}, {features}] and intercept [{classes}]")

    def execute(self, requests: list) -> list:
        return [self._run(request) for request in requests]

    def _run(self, request):
        features = pb_utils.get_input_tensor_by_name(request, self.input_name).as_numpy()
        if features.ndim != 2 or features.shape[1] != self.coef.shape[1]:
            message = f"input '{self.input_name}' has shape {list(features.shape)}, not [rows, {self.coef.shape[1]}]"
            return pb_utils.InferenceResponse(error=pb_utils.TritonError(message))
        result = probabilities(features, self.coef, self.intercept)
        return pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor(self.output_name, result)])
