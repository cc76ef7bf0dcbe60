"""Train a small real model, log it to MLflow as ONNX with its smoke sample, register it, set an alias.

    python examples/train_model.py --model iris --alias champion
    python examples/train_model.py --model iris --alias champion --break output-shape

The --break options register a deliberately broken version, each caught at a different step:
  corrupt-bytes    model.onnx is not ONNX at all            -> materialize
  unknown-op       valid ONNX with an operator onnxruntime lacks -> load
  output-shape     outputs one column more than it declares -> smoke (shape)
  golden-mismatch  a different model than the golden record -> smoke (numbers)
"""

from __future__ import annotations

import argparse
import os

import mlflow
import numpy as np
import onnx
from skl2onnx import to_onnx
from sklearn.datasets import load_iris
from sklearn.ensemble import RandomForestClassifier
from sklearn.linear_model import LogisticRegression

from ferry.publish import golden_outputs, log_onnx_model, register_version

BREAKS = ("none", "corrupt-bytes", "unknown-op", "output-shape", "golden-mismatch")


def _classifier(trees: int, labels: np.ndarray, features: np.ndarray):
    if trees:
        return RandomForestClassifier(n_estimators=trees, random_state=0).fit(features, labels)
    return LogisticRegression(max_iter=1000).fit(features, labels)


def _to_onnx(model, features: np.ndarray) -> onnx.ModelProto:
    return to_onnx(model, features[:1], options={id(model): {"zipmap": False}}, target_opset={"": 17, "ai.onnx.ml": 3})


def _widen_probabilities(model: onnx.ModelProto) -> onnx.ModelProto:
    """Append a column of zeros to 'probabilities' while declaring its width as free: it loads, then fails smoke."""
    graph = model.graph
    out = next(o for o in graph.output if o.name == "probabilities")
    for node in graph.node:
        node.output[:] = ["probabilities_raw" if name == "probabilities" else name for name in node.output]
    graph.node.extend([
        onnx.helper.make_node("Slice", ["probabilities_raw", "zero_i", "one_i", "one_i"], ["first_column"]),
        onnx.helper.make_node("Mul", ["first_column", "zero_f"], ["extra_column"]),
        onnx.helper.make_node("Concat", ["probabilities_raw", "extra_column"], ["probabilities"], axis=1),
    ])
    graph.initializer.extend([
        onnx.numpy_helper.from_array(np.array([0], dtype=np.int64), "zero_i"),
        onnx.numpy_helper.from_array(np.array([1], dtype=np.int64), "one_i"),
        onnx.numpy_helper.from_array(np.array(0.0, dtype=np.float32), "zero_f"),
    ])
    out.type.tensor_type.shape.dim[1].ClearField("dim_value")
    out.type.tensor_type.shape.dim[1].dim_param = "classes"
    return model


def _add_unknown_op(model: onnx.ModelProto) -> onnx.ModelProto:
    """Feed the input through an operator no runtime implements: valid ONNX that onnxruntime refuses to load."""
    graph = model.graph
    for node in graph.node:
        node.input[:] = ["X_scaled" if name == "X" else name for name in node.input]
    graph.node.insert(0, onnx.helper.make_node("Scale", ["X"], ["X_scaled"], domain="com.example.preprocessing"))
    model.opset_import.append(onnx.helper.make_opsetid("com.example.preprocessing", 1))
    return model


def train_and_register(
    model_name: str, alias: str | None, breakage: str = "none", trees: int = 0, tracking_uri: str | None = None,
    experiment: str = "ferry-examples",
) -> int:
    """Train, log and register one version; return its version number."""
    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    features, labels = load_iris(return_X_y=True)
    features = features.astype(np.float32)
    classifier = _classifier(trees, labels, features)
    model = _to_onnx(classifier, features)
    sample = {"X": features[[0, 60, 120]]}
    golden = golden_outputs(model.SerializeToString(), sample)
    if breakage == "output-shape":
        model = _widen_probabilities(model)
    elif breakage == "unknown-op":
        model = _add_unknown_op(model)
    elif breakage == "golden-mismatch":
        # A model trained on shuffled labels: same signature, different numbers.
        model = _to_onnx(_classifier(trees, np.random.default_rng(0).permutation(labels), features), features)
    model_bytes = os.urandom(4096) if breakage == "corrupt-bytes" else model.SerializeToString()
    use_experiment(experiment)
    with mlflow.start_run() as run:
        mlflow.log_params({"model": type(classifier).__name__, "trees": trees, "break": breakage})
        source = log_onnx_model(model_bytes, sample, golden=golden, extra={"break": breakage})
    return register_version(model_name, source, run.info.run_id, alias, tracking_uri=mlflow.get_tracking_uri())


def use_experiment(name: str) -> None:
    """Keep artifacts beside the tracking database rather than in ./mlruns of whatever directory we run in."""
    if mlflow.get_experiment_by_name(name) is None:
        uri = mlflow.get_tracking_uri()
        location = None
        if uri.startswith("sqlite:///"):
            location = os.path.join(os.path.dirname(uri.removeprefix("sqlite:///")), "mlartifacts")
        mlflow.create_experiment(name, artifact_location=location)
    mlflow.set_experiment(name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="iris")
    parser.add_argument("--alias", default="champion")
    parser.add_argument("--break", dest="breakage", choices=BREAKS, default="none")
    parser.add_argument("--trees", type=int, default=0,
                        help="train a random forest of this many trees (a larger model)")
    args = parser.parse_args()
    from ferry.core.config import load_settings

    tracking_uri = load_settings().tracking_uri
    version = train_and_register(args.model, args.alias, args.breakage, args.trees, tracking_uri)
    print(f"registered {args.model} v{version} ({args.breakage}) and pointed @{args.alias} at it")


if __name__ == "__main__":
    main()
