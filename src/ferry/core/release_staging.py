"""Materialize for a release (:mod:`ferry.core.release`): its members resolved in MLflow (or their manifests),
each staged or verified again as a version of its own model, and recorded in the entry version's manifest;
and how a member's failure reads."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from ferry.core import staging
from ferry.core.current import read_current
from ferry.core.errors import FerryError, InvalidInput, StepFailed
from ferry.core.front import disk_config
from ferry.core.fsutil import atomic_write
from ferry.core.model_config import config_digest, from_pbtxt, model_config_pb2, to_pbtxt
from ferry.core.records import Candidate, ReleaseMember, Snapshot, Step
from ferry.core.registry import VersionRef
from ferry.core.release import is_entry, keys, labels, member_pins
from ferry.core.repository import MANIFEST, ModelDir, check_model_name
from ferry.core.services import Services

T = TypeVar("T")


class ReleaseRefused(InvalidInput):
    """A release named inconsistently: refused as it is, nothing rolled back (the version is not at fault)."""


def with_members(ferry: Services, snapshot: Snapshot, candidate: Candidate, alias: str | None) -> Candidate:
    """The candidate with its release's members, each staged (or verified again) as a version of its own
    model; the candidate unchanged if it is no release. Raises StepFailed for a member that cannot be staged
    (the undo quarantines what this deploy staged) and InvalidInput for a release named inconsistently."""
    entry_dir = ferry.model_dir(snapshot.model)
    # The manifest's config names the members (config.pbtxt, which an active candidate carries, their stores).
    config = entry_dir.version_config(candidate.version) or from_pbtxt(candidate.config_pbtxt)
    if not is_entry(config):
        return candidate
    manifest = entry_dir.read_manifest(candidate.version)
    recorded = manifest.members if manifest is not None else []
    if recorded and alias is None:
        refs = [staging.resolve(ferry, ferry.model_dir(m.model), None, m.version) for m in recorded]
    else:
        refs = resolve_members(ferry, snapshot.model, config, alias)
        if recorded and keys(recorded) != [(r.model, r.version) for r in refs]:
            raise ReleaseRefused(
                f"v{candidate.version} of '{snapshot.model}' is the release {labels(recorded)}, but '{alias}' now "
                f"names {labels([(r.model, r.version) for r in refs])}",
                f"register a new version of '{snapshot.model}' for the new members (a version is one release), or "
                f"move the members' alias back")
    if candidate.already_active and not candidate.revalidate:
        return candidate.model_copy(update={"members": recorded})
    members = [_stage_member(ferry, snapshot, ref) for ref in refs]
    changed = [m for m, was in zip(members, recorded, strict=False) if m.sha256 != was.sha256]
    if recorded and changed:
        raise ReleaseRefused(f"the files of {labels(changed)} are not the ones the release '{snapshot.model}' "
                             f"v{candidate.version} recorded", "move the changed member versions out of the "
                             "repository (ferry stages them again from MLflow) and deploy again")
    if not recorded and manifest is not None:
        record = manifest.model_copy(update={"members": members})
        atomic_write(entry_dir.version_dir(candidate.version) / MANIFEST, record.model_dump_json(indent=1).encode())
    return candidate.model_copy(update={"members": members})


def resolve_members(ferry: Services, entry: str, config: model_config_pb2.ModelConfig,
                    alias: str | None) -> list[VersionRef]:
    """The version of each member the entry's config names: the one its step pins, else the deploy's alias'."""
    refs = []
    for name, pinned in member_pins(config):
        try:
            check_model_name(name)
        except InvalidInput as error:
            raise StepFailed(Step.MATERIALIZE, f"the ensemble's step names the model {name!r}: {error.message}",
                             "name registered models in the ensemble's steps") from None
        if name == entry:
            raise StepFailed(Step.MATERIALIZE, f"the ensemble '{entry}' names itself as a step",
                             "its steps name the models it runs, never itself")
        if pinned < 1 and pinned != -1:
            raise StepFailed(Step.MATERIALIZE, f"the ensemble's step '{name}' pins model_version {pinned}",
                             "pin a version (1 or more), or -1 for the member's version under the deploy's alias")
        if _deployed_alone(ferry.model_dir(name)):
            raise ReleaseRefused(f"'{name}', a member of '{entry}', is deployed on its own (it has a current.json)",
                                 f"a model is either a member of releases or deployed alone: retire '{name}' "
                                 "first, or name a copy of it in the ensemble")
        if pinned > 0:
            refs.append(staging.resolve(ferry, ferry.model_dir(name), None, pinned))
        elif alias is not None:
            refs.append(ferry.registry.resolve_alias(name, alias))
        else:
            raise ReleaseRefused(f"the ensemble's step '{name}' pins no version (model_version -1) and the deploy "
                                 "names no alias to find it by",
                                 f"deploy '{entry}' by alias, or pin model_version in its step")
    return refs


def _stage_member(ferry: Services, snapshot: Snapshot, ref: VersionRef) -> ReleaseMember:
    member_dir = ferry.model_dir(ref.model)
    alone = _alone(snapshot, ref.model)
    try:
        if member_dir.version_dir(ref.version).exists():
            staged = staging.reuse(member_dir, ref, alone, allow_signature_change=True)
        else:
            staged = staging.stage(ferry, member_dir, ref, alone, allow_signature_change=True)
    except StepFailed as error:
        raise _of_member(error, ref.model, ref.version) from error
    config = from_pbtxt(staged.config_pbtxt)
    if is_entry(config):
        raise StepFailed(Step.MATERIALIZE, f"member '{ref.model}' v{ref.version} is an ensemble itself",
                         "name the models of the inner ensemble in the entry's own steps")
    if not member_dir.config_path.exists():
        member_dir.write_config(disk_config(config, [ref.version]))  # an ensemble's load polls it (module doc)
    return ReleaseMember(model=ref.model, version=ref.version, run_id=staged.run_id, sha256=staged.sha256,
                         config_sha256=config_digest(staged.config_pbtxt))


def _alone(snapshot: Snapshot, member: str) -> Snapshot:
    """A member as a deploy of its own would see it: nothing committed of its own, the release's replicas."""
    return Snapshot(model=member, deploy_id=snapshot.deploy_id, started_at_utc=snapshot.started_at_utc,
                    current=None, config_text=None, triton_ready=[], replicas=snapshot.replicas)


def _of_member(error: StepFailed, model: str, version: int) -> StepFailed:
    """A member's failure, as the release's: the step, with the member it failed on named first."""
    return StepFailed(error.step, f"member '{model}' v{version}: {error.message}", error.hint,
                      retryable=error.retryable, detail=error.detail)


def member_candidate(ferry: Services, snapshot: Snapshot, member: ReleaseMember) -> tuple[Snapshot, Candidate]:
    """A member version as a deploy of its own sees it: how its smoke check runs (its sample, its config)."""
    config = ferry.model_dir(member.model).version_config(member.version)
    if config is None:
        raise StepFailed(Step.SMOKE, f"member '{member.model}' v{member.version} has lost its manifest")
    candidate = Candidate(model=member.model, version=member.version, run_id=member.run_id, alias=None,
                          sha256=member.sha256, size_bytes=0, config_pbtxt=to_pbtxt(config))
    return _alone(snapshot, member.model), candidate


def as_member(member: ReleaseMember, call: Callable[[], T]) -> T:
    """``call``, whose failure (a step's) names the member it failed on."""
    try:
        return call()
    except StepFailed as error:
        raise _of_member(error, member.model, member.version) from error


def end_to_end(members: list[ReleaseMember], call: Callable[[], T]) -> T:
    """``call``, the entry's smoke, whose failure says the members each passed alone."""
    try:
        return call()
    except StepFailed as error:
        raise StepFailed(error.step, f"the release end to end ({labels(members)}, each of which passed its own "
                         f"smoke): {error.message}", "the members do not fit together: register members that do (or "
                         "the entry's golden outputs in its smoke.json, if the new pipeline is right)",
                         retryable=error.retryable, detail=error.detail) from error


def _deployed_alone(model_dir: ModelDir) -> bool:
    try:
        return read_current(model_dir) is not None
    except FerryError:
        return True  # a current.json ferry cannot read is still someone's commit
