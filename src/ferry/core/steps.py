"""The steps of the deploy transaction: snapshot -> materialize -> load -> ready -> smoke -> commit, or undo.

Each step is a plain function over typed records; :mod:`ferry.core.runner` runs them (lock, journal,
timing, history) for the CLI, the DAG and ``ferry recover`` alike. A step that fails raises
:class:`StepFailed`; :func:`undo` then puts back the state the snapshot recorded.
"""

from __future__ import annotations

import datetime as dt
import functools
import time
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

from ferry.core import release, staging
from ferry.core.current import read_current, write_current
from ferry.core.errors import (
    FerryError,
    InvalidInput,
    StepFailed,
    TritonError,
    TritonTimeout,
    not_the_versions_fault,
)
from ferry.core.failure_text import SMOKE_HINT, load_hint, load_reason
from ferry.core.fleet import Fleet
from ferry.core.front import disk_config, store_name
from ferry.core.model_config import (
    config_digest,
    config_signature,
    from_pbtxt,
    model_config_pb2,
    signature_changes,
)
from ferry.core.placement import (
    loaded_after_load,
    pin_after_commit,
    store_override,
)
from ferry.core.records import (
    Candidate,
    CurrentState,
    Failure,
    Snapshot,
    Step,
    utc_stamp,
)
from ferry.core.release_staging import ReleaseRefused, as_member, end_to_end, member_candidate, with_members
from ferry.core.repository import ModelDir
from ferry.core.rollout import remove_rollout
from ferry.core.services import Services
from ferry.core.smoke import SMOKE_FILE, load_sample, output_problems, synthetic_sample
from ferry.core.triton import Triton, placement

T = TypeVar("T")


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


# ---------------------------------------------------------------- snapshot


def take_snapshot(ferry: Services, model: str) -> Snapshot:
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


def fleet_of(ferry: Services, snapshot: Snapshot) -> Fleet:
    return ferry.fleet(snapshot.replica_urls)


# ---------------------------------------------------------------- materialize


def materialize(ferry: Services, snapshot: Snapshot, alias: str | None = None, version: int | None = None,
                allow_signature_change: bool = False) -> Candidate:
    """Resolve the target and stage its files as ``<model>/<version>/``, verified.

    A target that cannot be resolved, or whose download meets MLflow or its artifact store not answering,
    raises FerryError (nothing is kept); a version that cannot be staged raises StepFailed, with what was
    downloaded left for the undo to quarantine.
    The active version is a candidate too when Triton does not serve it (after a restart):
    it goes through load, ready and smoke again. A version going back (no alias) may have another signature:
    it served before, with it.
    """
    model_dir = ferry.model_dir(snapshot.model)
    if snapshot.current is None and (releases := release.release_of(model_dir, snapshot.model)):
        raise ReleaseRefused(f"'{snapshot.model}' is a member of the release {releases}, which pins its version",
                             "deploy a new release of its entry model instead")
    ref = staging.resolve(ferry, model_dir, alias, version)
    if ref.version == snapshot.active_version and snapshot.current is not None:
        active = Candidate(
            model=ref.model, version=ref.version, run_id=ref.run_id, alias=alias, sha256=snapshot.current.sha256,
            size_bytes=0, config_pbtxt=snapshot.config_text or "", already_active=True,
            revalidate=any(served != [ref.version] for served in _served_by_replica(snapshot)),
        )
        return _staged(ref.version, lambda: with_members(ferry, snapshot, active, alias))
    allowed = allow_signature_change or alias is None

    def stage() -> Candidate:
        if staging.is_warm(snapshot, ref.version):
            return staging.warm(model_dir, ref, snapshot)
        if model_dir.version_dir(ref.version).exists():
            return with_members(ferry, snapshot, staging.reuse(model_dir, ref, snapshot, allowed), alias)
        return with_members(ferry, snapshot, staging.stage(ferry, model_dir, ref, snapshot, allowed), alias)

    return _staged(ref.version, stage)


def _staged(version: int, stage: Callable[[], Candidate]) -> Candidate:
    try:
        return stage()
    except (staging.ForeignVersion, ReleaseRefused):
        raise  # refused, not a failed step: nothing was loaded, and what was staged stays staged, unserved
    except Exception as error:  # whatever else stops a staging is a failed step, undone
        if not_the_versions_fault(error):
            raise  # stage kept nothing: rejected, not held against the version
        failure = as_step_failure(Step.MATERIALIZE, error)
        failure.version = version
        raise failure from error


def _served_by_replica(snapshot: Snapshot) -> list[list[int]]:
    return list(snapshot.replicas.values()) if snapshot.replicas else [snapshot.triton_ready]


def signature_crossed(ferry: Services, snapshot: Snapshot, candidate: Candidate) -> list[str]:
    """How the candidate's inputs and outputs differ from the active version's (a rollback may cross them)."""
    active = staging.active_config(ferry.model_dir(snapshot.model), snapshot)
    return signature_changes(active, from_pbtxt(candidate.config_pbtxt)) if active is not None else []


def needs_validation(candidate: Candidate) -> bool:
    """False for the active version while Triton serves it (nothing to do then), and for a warm previous
    version (proven when it was committed, and still loaded: the commit repoints the front to it)."""
    return needs_commit(candidate) and not candidate.warm


def needs_commit(candidate: Candidate) -> bool:
    """False only for the active version while Triton serves it."""
    return not candidate.already_active or candidate.revalidate


# ---------------------------------------------------------------- load, ready, smoke


def load(ferry: Services, snapshot: Snapshot, candidate: Candidate) -> None:
    """Load the candidate, under its own config, into its own store beside the active version's: the front
    still serves the active version, whose store nothing touches."""
    if not needs_validation(candidate):
        return
    model_dir = ferry.model_dir(snapshot.model)
    model_dir.ensure_store_link(candidate.version)
    config = from_pbtxt(candidate.config_pbtxt)
    if snapshot.config_text is None:
        # Triton records a config override's time only when config.pbtxt exists, and a later load of the front
        # then finds the store unchanged; the undo removes the file again (the snapshot had none).
        model_dir.write_config(disk_config(config, [candidate.version]))
    elif (existing := from_pbtxt(snapshot.config_text)).name and snapshot.active_version is not None:
        # A model not yet behind a front: without a name, config.pbtxt tells the gateways (at the commit, when
        # they read current.json again) to call the stores, where the candidate now is; the undo restores it.
        model_dir.write_config(disk_config(existing, [snapshot.active_version]))
    members = release.member_stores(model_dir, candidate.members)
    fleet_of(ferry, snapshot).each_step(lambda triton: _load_on(triton, snapshot.model, config, candidate, members))


def _load_on(triton: Triton, model: str, config: model_config_pb2.ModelConfig, candidate: Candidate,
             members: list[release.MemberStore]) -> None:
    """The candidate's store (a release: its members' first, each failure named by its member)."""
    for member in members:
        _load_one(functools.partial(triton.load, member.name, member.override()),
                  f"member '{member.model}' v{member.version}")
    override = store_override(config, model, candidate.version, members)
    _load_one(functools.partial(triton.load, store_name(model, candidate.version), override), f"v{candidate.version}")


def _load_one(load: Callable[[], None], what: str) -> None:
    try:
        load()
    except TritonTimeout as error:
        raise StepFailed(Step.LOAD, f"load of {what} timed out: {error.message}",
                         "a backend that cannot start hangs the load; see the Triton log") from error
    except TritonError as error:
        reason = load_reason(error.message)
        raise StepFailed(Step.LOAD, f"Triton could not load {what}: {reason}", load_hint(error),
                         retryable=error.retryable, detail=error.detail or error.message) from error


def wait_ready(ferry: Services, snapshot: Snapshot, candidate: Candidate) -> None:
    if not needs_validation(candidate):
        return
    timeout_s = ferry.settings.triton.ready_timeout_s

    def ready_on(triton: Triton) -> None:
        for member in candidate.members:
            as_member(member, functools.partial(_wait_ready_on, triton,
                                                        store_name(member.model, member.version),
                                                        member.version, timeout_s))
        _wait_ready_on(triton, store_name(snapshot.model, candidate.version), candidate.version, timeout_s)

    fleet_of(ferry, snapshot).each_step(ready_on)


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
                             f"{states.get(version, 'unknown to Triton')}",
                             "a model that needs longer to start: raise FERRY_READY_TIMEOUT_S; else see the Triton log")
        time.sleep(0.05)


def smoke(ferry: Services, snapshot: Snapshot, candidate: Candidate) -> dict[str, Any]:
    """Infer on the candidate version alone; check outputs against the config and the golden outputs."""
    if not needs_validation(candidate):
        return {}
    fleet = fleet_of(ferry, snapshot)
    checks = [(member, smoke_check(ferry, *member_candidate(ferry, snapshot, member))[0])
              for member in candidate.members]

    def members_on(triton: Triton) -> None:  # each member alone first: a failure then names the member at fault
        for member, check in checks:
            as_member(member, functools.partial(check, triton))

    if checks:
        fleet.each_step(members_on)
    smoke_on, golden = smoke_check(ferry, snapshot, candidate)

    def whole(triton: Triton) -> dict[str, list[int]]:
        return end_to_end(candidate.members, functools.partial(smoke_on, triton))

    shapes = fleet.each_step(whole if candidate.members else smoke_on)
    return {"golden": golden, "outputs": next(iter(shapes.values())), "replicas": len(shapes),
            **({"members": len(candidate.members)} if candidate.members else {})}


def smoke_check(ferry: Services, snapshot: Snapshot,
                candidate: Candidate) -> tuple[Callable[[Triton], dict[str, list[int]]], bool]:
    """The smoke inference on one replica (the output shapes it gave), and whether golden outputs judge it."""
    signature = config_signature(from_pbtxt(candidate.config_pbtxt))
    sample_path = ferry.model_dir(snapshot.model).version_dir(candidate.version) / SMOKE_FILE
    sample = load_sample(sample_path) if sample_path.exists() else synthetic_sample(signature)
    datatypes = {t.name: t.datatype for t in signature.inputs}
    rtol = sample.rtol if sample.rtol is not None else ferry.settings.deploy.rtol
    atol = sample.atol if sample.atol is not None else ferry.settings.deploy.atol

    def smoke_on(triton: Triton) -> dict[str, list[int]]:
        try:
            outputs = triton.infer(store_name(snapshot.model, candidate.version), candidate.version,
                                   sample.inputs, datatypes)
        except TritonError as error:
            raise StepFailed(Step.SMOKE, f"inference on v{candidate.version} failed: {error.message}",
                             error.hint or "the version loads but cannot answer its smoke sample: fix the version "
                             "(or its smoke.json) and register it again", detail=error.detail) from error
        problems = output_problems(signature, outputs, sample.golden, rtol, atol)
        if problems:
            raise StepFailed(Step.SMOKE, "; ".join(problems), SMOKE_HINT if sample.golden is not None else
                             "the version's outputs do not fit its config: fix the model or its config.pbtxt")
        return {name: list(v.shape) for name, v in outputs.items()}

    return smoke_on, sample.golden is not None


def prove_on(ferry: Services, snapshot: Snapshot, candidate: Candidate) -> Callable[[Triton], None]:
    """Ready and smoke on one replica: how a rolling deploy proves each replica it swaps."""
    smoke_on, _ = smoke_check(ferry, snapshot, candidate)
    store, timeout_s = store_name(snapshot.model, candidate.version), ferry.settings.triton.ready_timeout_s

    def prove(triton: Triton) -> None:
        _wait_ready_on(triton, store, candidate.version, timeout_s)
        smoke_on(triton)

    return prove


# ---------------------------------------------------------------- commit


def commit(ferry: Services, snapshot: Snapshot, candidate: Candidate) -> tuple[CurrentState | None, list[str]]:
    """Write current.json (the commit point), then repoint every replica's front to the new version and
    let the store drop the old one (or keep it warm for FERRY_KEEP_PREVIOUS_S)."""
    model_dir = ferry.model_dir(snapshot.model)
    if candidate.already_active:
        pinned = pin_after_commit(model_dir, candidate, fleet_of(ferry, snapshot)) if candidate.revalidate else []
        return snapshot.current, pinned
    before = snapshot.current.members if snapshot.current else []
    keep_s = 0 if candidate.members or before else ferry.settings.deploy.keep_previous_s  # a release keeps no warm copy
    warm_until = utc_stamp(dt.datetime.now(dt.UTC) + dt.timedelta(seconds=keep_s)) \
        if keep_s > 0 and snapshot.active_version is not None else None
    state = CurrentState(
        active_version=candidate.version, run_id=candidate.run_id, alias=candidate.alias,
        updated_at_utc=utc_stamp(), model=snapshot.model, previous_version=snapshot.active_version,
        sha256=candidate.sha256, deploy_id=snapshot.deploy_id, previous_warm_until_utc=warm_until,
        config_sha256=config_digest(candidate.config_pbtxt), members=candidate.members,
    )
    stale = release.stale_stores(model_dir, snapshot.model, before, candidate.members)  # before the commit point
    try:
        model_dir.make_durable(candidate.version)  # the files current.json will name survive a machine crash
        for member in candidate.members:
            ModelDir(model_dir.repository, member.model).make_durable(member.version)
        write_current(model_dir, state)
    except OSError as error:
        raise StepFailed(Step.COMMIT, f"cannot write {model_dir.current_path}: {error}") from error
    remove_rollout(model_dir)  # after current.json: the candidate is the active version now
    warm = snapshot.active_version if warm_until and not candidate.rolled else None  # no room: it swapped out
    loaded = loaded_after_load(snapshot, candidate)
    return state, pin_after_commit(model_dir, candidate, fleet_of(ferry, snapshot), warm, loaded, stale)


def committed_by(model_dir: ModelDir, deploy_id: str) -> bool:
    """Whether current.json names this deploy: the commit point, which decides finish or undo."""
    try:
        current = read_current(model_dir)
    except FerryError:
        return False  # current.json is written atomically, so this deploy did not damage it: restore the snapshot's
    return current is not None and current.deploy_id == deploy_id
