"""The ``triton`` flavor: a Triton model directory logged to MLflow, as NVIDIA's mlflow-triton-plugin logs it.

    <artifact root>/MLmodel                 flavors: {triton: {data: <dir>}}
    <artifact root>/<dir>/config.pbtxt      the version's config (any backend)
    <artifact root>/<dir>/<k>/...           its one numbered version folder, whatever k is
    <artifact root>/<dir>/smoke.json        ferry's smoke sample (optional; beside MLmodel is read too)

A directory logged as the artifact root itself (config.pbtxt at the top) is taken too. The version
folder's files are staged as ``<model>/<N>/``, each hashed while it is written; ferry understands
none of them but the config: Triton's load proves them.
"""

from __future__ import annotations

import hashlib
import os
import py_compile
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from ferry.core.errors import StepFailed
from ferry.core.fsutil import sha256_file
from ferry.core.model_config import from_pbtxt, model_config_pb2
from ferry.core.records import Step
from ferry.core.registry import Artifacts
from ferry.core.repository import MANIFEST
from ferry.core.smoke import SMOKE_FILE

MLMODEL = "MLmodel"
FLAVOR = "triton"
CONFIG = "config.pbtxt"
_SCRATCH = ".artifacts"  # inside the staging folder: the downloaded tree, before its version folder moves up
_RESERVED = (MANIFEST, SMOKE_FILE, _SCRATCH)  # names ferry writes in a version folder
_DOWNLOADS = 8  # parallel downloads: each is a round trip to the artifact store


@dataclass(frozen=True)
class Layout:
    """Where a triton-flavor version's files are, relative to its artifact root."""

    folder: str  # the model directory ("" for the root itself)
    version_folder: str  # its one numbered folder, as logged ("1")
    files: dict[str, int]  # every file of the version folder, relative to it -> its size
    smoke: str | None  # the smoke sample, as the artifact store names it (None: none logged)

    def source(self, name: str) -> str:
        """A file of the version folder as the artifact store names it (an empty folder adds nothing)."""
        return str(PurePosixPath(self.folder, self.version_folder, name))

    @property
    def config(self) -> str:
        return str(PurePosixPath(self.folder, CONFIG))


def is_directory(sizes: dict[str, int]) -> bool:
    """Whether a version's top-level listing is the triton flavor (MLmodel, or a model directory itself)."""
    return "model.onnx" not in sizes and (MLMODEL in sizes or CONFIG in sizes)


def model_folder(artifacts: Artifacts, sizes: dict[str, int], scratch: Path) -> str:
    """The model directory MLmodel's triton flavor names ("" when the artifact root is the directory)."""
    if MLMODEL not in sizes:
        return ""
    import yaml  # MLflow's own dependency: MLmodel is YAML

    path = artifacts.download(MLMODEL, scratch)
    try:
        flavors = (yaml.safe_load(path.read_text()) or {}).get("flavors") or {}
    except (yaml.YAMLError, AttributeError, UnicodeDecodeError) as error:
        raise StepFailed(Step.MATERIALIZE, f"MLmodel is not a valid MLflow model file: {error}") from None
    data = (flavors.get(FLAVOR) or {}).get("data") if isinstance(flavors, dict) else None
    if not isinstance(data, str) or not data:
        found = sorted(flavors) if isinstance(flavors, dict) else []
        raise StepFailed(Step.MATERIALIZE, f"the version's MLmodel has no '{FLAVOR}' flavor (it has {found})",
                         "log the model with ferry.publish.log_onnx_model or log_triton_model, or with "
                         "NVIDIA's mlflow-triton-plugin")
    parts = PurePosixPath(data).parts
    if data.startswith("/") or "\\" in data or any(p in ("..", ".") for p in parts):
        raise StepFailed(Step.MATERIALIZE, f"MLmodel's triton flavor names {data!r}, which leaves the version's "
                         "artifacts", "log the model directory inside the run's artifacts")
    return data.strip("/")


def layout(tree: dict[str, int], folder: str) -> Layout:
    """The version folder of a model directory's listing (relative to the artifact root); refuses what
    cannot be staged as one version."""
    prefix = f"{folder}/" if folder else ""
    inside = {name[len(prefix):]: size for name, size in tree.items() if name.startswith(prefix)}
    where = folder or "the artifact root"
    if CONFIG not in inside:
        raise StepFailed(Step.MATERIALIZE, f"{where} holds no {CONFIG}",
                         "log the whole Triton model directory: config.pbtxt and one numbered version folder")
    numbered = sorted({name.split("/", 1)[0] for name in inside if "/" in name and name.split("/", 1)[0].isdigit()})
    if len(numbered) > 1:
        raise wrong_folder_count(where, numbered)
    version_folder = numbered[0] if numbered else ""  # none: an ensemble, whose (empty) folder MLflow does not keep
    beside = sorted(name for name in inside if name not in (CONFIG, SMOKE_FILE)
                    and not (numbered and name.startswith(f"{version_folder}/"))
                    and not (folder == "" and name == MLMODEL))
    if beside:
        raise StepFailed(Step.MATERIALIZE, f"{where} holds files outside its version folder: {', '.join(beside[:5])}",
                         "move them into the version folder: a file beside config.pbtxt would be shared by every "
                         "version, and changing it makes Triton reload all of them")
    files = {name.split("/", 1)[1]: size for name, size in inside.items()
             if numbered and name.startswith(f"{version_folder}/")}
    _refuse_reserved(files)
    smoke = next((name for name in (f"{prefix}{SMOKE_FILE}", SMOKE_FILE) if name in tree), None)
    return Layout(folder, version_folder, files, smoke)


def wrong_folder_count(where: str, numbered: list[str]) -> StepFailed:
    return StepFailed(Step.MATERIALIZE, f"{where} holds {len(numbered)} numbered version folders "
                      f"({', '.join(numbered) or 'none'}); a model version is exactly one",
                      "log one version folder per MLflow version (ferry stages it as the version's number)")


def _refuse_reserved(files: dict[str, int]) -> None:
    clashes = sorted(name for name in files if name in _RESERVED)
    if clashes:
        raise StepFailed(Step.MATERIALIZE, f"the version folder holds {', '.join(clashes)}, a name ferry writes there",
                         "rename the file (smoke.json belongs beside config.pbtxt, not in the version folder)")
    cached = sorted(name for name in files if "__pycache__" in PurePosixPath(name).parts or name.endswith(".pyc"))
    if cached:
        raise StepFailed(Step.MATERIALIZE, f"the version folder holds compiled Python ({cached[0]})",
                         "log the model without __pycache__ folders: ferry compiles the sources itself")


def read_config(artifacts: Artifacts, where: Layout, scratch: Path) -> model_config_pb2.ModelConfig:
    """The version's config.pbtxt, parsed, without name or version policy (ferry pins both)."""
    path = artifacts.download(where.config, scratch)
    try:
        config = from_pbtxt(path.read_text())
    except Exception as error:  # protobuf's text parser raises its own ParseError
        raise StepFailed(Step.MATERIALIZE, f"{where.config} is not a valid Triton config: {error}",
                         "fix the config.pbtxt logged with the model") from None
    if not config.input or not config.output:
        raise StepFailed(Step.MATERIALIZE, f"{where.config} declares no {'inputs' if not config.input else 'outputs'}",
                         "declare every input and output: ferry checks and smoke-tests the signature")
    config.ClearField("version_policy")
    config.ClearField("name")
    if not where.version_folder and config.platform != "ensemble":
        raise wrong_folder_count(where.folder or "the artifact root", [])
    return config


def download_version(artifacts: Artifacts, where: Layout, staging: Path) -> dict[str, str]:
    """Download the version folder's files into ``staging`` in parallel, each hashed while written; the
    sha256 of every file, by its path in the folder."""
    scratch = staging / _SCRATCH
    names = sorted(where.files)
    if not names:  # an ensemble: Triton needs the version folder only
        shutil.rmtree(scratch, ignore_errors=True)
        return {}

    def fetch(name: str) -> str:
        path = artifacts.download(where.source(name), scratch)
        return artifacts.sha256(where.source(name), path)

    with ThreadPoolExecutor(min(_DOWNLOADS, max(1, len(names)))) as pool:
        digests = dict(zip(names, pool.map(fetch, names), strict=True))
    for entry in (scratch / where.folder / where.version_folder).iterdir():
        os.rename(entry, staging / entry.name)
    shutil.rmtree(scratch)
    _compile_sources(staging)
    return digests


def _compile_sources(staging: Path) -> None:
    """Compile the Python files now, so that the backend stub (same Python) writes no bytecode into the live
    version folder: a change there makes Triton re-create every loaded version of the model on its next load."""
    for source in staging.rglob("*.py"):
        try:
            py_compile.compile(str(source), doraise=True)
        except py_compile.PyCompileError as error:
            raise StepFailed(Step.MATERIALIZE, f"{source.relative_to(staging)} is not valid Python: {error.msg}",
                             "fix the model's source") from None


def tree_digest(files: dict[str, str]) -> str:
    """One sha256 for a version folder: of its files' paths and sha256s, in order."""
    digest = hashlib.sha256()
    for name in sorted(files):
        digest.update(f"{name}\0{files[name]}\n".encode())
    return digest.hexdigest()


def verify_files(folder: Path, files: dict[str, str]) -> list[str]:
    """The files of a staged version folder that are missing or changed since their manifest was written."""
    problems = []
    for name, want in sorted(files.items()):
        path = folder / name
        if path.is_symlink() or not path.is_file():
            problems.append(f"{name} is missing")
        elif sha256_file(path) != want:
            problems.append(f"{name} changed (sha256 differs)")
    return problems


def check_tree_limit(where: Layout, limit: int) -> None:
    total = sum(where.files.values())
    if total > limit:
        raise StepFailed(Step.MATERIALIZE, f"the version folder is {total} bytes in {len(where.files)} files, over "
                         f"the limit of {limit}", "raise FERRY_MAX_ARTIFACT_MB if the model really is that large")

