"""Training-side helpers: log a model version with its smoke sample to MLflow and register it.

Call :func:`log_onnx_model` inside an active MLflow run. ferry deploys what it writes:
``<artifact_path>/model.onnx`` and ``<artifact_path>/smoke.json`` (the sample input and the golden outputs).

Call :func:`log_triton_model` inside an active MLflow run to log a whole Triton model directory (the ``triton``
flavor, laid out as NVIDIA's mlflow-triton-plugin lays it out): ``<artifact_path>/MLmodel`` (flavor ``triton``,
``data`` the directory's name), ``<artifact_path>/<name>/`` (config.pbtxt and one numbered version folder) and,
when a sample is given, ``<artifact_path>/<name>/smoke.json`` (beside config.pbtxt: NVIDIA's plugin takes the one
entry beside MLmodel for the model directory; Triton ignores the file).

A BYTES (string) tensor may be given as Triton's clients build it (an object array of bytes) or as str (UTF-8).
onnxruntime's string tensors hold text, so the golden outputs are computed on the UTF-8 text of each element and
come back as bytes; an element that is not UTF-8 is refused here, as ferry's python runtime refuses it in Triton.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from ferry.core.errors import InvalidInput
from ferry.core.model_config import Signature, TensorSpec, config_signature, from_pbtxt, shape_fits
from ferry.core.smoke import SMOKE_FILE, SmokeSample, as_bytes, dump_sample, is_bytes

STRING = "tensor(string)"  # onnxruntime's type name of a string tensor
TRITON_FLAVOR = "triton"  # the flavor name of NVIDIA's mlflow-triton-plugin
CONFIG_FILE = "config.pbtxt"


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


def log_triton_model(
    model_dir: str | Path,
    sample_inputs: dict[str, np.ndarray] | None = None,
    golden: dict[str, np.ndarray] | None = None,
    artifact_path: str = "triton",
    rtol: float | None = None,
    atol: float | None = None,
    extra: dict | None = None,
) -> str:
    """Log a Triton model directory to the active run as the ``triton`` flavor; return the URI to register.

    The layout is the plugin's (``MLmodel`` and ``<name>/``) plus ferry's ``smoke.json`` beside ``config.pbtxt`` when
    ``sample_inputs`` is given (inputs only when ``golden`` is None: nothing here can run the model). ``extra``
    goes into the MLmodel's ``metadata``.
    """
    import mlflow
    from mlflow.models import Model

    source = Path(os.path.normpath(Path(model_dir).absolute()))
    signature = check_triton_dir(source)
    sample = _triton_sample(signature, sample_inputs, golden, rtol, atol)
    run = mlflow.active_run()
    if run is None:
        raise InvalidInput("log_triton_model needs an active MLflow run", "call it inside `with mlflow.start_run():`")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        shutil.copytree(source, folder / source.name)
        model = Model(artifact_path=artifact_path, run_id=run.info.run_id, metadata=extra or None)
        model.add_flavor(TRITON_FLAVOR, data=source.name)
        model.save(str(folder / "MLmodel"))
        if sample is not None:
            (folder / source.name / SMOKE_FILE).write_text(dump_sample(sample))
        mlflow.log_artifacts(str(folder), artifact_path=artifact_path)
    return f"runs:/{run.info.run_id}/{artifact_path}"


def check_triton_dir(model_dir: Path) -> Signature:
    """Refuse what Triton or ferry cannot take from a model directory; return the signature its config declares."""
    if not model_dir.is_dir():
        raise InvalidInput(f"{model_dir} is not a directory", "give the Triton model directory (config.pbtxt, 1/)")
    if model_dir.name in ("MLmodel", SMOKE_FILE):
        raise InvalidInput(f"the model directory may not be named {model_dir.name}",
                           "rename it: the name sits beside MLmodel and smoke.json in the run's artifacts")
    _refuse_links_and_caches(model_dir)
    config = model_dir / CONFIG_FILE
    if not config.is_file():
        raise InvalidInput(f"{model_dir} has no {CONFIG_FILE}",
                           "write the model's config.pbtxt at the top of the directory, beside its version folder")
    versions = sorted(p.name for p in model_dir.iterdir() if p.is_dir() and p.name.isdigit())
    if len(versions) != 1:
        found = ", ".join(versions) or "none"
        raise InvalidInput(f"{model_dir} holds {len(versions)} numbered version folders ({found}): one is allowed",
                           "keep one version folder (ferry stages it as the MLflow version, whatever its number)")
    return _config_signature(config)


def _refuse_links_and_caches(model_dir: Path) -> None:
    for root, dirs, files in os.walk(model_dir):
        for name in [*dirs, *files]:
            path = Path(root, name)
            if path.is_symlink():
                raise InvalidInput(f"{path} is a symlink", "copy the file it points at into the model directory")
            if name == "__pycache__":
                raise InvalidInput(f"{path} is a __pycache__ folder",
                                   "remove it (and set PYTHONDONTWRITEBYTECODE): Triton reloads a model on it")


def _config_signature(config: Path) -> Signature:
    from google.protobuf.text_format import ParseError

    try:
        return config_signature(from_pbtxt(config.read_text()))
    except (ParseError, UnicodeDecodeError) as error:
        raise InvalidInput(f"{config} is not a Triton model config: {error}",
                           "fix config.pbtxt (protobuf text of inference.ModelConfig)") from None


def _triton_sample(signature: Signature, inputs: dict[str, np.ndarray] | None, golden: dict[str, np.ndarray] | None,
                   rtol: float | None, atol: float | None) -> SmokeSample | None:
    """The smoke sample to log, once its tensors are known to fit the config."""
    if inputs is None:
        if golden is not None:
            raise InvalidInput("golden outputs without sample inputs", "give the sample_inputs they answer")
        return None
    _check_tensors("input", signature.inputs, inputs, every=True)
    if golden is not None:
        _check_tensors("golden output", signature.outputs, golden, every=False)
    return SmokeSample(inputs, golden, rtol, atol)


def _check_tensors(kind: str, specs: tuple[TensorSpec, ...], tensors: dict[str, np.ndarray], every: bool) -> None:
    declared = {spec.name: spec for spec in specs}
    unknown = sorted(set(tensors) - set(declared))
    missing = sorted(set(declared) - set(tensors)) if every else []
    if unknown or missing:
        raise InvalidInput(f"the sample's {kind}s do not match config.pbtxt (unknown {unknown}, missing {missing})",
                           f"name the {kind}s as config.pbtxt declares them: {sorted(declared)}")
    for name, value in tensors.items():
        shape = list(np.shape(value))
        if not shape_fits(shape, declared[name].dims):
            raise InvalidInput(f"{kind} '{name}' has shape {shape}, config.pbtxt says {list(declared[name].dims)}",
                               "give a tensor of the shape the config declares (-1: any size)")


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
