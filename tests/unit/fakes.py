"""In-process fakes of the two services a deploy talks to, for the unit tier (the real ones are in tests/).

- FakeTriton keeps Triton's explicit-mode model of versions (load with a version policy, unload,
  repository index, readiness) and answers inference with what each version's smoke.json recorded
  (or with ``wrong_outputs``). Faults are switched on per version: ``fail_load``, ``hang_load``.
- FakeRegistry is an MLflow registry of models, versions and aliases whose artifacts are local folders.
Neither checks anything ferry does not rely on: the real-component tests do that.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from ferry.core.errors import NoSuchModel, RegistryError, TritonError, TritonTimeout, Unavailable
from ferry.core.fsutil import sha256_file
from ferry.core.registry import VersionRef
from ferry.core.smoke import SMOKE_FILE, SmokeSample, dump_sample
from ferry.core.triton import Placement, VersionState, placement

WEIGHTS = np.arange(12, dtype=np.float32).reshape(4, 3) / 10


def tiny_onnx(outputs: int = 3) -> bytes:
    """A real ONNX model: Y = X @ W, X float [-1, 4], Y float [-1, outputs]."""
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["X", "W"], ["Y"])], "tiny",
        [helper.make_tensor_value_info("X", TensorProto.FLOAT, [None, 4])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [None, outputs])],
        [numpy_helper.from_array(np.resize(WEIGHTS, (4, outputs)), "W")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def write_version_files(folder: Path, model_bytes: bytes, golden_offset: float = 0.0) -> None:
    """model.onnx and a smoke.json whose golden output is X @ W (plus ``golden_offset``)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.onnx").write_bytes(model_bytes)
    sample = np.ones((2, 4), dtype=np.float32)
    golden = {"Y": sample @ WEIGHTS + np.float32(golden_offset)}
    (folder / SMOKE_FILE).write_text(dump_sample(SmokeSample({"X": sample}, golden)))


@dataclass
class FakeTriton:
    repository: Path
    url: str = "http://fake-triton:8000"
    models: dict[str, dict[int, str]] = field(default_factory=dict)  # model -> version -> state
    fail_load: dict[int, str] = field(default_factory=dict)  # version -> Triton's message
    hang_load: set[int] = field(default_factory=set)
    wrong_outputs: dict[int, dict[str, np.ndarray]] = field(default_factory=dict)
    unreachable: bool = False
    loads: list[tuple[str, list[int]]] = field(default_factory=list)
    unloads: list[str] = field(default_factory=list)
    worker: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(1), repr=False)

    def _check(self) -> None:
        if self.unreachable:
            raise TritonError(f"Triton at {self.url} is not reachable (fake)", retryable=True)

    def submit(self, call: Callable[[], object]) -> Future:
        """As Triton.submit: the call runs on this replica's thread, concurrently with the other replicas'."""
        return self.worker.submit(call)

    def index(self) -> dict[str, list[VersionState]]:
        self._check()
        return {m: [VersionState(v, s) for v, s in sorted(vs.items())] for m, vs in self.models.items()}

    def versions(self, model: str) -> list[VersionState]:
        return self.index().get(model, [])

    def ready_versions(self, model: str) -> list[int]:
        return sorted(v.version for v in self.versions(model) if v.state == "READY")

    def placement(self, model: str) -> Placement:
        return placement(self.index(), model)

    def load(self, model: str, config_json: str, files: dict[str, bytes] | None = None) -> None:
        self._check()
        config = json.loads(config_json)
        wanted = [int(v) for v in config["version_policy"]["specific"]["versions"]]
        self.loads.append((model, wanted))
        if config.get("platform") == "ensemble":  # a front: its one step must find its version in the store
            step = config["ensemble_scheduling"]["step"][0]
            if self.models.get(step["model_name"], {}).get(int(step["model_version"])) != "READY":
                raise TritonError(f"Triton refused loading '{model}': {step['model_name']} v{step['model_version']} "
                                  "is not loaded (fake)")
            self.models[model] = {v: "READY" for v in wanted}
            return
        for version in wanted:
            if version in self.hang_load:
                raise TritonTimeout(f"Triton at {self.url} did not answer loading '{model}' (fake)")
            if not (self.repository / model / str(version)).is_dir():
                raise TritonError(f"Triton refused loading '{model}': no version {version} on disk")
            if version in self.fail_load:
                raise TritonError(f"Triton refused loading '{model}': {self.fail_load[version]}")
        self.models[model] = {v: "READY" for v in wanted}  # a load is atomic; the others are retired

    def unload(self, model: str) -> None:
        self._check()
        self.unloads.append(model)
        self.models.pop(model, None)

    def version_ready(self, model: str, version: int) -> bool:
        self._check()
        return self.models.get(model, {}).get(version) == "READY"

    def infer(self, model: str, version: int, inputs: dict[str, np.ndarray],
              datatypes: dict[str, str]) -> dict[str, np.ndarray]:
        if not self.version_ready(model, version):
            raise TritonError(f"Triton refused inference on '{model}' v{version}: not loaded")
        if version in self.wrong_outputs:
            return self.wrong_outputs[version]
        return {"Y": inputs["X"] @ WEIGHTS}


@dataclass
class FakeArtifacts:
    folder: Path
    fails_with: Exception | None = None  # a store that fails mid-download: part of the file written, then this

    def sizes(self) -> dict[str, int]:
        return {p.name: p.stat().st_size for p in self.folder.iterdir() if p.is_file()}

    def tree(self, folder: str = "") -> dict[str, int]:
        root = self.folder / folder if folder else self.folder
        return {p.relative_to(self.folder).as_posix(): p.stat().st_size for p in root.rglob("*") if p.is_file()}

    def download(self, name: str, destination: Path) -> Path:
        target = destination / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if self.fails_with is not None:
            target.write_bytes((self.folder / name).read_bytes()[:100])
            raise self.fails_with
        shutil.copyfile(self.folder / name, target)
        return target

    def sha256(self, name: str, path: Path) -> str:
        return sha256_file(path)


@dataclass
class FakeRegistry:
    root: Path
    versions: dict[str, dict[int, str]] = field(default_factory=dict)  # model -> version -> run id
    aliases: dict[str, dict[str, int]] = field(default_factory=dict)
    unreachable: bool = False
    store_fails_with: Exception | None = None  # every download fails so, after writing part of the file
    tracking_uri: str = "fake://mlflow"

    def add(self, model: str, alias: str | None = None, model_bytes: bytes | None = None,
            golden_offset: float = 0.0) -> int:
        """Register a new version with its files; point ``alias`` at it."""
        version = len(self.versions.setdefault(model, {})) + 1
        run_id = f"run{version:04d}" + "0" * 24
        self.versions[model][version] = run_id
        write_version_files(self.root / model / str(version), model_bytes or tiny_onnx(), golden_offset)
        if alias:
            self.aliases.setdefault(model, {})[alias] = version
        return version

    def _check(self) -> None:
        if self.unreachable:
            raise Unavailable(f"MLflow at {self.tracking_uri} did not answer (fake)")

    def resolve_alias(self, model: str, alias: str) -> VersionRef:
        self._check()
        if model not in self.versions:
            raise NoSuchModel(f"no model named '{model}' in MLflow at {self.tracking_uri}")
        if alias not in self.aliases.get(model, {}):
            raise RegistryError(f"model '{model}' has no alias '{alias}' in MLflow")
        return self.get_version(model, self.aliases[model][alias], alias)

    def get_version(self, model: str, version: int, alias: str | None = None) -> VersionRef:
        self._check()
        run_id = self.versions.get(model, {}).get(version)
        if run_id is None:
            raise RegistryError(f"MLflow: reading version {version} of '{model}': not found")
        uri = f"runs:/{run_id}/onnx"
        return VersionRef(model, version, run_id, uri, alias, uri)

    def artifacts(self, ref: VersionRef) -> FakeArtifacts:
        self._check()
        return FakeArtifacts(self.root / ref.model / str(ref.version), self.store_fails_with)

