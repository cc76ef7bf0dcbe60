"""What each replica holds of a model and how ferry changes it: the front repointed, the store loaded or
drained (:mod:`ferry.core.front`), verified. The commit, the undo, reconcile and retire all go through here."""

from __future__ import annotations

import contextlib
import time

from ferry.core.errors import FerryError, TritonError
from ferry.core.fleet import Fleet
from ferry.core.front import disk_config, front_config, front_files, legacy_store_name, store_config, store_name
from ferry.core.model_config import from_pbtxt, model_config_pb2, to_override_json
from ferry.core.records import Candidate, CurrentState, ReleaseMember, Snapshot, parse_utc_stamp, utc_stamp
from ferry.core.release import MemberKey, MemberStore, entry_store_config, member_stores
from ferry.core.repository import ModelDir
from ferry.core.triton import READY, UNLOADING, Placement, Triton

DRAIN_S = 10.0  # how long an unloading entry store may take to finish its requests before its members go
Loaded = dict[str, list[int]]  # each replica (its URL) and the versions whose stores it holds


def loaded_after_load(snapshot: Snapshot, candidate: Candidate) -> Loaded | None:
    """The stores each replica holds once the candidate is loaded: what the snapshot found, and the candidate
    (the candidate alone after a rolling deploy; None for a snapshot that did not record them: looked up on
    each replica)."""
    if not snapshot.stores:
        return None
    if candidate.rolled:
        return {url: [candidate.version] for url in snapshot.stores}
    return {url: sorted(set(held) | {candidate.version}) for url, held in snapshot.stores.items()}


def pin_after_commit(model_dir: ModelDir, candidate: Candidate, fleet: Fleet, warm: int | None = None,
                     loaded: Loaded | None = None, stale: list[MemberKey] | None = None) -> list[str]:
    """After the commit point a failure is drift for reconcile to repair, never a reason to un-commit."""
    failed = pin(model_dir, candidate.config_pbtxt, candidate.version, fleet, warm, loaded, candidate.members, stale)
    where = "replica {}".format if len(fleet.replicas) > 1 else (lambda url: "Triton")
    return [f"committed v{candidate.version}, but pinning {where(url)} to it failed: {error} "
            "(drift: run `ferry reconcile`)" for url, error in failed.items()]


def pin(model_dir: ModelDir, config_pbtxt: str, version: int, fleet: Fleet, warm: int | None = None,
        loaded: Loaded | None = None, members: list[ReleaseMember] | None = None,
        stale: list[MemberKey] | None = None) -> dict[str, FerryError]:
    """Make every replica's front serve ``version`` (under ``config_pbtxt``) and hold its store alone (and
    ``warm``'s, the previous version kept loaded); then config.pbtxt says so. ``loaded``: the stores each
    replica held until now, unloaded once the front is repointed unless kept (None: looked up on each
    replica). ``members``: a release's, loaded first; ``stale``: member stores to unload after the front.
    The replicas that failed, with why; never raises (after a commit point, a failure is drift, not a reason
    to un-commit)."""
    try:
        config = from_pbtxt(config_pbtxt)
        model_dir.ensure_store_link(version)
        stores = member_stores(model_dir, members or [])
    except (FerryError, OSError, ValueError) as error:
        return {str(model_dir.path): FerryError(f"cannot serve v{version} of '{model_dir.model}': {error}")}
    keep = sorted({version} | ({warm} if warm is not None else set()))
    legacy = model_dir.legacy_store_link.is_symlink()  # a model an earlier release of ferry deployed

    def serve_on(triton: Triton) -> None:
        serve(triton, model_dir.model, config, version, keep, None if loaded is None else loaded.get(triton.url),
              legacy, stores, stale or [])

    results = fleet.settled(serve_on)
    failed: dict[str, FerryError] = {url: r for url, r in results.items() if isinstance(r, FerryError)}
    try:
        model_dir.write_config(disk_config(config, [version]))
        if not failed:
            model_dir.drop_store_links(keep)
    except OSError as error:
        failed[str(model_dir.config_path)] = FerryError(f"writing {model_dir.config_path} failed: {error}")
    return failed


def serve(triton: Triton, model: str, config: model_config_pb2.ModelConfig, version: int, keep: list[int],
          loaded: list[int] | None = None, legacy: bool = False, members: list[MemberStore] | None = None,
          stale: list[MemberKey] | None = None) -> None:
    """Point ``model``'s front at ``version`` and leave loaded the stores of ``keep`` (which includes it) alone.

    The store of ``version`` is loaded first (an in-place update when it is loaded already), so that the front,
    whose load makes Triton poll that store, finds it current; the front is repointed; only then are the other
    stores in ``loaded`` unloaded (Triton drains them). ``loaded`` None: what this replica holds, from its
    repository index (reconcile and undo, whose replicas may each be astray in their own way). ``legacy``:
    unload the one store earlier releases of ferry loaded, too. ``members``: a release's member stores,
    loaded before its entry's store (:mod:`ferry.core.release`); ``stale``: member stores unloaded last."""
    if loaded is None:
        where = triton.placement(model)
        loaded, legacy = where.store, legacy or bool(where.legacy)
    load_store(triton, model, config, version, members or [])
    triton.load(model, to_override_json(front_config(config, model, version)), front_files(model, version))
    old_stores = [store_name(model, old) for old in sorted(set(loaded) - set(keep))]
    for old_store in old_stores:
        triton.unload(old_store)
    if legacy:
        with contextlib.suppress(TritonError):  # Triton refuses to unload a model it does not have
            triton.unload(legacy_store_name(model))
    unload_members(triton, stale or [], old_stores)


def unload_members(triton: Triton, stale: list[MemberKey], draining: list[str] | None = None) -> None:
    """Unload member stores no release pins any more, once the entry stores that ran them (``draining``, being
    unloaded) have finished the requests they had in flight: those requests still run their member stores."""
    if stale and draining:
        wait_unloaded(triton, draining)
    for member, version in stale:
        with contextlib.suppress(TritonError):  # not loaded there (a replica that restarted): nothing to drain
            triton.unload(store_name(member, version))


def wait_unloaded(triton: Triton, names: list[str], timeout_s: float = DRAIN_S) -> None:
    """Until Triton holds none of ``names`` ready or unloading (Triton unloads a model once its requests in
    flight end), or ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while any(v.state in (READY, UNLOADING) for name, versions in triton.index().items() if name in names
              for v in versions) and time.monotonic() < deadline:
        time.sleep(0.02)


def load_store(triton: Triton, model: str, config: model_config_pb2.ModelConfig, version: int,
               members: list[MemberStore]) -> None:
    """Load version ``version``'s store under its config; a release's member stores first, then its entry's
    store with its steps sent to them."""
    for member in members:
        triton.load(member.name, member.override())
    triton.load(store_name(model, version), store_override(config, model, version, members))


def store_override(config: model_config_pb2.ModelConfig, model: str, version: int, members: list[MemberStore]) -> str:
    """The config override version ``version``'s store loads with (a release's entry: its steps sent to the
    member stores)."""
    pinned = entry_store_config(config, model, version, members) if members else store_config(config, model, version)
    return to_override_json(pinned)


def retire(triton: Triton, model: str) -> None:
    """Nothing of ``model`` loaded: its front first, so that no client reaches a store being unloaded.
    Each is asked even if one refuses (Triton refuses to unload a model it never had)."""
    stores = triton.placement(model).store
    refused: TritonError | None = None
    for name in (model, *(store_name(model, v) for v in stores), legacy_store_name(model)):
        try:
            triton.unload(name)
        except TritonError as error:
            if name != legacy_store_name(model):
                refused = refused or error
    if refused is not None:
        raise refused


def serve_only_active(fleet: Fleet, snapshot: Snapshot, model_dir: ModelDir,
                      stale: list[MemberKey] | None = None) -> None:
    """Every replica back to the active version alone (or to nothing); raises if any replica refused.
    config.pbtxt holds the active version's config (the commit wrote it; the undo restored it first).
    ``stale``: the member stores a failed release loaded, unloaded last."""
    def retire_all(triton: Triton) -> None:
        stores = [store_name(snapshot.model, v) for v in triton.placement(snapshot.model).store] if stale else []
        retire(triton, snapshot.model)
        unload_members(triton, stale or [], stores)

    if snapshot.current is None:
        fleet.each(retire_all)
    else:
        config = from_pbtxt(snapshot.config_text or "")
        active = snapshot.current.active_version
        members = member_stores(model_dir, snapshot.current.members)
        fleet.each(lambda triton: serve(triton, snapshot.model, config, active, [active], None, False, members,
                                        stale))


def wait_serving(fleet: Fleet, model: str, wanted: list[int], timeout_s: float = 5.0,
                 held: list[int] | None = None) -> tuple[bool, dict[str, list[int] | FerryError]]:
    """True once every replica serves exactly ``wanted`` and its store holds nothing else (or ``held``: the
    previous version kept warm too; a version that is unloading no longer counts); what each replica
    serves (or why it could not say) either way."""
    def settled(where: Placement | FerryError) -> bool:
        return isinstance(where, Placement) and where.settled(wanted, held)

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


def held_versions(current: CurrentState | None) -> list[int]:
    """What the store should hold: the active version, and the previous one while its warm window lasts."""
    if current is None:
        return []
    previous, until = current.previous_version, current.previous_warm_until_utc
    if previous is None or not until or parse_utc_stamp(until) < parse_utc_stamp(utc_stamp()):
        return [current.active_version]
    return sorted({current.active_version, previous})


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
