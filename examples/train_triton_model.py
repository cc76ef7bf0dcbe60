"""Train a small real model, log it to MLflow as a Triton model directory (the triton flavor), register it.

    python examples/train_triton_model.py --model iris_py --alias champion
    python examples/train_triton_model.py --model iris_py --alias champion --batching
    python examples/train_triton_model.py --model iris_py --alias champion --break bad-backend

The directory is a Python-backend model: 1/model.py (copied from examples/triton_iris/1/model.py) computes the
classifier's probabilities with numpy from 1/weights.npz, under a config.pbtxt with the signature of the ONNX
iris example (X FP32 [-1, 4] -> probabilities FP32 [-1, 3]), so that clients do not care which flavor serves
them. smoke.json carries the sample and its golden outputs, computed here with the same math as model.py.

--batching changes the config only, not what clients see: max_batch_size 8, dynamic batching, two instances.

The --break options register a deliberately broken version, each caught at a different step:
  init-raises      initialize() raises: weights.npz does not fit the config        -> load
  bad-backend      config.pbtxt names backend "onnxruntime", absent from the server  -> load
  rename-output    the output is called 'probability': a changed signature          -> materialize
  golden-mismatch  a different model than the golden record                         -> smoke (numbers)
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression
from train_model import use_experiment

from ferry.publish import log_triton_model, register_version

BREAKS = ("none", "init-raises", "bad-backend", "rename-output", "golden-mismatch")
TEMPLATE = Path(__file__).resolve().parent / "triton_iris" / "1" / "model.py"
OUTPUT = "probabilities"


@dataclass
class Weights:
    coef: np.ndarray  # [classes, features]
    intercept: np.ndarray  # [classes]


def train(labels: np.ndarray, features: np.ndarray) -> Weights:
    model = LogisticRegression(max_iter=1000).fit(features, labels)
    return Weights(model.coef_.astype(np.float64), model.intercept_.astype(np.float64))


def probabilities(features: np.ndarray, weights: Weights) -> np.ndarray:
    """What 1/model.py answers: the softmax of the linear scores, in FP32."""
    scores = features.astype(np.float64) @ weights.coef.T + weights.intercept
    scores -= scores.max(axis=1, keepdims=True)
    exp = np.exp(scores)
    return (exp / exp.sum(axis=1, keepdims=True)).astype(np.float32)


def config_pbtxt(name: str, backend: str = "python", output: str = OUTPUT, batching: bool = False) -> str:
    """The model's config: the ONNX iris example's signature, with or without Triton's batching."""
    batch, x_dims, out_dims = (8, "[ 4 ]", "[ 3 ]") if batching else (0, "[ -1, 4 ]", "[ -1, 3 ]")
    text = (
        f'name: "{name}"\nbackend: "{backend}"\nmax_batch_size: {batch}\n'
        f'input [\n  {{\n    name: "X"\n    data_type: TYPE_FP32\n    dims: {x_dims}\n  }}\n]\n'
        f'output [\n  {{\n    name: "{output}"\n    data_type: TYPE_FP32\n    dims: {out_dims}\n  }}\n]\n'
    )
    if batching:
        text += "dynamic_batching { }\ninstance_group [\n  {\n    count: 2\n    kind: KIND_CPU\n  }\n]\n"
    return text


def build_model_dir(parent: Path, name: str, weights: Weights, breakage: str = "none",
                    batching: bool = False) -> Path:
    """Write the Triton model directory ``parent/name`` (config.pbtxt, 1/model.py, 1/weights.npz) and return it."""
    if breakage not in BREAKS:
        raise ValueError(f"unknown break {breakage!r}: one of {', '.join(BREAKS)}")
    folder = parent / name
    version = folder / "1"
    version.mkdir(parents=True)
    backend = "onnxruntime" if breakage == "bad-backend" else "python"
    output = "probability" if breakage == "rename-output" else OUTPUT
    (folder / "config.pbtxt").write_text(config_pbtxt(name, backend, output, batching))
    shutil.copyfile(TEMPLATE, version / "model.py")
    coef = weights.coef
    if breakage == "init-raises":  # a fifth feature the config does not take: initialize() refuses the weights
        coef = np.hstack([coef, np.zeros((coef.shape[0], 1))])
    np.savez(version / "weights.npz", coef=coef, intercept=weights.intercept)
    return folder


def train_and_register(
    model_name: str, alias: str | None, breakage: str = "none", batching: bool = False,
    tracking_uri: str | None = None, experiment: str = "ferry-examples",
) -> int:
    """Train, log and register one version; return its version number."""
    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    features, labels = load_iris(return_X_y=True)
    features = features.astype(np.float32)
    weights = train(labels, features)
    sample = {"X": features[[0, 60, 120]]}
    golden = {OUTPUT: probabilities(sample["X"], weights)}
    if breakage == "golden-mismatch":
        # A model trained on shuffled labels: same signature, different numbers.
        weights = train(np.random.default_rng(0).permutation(labels), features)
    use_experiment(experiment)
    with tempfile.TemporaryDirectory() as tmp, mlflow.start_run() as run:
        model_dir = build_model_dir(Path(tmp), model_name, weights, breakage, batching)
        mlflow.log_params({"model": "LogisticRegression", "flavor": "triton", "break": breakage,
                           "batching": batching})
        # The golden record names the output the config declares, so that a rename is caught at materialize.
        if breakage == "rename-output":
            golden = {"probability": golden[OUTPUT]}
        source = log_triton_model(model_dir, sample, golden=golden, extra={"break": breakage, "batching": batching})
    return register_version(model_name, source, run.info.run_id, alias, tracking_uri=mlflow.get_tracking_uri())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="iris_py")
    parser.add_argument("--alias", default="champion")
    parser.add_argument("--break", dest="breakage", choices=BREAKS, default="none")
    parser.add_argument("--batching", action="store_true",
                        help="max_batch_size 8, dynamic batching, two CPU instances (the same signature)")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow's tracking URI (default: ferry's, from MLFLOW_TRACKING_URI or FERRY_HOME)")
    args = parser.parse_args()
    from ferry.core.config import load_settings

    tracking_uri = args.tracking_uri or load_settings().tracking_uri
    version = train_and_register(args.model, args.alias, args.breakage, args.batching, tracking_uri)
    print(f"registered {args.model} v{version} (triton flavor, {args.breakage}) and pointed @{args.alias} at it")


if __name__ == "__main__":
    main()
