"""What is committed for a model, what Triton serves, and whether the two agree."""

from __future__ import annotations

import difflib
from pathlib import Path

from filelock import FileLock, Timeout
from pydantic import BaseModel

from ferry.core.current import read_current
from ferry.core.errors import FerryError, InvalidInput
from ferry.core.fleet import Fleet
from ferry.core.front import legacy_store_name
from ferry.core.journal import read_journal, unfinished_error
from ferry.core.model_config import config_digest, signature_changes, to_pbtxt
from ferry.core.records import CurrentState, ReleaseMember
from ferry.core.release import ANY_VERSION, describe_pins, missing_members, pinned_versions
from ferry.core.repository import STATE_DIR, ModelDir
from ferry.core.triton import RepositoryIndex, VersionState, placement, store_states

UNKNOWN = "unknown"


class LiveFigures(BaseModel):
    """The active version's p95 latency and failure ratio (filled in by ferry.observability.live)."""

    p95_ms: float | None = None
    failure_ratio: float | None = None
    source: str = ""  # "prometheus (5m)" or "triton (since load)"
    error: str | None = None


class ReplicaStatus(BaseModel):
    url: str
    versions: list[VersionState] | None = None  # None when the replica did not answer
    serving: list[int] = []  # what clients of the model's name reach (the front's version)
    held: list[int] = []  # the versions the model's store holds: the served one, a warm previous one, a candidate
    error: str | None = None
    drift: str | None = None  # None when it serves exactly the committed version; "unknown" when it cannot tell


class ModelStatus(BaseModel):
    model: str
    current: CurrentState | None = None
    current_error: str | None = None
    replicas: list[ReplicaStatus] = []
    triton: list[VersionState] | None = None  # the first replica's versions (a single server's)
    triton_error: str | None = None  # the first replica error
    serving: list[int] = []  # the versions any replica serves
    drift: str | None = None  # None when every replica serves exactly the committed version; "unknown" when unsure
    quarantined: list[str] = []
    in_flight: str | None = None  # a deploy that is running, or whose process stopped before it finished
    live: LiveFigures | None = None  # p95 latency and failure ratio of the active version
    member_of: str | None = None  # a model with nothing committed of its own: the releases that pin it


def list_models(repository: Path) -> list[str]:
    if not repository.exists():
        return []
    committed = {p.parent.name for p in (repository / STATE_DIR).glob("*/current.json")}
    configured = {p.parent.name for p in repository.glob("*/config.pbtxt") if not p.parent.is_symlink()}  # a store
    return sorted((committed | configured) - {STATE_DIR})


def model_status(repository: Path, fleet: Fleet, model: str,
                 index: dict[str, RepositoryIndex | FerryError] | None = None) -> ModelStatus:
    """What is committed for ``model``, and what each replica serves. ``index``: each replica's repository
    index (or error), read once for many models."""
    model_dir = ModelDir(repository, model)
    report = ModelStatus(model=model)
    try:
        report.current = read_current(model_dir)
    except FerryError as error:
        report.current_error = str(error)
    committed = [report.current.active_version] if report.current else None
    members = report.current.members if report.current else []
    pins = pinned_versions(model_dir, model) if report.current is None and not report.current_error else {}
    report.member_of = describe_pins(model, pins)
    pinned = sorted(v for v in pins if v != ANY_VERSION)
    for url, entry in (index if index is not None else replica_indexes(fleet)).items():
        replica = _replica(url, entry, model, None if report.current_error else committed)
        if not isinstance(entry, FerryError):
            _release_drift(replica, entry, members, model, pinned)
        report.replicas.append(replica)
    first = report.replicas[0] if report.replicas else None
    report.triton, report.triton_error = (first.versions, first.error) if first else (None, None)
    report.serving = sorted({v for r in report.replicas for v in r.serving})
    report.drift = _drift(report)
    if model_dir.quarantine_root.exists():
        report.quarantined = sorted(p.name for p in model_dir.quarantine_root.iterdir())
    report.in_flight = _in_flight(model_dir)
    return report


def replica_indexes(fleet: Fleet) -> dict[str, RepositoryIndex | FerryError]:
    """Each replica's repository index, or the error it gave: one call per replica, concurrently."""
    return fleet.settled(lambda triton: triton.index())


def _replica(url: str, index: RepositoryIndex | FerryError, model: str, committed: list[int] | None) -> ReplicaStatus:
    if isinstance(index, FerryError):
        return ReplicaStatus(url=url, error=str(index), drift=UNKNOWN)
    versions = store_states(index, model) or index.get(legacy_store_name(model), []) or index.get(model, [])
    where = placement(index, model)
    serving = where.serving
    if committed is None:
        drift = UNKNOWN  # current.json cannot be read
    elif serving == committed:
        drift = None
    else:
        drift = f"current.json names {committed or 'no version'}, Triton serves {serving or 'nothing'}"
    return ReplicaStatus(url=url, versions=versions, serving=serving, held=where.store, drift=drift)


def _release_drift(replica: ReplicaStatus, index: RepositoryIndex, members: list[ReleaseMember], model: str,
                   pinned: list[int]) -> None:
    """A release's drift: a member store of the committed release the replica lacks; for a member, what it
    holds against what the committed releases pin (it has no front: its stores are what serves)."""
    if pinned:
        held = placement(index, model).store
        replica.serving, replica.held = held, held
        replica.drift = None if set(held) == set(pinned) else \
            f"its releases pin v{', v'.join(map(str, pinned))}, Triton holds {held or 'nothing'}"
    elif missing := missing_members(index, members):
        lacks = f"lacks the release's {', '.join(missing)}"
        replica.drift = f"{replica.drift}; {lacks}" if replica.drift else lacks


def _in_flight(model_dir: ModelDir) -> str | None:
    try:
        journal = read_journal(model_dir)
    except FerryError as error:
        return str(error)
    if journal is None:
        return None
    try:
        with FileLock(str(model_dir.lock_path), timeout=0):
            return str(unfinished_error(model_dir, journal))
    except Timeout:
        record = journal.record
        return f"deploy {journal.deploy_id or '(starting)'} ({record.target}) is running, at step {record.step}"


def _drift(report: ModelStatus) -> str | None:
    drifted = [r for r in report.replicas if r.drift is not None]
    if not drifted:
        return None
    if len(report.replicas) == 1:
        return drifted[0].drift
    known = [r for r in drifted if r.drift != UNKNOWN]
    if not known:
        return UNKNOWN
    return "; ".join(f"replica {r.url}: {r.drift}" for r in known)


class ConfigDiff(BaseModel):
    """How the configs of two versions of a model differ (``ferry diff``)."""

    model: str
    versions: tuple[int, int]
    sha256: tuple[str, str]
    diff: list[str]  # a unified diff of the two config.pbtxt texts (empty: the same config)
    signature_changes: list[str]  # what in the second would break the first's clients


def config_diff(model_dir: ModelDir, first: int, second: int) -> ConfigDiff:
    """The two versions' configs, from their manifests (the model's config.pbtxt for versions staged before
    configs travelled with them); InvalidInput for a version ferry has no files of."""
    fallback = model_dir.read_config_text()
    configs = []
    for version in (first, second):
        config = model_dir.version_config(version, fallback) if model_dir.read_manifest(version) else None
        if config is None:
            raise InvalidInput(f"{model_dir.model} has no staged v{version} (no {model_dir.version_dir(version)})",
                               f"`ferry history {model_dir.model}` lists the versions deployed")
        configs.append(config)
    texts = [to_pbtxt(c) for c in configs]
    diff = list(difflib.unified_diff(texts[0].splitlines(), texts[1].splitlines(), f"v{first}/config.pbtxt",
                                     f"v{second}/config.pbtxt", lineterm=""))
    return ConfigDiff(model=model_dir.model, versions=(first, second),
                      sha256=(config_digest(texts[0]), config_digest(texts[1])), diff=diff,
                      signature_changes=signature_changes(configs[0], configs[1]))
