"""Training-side helpers: log an ONNX model with its smoke sample to MLflow and register it.

Call :func:`log_onnx_model` inside an active MLflow run. ferry deploys what it writes:
``<artifact_path>/model.onnx`` and ``<artifact_path>/smoke.json`` (the sample input and the golden outputs).

A BYTES (string) tensor may be given as Triton's clients build it (an object array of bytes) or as str (UTF-8).
onnxruntime's string tensors hold text, so the golden outputs are computed on the UTF-8 text of each element and
come back as bytes; an element that is not UTF-8 is refused here, as ferry's python runtime refuses it in Triton.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np

from ferry.core.errors import InvalidInput
from ferry.core.smoke import SMOKE_FILE, SmokeSample, as_bytes, dump_sample, is_bytes

STRING = "tensor(string)"  # onnxruntime's type name of a string tensor


def golden_outputs(model_bytes: bytes, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """What the model answers for ``inputs`` in onnxruntime; string outputs as object arrays of bytes."""
    import onnxruntime as ort

    session = ort.InferenceSession(model_bytes, providers=["CPUExecutionProvider"])
    strings = {i.name for i in session.get_inputs() if i.type == STRING}
    feeds = {name: _as_text(name, value) if name in strings else value for name, value in inputs.items()}
    names = [o.name for o in session.get_outputs()]
    results = session.run(names, feeds)
    return {name: as_bytes(value) if is_bytes(value) else value for name, value in zip(names, results, strict=True)}


def _as_text(name: str, value: np.ndarray) -> np.ndarray:
    """A BYTES sample as the object array of str onnxruntime needs (it cuts numpy str items at their first NUL)."""
    value = np.asarray(value)
    try:
        flat = as_bytes(value).ravel()
    except ValueError as error:
        raise InvalidInput(f"sample input '{name}' is a string tensor: {error}", "give bytes or str items") from None
    items = []
    for index, item in enumerate(flat):
        try:
            items.append(item.decode("utf-8"))
        except UnicodeDecodeError as error:
            where = [int(i) for i in np.unravel_index(index, value.shape)]
            raise InvalidInput(f"sample input '{name}' at {where} is not UTF-8 ({item!r:.40}: {error.reason})",
                               "give UTF-8 text: onnxruntime's string tensors hold text") from None
    out = np.empty(len(items), dtype=np.object_)
    out[:] = items
    return out.reshape(value.shape)


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
    run = mlflow.active_run()
    assert run is not None  # log_artifacts starts a run when none is active
    return f"runs:/{run.info.run_id}/{artifact_path}"


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
