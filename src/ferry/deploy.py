"""The deploy transaction: snapshot -> materialize -> load -> ready -> smoke -> commit, or rollback.

Each step is a plain function over JSON-able records, so the CLI's :func:`deploy` and
the Airflow DAG's tasks run exactly the same code. A step that fails raises
:class:`StepFailed`; :func:`rollback` then puts back the state the snapshot recorded.
"""

from __future__ import annotations

import getpass
import importlib.resources
import json
import py_compile
import shutil
import socket
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Callable

from filelock import FileLock, Timeout
from google.protobuf.message import DecodeError
from pydantic import BaseModel

from ferry.config import Settings
from ferry.errors import FerryError, StepFailed
from ferry.fsutil import atomic_write, sha256_file
from ferry.journal import Journal, owner
from ferry.model_config import (
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
from ferry.registry import Artifacts, Registry, VersionRef, disk_full
from ferry.repository import MANIFEST, ModelDir, check_name
from ferry.runtime.stubs import stop_stubs_of
from ferry.smoke import SMOKE_FILE, load_sample, output_problems, synthetic_sample
from ferry.state import CurrentState, append_history, read_current, restore_current, utc_stamp, write_current
from ferry.triton import Triton, TritonError, TritonTimeout

STEPS = ("snapshot", "materialize", "load", "ready", "smoke", "commit")


@dataclass
class Ferry:
    """The services a deploy talks to, built from settings."""

    settings: Settings

    @cached_property
    def triton(self) -> Triton:
        s = self.settings
        return Triton(s.triton_url, timeout_s=s.triton_timeout_s, load_timeout_s=s.load_timeout_s,
                      api_key=s.model_control_key())

    @cached_property
    def registry(self) -> Registry:
        return Registry(self.settings.tracking_uri)

    def model_dir(self, model: str) -> ModelDir:
        return ModelDir(self.settings.repository, model)


class Snapshot(BaseModel):
    model: str
    deploy_id: str
    started_at_utc: str
    current: CurrentState | None
    config_text: str | None
    triton_ready: list[int]

    @property
    def active_version(self) -> int | None:
        return self.current.active_version if self.current else None


class Candidate(BaseModel):
    model: str
    version: int
    run_id: str
    alias: str | None
    sha256: str
    size_bytes: int
    config_pbtxt: str  # the model's config (without version policy) the candidate runs under
    already_active: bool = False
    reused: bool = False  # the version directory was staged by an earlier deploy and verified again


class RollbackReport(BaseModel):
    actions: list[str]
    quarantined: list[str]
    verified: bool
    serving: list[int]
    problems: list[str]


class DeployReport(BaseModel):
    deploy_id: str
    model: str
    kind: str  # "deploy" (from an alias) or "rollback" (to a version)
    target: str
    outcome: str  # committed | noop | rolled_back | rejected
    version: int | None = None
    previous_version: int | None = None
    run_id: str | None = None
    failed_step: str | None = None
    error: str | None = None
    hint: str | None = None
    steps: dict[str, float] = {}
    rollback: RollbackReport | None = None
    current: CurrentState | None = None
    warnings: list[str] = []
    who: str = ""
    started_at_utc: str = ""
    finished_at_utc: str = ""
    recovered_by: str | None = None  # who finished or undid it with `ferry recover`, after its process stopped

    @property
    def ok(self) -> bool:
        return self.outcome in ("committed", "noop")


def _step_failure(step: str, error: BaseException) -> StepFailed:
    if isinstance(error, StepFailed):
        return error
    if isinstance(error, KeyboardInterrupt):
        return StepFailed(step, f"interrupted (SIGINT or SIGTERM) during {step}", "deploy again when ready")
    if isinstance(error, FerryError):
        return StepFailed(step, error.message, error.hint, retryable=error.retryable)
    return StepFailed(step, f"unexpected {type(error).__name__}: {error}", "this is a bug in ferry; the history has the details")


# ---------------------------------------------------------------- snapshot


def take_snapshot(ferry: Ferry, model: str) -> Snapshot:
    """Record what is committed and what Triton serves. Raises FerryError if either cannot be read."""
    model_dir = ferry.model_dir(model)
    current = read_current(model_dir)
    ready = ferry.triton.ready_versions(model)
    return Snapshot(
        model=model,
        deploy_id=f"{utc_stamp()}-{uuid.uuid4().hex[:6]}",
        started_at_utc=utc_stamp(),
        current=current,
        config_text=model_dir.read_config_text(),
        triton_ready=ready,
    )


# ---------------------------------------------------------------- materialize


def resolve(ferry: Ferry, model: str, alias: str | None, version: int | None) -> VersionRef:
    if alias is not None:
        return ferry.registry.resolve_alias(model, check_name("alias", alias))
    if version is None:
        raise FerryError("nothing to deploy: give an alias or a version")
    return ferry.registry.get_version(model, version)


def materialize(ferry: Ferry, snapshot: Snapshot, alias: str | None = None, version: int | None = None) -> Candidate:
    """Resolve the target in MLflow and stage its files as ``<model>/<version>/``, verified.

    A target that cannot be resolved raises FerryError (nothing was touched); a version that
    cannot be staged raises StepFailed, with what was downloaded left for the rollback to quarantine.
    """
    ref = resolve(ferry, snapshot.model, alias, version)
    model_dir = ferry.model_dir(snapshot.model)
    if ref.version == snapshot.active_version:
        return Candidate(
            model=ref.model, version=ref.version, run_id=ref.run_id, alias=alias, sha256=snapshot.current.sha256,
            size_bytes=0, config_pbtxt=snapshot.config_text or "", already_active=True,
        )
    try:
        if model_dir.version_dir(ref.version).exists():
            return _reuse(model_dir, ref, snapshot)
        return _stage(ferry, model_dir, ref, snapshot)
    except Exception as error:
        failure = _step_failure("materialize", error)
        failure.version = ref.version
        raise failure from error


def _model_config(snapshot: Snapshot, signature: Signature, runtime: str):
    """The config the candidate must run under: the model's existing one, else one built from its signature."""
    if snapshot.config_text is not None:
        return with_versions(from_pbtxt(snapshot.config_text), [])
    return build_config(snapshot.model, signature, runtime)


def _verify_onnx(path: Path, snapshot: Snapshot, runtime: str):
    """Check the file is an ONNX model whose inputs and outputs fit the model's config.

    The graph itself is checked by onnxruntime when Triton loads the candidate beside the active
    version: that load is atomic, says exactly what is wrong, and a failure rolls back in milliseconds,
    whereas checking the graph here too would cost about 2 ms per MB on every deploy.
    """
    try:
        signature = read_onnx_signature(path)
    except (ValueError, IndexError, DecodeError) as error:
        raise StepFailed("materialize", f"model.onnx is not a valid ONNX model: {error}",
                         "the registered artifact is damaged: log the model again")
    config = _model_config(snapshot, signature, runtime)
    problems = signature_mismatches(signature, config_signature(config))
    if problems:
        raise StepFailed("materialize", "model.onnx does not match the model's config: " + "; ".join(problems),
                         "a version must keep the model's inputs and outputs; a new signature needs a new model name")
    return config


def _stage(ferry: Ferry, model_dir: ModelDir, ref: VersionRef, snapshot: Snapshot) -> Candidate:
    limit = ferry.settings.max_artifact_bytes
    artifacts = ferry.registry.artifacts(ref)
    sizes = artifacts.sizes()
    if "model.onnx" not in sizes:
        raise StepFailed("materialize", f"version {ref.version} has no model.onnx at {ref.artifact_uri}",
                         "log the model with ferry.publish.log_onnx_model")
    if sizes["model.onnx"] > limit:
        raise StepFailed("materialize", f"model.onnx is {sizes['model.onnx']} bytes, over the limit of {limit}",
                         "raise FERRY_MAX_ARTIFACT_MB if the model really is that large")
    model_dir.ensure()
    staging = model_dir.new_staging_dir(ref.version, snapshot.deploy_id)
    try:
        config, size, digest = _fill_staging(ferry, artifacts, staging, snapshot, sizes)
        manifest = {
            "model": ref.model, "version": ref.version, "run_id": ref.run_id, "source": ref.source,
            "sha256": digest, "size_bytes": size, "deploy_id": snapshot.deploy_id, "staged_at_utc": utc_stamp(),
            "runtime": ferry.settings.runtime,
        }
        atomic_write(staging / MANIFEST, json.dumps(manifest, indent=1).encode())
    except OSError as error:
        if not disk_full(error):
            raise
        model_dir.discard_staging(staging)  # half a version is no evidence worth keeping, and it holds the space
        raise StepFailed("materialize", f"no space left on the device of {model_dir.path} while staging "
                         f"v{ref.version}: {error.strerror}",
                         "free space there (old quarantined versions count too) and deploy again; "
                         "the partial files were removed")
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
        raise StepFailed("materialize", f"model.onnx is {size} bytes, over the limit of {limit}")
    config = _verify_onnx(onnx_path, snapshot, ferry.settings.runtime)
    if (staging / SMOKE_FILE).exists():
        _check_sample(staging / SMOKE_FILE, config)
    if ferry.settings.runtime == "python":
        runner = ferry.settings.python_runner or importlib.resources.files("ferry.runtime") / "onnx_runner.py"
        shutil.copyfile(str(runner), staging / "model.py")
        # Compiled now, so that the backend stub (same Python) has no bytecode to write into the live
        # version directory: a change there makes Triton re-create every loaded version on the next load.
        py_compile.compile(str(staging / "model.py"), doraise=True)
    return config, size, sha256_file(onnx_path)


def _check_sample(path: Path, config) -> None:
    try:
        sample = load_sample(path)
    except ValueError as error:
        raise StepFailed("materialize", str(error), "log the smoke sample again with ferry.publish.log_onnx_model")
    wanted = {t.name for t in config_signature(config).inputs}
    if set(sample.inputs) != wanted:
        raise StepFailed("materialize", f"smoke.json gives inputs {sorted(sample.inputs)}, the model takes {sorted(wanted)}")


def _reuse(model_dir: ModelDir, ref: VersionRef, snapshot: Snapshot) -> Candidate:
    """A version directory already exists: use it only if ferry staged it from the same run, intact."""
    folder = model_dir.version_dir(ref.version)
    manifest = model_dir.read_manifest(ref.version)
    hint = f"ferry did not stage it for this run: move {folder} out of the repository and deploy again"
    if manifest is None or manifest.get("run_id") != ref.run_id:
        raise FerryError(f"{folder} exists but holds no ferry manifest for run {ref.run_id}", hint)
    if sha256_file(folder / "model.onnx") != manifest["sha256"]:
        raise FerryError(f"{folder}/model.onnx changed since ferry staged it (sha256 differs)", hint)
    config = _model_config(snapshot, read_onnx_signature(folder / "model.onnx"), manifest.get("runtime", "python"))
    return Candidate(model=ref.model, version=ref.version, run_id=ref.run_id, alias=ref.alias,
                     sha256=manifest["sha256"], size_bytes=manifest["size_bytes"], config_pbtxt=to_pbtxt(config),
                     reused=True)


# ---------------------------------------------------------------- load, ready, smoke


def load(ferry: Ferry, snapshot: Snapshot, candidate: Candidate) -> None:
    """Load the candidate beside the active version: both serve, production still reaches only the active one."""
    if candidate.already_active:
        return
    versions = [v for v in (snapshot.active_version, candidate.version) if v is not None]
    config = with_versions(from_pbtxt(candidate.config_pbtxt), versions)
    try:
        ferry.triton.load(snapshot.model, to_override_json(config))
    except TritonTimeout as error:
        raise StepFailed("load", f"load of v{candidate.version} timed out: {error.message}",
                         "a backend that cannot start hangs the load; see the Triton log") from error
    except TritonError as error:
        raise StepFailed("load", f"Triton could not load v{candidate.version}: {error.message}",
                         error.hint, retryable=error.retryable) from error


def wait_ready(ferry: Ferry, snapshot: Snapshot, candidate: Candidate) -> None:
    if candidate.already_active:
        return
    deadline = time.monotonic() + ferry.settings.ready_timeout_s
    while True:
        try:
            if ferry.triton.version_ready(snapshot.model, candidate.version):
                return
        except TritonError as error:
            raise StepFailed("ready", error.message) from error
        if time.monotonic() > deadline:
            states = {v.version: f"{v.state} {v.reason}".strip() for v in ferry.triton.versions(snapshot.model)}
            raise StepFailed("ready", f"v{candidate.version} not ready after {ferry.settings.ready_timeout_s:g} s: "
                             f"{states.get(candidate.version, 'unknown to Triton')}")
        time.sleep(0.05)


def smoke(ferry: Ferry, snapshot: Snapshot, candidate: Candidate) -> dict:
    """Infer on the candidate version alone; check outputs against the config and the golden outputs."""
    if candidate.already_active:
        return {}
    signature = config_signature(from_pbtxt(candidate.config_pbtxt))
    sample_path = ferry.model_dir(snapshot.model).version_dir(candidate.version) / SMOKE_FILE
    sample = load_sample(sample_path) if sample_path.exists() else synthetic_sample(signature)
    datatypes = {t.name: t.datatype for t in signature.inputs}
    try:
        outputs = ferry.triton.infer(snapshot.model, candidate.version, sample.inputs, datatypes)
    except TritonError as error:
        raise StepFailed("smoke", f"inference on v{candidate.version} failed: {error.message}") from error
    rtol = sample.rtol if sample.rtol is not None else ferry.settings.rtol
    atol = sample.atol if sample.atol is not None else ferry.settings.atol
    problems = output_problems(signature, outputs, sample.golden, rtol, atol)
    if problems:
        raise StepFailed("smoke", "; ".join(problems))
    return {"golden": sample.golden is not None, "outputs": {name: list(v.shape) for name, v in outputs.items()}}


# ---------------------------------------------------------------- commit


def commit(ferry: Ferry, snapshot: Snapshot, candidate: Candidate) -> tuple[CurrentState, list[str]]:
    """Write current.json (the commit point), then pin the config to the new version and retire the old one."""
    model_dir = ferry.model_dir(snapshot.model)
    if candidate.already_active:
        return snapshot.current, []
    state = CurrentState(
        active_version=candidate.version, run_id=candidate.run_id, alias=candidate.alias,
        updated_at_utc=utc_stamp(), model=snapshot.model, previous_version=snapshot.active_version,
        sha256=candidate.sha256, deploy_id=snapshot.deploy_id,
    )
    try:
        write_current(model_dir, state)
    except OSError as error:
        raise StepFailed("commit", f"cannot write {model_dir.current_path}: {error}") from error
    warnings = []
    try:
        pin(ferry, model_dir, candidate.config_pbtxt, candidate.version)
    except (OSError, TritonError) as error:
        warnings.append(f"committed v{candidate.version}, but retiring v{snapshot.active_version} failed: {error}")
    return state, warnings


def pin(ferry: Ferry, model_dir: ModelDir, config_pbtxt: str, version: int) -> None:
    """Make config.pbtxt and Triton serve ``version`` alone (Triton drains any other version, then unloads it)."""
    config = with_versions(from_pbtxt(config_pbtxt), [version])
    model_dir.write_config(config)
    ferry.triton.load(model_dir.model, to_override_json(config))


# ---------------------------------------------------------------- rollback


def _quarantine_failed(model_dir: ModelDir, snapshot: Snapshot, candidate: int | None, reason: dict) -> list[str]:
    """Quarantine what this deploy staged and the candidate version, if there was one: never delete them."""
    folders = dict(model_dir.staging_dirs(snapshot.deploy_id))
    if candidate is not None and candidate != snapshot.active_version and model_dir.version_dir(candidate).exists():
        folders[model_dir.version_dir(candidate)] = candidate
    return [str(model_dir.quarantine(folder, v, {**reason, "version": v})) for folder, v in folders.items()]


def _serve_only_active(ferry: Ferry, snapshot: Snapshot) -> None:
    if snapshot.current is None:
        ferry.triton.unload(snapshot.model)
    else:
        config = with_versions(from_pbtxt(snapshot.config_text or ""), [snapshot.current.active_version])
        ferry.triton.load(snapshot.model, to_override_json(config))


def wait_serving(ferry: Ferry, model: str, wanted: list[int], timeout_s: float = 5.0) -> tuple[bool, list[int]]:
    """True once Triton serves exactly ``wanted`` (a version that is unloading no longer counts)."""
    deadline = time.monotonic() + timeout_s
    while True:
        serving = ferry.triton.ready_versions(model)
        if serving == wanted or time.monotonic() > deadline:
            return serving == wanted, serving
        time.sleep(0.05)


def rollback(ferry: Ferry, snapshot: Snapshot, failure: StepFailed, candidate: int | None) -> RollbackReport:
    """Restore the snapshot's state, quarantine the failed version, and make Triton serve the active one.

    ``candidate`` is the version materialize produced (staged or reused), None if it produced none;
    what this deploy left half-staged is found by its deploy id. Best effort: every action is tried
    even if an earlier one failed, and the report says what worked.
    """
    model_dir = ferry.model_dir(snapshot.model)
    actions: list[str] = []
    problems: list[str] = []
    reason = {
        "deploy_id": snapshot.deploy_id, "model": snapshot.model, "failed_step": failure.step,
        "error": failure.message, "hint": failure.hint, "failed_at_utc": utc_stamp(),
    }

    def attempt(what: str, action: Callable[[], object]) -> object:
        try:
            result = action()
        except Exception as error:  # best effort: record it and go on with the next action
            problems.append(f"{what}: {error}")
            return None
        actions.append(what)
        return result

    if attempt("checked current.json", lambda: restore_current(model_dir, snapshot.current)):
        actions.append("restored current.json")
    attempt("restored config.pbtxt", lambda: model_dir.restore_config_text(snapshot.config_text))
    if failure.step == "load" and candidate is not None:
        attempt("stopped the candidate's backend stubs", lambda: stop_stubs_of(model_dir.version_dir(candidate)))
    # Pin Triton before moving the candidate away: with the model directory unchanged since the
    # candidate's load, Triton keeps the active version's running instance instead of re-creating it.
    attempt("asked Triton to serve only the active version", lambda: _serve_only_active(ferry, snapshot))
    verified, serving = False, []
    try:
        wanted = [snapshot.active_version] if snapshot.current else []
        verified, serving = wait_serving(ferry, snapshot.model, wanted)
        if not verified:
            problems.append(f"Triton serves {serving}, expected {wanted}")
    except FerryError as error:
        problems.append(f"could not verify what Triton serves: {error}")
    quarantined = attempt("quarantined the failed version", lambda: _quarantine_failed(model_dir, snapshot, candidate, reason))
    if ferry.settings.quarantine_keep > 0:
        attempt("pruned the files of older quarantined versions",
                lambda: model_dir.prune_quarantine(ferry.settings.quarantine_keep))
    return RollbackReport(actions=actions, quarantined=quarantined or [], verified=verified, serving=serving, problems=problems)


def failure_record(failure: StepFailed) -> dict:
    """A step's failure as the journal keeps it, so that a rollback interrupted halfway is redone with its reason."""
    return {"step": failure.step, "message": failure.message, "hint": failure.hint, "version": failure.version}


# ---------------------------------------------------------------- the whole transaction

EventHandler = Callable[[str, str, float, str], None]  # (step, "start" | "ok" | "failed", seconds, detail)


def current_user() -> str:
    return f"{getpass.getuser()}@{socket.gethostname()}"


def model_lock(ferry: Ferry, model_dir: ModelDir) -> FileLock:
    model_dir.state.mkdir(parents=True, exist_ok=True)
    return FileLock(str(model_dir.lock_path), timeout=ferry.settings.lock_wait_s)


def deploy(
    ferry: Ferry, model: str, alias: str | None = None, version: int | None = None, on_event: EventHandler | None = None
) -> DeployReport:
    """Run the whole transaction under the model's lock and journal; always leave exactly one history record.

    Raises FerryError only for a model name that cannot be used at all; every other outcome
    (committed, noop, rolled_back, rejected) comes back as the report.
    """
    model_dir = ferry.model_dir(model)
    report = DeployReport(
        deploy_id="", model=model, kind="deploy" if alias is not None else "rollback",
        target=f"@{alias}" if alias is not None else f"v{version}", outcome="rejected",
        who=current_user(), started_at_utc=utc_stamp(),
    )
    try:
        with model_lock(ferry, model_dir):
            journal = Journal.create(model_dir, journal_record(report, "cli", alias=alias, version=version))
            _run(ferry, model, alias, version, report, journal, on_event or (lambda *args: None))
            finish(model_dir, report, journal)
            return report
    except Timeout:
        report.error = f"another deploy of '{model}' is running (it holds {model_dir.lock_path})"
        report.hint = f"wait for it (see `ferry history {model}`), or set FERRY_LOCK_WAIT_S to queue behind it"
    except FerryError as error:  # refused: a journal says another deploy is unfinished
        report.error, report.hint = error.message, error.hint
    finish(model_dir, report)
    return report


def journal_record(report: DeployReport, via: str, **target: object) -> dict:
    return {"deploy_id": "", "model": report.model, "kind": report.kind, "target": report.target, **target,
            "who": report.who, "owner": owner(via), "started_at_utc": report.started_at_utc, "step": "snapshot",
            "steps": {}}


def finish(model_dir: ModelDir, report: DeployReport, journal: Journal | None = None) -> None:
    """Write the attempt's history record, then end its journal: a journal outlives its deploy only if the process died."""
    report.finished_at_utc = utc_stamp()
    append_history(model_dir, report.model_dump(mode="json"))
    if journal is not None:
        journal.remove()


def _run(ferry: Ferry, model: str, alias: str | None, version: int | None, report: DeployReport,
         journal: Journal, emit: EventHandler) -> None:
    def timed(step: str, action: Callable[[], object], detail: Callable[[object], str] = lambda _: "") -> object:
        journal.begin(step)
        emit(step, "start", 0.0, "")
        began = time.perf_counter()
        try:
            result = action()
        except BaseException as error:
            report.steps[step] = round(time.perf_counter() - began, 4)
            emit(step, "failed", report.steps[step], str(error))
            raise
        report.steps[step] = round(time.perf_counter() - began, 4)
        emit(step, "ok", report.steps[step], detail(result))
        return result

    try:
        snapshot = timed("snapshot", lambda: take_snapshot(ferry, model),
                         lambda s: f"active v{s.active_version}" if s.current else "nothing active yet")
    except FerryError as error:
        report.error, report.hint = error.message, error.hint
        return
    report.deploy_id = snapshot.deploy_id
    report.previous_version = snapshot.active_version
    journal.update(deploy_id=snapshot.deploy_id, snapshot=snapshot.model_dump(mode="json"))
    candidate: Candidate | None = None
    step = "materialize"
    try:
        candidate = timed("materialize", lambda: materialize(ferry, snapshot, alias, version), _describe_candidate)
        journal.update(candidate=candidate.model_dump(mode="json"))
        report.version, report.run_id = candidate.version, candidate.run_id
        if candidate.already_active:
            report.outcome, report.current = "noop", snapshot.current
            report.warnings.append(f"v{candidate.version} is already active: nothing to do")
            return
        for step, action in (("load", load), ("ready", wait_ready), ("smoke", smoke)):
            timed(step, lambda action=action: action(ferry, snapshot, candidate))
        step = "commit"
        report.current, report.warnings = timed("commit", lambda: commit(ferry, snapshot, candidate),
                                                lambda r: f"current.json -> v{r[0].active_version}")
        report.outcome = "committed"
    except FerryError as error:
        if not isinstance(error, StepFailed):  # the target could not be resolved: nothing was touched
            report.error, report.hint = error.message, error.hint
            return
        _roll_back(ferry, snapshot, error, candidate, report, journal, emit)
    except (Exception, KeyboardInterrupt) as error:  # Ctrl-C too: stopping a deploy must not leave it half done
        _roll_back(ferry, snapshot, _step_failure(step, error), candidate, report, journal, emit)


def _describe_candidate(candidate: Candidate) -> str:
    if candidate.already_active:
        return f"v{candidate.version} is already active"
    origin = "reused" if candidate.reused else f"{candidate.size_bytes} bytes"
    return f"v{candidate.version} (run {candidate.run_id[:8]}, {origin}, sha256 {candidate.sha256[:12]})"


def _roll_back(ferry: Ferry, snapshot: Snapshot, failure: StepFailed, candidate: Candidate | None,
               report: DeployReport, journal: Journal, emit: EventHandler) -> None:
    journal.update(step="rollback", failure=failure_record(failure))
    report.outcome, report.failed_step = "rolled_back", failure.step
    report.error, report.hint = failure.message, failure.hint
    report.version = candidate.version if candidate else failure.version
    emit("rollback", "start", 0.0, "")
    began = time.perf_counter()
    report.rollback = rollback(ferry, snapshot, failure, candidate.version if candidate else None)
    report.steps["rollback"] = round(time.perf_counter() - began, 4)
    status = "ok" if report.rollback.verified else "failed"
    emit("rollback", status, report.steps["rollback"], "; ".join(report.rollback.problems) or
         f"serving {report.rollback.serving or 'nothing'}")
