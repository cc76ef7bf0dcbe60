"""Make Triton serve exactly what current.json commits: after a Triton restart, on a new replica, or periodically."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel

from ferry.core.current import read_current
from ferry.core.errors import Busy, FerryError, InvalidInput
from ferry.core.fleet import Fleet
from ferry.core.journal import read_journal
from ferry.core.lock import holding
from ferry.core.model_config import to_pbtxt
from ferry.core.placement import held_versions, pin, retire, serving_problems, unload_members, wait_serving
from ferry.core.release import ANY_VERSION, describe_pins, missing_members, pinned_versions
from ferry.core.repository import ModelDir
from ferry.core.services import Services
from ferry.core.triton import Placement, RepositoryIndex, placement

Action = Literal["in place", "loaded", "unloaded", "skipped", "failed"]


class Reconciled(BaseModel):
    model: str
    active_version: int | None
    action: Action
    detail: str = ""
    replicas: dict[str, list[int]] = {}  # what each replica serves afterwards

    @property
    def ok(self) -> bool:
        return self.action in ("in place", "loaded", "unloaded")


def reconcile(ferry: Services, model: str) -> Reconciled:
    """Make Triton serve exactly the committed version of ``model`` (after a restart, or on a new replica).

    Touches Triton only when it differs, so it is cheap and safe to run periodically.
    A model with an unfinished deploy is skipped: `ferry recover` decides what is committed.
    """
    model_dir = ferry.model_dir(model)
    try:
        with holding(model_dir):
            if (journal := read_journal(model_dir)) is not None:
                return Reconciled(model=model, active_version=None, action="skipped",
                                  detail=f"deploy {journal.deploy_id} is unfinished: run `ferry recover {model}` first")
            return _reconcile(ferry, model_dir)
    except Busy:
        return Reconciled(model=model, active_version=None, action="skipped", detail="a deploy is running")
    except FerryError as error:
        return Reconciled(model=model, active_version=None, action="failed", detail=str(error))


def _reconcile(ferry: Services, model_dir: ModelDir) -> Reconciled:
    current = read_current(model_dir)
    if current is None and (pins := pinned_versions(model_dir, model_dir.model)):
        return _reconcile_member(ferry, model_dir, pins)
    version = current.active_version if current else None
    wanted = [version] if version is not None else []
    held = held_versions(current)
    members = current.members if current else []
    fleet = ferry.fleet()
    indexes = fleet.settled(lambda triton: triton.index())
    placements: dict[str, Placement | FerryError] = {
        url: index if isinstance(index, FerryError) else placement(index, model_dir.model)
        for url, index in indexes.items()}
    states: dict[str, list[int] | FerryError] = {
        url: where.serving if isinstance(where, Placement) else where for url, where in placements.items()}
    # Unreachable replicas are astray too; a warm previous version past its window makes a replica astray, and
    # so does a member store of the committed release that a replica lacks.
    astray = Fleet([r for r in fleet.replicas if not _in_place(placements[r.url], wanted, held)
                    or (members and missing_members(_index_of(indexes[r.url]), members))])
    pinned = version is None or _pinned(model_dir, wanted, held)
    if not astray.replicas and pinned:
        return _result(model_dir, version, "in place", states, wanted)
    if version is None:
        astray.settled(lambda triton: retire(triton, model_dir.model))
        return _result(model_dir, None, "unloaded", wait_serving(astray, model_dir.model, [])[1], wanted)
    if not model_dir.version_dir(version).is_dir():
        raise InvalidInput(f"current.json names v{version}, but {model_dir.version_dir(version)} is missing",
                           f"restore that directory, or `ferry rollback {model_dir.model} --to` a version that "
                           "has its files")
    config = model_dir.version_config(version, model_dir.read_config_text())
    if config is None:
        raise InvalidInput(f"{model_dir.config_path} is missing", "restore it, or deploy the version again")
    # Only the replicas that differ are loaded: a replica in place keeps its running instance.
    target = astray if astray.replicas else fleet
    warm = next((v for v in held if v != version), None)
    failed = pin(model_dir, to_pbtxt(config), version, target, warm, members=members)
    _, after = wait_serving(target, model_dir.model, wanted, timeout_s=ferry.settings.triton.ready_timeout_s,
                            held=held)
    return _result(model_dir, version, "loaded", {**states, **after, **failed}, wanted)


def _reconcile_member(ferry: Services, model_dir: ModelDir, pins: dict[int, list[str]]) -> Reconciled:
    """A member of releases: its entries' reconcile loads what they pin; here, what no release pins any more
    (a stale store an unreachable replica kept) is unloaded."""
    member = model_dir.model
    releases = describe_pins(member, pins)
    if ANY_VERSION in pins:
        return Reconciled(model=member, active_version=None, action="in place",
                          detail=f"a member of {releases}: left as it is")
    fleet = ferry.fleet()
    holds = fleet.settled(lambda triton: triton.placement(member).store)
    stale = sorted({v for held in holds.values() if not isinstance(held, FerryError) for v in held} - set(pins))
    if not stale:
        return Reconciled(model=member, active_version=None, action="in place",
                          detail=f"a member of {releases}: reconciled with its release")
    fleet.settled(lambda triton: unload_members(triton, [(member, v) for v in stale]))
    return Reconciled(model=member, active_version=None, action="unloaded",
                      detail=f"a member of {releases}: unloaded v{', v'.join(map(str, stale))}, which no release pins")


def _index_of(index: RepositoryIndex | FerryError) -> RepositoryIndex:
    return {} if isinstance(index, FerryError) else index


def _in_place(where: Placement | FerryError, wanted: list[int], held: list[int]) -> bool:
    return isinstance(where, Placement) and where.settled(wanted, held)


def _pinned(model_dir: ModelDir, wanted: list[int], held: list[int]) -> bool:
    """Whether config.pbtxt says what Triton should hold (and names no model, as ferry writes it)."""
    config = model_dir.read_config()
    return config is not None and list(config.version_policy.specific.versions) in (wanted, held) \
        and not config.name


def _result(model_dir: ModelDir, version: int | None, action: Action,
            states: dict[str, list[int] | FerryError], wanted: list[int]) -> Reconciled:
    problems = serving_problems(states, wanted)
    replicas = {url: s for url, s in states.items() if not isinstance(s, FerryError)}
    if problems:
        return Reconciled(model=model_dir.model, active_version=version, action="failed",
                          detail="; ".join(problems), replicas=replicas)
    where = f"all {len(states)} replicas serve" if len(states) > 1 else "Triton serves"
    shown = f"v{version}" if version is not None else "nothing"
    return Reconciled(model=model_dir.model, active_version=version, action=action,
                      detail=f"{where} {shown}", replicas=replicas)
