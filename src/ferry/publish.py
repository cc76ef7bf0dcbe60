"""Training-side helpers: log an ONNX model with its smoke sample to MLflow and register it.

Call :func:`log_onnx_model` inside an active MLflow run. ferry deploys what it writes:
``<artifact_path>/model.onnx`` and ``<artifact_path>/smoke.json`` (the sample input and the golden outputs).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np

from ferry.core.smoke import SMOKE_FILE, SmokeSample, dump_sample


def golden_outputs(model_bytes: bytes, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, inputs), strict=False))


def log_onnx_model(
    model_bytes: bytes,
    sample_inputs: dict[str, np.ndarray],
    golden: dict[str, np.ndarray] | None = None,
    artifact_path: str = "onnx",
    rtol: float | None = None,
    atol: float | None = None,
    extra: dict | None = None,
) -> str:
    """Log model.onnx and smoke.json to the active run; return the artifact URI to register."""
    import mlflow

    if golden is None:
        golden = golden_outputs(model_bytes, sample_inputs)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "model.onnx").write_bytes(model_bytes)
        (folder / SMOKE_FILE).write_text(dump_sample(SmokeSample(sample_inputs, golden, rtol, atol)))
        if extra:
            (folder / "training.json").write_text(json.dumps(extra, indent=1))
        mlflow.log_artifacts(str(folder), artifact_path=artifact_path)
    return f"runs:/{mlflow.active_run().info.run_id}/{artifact_path}"


def register_version(model: str, source: str, run_id: str, alias: str | None = None,
                     tracking_uri: str | None = None) -> int:
    """Register ``source`` as a new version of ``model`` (created if needed) and point ``alias`` at it."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    try:
        client.get_registered_model(model)
    except MlflowException:
        client.create_registered_model(model)
    version = int(client.create_model_version(model, source=source, run_id=run_id).version)
    if alias:
        client.set_registered_model_alias(model, alias, str(version))
    return version
