"""ferry.publish.log_triton_model: the triton flavor laid out as NVIDIA's mlflow-triton-plugin lays it out, plus
ferry's smoke.json; the directories it refuses; and the directories examples/train_triton_model.py writes for
each of its --break kinds (checked as files, and model.py run against a stand-in for Triton's backend utils)."""

from __future__ import annotations

import importlib.util
import json
import sys
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pytest
from mlflow.models import Model
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression

from ferry.core.errors import InvalidInput
from ferry.core.model_config import config_signature, from_pbtxt
from ferry.core.smoke import load_sample
from ferry.publish import log_triton_model

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "examples"))

import train_triton_model as example

FEATURES, LABELS = load_iris(return_X_y=True)
FEATURES = FEATURES.astype(np.float32)
SAMPLE = {"X": FEATURES[[0, 60, 120]]}


@pytest.fixture(scope="module")
def weights() -> example.Weights:
    return example.train(LABELS, FEATURES)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A real MLflow on sqlite (its file store is refused by MLflow 3) for the module, artifacts beside it."""
    folder = tmp_path_factory.mktemp("mlflow")
    before = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(f"sqlite:///{folder / 'mlflow.db'}")
    mlflow.set_experiment(experiment_id=mlflow.create_experiment("t", artifact_location=str(folder / "mlartifacts")))
    yield folder
    mlflow.set_tracking_uri(before)


def _log(model_dir: Path, **kwargs: Any) -> tuple[str, str, Path]:
    """Log in a fresh run; return (the URI to register, the run's id, the logged folder on disk)."""
    with mlflow.start_run() as run:
        uri = log_triton_model(model_dir, **kwargs)
    return uri, run.info.run_id, Path(mlflow.artifacts.download_artifacts(uri))


def test_the_layout_is_the_plugins_with_smoke_json_beside_the_config(
    store: Path, tmp_path: Path, weights: example.Weights
) -> None:
    model_dir = example.build_model_dir(tmp_path / "build", "iris_py", weights)
    golden = {"probabilities": example.probabilities(SAMPLE["X"], weights)}
    uri, run_id, logged = _log(model_dir, sample_inputs=SAMPLE, golden=golden, extra={"break": "none"})
    assert uri == f"runs:/{run_id}/triton"
    files = sorted(str(p.relative_to(logged)) for p in logged.rglob("*") if p.is_file())
    # MLmodel and one entry beside it, as NVIDIA's plugin wants (it takes that entry for the model directory).
    assert files == ["MLmodel", "iris_py/1/model.py", "iris_py/1/weights.npz", "iris_py/config.pbtxt",
                     "iris_py/smoke.json"]
    mlmodel = Model.load(str(logged / "MLmodel"))
    assert mlmodel.flavors == {"triton": {"data": "iris_py"}}
    assert (mlmodel.artifact_path, mlmodel.run_id, mlmodel.metadata) == ("triton", run_id, {"break": "none"})
    sample = load_sample(logged / "iris_py" / "smoke.json")
    np.testing.assert_array_equal(sample.inputs["X"], SAMPLE["X"])
    assert sample.golden is not None
    np.testing.assert_array_equal(sample.golden["probabilities"], golden["probabilities"])
    assert (logged / "iris_py" / "config.pbtxt").read_text() == (model_dir / "config.pbtxt").read_text()


def test_without_golden_smoke_json_holds_the_inputs_and_without_a_sample_there_is_none(
    store: Path, tmp_path: Path, weights: example.Weights
) -> None:
    model_dir = example.build_model_dir(tmp_path / "build", "iris_py", weights)
    _, _, logged = _log(model_dir, sample_inputs=SAMPLE, rtol=1e-4)
    body = json.loads((logged / "iris_py" / "smoke.json").read_text())
    assert set(body) == {"inputs", "rtol"} and body["inputs"]["X"]["shape"] == [3, 4]
    _, _, bare = _log(model_dir)
    assert sorted(p.name for p in bare.iterdir()) == ["MLmodel", "iris_py"]
    assert Model.load(str(bare / "MLmodel")).metadata is None


def _python_model(folder: Path) -> None:
    folder.mkdir(parents=True)
    (folder / "config.pbtxt").write_text(example.config_pbtxt(folder.name))
    (folder / "3").mkdir()
    (folder / "3" / "model.py").write_text("")


def _without_config(folder: Path) -> None:
    (folder / "config.pbtxt").unlink()


def _without_version(folder: Path) -> None:
    (folder / "3" / "model.py").unlink()
    (folder / "3").rmdir()


def _two_versions(folder: Path) -> None:
    (folder / "4").mkdir()


def _symlink(folder: Path) -> None:
    (folder / "3" / "weights.npz").symlink_to(folder / "config.pbtxt")


def _pycache(folder: Path) -> None:
    (folder / "3" / "__pycache__").mkdir()


def _bad_config(folder: Path) -> None:
    (folder / "config.pbtxt").write_text("backend: python\ninputs: nonsense {\n")


@pytest.mark.parametrize(("damage", "said"), [
    (_without_config, "has no config.pbtxt"),
    (_without_version, "0 numbered version folders (none)"),
    (_two_versions, "2 numbered version folders (3, 4)"),
    (_symlink, "is a symlink"),
    (_pycache, "is a __pycache__ folder"),
    (_bad_config, "is not a Triton model config"),
])
def test_a_directory_triton_or_ferry_cannot_take_is_refused(store: Path, tmp_path: Path, damage: Any,
                                                             said: str) -> None:
    folder = tmp_path / "m"
    _python_model(folder)
    damage(folder)
    with mlflow.start_run(), pytest.raises(InvalidInput) as caught:
        log_triton_model(folder, SAMPLE)
    assert said in caught.value.message and caught.value.hint
    assert mlflow.artifacts.list_artifacts(run_id=mlflow.last_active_run().info.run_id) == []  # type: ignore[union-attr]


@pytest.mark.parametrize(("kwargs", "said"), [
    ({"sample_inputs": {"x": SAMPLE["X"]}}, "unknown ['x'], missing ['X']"),
    ({"sample_inputs": {"X": FEATURES[:2, :3]}}, "input 'X' has shape [2, 3], config.pbtxt says [-1, 4]"),
    ({"sample_inputs": SAMPLE, "golden": {"probability": np.zeros((3, 3))}}, "unknown ['probability']"),
    ({"golden": {"probabilities": np.zeros((3, 3))}}, "golden outputs without sample inputs"),
])
def test_a_sample_that_does_not_fit_the_config_is_refused(store: Path, tmp_path: Path, kwargs: dict,
                                                          said: str) -> None:
    folder = tmp_path / "m"
    _python_model(folder)
    with mlflow.start_run(), pytest.raises(InvalidInput) as caught:
        log_triton_model(folder, **kwargs)
    assert said in caught.value.message and caught.value.hint


def test_logging_needs_an_active_run(store: Path, tmp_path: Path) -> None:
    _python_model(tmp_path / "m")
    with pytest.raises(InvalidInput, match="active MLflow run"):
        log_triton_model(tmp_path / "m")


class _Tensor:
    def __init__(self, name: str, value: np.ndarray) -> None:
        self.name, self.value = name, value

    def as_numpy(self) -> np.ndarray:
        return self.value


class _Response:
    def __init__(self, output_tensors: list[_Tensor] | None = None, error: Exception | None = None) -> None:
        self.output_tensors, self.error = output_tensors or [], error


@pytest.fixture
def pb_utils(monkeypatch: pytest.MonkeyPatch) -> None:
    """A stand-in for Triton's triton_python_backend_utils: the few names model.py uses."""
    module = types.ModuleType("triton_python_backend_utils")
    module.Tensor = _Tensor  # type: ignore[attr-defined]
    module.InferenceResponse = _Response  # type: ignore[attr-defined]
    module.TritonError = RuntimeError  # type: ignore[attr-defined]
    module.get_input_tensor_by_name = lambda request, name: request.get(name)  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", module)
    monkeypatch.setattr(sys, "dont_write_bytecode", True)


def _load(folder: Path) -> Any:
    """The folder's TritonPythonModel, initialized as Triton does (the config as JSON)."""
    spec = importlib.util.spec_from_file_location("model", folder / "1" / "model.py")
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = from_pbtxt((folder / "config.pbtxt").read_text())
    from google.protobuf import json_format

    model = module.TritonPythonModel()
    model.initialize({"model_config": json.dumps(json_format.MessageToDict(config, preserving_proto_field_name=True)),
                      "model_repository": str(folder), "model_version": "1"})
    return model


@pytest.mark.parametrize("batching", [False, True])
def test_model_py_answers_the_classifiers_probabilities(tmp_path: Path, weights: example.Weights, pb_utils: None,
                                                        batching: bool) -> None:
    model = _load(example.build_model_dir(tmp_path, "iris_py", weights, batching=batching))
    [response] = model.execute([{"X": _Tensor("X", FEATURES)}])
    [out] = response.output_tensors
    assert out.name == "probabilities" and out.value.dtype == np.float32 and out.value.shape == (150, 3)
    reference = LogisticRegression(max_iter=1000).fit(FEATURES, LABELS).predict_proba(FEATURES)
    np.testing.assert_allclose(out.value, reference, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(out.value, example.probabilities(FEATURES, weights))  # the golden outputs' math
    [refused] = model.execute([{"X": _Tensor("X", FEATURES[:, :3])}])
    assert "has shape [150, 3], not [rows, 4]" in str(refused.error)


def test_batching_changes_the_config_and_not_the_signature(tmp_path: Path, weights: example.Weights) -> None:
    plain = from_pbtxt(example.build_model_dir(tmp_path / "a", "m", weights).joinpath("config.pbtxt").read_text())
    batched_dir = example.build_model_dir(tmp_path / "b", "m", weights, batching=True)
    batched = from_pbtxt((batched_dir / "config.pbtxt").read_text())
    assert (plain.max_batch_size, batched.max_batch_size) == (0, 8)
    assert list(batched.input[0].dims) == [4] and list(batched.output[0].dims) == [3]
    assert batched.HasField("dynamic_batching") and not plain.HasField("dynamic_batching")
    assert [(g.count, g.kind) for g in batched.instance_group] == [(2, batched.instance_group[0].KIND_CPU)]
    assert config_signature(plain) == config_signature(batched)


def test_each_break_kind_writes_what_it_says(tmp_path: Path, weights: example.Weights, pb_utils: None) -> None:
    def built(kind: str) -> Path:
        return example.build_model_dir(tmp_path / kind, "iris_py", weights, kind)

    def config(kind: str) -> Any:
        return from_pbtxt((built(kind) / "config.pbtxt").read_text())

    assert set(example.BREAKS) == {"none", "init-raises", "bad-backend", "rename-output", "golden-mismatch"}
    assert (config("none").backend, config("bad-backend").backend) == ("python", "onnxruntime")
    assert [o.name for o in config("rename-output").output] == ["probability"]
    assert [o.name for o in config("golden-mismatch").output] == ["probabilities"]
    with pytest.raises(ValueError, match=r"weights.npz holds coef \[3, 5\].*config takes 4 features"):
        _load(built("init-raises"))
    with pytest.raises(ValueError, match="unknown break"):
        example.build_model_dir(tmp_path, "x", weights, "wrong")


def test_golden_mismatch_registers_other_numbers_than_the_model_answers(store: Path, pb_utils: None) -> None:
    version = example.train_and_register("iris_py", "champion", "golden-mismatch",
                                         tracking_uri=mlflow.get_tracking_uri(), experiment="ferry-examples")
    assert version == 1
    logged = Path(mlflow.artifacts.download_artifacts("models:/iris_py@champion"))
    sample = load_sample(logged / "iris_py" / "smoke.json")
    assert sample.golden is not None
    [response] = _load(logged / "iris_py").execute([{"X": _Tensor("X", sample.inputs["X"])}])
    answered = response.output_tensors[0].value
    assert answered.shape == sample.golden["probabilities"].shape
    assert not np.allclose(answered, sample.golden["probabilities"], atol=0.05)
