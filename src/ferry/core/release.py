"""Releases: an entry model (an ensemble) and the version of every model it uses, switched as one.

A model whose config is an ensemble is a release's entry. Its steps name its members; each step's
``model_version`` pins the member's MLflow version (> 0), or leaves it to the alias the deploy names (-1: the
member's version under that alias). The members are fixed at the entry version's first staging (its
manifest records them), so an entry version is one release for ever, and a rollback restores its tuple.

In Triton each member version is a store like any model's (``<member>.versions.<v>``, under its own config),
and the entry version's store is the ensemble with its steps rewritten to those stores at their versions:
``pipe.versions.7`` runs ``pre.versions.3`` then ``cls.versions.5``, whatever else is loaded. The commit
repoints the entry's front in one load, so a request runs wholly on the old stores or wholly on the new ones.

Members have no front and no current.json: the entry's current.json commits their versions. A member store
stays loaded while any committed release pins it (two releases may pin one member, at one version or at
two, loaded beside); a model deployed on its own cannot be a member, nor a member be deployed on its own.

A load of an ensemble makes Triton poll its members on disk and reload from config.pbtxt any member whose
directory changed since its last load: every load of an entry store is preceded by loads of its member
stores with their overrides, and each member directory holds a config.pbtxt (an ensemble's load needs it).
"""

from __future__ import annotations

from dataclasses import dataclass

from ferry.core.current import read_current
from ferry.core.errors import FerryError, InvalidInput, StepFailed
from ferry.core.front import store_config, store_name
from ferry.core.journal import read_journal
from ferry.core.model_config import model_config_pb2, to_override_json
from ferry.core.records import QuarantineReason, ReleaseMember, Step
from ferry.core.repository import STATE_DIR, ModelDir
from ferry.core.triton import VersionState, ready_versions

MemberKey = tuple[str, int]


def is_entry(config: model_config_pb2.ModelConfig) -> bool:
    """Whether a version with this config is a release's entry: an ensemble of other models."""
    return bool(config.platform == "ensemble")


def member_pins(config: model_config_pb2.ModelConfig) -> list[MemberKey]:
    """Each model the ensemble's steps name, once, in step order, with the version its step pins (-1: none)."""
    pins: dict[str, int] = {}
    for step in config.ensemble_scheduling.step:
        pinned = int(step.model_version)
        if pins.setdefault(step.model_name, pinned) != pinned:
            raise StepFailed(Step.MATERIALIZE, f"the ensemble's steps pin '{step.model_name}' at two versions "
                             f"({pins[step.model_name]} and {pinned})",
                             "a release runs one version of each member: give every step of it the same model_version")
    return list(pins.items())


def keys(members: list[ReleaseMember]) -> list[MemberKey]:
    return [(m.model, m.version) for m in members]


def labels(members: list[ReleaseMember] | list[MemberKey]) -> str:
    pairs = [(m.model, m.version) if isinstance(m, ReleaseMember) else m for m in members]
    return ", ".join(f"{model} v{version}" for model, version in pairs)


# ---------------------------------------------------------------- in Triton


@dataclass(frozen=True)
class MemberStore:
    """A member version's store as an entry store runs it."""

    model: str
    version: int
    config: model_config_pb2.ModelConfig

    @property
    def name(self) -> str:
        return store_name(self.model, self.version)

    def override(self) -> str:
        return to_override_json(store_config(self.config, self.model, self.version))


def member_stores(repository: ModelDir, members: list[ReleaseMember]) -> list[MemberStore]:
    """The stores of a release's members, their links in place (``repository``: any model of it)."""
    stores = []
    for member in members:
        member_dir = ModelDir(repository.repository, member.model)
        config = member_dir.version_config(member.version)
        if config is None:
            raise InvalidInput(f"member '{member.model}' v{member.version} has no manifest in {member_dir.path}",
                               f"restore {member_dir.version_dir(member.version)}, or deploy another release")
        member_dir.ensure_store_link(member.version)
        stores.append(MemberStore(member.model, member.version, config))
    return stores


def entry_store_config(config: model_config_pb2.ModelConfig, model: str, version: int,
                       stores: list[MemberStore]) -> model_config_pb2.ModelConfig:
    """The entry version's store: its ensemble with every step sent to its member's store, at its version."""
    pinned = store_config(config, model, version)
    by_model = {store.model: store for store in stores}
    for step in pinned.ensemble_scheduling.step:
        if step.model_name in by_model:
            store = by_model[step.model_name]
            step.model_name, step.model_version = store.name, store.version
    return pinned


ANY_VERSION = -1  # in pinned_versions: an entry whose files cannot be read, which may pin any version (keep all)


def pinned_versions(repository: ModelDir, member: str, besides: str | None = None) -> dict[int, list[str]]:
    """Each version of ``member`` that a release pins, and the entry models that pin it: committed (their
    current.json) or being deployed (their journal's candidate), but ``besides``, whose own state the caller
    is changing. An entry whose current.json or journal cannot be read pins ANY_VERSION: nothing of the
    member is unloaded or quarantined on its account (fail closed)."""
    pins: dict[int, list[str]] = {}
    for state_dir in sorted((repository.repository / STATE_DIR).iterdir()) \
            if (repository.repository / STATE_DIR).is_dir() else []:
        entry = state_dir.name
        has_state = (state_dir / "current.json").exists() or (state_dir / "journal.json").exists()
        if entry == besides or not has_state:
            continue
        try:
            entry_dir = ModelDir(repository.repository, entry)
            current, journal = read_current(entry_dir), read_journal(entry_dir)
        except (FerryError, OSError, ValueError):
            pins.setdefault(ANY_VERSION, []).append(entry)
            continue
        claimed = journal.record.candidate.members if journal and journal.record.candidate else []
        for pinned in [*(current.members if current else []), *claimed]:
            if pinned.model == member and entry not in pins.get(pinned.version, []):
                pins.setdefault(pinned.version, []).append(entry)
    return pins


def stale_stores(repository: ModelDir, entry: str, before: list[ReleaseMember],
                 after: list[ReleaseMember]) -> list[MemberKey]:
    """The member stores ``entry`` pinned before and no longer does, that no other release pins (committed or
    being deployed)."""
    kept = set(keys(after))
    stale = []
    for model, version in keys(before):
        pins = pinned_versions(repository, model, besides=entry)
        if (model, version) not in kept and version not in pins and ANY_VERSION not in pins:
            stale.append((model, version))
    return stale


def release_of(repository: ModelDir, model: str) -> str | None:
    """The releases ``model`` is a member of (committed or being deployed), as one phrase (None: of none)."""
    return describe_pins(model, pinned_versions(repository, model))


def describe_pins(model: str, pins: dict[int, list[str]]) -> str | None:
    """What :func:`pinned_versions` found, as one phrase (None: nothing pins ``model``)."""
    if not pins:
        return None
    return ", ".join(f"'{entry}' (unreadable: it may pin any version)" if version == ANY_VERSION
                     else f"'{entry}' (which pins {model} v{version})"
                     for version, entries in sorted(pins.items()) for entry in entries)


# ---------------------------------------------------------------- the undo


def members_of(model_dir: ModelDir, version: int | None) -> list[ReleaseMember]:
    """The members an entry version's manifest records ([] for no release, or one not yet recorded)."""
    manifest = model_dir.read_manifest(version) if version is not None else None
    return manifest.members if manifest is not None else []


def member_models(model_dir: ModelDir, version: int | None) -> list[str]:
    """The models an entry version's config names as members, recorded or not ([] for no release)."""
    try:
        config = model_dir.version_config(version) if version is not None else None
        return [name for name, _ in member_pins(config)] if config is not None and is_entry(config) else []
    except (FerryError, ValueError):
        return []


def quarantine_staged(model_dir: ModelDir, names: list[str], active: list[ReleaseMember],
                      reason: QuarantineReason) -> list[str]:
    """Quarantine what a failed release staged of its members ``names``: the versions this deploy staged that
    neither the restored release (``active``) nor any other release pins; and drop the links of member stores
    nothing pins any more."""
    moved = []
    for name in names:
        member_dir = ModelDir(model_dir.repository, name)
        pins = pinned_versions(model_dir, name, besides=model_dir.model)
        keep = set(pins) | {m.version for m in active if m.model == name}
        folders = dict(member_dir.staging_dirs(reason.deploy_id))
        for folder in member_dir.path.glob("[0-9]*"):
            manifest = member_dir.read_manifest(int(folder.name)) if folder.name.isdigit() else None
            if manifest is not None and manifest.deploy_id == reason.deploy_id and manifest.version not in keep:
                folders[folder] = manifest.version
        for folder, member_version in folders.items():
            copy = reason.model_copy(update={"model": name, "version": member_version})
            moved.append(str(member_dir.quarantine(folder, copy)))
        if ANY_VERSION not in pins:
            member_dir.drop_store_links(sorted(keep))
    return moved


def missing_members(index: dict[str, list[VersionState]], members: list[ReleaseMember]) -> list[str]:
    """The members of a committed release whose store a replica (its repository index) does not hold ready."""
    return [m.label for m in members if m.version not in ready_versions(index.get(store_name(m.model, m.version), []))]
