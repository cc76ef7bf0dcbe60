"""Materialize's work: resolve the version in MLflow (or from its manifest), download and verify its files,
stage them as ``<model>/<N>/`` with one atomic rename, or trust a version staged before (verified again)."""

from __future__ import annotations

import importlib.resources
import os
import py_compile
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ferry.core import triton_flavor
from ferry.core.errors import FerryError, InvalidInput, NotOnnx, StepFailed, not_the_versions_fault
from ferry.core.fsutil import atomic_write, sha256_file
from ferry.core.model_config import (
    Signature,
    build_config,
    config_digest,
    config_signature,
    from_pbtxt,
    model_config_pb2,
    read_onnx_signature,
    shape_fits,
    signature_changes,
    signature_mismatches,
    to_pbtxt,
    with_versions,
)
from ferry.core.records import Candidate, Manifest, Snapshot, Step, parse_utc_stamp, utc_stamp
from ferry.core.registry import Artifacts, VersionRef, disk_full
from ferry.core.repository import MANIFEST, ModelDir, check_name
from ferry.core.services import Services
from ferry.core.smoke import SMOKE_FILE, load_sample


def resolve(ferry: Services, model_dir: ModelDir, alias: str | None, version: int | None) -> VersionRef:
    """The version to deploy. A version already staged by ferry is read from its manifest, without MLflow:
    going back to a kept version must work when MLflow is down."""
    if alias is not None:
        return ferry.registry.resolve_alias(model_dir.model, check_name("alias", alias))
    if version is None:
        raise InvalidInput("nothing to deploy: give an alias or a version")
    manifest = model_dir.read_manifest(version)
    if manifest is not None and manifest.model == model_dir.model:
        return VersionRef(model_dir.model, version, manifest.run_id, manifest.source, None, manifest.source)
    return ferry.registry.get_version(model_dir.model, version)


def is_warm(snapshot: Snapshot, version: int) -> bool:
    """Whether ``version`` is the previous version, kept loaded after the last commit on every replica and
    still inside its window (FERRY_KEEP_PREVIOUS_S)."""
    current = snapshot.current
    if current is None or current.previous_version != version or not current.previous_warm_until_utc:
        return False
    if parse_utc_stamp(current.previous_warm_until_utc) < parse_utc_stamp(utc_stamp()):
        return False
    return bool(snapshot.stores) and all(version in held for held in snapshot.stores.values())


def warm(model_dir: ModelDir, ref: VersionRef, snapshot: Snapshot) -> Candidate:
    """The previous version, still loaded: it served until the last commit, and what serves is the loaded
    instance, not the files (kept, and hashed again at the next load that needs them)."""
    manifest = model_dir.read_manifest(ref.version)
    config = model_dir.version_config(ref.version, snapshot.config_text)
    if manifest is None or config is None:
        raise InvalidInput(f"v{ref.version} is loaded but ferry's manifest for it is missing",
                           f"restore {model_dir.version_dir(ref.version)}/{MANIFEST}, or deploy another version")
    return Candidate(model=ref.model, version=ref.version, run_id=manifest.run_id, alias=ref.alias,
                     sha256=manifest.sha256, size_bytes=manifest.size_bytes, config_pbtxt=to_pbtxt(config),
                     reused=True, warm=True)


def active_config(model_dir: ModelDir, snapshot: Snapshot) -> model_config_pb2.ModelConfig | None:
    """The config the active version runs under (None before the first commit)."""
    if snapshot.active_version is None:
        return None
    return model_dir.version_config(snapshot.active_version, snapshot.config_text)


def _model_config(model_dir: ModelDir, snapshot: Snapshot, signature: Signature,
                  runtime: str) -> model_config_pb2.ModelConfig:
    """The config an ONNX candidate runs under: the active version's, if it is an ONNX version too, else one
    built from the candidate's signature (for the first version, or after a version of the triton flavor)."""
    active = snapshot.active_version
    manifest = model_dir.read_manifest(active) if active is not None else None
    if snapshot.config_text is not None and (manifest is None or manifest.flavor == "onnx"):
        config = active_config(model_dir, snapshot) or from_pbtxt(snapshot.config_text)
        return with_versions(config, [])
    return build_config(snapshot.model, signature, runtime)


def _verify_onnx(path: Path, model_dir: ModelDir, snapshot: Snapshot, runtime: str) -> model_config_pb2.ModelConfig:
    """Check the file is an ONNX model whose inputs and outputs fit the model's config.

    The graph itself is checked by onnxruntime when Triton loads the candidate beside the active
    version: that load is atomic, says exactly what is wrong, and a failure rolls back in milliseconds,
    whereas checking the graph here too would cost about 2 ms per MB on every deploy.
    """
    try:
        signature = read_onnx_signature(path)
    except NotOnnx as error:
        raise StepFailed(Step.MATERIALIZE, error.message, error.hint) from None
    config = _model_config(model_dir, snapshot, signature, runtime)
    problems = signature_mismatches(signature, config_signature(config))
    if problems:
        raise StepFailed(Step.MATERIALIZE, "model.onnx does not match the model's config: " + "; ".join(problems),
                         "a version must keep the model's inputs and outputs; a new signature needs a new model name")
    return config


def check_signature(model_dir: ModelDir, snapshot: Snapshot, config: model_config_pb2.ModelConfig,
                    version: int, allowed: bool) -> None:
    """Refuse a candidate whose inputs or outputs would break the active version's clients, unless asked to."""
    active = active_config(model_dir, snapshot)
    changes = signature_changes(active, config) if active is not None and not allowed else []
    if changes:
        raise StepFailed(Step.MATERIALIZE, f"v{version} changes the model's signature, which would break every "
                         f"client of v{snapshot.active_version}: " + "; ".join(changes),
                         "give the new signature a new model name, or deploy with --allow-signature-change "
                         "(DAG param allow_signature_change, -C allow_signature_change=true) once clients are ready")


def stage(ferry: Services, model_dir: ModelDir, ref: VersionRef, snapshot: Snapshot,
          allow_signature_change: bool = False) -> Candidate:
    artifacts = ferry.registry.artifacts(ref)
    sizes = artifacts.sizes()
    directory = triton_flavor.is_directory(sizes)
    if not directory:
        _check_onnx_listing(ferry, ref, sizes)
    model_dir.ensure()
    staging = model_dir.new_staging_dir(ref.version, snapshot.deploy_id)
    try:
        if directory:
            config, size, digest, files = _fill_from_directory(ferry, artifacts, staging, sizes)
        else:
            config, size, digest = _fill_staging(ferry, artifacts, model_dir, staging, snapshot, sizes)
            files = {}
        config_text = to_pbtxt(config)
        manifest = Manifest(
            model=ref.model, version=ref.version, run_id=ref.run_id, source=ref.source, sha256=digest,
            size_bytes=size, deploy_id=snapshot.deploy_id, staged_at_utc=utc_stamp(),
            runtime=ferry.settings.triton.runtime,
            flavor="triton" if directory else "onnx", config_pbtxt=config_text,
            config_sha256=config_digest(config_text), files=files,
        )
        # Before the checks: a version refused by them is quarantined with the config it brought.
        atomic_write(staging / MANIFEST, manifest.model_dump_json(indent=1).encode())
        check_signature(model_dir, snapshot, config, ref.version, allow_signature_change)
        if (staging / SMOKE_FILE).exists():
            _check_sample(staging / SMOKE_FILE, config)
    except FerryError as error:
        if not_the_versions_fault(error):
            model_dir.discard_staging(staging)  # ferry's setup, or MLflow or its store stopped answering: keep none
        raise
    except OSError as error:
        if not disk_full(error):
            raise
        model_dir.discard_staging(staging)  # half a version is no evidence worth keeping, and it holds the space
        raise StepFailed(Step.MATERIALIZE, f"no space left on the device of {model_dir.path} while staging "
                         f"v{ref.version}: {error.strerror}",
                         "free space there (old quarantined versions count too) and deploy again; "
                         "the partial files were removed") from None
    model_dir.publish_version(staging, ref.version)
    return Candidate(model=ref.model, version=ref.version, run_id=ref.run_id, alias=ref.alias, sha256=digest,
                     size_bytes=size, config_pbtxt=config_text)


def _check_onnx_listing(ferry: Services, ref: VersionRef, sizes: dict[str, int]) -> None:
    limit = ferry.settings.deploy.max_artifact_bytes
    if "model.onnx" not in sizes:
        raise StepFailed(Step.MATERIALIZE, f"version {ref.version} has neither model.onnx nor a Triton model "
                         f"directory at {ref.artifact_uri}",
                         "log the model with ferry.publish.log_onnx_model or log_triton_model")
    if sizes["model.onnx"] > limit:
        raise StepFailed(Step.MATERIALIZE, f"model.onnx is {sizes['model.onnx']} bytes, over the limit of {limit}",
                         "raise FERRY_MAX_ARTIFACT_MB if the model really is that large")


def _fill_from_directory(ferry: Services, artifacts: Artifacts, staging: Path,
                         sizes: dict[str, int]) -> tuple[model_config_pb2.ModelConfig, int, str, dict[str, str]]:
    """Stage a triton-flavor version's folder and its smoke sample: the config, size, sha256 and every file's."""
    scratch = staging / ".artifacts"
    folder = triton_flavor.model_folder(artifacts, sizes, scratch)
    where = triton_flavor.layout({**sizes, **artifacts.tree(folder)}, folder)
    triton_flavor.check_tree_limit(where, ferry.settings.deploy.max_artifact_bytes)
    config = triton_flavor.read_config(artifacts, where, scratch)
    if where.smoke is not None:
        os.rename(artifacts.download(where.smoke, scratch), staging / SMOKE_FILE)
    files = triton_flavor.download_version(artifacts, where, staging)
    return config, sum(where.files.values()), triton_flavor.tree_digest(files), files


def _fill_staging(ferry: Services, artifacts: Artifacts, model_dir: ModelDir, staging: Path, snapshot: Snapshot,
                  sizes: dict[str, int]) -> tuple[model_config_pb2.ModelConfig, int, str]:
    """Download and check the version's files and add the runner; the config, model size and sha256."""
    limit = ferry.settings.deploy.max_artifact_bytes
    wanted = ["model.onnx"] + ([SMOKE_FILE] if SMOKE_FILE in sizes else [])
    with ThreadPoolExecutor(len(wanted)) as pool:  # each download is a round trip to the artifact store
        onnx_path, *_ = pool.map(lambda name: artifacts.download(name, staging), wanted)
    size = onnx_path.stat().st_size
    if size > limit:
        raise StepFailed(Step.MATERIALIZE, f"model.onnx is {size} bytes, over the limit of {limit}")
    config = _verify_onnx(onnx_path, model_dir, snapshot, ferry.settings.triton.runtime)
    if ferry.settings.triton.runtime == "python":
        runner = ferry.settings.triton.python_runner or importlib.resources.files("ferry.runtime") / "onnx_runner.py"
        shutil.copyfile(str(runner), staging / "model.py")
        # Compiled now, so that the backend stub (same Python) has no bytecode to write into the live
        # version directory: a change there makes Triton re-create every loaded version on the next load.
        py_compile.compile(str(staging / "model.py"), doraise=True)
    return config, size, artifacts.sha256("model.onnx", onnx_path)


def _check_sample(path: Path, config: model_config_pb2.ModelConfig) -> None:
    """A smoke sample must fit the candidate's config: its inputs, their datatypes and shapes."""
    try:
        sample = load_sample(path)
    except InvalidInput as error:
        raise StepFailed(Step.MATERIALIZE, error.message, error.hint) from None
    inputs = {t.name: t for t in config_signature(config).inputs}
    if set(sample.inputs) != set(inputs):
        raise StepFailed(Step.MATERIALIZE,
                         f"smoke.json gives inputs {sorted(sample.inputs)}, the model takes {sorted(inputs)}")
    for name, value in sample.inputs.items():
        spec = inputs[name]
        if not shape_fits(list(value.shape), spec.dims):
            raise StepFailed(Step.MATERIALIZE, f"smoke.json's input '{name}' has shape {list(value.shape)}, the "
                             f"config says {list(spec.dims)}", "log a sample that fits the version's config")
        if config.max_batch_size and value.shape and value.shape[0] > config.max_batch_size:
            raise StepFailed(Step.MATERIALIZE, f"smoke.json's input '{name}' has a batch of {value.shape[0]}, over "
                             f"the config's max_batch_size {config.max_batch_size}", "log a smaller sample")


class ForeignVersion(InvalidInput):
    """A version directory ferry did not write (or that changed since): the deploy is refused, the directory
    left as it is, and nothing is rolled back, since nothing was touched."""


def reuse(model_dir: ModelDir, ref: VersionRef, snapshot: Snapshot, allow_signature_change: bool = False) -> Candidate:
    """A version directory already exists: use it only if ferry staged it from the same run, intact."""
    folder = model_dir.version_dir(ref.version)
    manifest = model_dir.read_manifest(ref.version)
    hint = f"ferry did not stage it for this run: move {folder} out of the repository and deploy again"
    if manifest is None or manifest.run_id != ref.run_id:
        raise ForeignVersion(f"{folder} exists but holds no ferry manifest for run {ref.run_id}", hint)
    if manifest.flavor == "triton":
        changed = triton_flavor.verify_files(folder, manifest.files)
        if changed:
            raise ForeignVersion(f"{folder} changed since ferry staged it: {'; '.join(changed[:3])}", hint)
        config = model_dir.version_config(ref.version)
        assert config is not None, "a triton-flavor manifest records its config"
    else:
        if sha256_file(folder / "model.onnx") != manifest.sha256:
            raise ForeignVersion(f"{folder}/model.onnx changed since ferry staged it (sha256 differs)", hint)
        config = model_dir.version_config(ref.version) or \
            _model_config(model_dir, snapshot, read_onnx_signature(folder / "model.onnx"), manifest.runtime)
    check_signature(model_dir, snapshot, config, ref.version, allow_signature_change)
    return Candidate(model=ref.model, version=ref.version, run_id=ref.run_id, alias=ref.alias,
                     sha256=manifest.sha256, size_bytes=manifest.size_bytes, config_pbtxt=to_pbtxt(config),
                     reused=True)
