"""The steps of the deploy transaction: snapshot -> materialize -> load -> ready -> smoke -> commit, or undo.

Each step is a plain function over typed records; :mod:`ferry.core.runner` runs them (lock, journal,
timing, history) for the CLI, the DAG and ``ferry recover`` alike. A step that fails raises
:class:`StepFailed`; :func:`undo` then puts back the state the snapshot recorded.
"""

from __future__ import annotations

import datetime as dt
import importlib.resources
import py_compile
import shutil
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TypeVar

from ferry.core.config import Endpoint, Settings, parse_endpoint
from ferry.core.current import read_current, restore_current, write_current
from ferry.core.errors import FerryError, InvalidInput, StepFailed, TritonError, TritonTimeout
from ferry.core.fleet import Fleet, ReplicaFailed, resolve_replicas
from ferry.core.front import disk_config, front_config, front_files, store_config, store_name
from ferry.core.fsutil import atomic_write, sha256_file
from ferry.core.model_config import (
    NotOnnx,
    Signature,
    build_config,
    config_signature,
    from_pbtxt,
    model_config_pb2,
    read_onnx_signature,
    signature_mismatches,
    to_override_json,
    to_pbtxt,
    with_versions,
)
from ferry.core.records import (
    Candidate,
    CurrentState,
    Failure,
    Manifest,
    QuarantineReason,
    RollbackReport,
    Snapshot,
    Step,
    parse_utc_stamp,
    utc_stamp,
)
from ferry.core.registry import Artifacts, Registry, VersionRef, disk_full
from ferry.core.repository import MANIFEST, ModelDir, check_name
from ferry.core.rollout import remove_rollout
from ferry.core.smoke import SMOKE_FILE, load_sample, output_problems, synthetic_sample
from ferry.core.stubs import stop_stubs_of
from ferry.core.triton import Placement, Triton, placement

T = TypeVar("T")


@dataclass
class Ferry:
    """The services a deploy talks to, built from settings (or given: the unit tests pass in-process fakes)."""

    settings: Settings
    given_replicas: list[Triton] | None = None
    given_registry: Registry | None = None
    _registry_future: Future[Registry] | None = field(default=None, repr=False)
    _clients: dict[str, Triton] = field(default_factory=dict, repr=False)

    def fleet(self, urls: list[str] | None = None) -> Fleet:
        """The replicas at ``urls`` (a deploy's, from its snapshot), else those FERRY_TRITON_URL names now."""
        if self.given_replicas is not None:
            return Fleet([r for r in self.given_replicas if urls is None or r.url in urls])
        endpoints = [parse_endpoint(url) for url in urls] if urls else resolve_replicas(self.settings.replica_sources)
        if not endpoints:
            raise InvalidInput("no Triton replica to act on", "set FERRY_TRITON_URL")
        return Fleet([self._client(endpoint) for endpoint in endpoints])

    def _client(self, endpoint: Endpoint) -> Triton:
        if endpoint.url not in self._clients:
            s = self.settings
            self._clients[endpoint.url] = Triton(endpoint.url, timeout_s=s.triton_timeout_s,
                                                 load_timeout_s=s.load_timeout_s, api_key=s.model_control_key())
        return self._clients[endpoint.url]

    @property
    def triton(self) -> Triton:
        """The first replica: the one Triton of a single-server setup (the local one, in the demo and tests)."""
        return self.fleet().replicas[0]

    def start_registry(self) -> None:
        """Start MLflow's client in the background (importing mlflow takes about a second); ``registry`` waits."""
        if self.given_registry is None and self._registry_future is None and "registry" not in self.__dict__:
            pool = ThreadPoolExecutor(1, thread_name_prefix="ferry-registry")
            self._registry_future = pool.submit(Registry, self.settings.tracking_uri)
            pool.shutdown(wait=False)

    @cached_property
    def registry(self) -> Registry:
        if self.given_registry is not None:
            return self.given_registry
        if self._registry_future is not None:
            return self._registry_future.result()
        return Registry(self.settings.tracking_uri)

    def model_dir(self, model: str) -> ModelDir:
        return ModelDir(self.settings.repository, model)


def as_step_failure(step: Step, error: BaseException) -> StepFailed:
    """Any error raised inside a step, as the failure the undo and the history record."""
    if isinstance(error, StepFailed):
        return error
    if isinstance(error, KeyboardInterrupt):
        return StepFailed(step, f"interrupted (SIGINT or SIGTERM) during {step}", "deploy again when ready")
    if isinstance(error, FerryError):
        return StepFailed(step, error.message, error.hint, retryable=error.retryable, detail=error.detail)
    return StepFailed(step, f"unexpected {type(error).__name__}: {error}",
                      "this is a bug in ferry; the history has the details")


def failure_of(error: StepFailed, rejected: bool = False) -> Failure:
    """A step's failure as the journal keeps it, so that an interrupted undo is redone with its reason.

    The message is one line (a backend's stack trace goes to ``detail``, for the history and reason.json)."""
    first, newline, _ = error.message.strip().partition("\n")
    detail = error.detail or (error.message if newline else "")
    return Failure(step=error.step, message=first, hint=error.hint, detail=detail, version=error.version,
                   replica=error.replica, rejected=rejected, retryable=error.retryable)


def on_every_replica(fleet: Fleet, action: Callable[[Triton], T]) -> dict[str, T]:
    """``action`` on every replica of the deploy at once; a step's failure names the replica it failed on."""
    try:
        return fleet.each(action)
    except ReplicaFailed as failed:
        cause = failed.cause
        if isinstance(cause, StepFailed):
            raise StepFailed(cause.step, cause.message, cause.hint, cause.version, cause.retryable,
                             cause.detail, replica=failed.replica) from None
        raise


# ---------------------------------------------------------------- snapshot


def take_snapshot(ferry: Ferry, model: str) -> Snapshot:
    """Record what is committed and what every replica serves. Raises FerryError if any cannot be read,
    and refuses a model that Triton serves while ferry has no state for it: its rollback could not restore it."""
    model_dir = ferry.model_dir(model)
    current = read_current(model_dir)
    fleet = ferry.fleet()
    indexes = fleet.each(lambda triton: triton.index())
    foreign = sorted({v.version for index in indexes.values() for v in index.get(model, []) if v.state == "READY"})
    if current is None and foreign:
        raise InvalidInput(f"Triton serves v{', v'.join(map(str, foreign))} of '{model}', but ferry has no state for "
                           "it (another tool deployed it)", f"take it over first with `ferry adopt {model}`")
    placements = {url: placement(index, model) for url, index in indexes.items()}
    serving = {url: where.serving for url, where in placements.items()}
    served = sorted(set().union(*serving.values()))
    return Snapshot(
        model=model,
        deploy_id=f"{utc_stamp()}-{uuid.uuid4().hex[:6]}",
        started_at_utc=utc_stamp(),
        current=current,
        config_text=model_dir.read_config_text(),
        triton_ready=served,
        replicas=serving,
        stores={url: where.store for url, where in placements.items()},
    )


def fleet_of(ferry: Ferry, snapshot: Snapshot) -> Fleet:
    return ferry.fleet(snapshot.replica_urls)


# ---------------------------------------------------------------- materialize


def resolve(ferry: Ferry, model_dir: ModelDir, alias: str | None, version: int | None) -> VersionRef:
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


def materialize(ferry: Ferry, snapshot: Snapshot, alias: str | None = None, version: int | None = None) -> Candidate:
    """Resolve the target and stage its files as ``<model>/<version>/``, verified.

    A target that cannot be resolved raises FerryError (nothing was touched); a version that
    cannot be staged raises StepFailed, with what was downloaded left for the undo to quarantine.
    The active version is a candidate too when Triton does not serve it (after a restart):
    it goes through load, ready and smoke again.
    """
    model_dir = ferry.model_dir(snapshot.model)
    ref = resolve(ferry, model_dir, alias, version)
    if ref.version == snapshot.active_version and snapshot.current is not None:
        return Candidate(
            model=ref.model, version=ref.version, run_id=ref.run_id, alias=alias, sha256=snapshot.current.sha256,
            size_bytes=0, config_pbtxt=snapshot.config_text or "", already_active=True,
            revalidate=any(served != [ref.version] for served in _served_by_replica(snapshot)),
        )
    try:
        if is_warm(snapshot, ref.version):
            return _warm(model_dir, ref, snapshot)
        if model_dir.version_dir(ref.version).exists():
            return _reuse(model_dir, ref, snapshot)
        return _stage(ferry, model_dir, ref, snapshot)
    except ForeignVersion:
        raise  # refused before anything was touched: not a failed step, nothing to roll back
    except Exception as error:
        failure = as_step_failure(Step.MATERIALIZE, error)
        failure.version = ref.version
        raise failure from error


def is_warm(snapshot: Snapshot, version: int) -> bool:
    """Whether ``version`` is the previous version, kept loaded after the last commit on every replica and
    still inside its window (FERRY_KEEP_PREVIOUS_S)."""
    current = snapshot.current
    if current is None or current.previous_version != version or not current.previous_warm_until_utc:
        return False
    if parse_utc_stamp(current.previous_warm_until_utc) < parse_utc_stamp(utc_stamp()):
        return False
    return bool(snapshot.stores) and all(version in held for held in snapshot.stores.values())


def _warm(model_dir: ModelDir, ref: VersionRef, snapshot: Snapshot) -> Candidate:
    """The previous version, still loaded: it served until the last commit, and what serves is the loaded
    instance, not the files (kept, and hashed again at the next load that needs them)."""
    manifest = model_dir.read_manifest(ref.version)
    if manifest is None or snapshot.config_text is None:
        raise InvalidInput(f"v{ref.version} is loaded but ferry's manifest for it is missing",
                           f"restore {model_dir.version_dir(ref.version)}/{MANIFEST}, or deploy another version")
    return Candidate(model=ref.model, version=ref.version, run_id=manifest.run_id, alias=ref.alias,
                     sha256=manifest.sha256, size_bytes=manifest.size_bytes,
                     config_pbtxt=to_pbtxt(with_versions(from_pbtxt(snapshot.config_text), [])), reused=True, warm=True)


def _served_by_replica(snapshot: Snapshot) -> list[list[int]]:
    return list(snapshot.replicas.values()) if snapshot.replicas else [snapshot.triton_ready]


def needs_validation(candidate: Candidate) -> bool:
    """False for the active version while Triton serves it (nothing to do then), and for a warm previous
    version (proven when it was committed, and still loaded: the commit repoints the front to it)."""
    return needs_commit(candidate) and not candidate.warm


def needs_commit(candidate: Candidate) -> bool:
    """False only for the active version while Triton serves it."""
    return not candidate.already_active or candidate.revalidate


def _model_config(snapshot: Snapshot, signature: Signature, runtime: str) -> model_config_pb2.ModelConfig:
    """The config the candidate must run under: the model's existing one, else one built from its signature."""
    if snapshot.config_text is not None:
        return with_versions(from_pbtxt(snapshot.config_text), [])
    return build_config(snapshot.model, signature, runtime)


def _verify_onnx(path: Path, snapshot: Snapshot, runtime: str) -> model_config_pb2.ModelConfig:
    """Check the file is an ONNX model whose inputs and outputs fit the model's config.

    The graph itself is checked by onnxruntime when Triton loads the candidate beside the active
    version: that load is atomic, says exactly what is wrong, and a failure rolls back in milliseconds,
    whereas checking the graph here too would cost about 2 ms per MB on every deploy.
    """
    try:
        signature = read_onnx_signature(path)
    except NotOnnx as error:
        raise StepFailed(Step.MATERIALIZE, error.message, error.hint) from None
    config = _model_config(snapshot, signature, runtime)
    problems = signature_mismatches(signature, config_signature(config))
    if problems:
        raise StepFailed(Step.MATERIALIZE, "model.onnx does not match the model's config: " + "; ".join(problems),
                         "a version must keep the model's inputs and outputs; a new signature needs a new model name")
    return config


def _stage(ferry: Ferry, model_dir: ModelDir, ref: VersionRef, snapshot: Snapshot) -> Candidate:
    limit = ferry.settings.max_artifact_bytes
    artifacts = ferry.registry.artifacts(ref)
    sizes = artifacts.sizes()
    if "model.onnx" not in sizes:
        raise StepFailed(Step.MATERIALIZE, f"version {ref.version} has no model.onnx at {ref.artifact_uri}",
                         "log the model with ferry.publish.log_onnx_model")
    if sizes["model.onnx"] > limit:
        raise StepFailed(Step.MATERIALIZE, f"model.onnx is {sizes['model.onnx']} bytes, over the limit of {limit}",
                         "raise FERRY_MAX_ARTIFACT_MB if the model really is that large")
    model_dir.ensure()
    staging = model_dir.new_staging_dir(ref.version, snapshot.deploy_id)
    try:
        config, size, digest = _fill_staging(ferry, artifacts, staging, snapshot, sizes)
        manifest = Manifest(
            model=ref.model, version=ref.version, run_id=ref.run_id, source=ref.source, sha256=digest,
            size_bytes=size, deploy_id=snapshot.deploy_id, staged_at_utc=utc_stamp(), runtime=ferry.settings.runtime,
        )
        atomic_write(staging / MANIFEST, manifest.model_dump_json(indent=1).encode())
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
                     size_bytes=size, config_pbtxt=to_pbtxt(config))


def _fill_staging(ferry: Ferry, artifacts: Artifacts, staging: Path, snapshot: Snapshot,
                  sizes: dict[str, int]) -> tuple[model_config_pb2.ModelConfig, int, str]:
    """Download and check the version's files and add the runner; the config, model size and sha256."""
    limit = ferry.settings.max_artifact_bytes
    wanted = ["model.onnx"] + ([SMOKE_FILE] if SMOKE_FILE in sizes else [])
    with ThreadPoolExecutor(len(wanted)) as pool:  # each download is a round trip to the artifact store
        onnx_path, *_ = pool.map(lambda name: artifacts.download(name, staging), wanted)
    size = onnx_path.stat().st_size
    if size > limit:
        raise StepFailed(Step.MATERIALIZE, f"model.onnx is {size} bytes, over the limit of {limit}")
    config = _verify_onnx(onnx_path, snapshot, ferry.settings.runtime)
    if (staging / SMOKE_FILE).exists():
        _check_sample(staging / SMOKE_FILE, config)
    if ferry.settings.runtime == "python":
        runner = ferry.settings.python_runner or importlib.resources.files("ferry.runtime") / "onnx_runner.py"
        shutil.copyfile(str(runner), staging / "model.py")
        # Compiled now, so that the backend stub (same Python) has no bytecode to write into the live
        # version directory: a change there makes Triton re-create every loaded version on the next load.
        py_compile.compile(str(staging / "model.py"), doraise=True)
    return config, size, artifacts.sha256("model.onnx", onnx_path)


def _check_sample(path: Path, config: model_config_pb2.ModelConfig) -> None:
    try:
        sample = load_sample(path)
    except InvalidInput as error:
        raise StepFailed(Step.MATERIALIZE, error.message, error.hint) from None
    wanted = {t.name for t in config_signature(config).inputs}
    if set(sample.inputs) != wanted:
        raise StepFailed(Step.MATERIALIZE,
                         f"smoke.json gives inputs {sorted(sample.inputs)}, the model takes {sorted(wanted)}")


class ForeignVersion(InvalidInput):
    """A version directory ferry did not write (or that changed since): the deploy is refused, the directory
    left as it is, and nothing is rolled back, since nothing was touched."""


def _reuse(model_dir: ModelDir, ref: VersionRef, snapshot: Snapshot) -> Candidate:
    """A version directory already exists: use it only if ferry staged it from the same run, intact."""
    folder = model_dir.version_dir(ref.version)
    manifest = model_dir.read_manifest(ref.version)
    hint = f"ferry did not stage it for this run: move {folder} out of the repository and deploy again"
    if manifest is None or manifest.run_id != ref.run_id:
        raise ForeignVersion(f"{folder} exists but holds no ferry manifest for run {ref.run_id}", hint)
    if sha256_file(folder / "model.onnx") != manifest.sha256:
        raise ForeignVersion(f"{folder}/model.onnx changed since ferry staged it (sha256 differs)", hint)
    config = _model_config(snapshot, read_onnx_signature(folder / "model.onnx"), manifest.runtime)
    return Candidate(model=ref.model, version=ref.version, run_id=ref.run_id, alias=ref.alias,
                     sha256=manifest.sha256, size_bytes=manifest.size_bytes, config_pbtxt=to_pbtxt(config),
                     reused=True)


# ---------------------------------------------------------------- load, ready, smoke


def load(ferry: Ferry, snapshot: Snapshot, candidate: Candidate) -> None:
    """Load the candidate into the store beside the active version: the front still serves the active one,
    whose instance is updated in place, not re-created."""
    if not needs_validation(candidate):
        return
    versions = [v for v in (snapshot.active_version, candidate.version) if v is not None]
    if snapshot.config_text is None:
        # Triton records a config override's time only when config.pbtxt exists, and a later load of the front
        # then finds the store unchanged; the undo removes the file again (the snapshot had none).
        ferry.model_dir(snapshot.model).write_config(disk_config(from_pbtxt(candidate.config_pbtxt), versions))
    config = to_override_json(store_config(from_pbtxt(candidate.config_pbtxt), snapshot.model, versions))
    on_every_replica(fleet_of(ferry, snapshot), lambda triton: _load_on(triton, snapshot.model, config, candidate))


def _load_on(triton: Triton, model: str, config_json: str, candidate: Candidate) -> None:
    try:
        triton.load(store_name(model), config_json)
    except TritonTimeout as error:
        raise StepFailed(Step.LOAD, f"load of v{candidate.version} timed out: {error.message}",
                         "a backend that cannot start hangs the load; see the Triton log") from error
    except TritonError as error:
        raise StepFailed(Step.LOAD, f"Triton could not load v{candidate.version}: {error.message}",
                         error.hint, retryable=error.retryable, detail=error.detail) from error


def wait_ready(ferry: Ferry, snapshot: Snapshot, candidate: Candidate) -> None:
    if not needs_validation(candidate):
        return
    timeout_s = ferry.settings.ready_timeout_s
    on_every_replica(fleet_of(ferry, snapshot),
                     lambda triton: _wait_ready_on(triton, store_name(snapshot.model), candidate.version, timeout_s))


def _wait_ready_on(triton: Triton, model: str, version: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            if triton.version_ready(model, version):
                return
        except TritonError as error:
            raise StepFailed(Step.READY, error.message) from error
        if time.monotonic() > deadline:
            states = {v.version: f"{v.state} {v.reason}".strip() for v in triton.versions(model)}
            raise StepFailed(Step.READY, f"v{version} not ready after {timeout_s:g} s: "
                             f"{states.get(version, 'unknown to Triton')}")
        time.sleep(0.05)


def smoke(ferry: Ferry, snapshot: Snapshot, candidate: Candidate) -> dict:
    """Infer on the candidate version alone; check outputs against the config and the golden outputs."""
    if not needs_validation(candidate):
        return {}
    signature = config_signature(from_pbtxt(candidate.config_pbtxt))
    sample_path = ferry.model_dir(snapshot.model).version_dir(candidate.version) / SMOKE_FILE
    sample = load_sample(sample_path) if sample_path.exists() else synthetic_sample(signature)
    datatypes = {t.name: t.datatype for t in signature.inputs}
    rtol = sample.rtol if sample.rtol is not None else ferry.settings.rtol
    atol = sample.atol if sample.atol is not None else ferry.settings.atol

    def smoke_on(triton: Triton) -> dict[str, list[int]]:
        try:
            outputs = triton.infer(store_name(snapshot.model), candidate.version, sample.inputs, datatypes)
        except TritonError as error:
            raise StepFailed(Step.SMOKE, f"inference on v{candidate.version} failed: {error.message}",
                             detail=error.detail) from error
        problems = output_problems(signature, outputs, sample.golden, rtol, atol)
        if problems:
            raise StepFailed(Step.SMOKE, "; ".join(problems))
        return {name: list(v.shape) for name, v in outputs.items()}

    shapes = on_every_replica(fleet_of(ferry, snapshot), smoke_on)
    return {"golden": sample.golden is not None, "outputs": next(iter(shapes.values())), "replicas": len(shapes)}


# ---------------------------------------------------------------- commit


def commit(ferry: Ferry, snapshot: Snapshot, candidate: Candidate) -> tuple[CurrentState | None, list[str]]:
    """Write current.json (the commit point), then repoint every replica's front to the new version and
    let the store drop the old one (or keep it warm for FERRY_KEEP_PREVIOUS_S)."""
    model_dir = ferry.model_dir(snapshot.model)
    if candidate.already_active:
        pinned = pin_after_commit(model_dir, candidate, fleet_of(ferry, snapshot)) if candidate.revalidate else []
        return snapshot.current, pinned
    keep_s = ferry.settings.keep_previous_s
    warm_until = utc_stamp(dt.datetime.now(dt.UTC) + dt.timedelta(seconds=keep_s)) \
        if keep_s > 0 and snapshot.active_version is not None else None
    state = CurrentState(
        active_version=candidate.version, run_id=candidate.run_id, alias=candidate.alias,
        updated_at_utc=utc_stamp(), model=snapshot.model, previous_version=snapshot.active_version,
        sha256=candidate.sha256, deploy_id=snapshot.deploy_id, previous_warm_until_utc=warm_until,
    )
    try:
        write_current(model_dir, state)
    except OSError as error:
        raise StepFailed(Step.COMMIT, f"cannot write {model_dir.current_path}: {error}") from error
    remove_rollout(model_dir)  # after current.json: the candidate is the active version now
    warm = snapshot.active_version if warm_until else None
    return state, pin_after_commit(model_dir, candidate, fleet_of(ferry, snapshot), warm, snapshot.active_version)


def pin_after_commit(model_dir: ModelDir, candidate: Candidate, fleet: Fleet, warm: int | None = None,
                     previous: int | None = None) -> list[str]:
    """After the commit point a failure is drift for reconcile to repair, never a reason to un-commit."""
    failed = pin(model_dir, candidate.config_pbtxt, candidate.version, fleet, warm, previous)
    where = "replica {}".format if len(fleet.replicas) > 1 else (lambda url: "Triton")
    return [f"committed v{candidate.version}, but pinning {where(url)} to it failed: {error} "
            "(drift: run `ferry reconcile`)" for url, error in failed.items()]


def pin(model_dir: ModelDir, config_pbtxt: str, version: int, fleet: Fleet, warm: int | None = None,
        previous: int | None = None) -> dict[str, FerryError]:
    """Make every replica's front serve ``version`` and its store hold it alone (and ``warm``, the previous
    version kept loaded); then config.pbtxt says so. ``previous``: what the fronts served until now, kept
    loaded until they are repointed. The replicas that failed, with why."""
    config = from_pbtxt(config_pbtxt)
    keep = sorted({version} | ({warm} if warm is not None else set()))
    during = [previous] if previous is not None else []
    results = fleet.settled(lambda triton: serve(triton, model_dir.model, config, version, keep, during))
    failed: dict[str, FerryError] = {url: r for url, r in results.items() if isinstance(r, FerryError)}
    try:
        model_dir.write_config(disk_config(config, keep))
    except OSError as error:
        failed[str(model_dir.config_path)] = FerryError(f"writing {model_dir.config_path} failed: {error}")
    return failed


def serve(triton: Triton, model: str, config: model_config_pb2.ModelConfig, version: int, keep: list[int],
          during: list[int] | None = None) -> None:
    """Point ``model``'s front at ``version`` and leave its store holding ``keep`` (which includes it).

    The store is loaded first, holding ``during`` too (what the front serves until it is repointed: an
    in-place update of what is loaded already), so that the front, whose load makes Triton poll the store,
    finds it current; the front is repointed; only then does the store drop ``during`` (Triton drains it)."""
    store = store_name(model)
    hold = sorted(set(keep) | set(during or ()))
    triton.load(store, to_override_json(store_config(config, model, hold)))
    triton.load(model, to_override_json(front_config(config, model, version)), front_files(model, version))
    if hold != keep:
        triton.load(store, to_override_json(store_config(config, model, keep)))


def retire(triton: Triton, model: str) -> None:
    """Nothing of ``model`` loaded: its front first, so that no client reaches a store being unloaded.
    Both are asked even if the first refuses (Triton refuses to unload a model it never had)."""
    refused: TritonError | None = None
    for name in (model, store_name(model)):
        try:
            triton.unload(name)
        except TritonError as error:
            refused = refused or error
    if refused is not None:
        raise refused


# ---------------------------------------------------------------- undo


def _quarantine_failed(model_dir: ModelDir, snapshot: Snapshot, candidate: int | None,
                       reason: QuarantineReason) -> list[str]:
    """Quarantine what this deploy staged and the candidate version, if there was one: never delete them."""
    folders = dict(model_dir.staging_dirs(snapshot.deploy_id))
    if candidate is not None and candidate != snapshot.active_version and model_dir.version_dir(candidate).exists():
        folders[model_dir.version_dir(candidate)] = candidate
    return [str(model_dir.quarantine(folder, reason.model_copy(update={"version": v})))
            for folder, v in folders.items()]


def _serve_only_active(fleet: Fleet, snapshot: Snapshot) -> None:
    """Every replica back to the active version alone (or to nothing); raises if any replica refused."""
    if snapshot.current is None:
        fleet.each(lambda triton: retire(triton, snapshot.model))
    else:
        config = from_pbtxt(snapshot.config_text or "")
        active = snapshot.current.active_version
        fleet.each(lambda triton: serve(triton, snapshot.model, config, active, [active]))


def wait_serving(fleet: Fleet, model: str, wanted: list[int], timeout_s: float = 5.0,
                 held: list[int] | None = None) -> tuple[bool, dict[str, list[int] | FerryError]]:
    """True once every replica serves exactly ``wanted`` and its store holds nothing else (or ``held``: the
    previous version kept warm too; a version that is unloading no longer counts); what each replica
    serves (or why it could not say) either way."""
    def settled(where: Placement | FerryError) -> bool:
        return isinstance(where, Placement) and where.front == wanted and where.store in (wanted, held or wanted)

    def wait_on(triton: Triton) -> Placement:
        deadline = time.monotonic() + timeout_s
        while True:
            where = triton.placement(model)
            if settled(where) or time.monotonic() > deadline:
                return where
            time.sleep(0.05)

    placements = fleet.settled(wait_on)
    serving: dict[str, list[int] | FerryError] = {
        url: where if isinstance(where, FerryError) else where.serving for url, where in placements.items()}
    verified = all(settled(where) for where in placements.values())
    return verified, serving


def undo(ferry: Ferry, snapshot: Snapshot, failure: Failure, candidate: int | None) -> RollbackReport:
    """Restore the snapshot's state, quarantine the failed version, and make Triton serve the active one.

    ``candidate`` is the version materialize produced (staged or reused), None if it produced none;
    what this deploy left half-staged is found by its deploy id. Best effort: every action is tried
    even if an earlier one failed, and the report says what worked.
    """
    model_dir = ferry.model_dir(snapshot.model)
    actions: list[str] = []
    problems: list[str] = []
    reason = QuarantineReason(deploy_id=snapshot.deploy_id, model=snapshot.model, failed_step=failure.step,
                              error=failure.message, hint=failure.hint, detail=failure.detail,
                              failed_at_utc=utc_stamp())

    def attempt(what: str, action: Callable[[], object]) -> object:
        try:
            result = action()
        except Exception as error:  # best effort: record it and go on with the next action
            problems.append(f"{what}: {error}")
            return None
        actions.append(what)
        return result

    if attempt("checked rollout.json", lambda: remove_rollout(model_dir)):  # first: no request to the candidate
        actions.append("removed rollout.json")
    if attempt("checked current.json", lambda: restore_current(model_dir, snapshot.current)):
        actions.append("restored current.json")
    attempt("restored config.pbtxt", lambda: model_dir.restore_config_text(snapshot.config_text))
    if failure.step == Step.LOAD and candidate is not None:
        attempt("stopped the candidate's backend stubs", lambda: stop_stubs_of(model_dir.version_dir(candidate)))
    fleet = fleet_of(ferry, snapshot)
    # Pin Triton before moving the candidate away: with the model directory unchanged since the
    # candidate's load, Triton keeps the active version's running instance instead of re-creating it.
    attempt("asked Triton to serve only the active version", lambda: _serve_only_active(fleet, snapshot))
    wanted = [snapshot.active_version] if snapshot.current else []
    verified, states = wait_serving(fleet, snapshot.model, wanted)
    problems += serving_problems(states, wanted)
    replicas = {url: s for url, s in states.items() if not isinstance(s, FerryError)}
    serving = sorted(set().union(*replicas.values())) if replicas else []
    quarantined = attempt("quarantined the failed version",
                          lambda: _quarantine_failed(model_dir, snapshot, candidate, reason))
    if ferry.settings.quarantine_keep > 0:
        attempt("pruned the files of older quarantined versions",
                lambda: model_dir.prune_quarantine(ferry.settings.quarantine_keep))
    return RollbackReport(actions=actions, quarantined=quarantined or [], verified=verified, serving=serving,
                          problems=problems, replicas=replicas)


def serving_problems(states: dict[str, list[int] | FerryError], wanted: list[int]) -> list[str]:
    """What is wrong with what each replica serves, one line per replica (Triton, for a single server)."""
    problems = []
    for url, state in states.items():
        where = f"replica {url}" if len(states) > 1 else "Triton"
        if isinstance(state, FerryError):
            problems.append(f"could not verify what {where} serves: {state}")
        elif state != wanted:
            problems.append(f"{where} serves {state or 'nothing'}, expected {wanted or 'nothing'}")
    return problems


def committed_by(model_dir: ModelDir, deploy_id: str) -> bool:
    """Whether current.json names this deploy: the commit point, which decides finish or undo."""
    try:
        current = read_current(model_dir)
    except FerryError:
        return False  # current.json is written atomically, so this deploy did not damage it: restore the snapshot's
    return current is not None and current.deploy_id == deploy_id
