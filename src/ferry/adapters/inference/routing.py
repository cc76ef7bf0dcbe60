"""Which version production traffic goes to: the one current.json commits, noticed as soon as it changes.

A commit replaces current.json with a rename, so its inode changes: one ``stat`` per request (about a
microsecond) tells whether to read it again. The first request after a commit goes to the new version.

During a bake, ``.ferry/<model>/rollout.json`` names a candidate beside the committed version, followed the
same way (a ``stat``, a read only when it changed; absent: no bake), and :meth:`Router.bake` says what to do
with the candidate (canary: answer a share of requests; shadow: receive a copy of a share of them).
"""

from __future__ import annotations

import os
import random
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path

from ferry.core.current import read_current
from ferry.core.errors import FerryError, NoSuchModel
from ferry.core.front import store_name
from ferry.core.model_config import Signature, TensorSpec, config_signature, model_config_pb2
from ferry.core.records import CurrentState, RolloutState
from ferry.core.repository import ModelDir
from ferry.core.rollout import ROLES, read_rollout

ACTIVE = "active"  # the role of the committed version's requests (metrics' ``role`` label)
CANDIDATE = ROLES["canary"]  # a canary's share, answered by the candidate
SHADOW = ROLES["shadow"]  # copies of requests sent to a shadow candidate, never seen by a client
StatKey = tuple[int, int, int]


@dataclass(frozen=True)
class Route:
    model: str
    version: int
    signature: Signature  # the model's inputs and outputs, from its config.pbtxt (batch dimension included)
    max_batch_size: int = 0  # from config.pbtxt; with batching on, the first dimension may not exceed it
    role: str = ACTIVE  # CANDIDATE: the candidate version answering a canary's share; SHADOW: a mirrored copy

    behind_front: bool = True  # False for a model an earlier ferry deployed, or adopted: Triton serves it itself

    @cached_property
    def upstream(self) -> str:
        """The Triton model the gateway sends this route's requests to, naming its version: the version's store,
        loaded from the candidate's load on (the front serves it only from the commit's repoint on, a few
        milliseconds after current.json), a baking candidate's too; or, for a model not yet behind a front, the
        model itself."""
        return store_name(self.model, self.version) if self.behind_front else self.model

    def serves(self, version: str) -> bool:
        """Whether a version a client named (a URL segment, a gRPC field; empty: none named) is this one."""
        return not version or version == str(self.version)

    @cached_property
    def inputs(self) -> dict[str, TensorSpec]:
        return {spec.name: spec for spec in self.signature.inputs}

    @cached_property
    def outputs(self) -> frozenset[str]:
        return frozenset(spec.name for spec in self.signature.outputs)


@dataclass(frozen=True)
class Bake:
    """A candidate baking beside a committed route (rollout.json): ``candidate`` is its route (role CANDIDATE
    in canary mode, SHADOW in shadow mode), ``share`` the fraction of requests it answers or receives."""

    active: Route
    candidate: Route
    share: float
    deploy_id: str

    @property
    def canary(self) -> bool:
        return self.candidate.role == CANDIDATE

    def takes(self) -> bool:
        """Whether this request is the candidate's (a fresh draw per request)."""
        return random.random() < self.share


def bake_of(route: Route, state: RolloutState | None,
            config: model_config_pb2.ModelConfig | None = None) -> Bake | None:
    """What rollout.json asks for ``route``, if it applies: it must bake beside the version committed now.
    ``config``: the candidate's own (None: the committed version's), which its requests are checked against."""
    if state is None or state.model != route.model or state.active_version != route.version \
            or state.candidate_version == route.version or state.plan.mode == "rolling":
        return None
    plan = state.plan
    share = (plan.canary_percent if plan.mode == "canary" else plan.mirror_percent) / 100
    if share <= 0:
        return None
    candidate = replace(route, version=state.candidate_version, role=ROLES[plan.mode], behind_front=True)  # the store
    if config is not None:
        candidate = replace(candidate, signature=config_signature(config), max_batch_size=config.max_batch_size)
    return Bake(route, candidate, min(share, 1.0), state.deploy_id)


class UnknownModel(NoSuchModel):
    """Nothing is committed for this model (or the name is not one): the gateway answers 404."""


class Router:
    def __init__(self, repository: Path) -> None:
        self.repository = repository
        self._current_paths: dict[str, str] = {}  # model -> its current.json, for the names already checked
        self._cache: dict[str, tuple[StatKey, Route]] = {}
        self._rollout_paths: dict[str, str] = {}  # routed models only: bounded by the repository
        self._bakes: dict[str, tuple[StatKey, RolloutState | None, Route | None, Bake | None]] = {}

    def route(self, model: str) -> Route:
        """The committed version of ``model``; UnknownModel if it has none (or no such model)."""
        path = self._current_paths.get(model)
        if path is None:
            path = str(self._model_dir(model).current_path)
            if len(self._current_paths) < 10_000:  # names from requests: keep the memory bounded
                self._current_paths[model] = path
        try:
            stat = os.stat(path)
        except FileNotFoundError:
            raise UnknownModel(f"model '{model}' has no committed version", "deploy it with `ferry deploy`") from None
        key = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
        cached = self._cache.get(model)
        if cached is not None and cached[0] == key:
            return cached[1]
        route = self._read(self._model_dir(model))
        self._cache[model] = (key, route)
        return route

    def _model_dir(self, model: str) -> ModelDir:
        try:
            return ModelDir(self.repository, model)
        except FerryError as error:
            raise UnknownModel(error.message, error.hint) from error

    @staticmethod
    def _read(model_dir: ModelDir) -> Route:
        current: CurrentState | None = read_current(model_dir)
        pinned = model_dir.read_config()
        if current is None or pinned is None:
            raise UnknownModel(f"model '{model_dir.model}' has no committed version", "deploy it with `ferry deploy`")
        # The version's own config (its manifest): config.pbtxt follows the commit only after every front is
        # repointed, and the first request after the commit must be checked against the new version's config.
        config = model_dir.version_config(current.active_version) or pinned
        # ferry writes config.pbtxt without a name once the model is behind a front (ferry.core.front.disk_config).
        return Route(model_dir.model, current.active_version, config_signature(config), config.max_batch_size,
                     behind_front=not pinned.name)

    def bake(self, route: Route) -> Bake | None:
        """The bake beside ``route`` (a committed route), from rollout.json: None when there is none, when it
        does not apply to the version committed now, or when the file is damaged (no bake, fail safe)."""
        path = self._rollout_paths.get(route.model)
        if path is None:
            path = self._rollout_paths[route.model] = str(self._model_dir(route.model).rollout_path)
        try:
            stat = os.stat(path)
        except OSError:  # absent (no bake), or unreadable: either way the committed version alone
            return None
        key = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
        cached = self._bakes.get(route.model)
        if cached is None or cached[0] != key or cached[2] is not route:  # built once per file and route
            state = cached[1] if cached is not None and cached[0] == key else self._read_rollout(route.model)
            config = self._candidate_config(route.model, state)
            cached = self._bakes[route.model] = (key, state, route, bake_of(route, state, config))
        return cached[3]

    def _candidate_config(self, model: str, state: RolloutState | None) -> model_config_pb2.ModelConfig | None:
        try:
            return None if state is None else self._model_dir(model).version_config(state.candidate_version)
        except FerryError:  # a damaged manifest: the candidate is checked against the committed version's config
            return None

    def _read_rollout(self, model: str) -> RolloutState | None:
        try:
            return read_rollout(self._model_dir(model))
        except (OSError, ValueError, FerryError):  # damaged or half-visible: treated as no bake
            return None
