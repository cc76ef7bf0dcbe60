"""Take over a model that another tool deployed, without reloading anything: ``ferry adopt MODEL``.

The common hand-written layout: version directories, perhaps a marker file ``current.json`` inside the
model directory (in whatever shape the other tool wrote it), perhaps ``13.failed_<UTC>``
directories beside the versions (which Triton takes for version 13). Adoption checks each version
directory against its MLflow version (the sha256 of ``model.onnx``), writes ferry's manifest into the
ones that match, moves the ``.failed_`` directories into ferry's quarantine, pins ``config.pbtxt`` to the
version every replica serves and commits it in ferry's ``current.json``. Nothing is loaded or unloaded:
production keeps serving the same version throughout. A plan is made first and can be shown alone.

What Triton serves decides the version; the old marker is then only moved aside, whatever it holds. Only
when nothing serves is the marker read, under the key names tools commonly use (LEGACY_VERSION_KEYS), or
the version is given explicitly (``ferry adopt MODEL --version N``).
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from ferry.core.current import read_current, write_current
from ferry.core.errors import FerryError, InvalidInput
from ferry.core.fsutil import atomic_write, fsync_dir, sha256_file
from ferry.core.journal import read_journal, unfinished_error
from ferry.core.lock import current_user, holding
from ferry.core.model_config import with_versions
from ferry.core.records import CurrentState, Manifest, QuarantineReason, utc_stamp
from ferry.core.repository import MANIFEST, ModelDir
from ferry.core.services import Services

ADOPTED_DIR = "adopted"
LEGACY_FILE = "current.json"
LEGACY_VERSION_KEYS = ("active_version", "version", "model_version")  # read in this order


class VersionFinding(BaseModel):
    version: int
    verdict: str  # "matches MLflow" | "not in MLflow" | "differs from MLflow" | "has no model.onnx"
    run_id: str = ""
    source: str = ""
    sha256: str = ""

    @property
    def trusted(self) -> bool:
        return self.verdict == "matches MLflow"


class AdoptionPlan(BaseModel):
    """What ``ferry adopt`` finds and will do; also kept as ``.ferry/<model>/adopted/adoption.json``."""

    model: str
    active_version: int
    served_by: dict[str, list[int]]  # each replica and what it serves
    versions: list[VersionFinding]
    failed_dirs: list[str]  # directories another tool marked failed, to move into quarantine
    legacy_current: dict[str, Any] | None = None  # the other tool's marker, if it is a JSON object
    legacy_file: str | None = None  # the other tool's marker file, moved into adopted/ whatever it holds
    alias: str | None = None
    actions: list[str] = []
    adopted_by: str = ""
    adopted_at_utc: str = ""


def plan_adoption(ferry: Services, model: str, version: int | None = None) -> AdoptionPlan:
    """Look, change nothing: what the repository holds, what MLflow says of it and what Triton serves.
    ``version``: the version to adopt when nothing serves (what serves decides otherwise)."""
    model_dir = ferry.model_dir(model)
    if read_current(model_dir) is not None:
        raise InvalidInput(f"'{model}' is already managed by ferry", f"see `ferry status {model}`")
    if not model_dir.path.is_dir():
        raise InvalidInput(f"there is no model directory {model_dir.path} to adopt", "check FERRY_REPOSITORY")
    served_by = ferry.fleet().each(lambda triton: triton.ready_versions(model))
    legacy_path = model_dir.path / LEGACY_FILE
    active = _active_version(model, served_by, legacy_path, version)
    legacy = _read_legacy(legacy_path)
    versions = [_check_version(ferry, model_dir, n) for n in _version_numbers(model_dir)]
    found = next((v for v in versions if v.version == active), None)
    if found is None or not found.trusted:
        verdict = found.verdict if found else "has no directory"
        raise InvalidInput(f"the version to adopt, v{active}, {verdict}: ferry cannot vouch for it",
                           "deploy a version MLflow has with your current tool first, or register this one")
    alias = (legacy or {}).get("alias")
    plan = AdoptionPlan(model=model, active_version=active, served_by=served_by, versions=versions,
                        failed_dirs=_failed_dirs(model_dir), legacy_current=legacy,
                        legacy_file=str(legacy_path) if legacy_path.is_file() else None,
                        alias=alias if isinstance(alias, str) else None)
    plan.actions = _actions(plan, model_dir)
    return plan


def adopt(ferry: Services, model: str, version: int | None = None) -> AdoptionPlan:
    """Carry out the plan, under the model's lock; Triton is not touched."""
    model_dir = ferry.model_dir(model)
    with holding(model_dir, ferry.settings.deploy.lock_wait_s):
        if (journal := read_journal(model_dir)) is not None:
            raise unfinished_error(model_dir, journal)
        plan = plan_adoption(ferry, model, version)
        for finding in plan.versions:
            if finding.trusted:
                _write_manifest(model_dir, finding, ferry.settings.triton.runtime)
        for name in plan.failed_dirs:
            _quarantine_failed_dir(model_dir, name)
        _pin_config(model_dir, plan.active_version)
        _commit(model_dir, plan)
        return plan


def _read_legacy(path: Path) -> dict[str, Any] | None:
    """The other tool's marker as a JSON object; None when there is none, or it is not one."""
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):  # absent, or not JSON: moved aside all the same when something serves
        return None
    return record if isinstance(record, dict) else None


def _active_version(model: str, served_by: dict[str, list[int]], legacy_path: Path, given: int | None) -> int:
    served = {tuple(versions) for versions in served_by.values()}
    if len(served) > 1:
        raise InvalidInput(f"the replicas serve different versions of '{model}': {served_by}",
                           "make them agree with your current tool first (adoption never reloads anything)")
    [versions] = served
    if len(versions) > 1:
        raise InvalidInput(f"Triton serves several versions of '{model}' ({list(versions)})",
                           "ferry commits one active version: retire the others with your current tool first")
    if versions:
        if given is not None and given != versions[0]:
            raise InvalidInput(f"--version {given} was given, but Triton serves v{versions[0]} of '{model}'",
                               "what serves is adopted (adoption never reloads anything): drop --version")
        return versions[0]
    if given is not None:
        return given
    return _legacy_version(model, legacy_path)  # nothing serves: adopt what the other tool committed


def _legacy_version(model: str, path: Path) -> int:
    hint = f"say which version to adopt with `ferry adopt {model} --version N`"
    if not path.is_file():
        raise InvalidInput(f"Triton serves nothing of '{model}' and there is no {path} to say what should",
                           f"{hint}, or deploy it with `ferry deploy {model} --alias ...`")
    try:
        record = json.loads(path.read_text())
    except ValueError as error:
        raise InvalidInput(f"Triton serves nothing of '{model}', and {path} is not JSON ({error})", hint) from None
    found = _version_in(record)
    if found is None:
        keys = ", ".join(LEGACY_VERSION_KEYS)
        raise InvalidInput(f"Triton serves nothing of '{model}', and {path} names no version under {keys}", hint)
    return found


def _version_in(record: object) -> int | None:
    """The first of LEGACY_VERSION_KEYS that holds a version number (an int, or a string of digits)."""
    if not isinstance(record, dict):
        return None
    for key in LEGACY_VERSION_KEYS:
        value = record.get(key)
        if isinstance(value, bool):
            continue
        if isinstance(value, int) and value > 0:
            return value
        if isinstance(value, str) and value.strip().isdigit() and int(value) > 0:
            return int(value)
    return None


def _version_numbers(model_dir: ModelDir) -> list[int]:
    return sorted(int(p.name) for p in model_dir.path.iterdir() if p.is_dir() and p.name.isdigit())


def _failed_dirs(model_dir: ModelDir) -> list[str]:
    """Names Triton would read as versions (they start with digits) that are not versions."""
    return sorted(p.name for p in model_dir.path.iterdir() if p.name[:1].isdigit() and not p.name.isdigit())


def _check_version(ferry: Services, model_dir: ModelDir, version: int) -> VersionFinding:
    onnx_path = model_dir.version_dir(version) / "model.onnx"
    if not onnx_path.is_file():
        return VersionFinding(version=version, verdict="has no model.onnx")
    local = sha256_file(onnx_path)
    try:
        ref = ferry.registry.get_version(model_dir.model, version)
    except FerryError as error:
        if error.retryable:
            raise
        return VersionFinding(version=version, verdict="not in MLflow", sha256=local)
    with tempfile.TemporaryDirectory() as tmp:
        registered = sha256_file(ferry.registry.artifacts(ref).download("model.onnx", Path(tmp)))
    verdict = "matches MLflow" if registered == local else "differs from MLflow"
    return VersionFinding(version=version, verdict=verdict, run_id=ref.run_id, source=ref.source, sha256=local)


def _actions(plan: AdoptionPlan, model_dir: ModelDir) -> list[str]:
    actions = []
    for finding in plan.versions:
        if finding.trusted:
            actions.append(f"v{finding.version}: {finding.verdict} (run {finding.run_id[:8]}): write its manifest")
        else:
            actions.append(f"v{finding.version}: {finding.verdict}: left as it is (ferry will not deploy over it)")
    actions += [f"{name}: move into {model_dir.quarantine_root}" for name in plan.failed_dirs]
    actions.append(f"config.pbtxt: pin to v{plan.active_version}")
    if plan.legacy_file is not None:
        actions.append(f"{plan.legacy_file}: move to {model_dir.state_dir / ADOPTED_DIR} (the other tool's marker)")
    actions.append(f"current.json: commit v{plan.active_version} (what {len(plan.served_by)} replica(s) serve; "
                   "nothing is reloaded)")
    return actions


def _write_manifest(model_dir: ModelDir, finding: VersionFinding, runtime: str) -> None:
    path = model_dir.version_dir(finding.version) / MANIFEST
    if path.exists():
        return
    manifest = Manifest(model=model_dir.model, version=finding.version, run_id=finding.run_id, source=finding.source,
                        sha256=finding.sha256, size_bytes=(path.parent / "model.onnx").stat().st_size,
                        deploy_id="adopted", staged_at_utc=utc_stamp(), runtime=runtime)
    atomic_write(path, manifest.model_dump_json(indent=1).encode())


def _quarantine_failed_dir(model_dir: ModelDir, name: str) -> None:
    version = int(re.findall(r"^\d+", name)[0])  # the name starts with its version
    reason = QuarantineReason(deploy_id="adopted", model=model_dir.model, version=version, failed_step="unknown",
                              error=f"marked failed as {name} by the tool that deployed before ferry",
                              failed_at_utc=utc_stamp())
    model_dir.quarantine(model_dir.path / name, reason)


def _pin_config(model_dir: ModelDir, version: int) -> None:
    config = model_dir.read_config()
    if config is None:
        raise InvalidInput(f"{model_dir.config_path} is missing", "adoption keeps the model's own config: restore it")
    model_dir.write_config(with_versions(config, [version]))


def _commit(model_dir: ModelDir, plan: AdoptionPlan) -> None:
    active = next(v for v in plan.versions if v.version == plan.active_version)
    kept = model_dir.state_dir / ADOPTED_DIR
    kept.mkdir(parents=True, exist_ok=True)
    if plan.legacy_file is not None:
        os.replace(plan.legacy_file, kept / LEGACY_FILE)
        fsync_dir(model_dir.path)
    plan.adopted_by, plan.adopted_at_utc = current_user(), utc_stamp()
    atomic_write(kept / "adoption.json", plan.model_dump_json(indent=1).encode())
    write_current(model_dir, CurrentState(
        active_version=plan.active_version, run_id=active.run_id, alias=plan.alias, updated_at_utc=utc_stamp(),
        model=plan.model, previous_version=None, sha256=active.sha256, deploy_id=f"adopted-{plan.adopted_at_utc}"))
