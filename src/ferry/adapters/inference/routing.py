"""Which version production traffic goes to: the one current.json commits, noticed as soon as it changes.

A commit replaces current.json with a rename, so its inode changes: one ``stat`` per request (about a
microsecond) tells whether to read it again. The first request after a commit goes to the new version.

During a bake, ``.ferry/<model>/rollout.json`` names a candidate beside the committed version, followed the
same way (a ``stat``, a read only when it changed; absent: no bake), and :meth:`Router.bake` says what to do
with the candidate (canary: answer a share of requests; shadow: receive a copy of a share of them).

During a rolling deploy (rollout.json's ``plan.mode`` is ``rolling`` and its ``active_version`` the committed
one), :meth:`Router.follow` sends the model's requests to its front, unversioned: each replica answers with the
version its front serves (the active one, or the candidate on the replicas listed ``swapped``), and
:meth:`Route.answered_by` names the version that answered. :meth:`Router.draining` is the union of every rolling
rollout's ``draining`` replicas, which the balancers send nothing new.
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import NamedTuple

from ferry.core.current import read_current
from ferry.core.errors import FerryError, NoSuchModel
from ferry.core.front import store_name
from ferry.core.model_config import Signature, TensorSpec, config_signature, model_config_pb2
from ferry.core.records import CurrentState, RolloutState
from ferry.core.repository import STATE_DIR, ModelDir
from ferry.core.rollout import ROLES, read_rollout

ACTIVE = "active"  # the role of the committed version's requests (metrics' ``role`` label)
CANDIDATE = ROLES["canary"]  # a canary's share, answered by the candidate
SHADOW = ROLES["shadow"]  # copies of requests sent to a shadow candidate, never seen by a client
StatKey = tuple[int, int, int]
DRAIN_SCAN_S = 0.1  # every model's rollout.json is looked at this often (on the request path) for draining replicas


@dataclass(frozen=True)
class Route:
    model: str
    version: int
    signature: Signature  # the model's inputs and outputs, from its config.pbtxt (batch dimension included)
    max_batch_size: int = 0  # from config.pbtxt; with batching on, the first dimension may not exceed it
    role: str = ACTIVE  # CANDIDATE: the candidate version answering a canary's share; SHADOW: a mirrored copy

    behind_front: bool = True  # False for a model an earlier ferry deployed, or adopted: Triton serves it itself
    front: bool = False  # a rolling deploy: sent to the model's front, naming no version (see Router.follow)

    @cached_property
    def upstream(self) -> str:
        """The Triton model the gateway sends this route's requests to, naming its version: the version's store,
        loaded from the candidate's load on (the front serves it only from the commit's repoint on, a few
        milliseconds after current.json), a baking candidate's too; or, for a model not yet behind a front, the
        model itself; during a rolling deploy, the model's front (the replica decides the version)."""
        return store_name(self.model, self.version) if self.behind_front and not self.front else self.model

    @cached_property
    def path(self) -> str:
        """The KServe HTTP path of the upstream model (append ``/infer``, ``/ready``...): with its version, or
        none for the front (a swapped replica's front serves the candidate, not the committed version)."""
        if self.front:
            return f"/v2/models/{self.model}"
        return f"/v2/models/{self.upstream}/versions/{self.version}"

    @cached_property
    def upstream_version(self) -> str:
        """The version named in a gRPC request sent upstream (empty for the front: whichever it serves)."""
        return "" if self.front else str(self.version)

    def answered_by(self, version: int | None) -> Route:
        """This front route as the answer of ``version`` names it (the model_version Triton's front wrote): role
        CANDIDATE for a version other than the committed one. None (unreadable): this route, as the active one."""
        if not self.front or version is None or version == self.version:
            return self
        answers = self._answers
        found = answers.get(version)
        if found is None:
            found = answers[version] = replace(self, version=version, role=CANDIDATE)
        return found

    @cached_property
    def _answers(self) -> dict[int, Route]:
        return {}

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


def front_of(route: Route, state: RolloutState | None) -> Route | None:
    """The front route for ``route`` while rollout.json describes a rolling deploy from the version committed now
    (None otherwise: the committed version's store, as always). The version stays the committed one: the
    requests are checked against its config, and an answer names its own version (:meth:`Route.answered_by`)."""
    if state is None or state.plan.mode != "rolling" or state.model != route.model \
            or state.active_version != route.version or not route.behind_front or route.role != ACTIVE:
        return None
    return replace(route, front=True)


class _Derived(NamedTuple):
    """What one rollout.json means for one committed route (rebuilt when either changes)."""

    state: RolloutState | None
    route: Route
    bake: Bake | None
    served: Route  # the route requests go to: the committed one, or its front during a rolling deploy


class UnknownModel(NoSuchModel):
    """Nothing is committed for this model (or the name is not one): the gateway answers 404."""


class Router:
    def __init__(self, repository: Path) -> None:
        self.repository = repository
        self._current_paths: dict[str, str] = {}  # model -> its current.json, for the names already checked
        self._cache: dict[str, tuple[StatKey, Route]] = {}
        self._rollout_paths: dict[str, str] = {}  # routed or rolling models only: bounded by the repository
        self._states: dict[str, tuple[StatKey, RolloutState | None]] = {}  # model -> its rollout.json, as last read
        self._derived: dict[str, _Derived] = {}
        self._drains: dict[str, frozenset[str]] = {}  # model -> its rolling rollout's draining replicas
        self._draining: frozenset[str] = frozenset()
        self._scanned = -DRAIN_SCAN_S

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
        return self.follow(route)[1]

    def follow(self, route: Route) -> tuple[Route, Bake | None]:
        """Where ``route``'s (a committed route's) requests go, and the bake beside it, from rollout.json (one
        ``stat``; absent: ``route`` itself and no bake): its front during a rolling deploy (:func:`front_of`)."""
        state = self.rollout(route.model)
        if state is None:
            return route, None
        derived = self._derived.get(route.model)
        if derived is None or derived.state is not state or derived.route is not route:  # once per file and route
            config = self._candidate_config(route.model, state)
            derived = self._derived[route.model] = _Derived(state, route, bake_of(route, state, config),
                                                            front_of(route, state) or route)
        return derived.served, derived.bake

    def answered_on(self, route: Route, replica: str) -> Route:
        """A front route's answer that names no version (an error) by the replica it came from: the candidate's
        when a rolling deploy swapped that replica, else the route itself."""
        state = self.rollout(route.model) if route.front else None
        if state is None or replica not in state.swapped or state.candidate_version == route.version:
            return route
        return route.answered_by(state.candidate_version)

    def rollout(self, model: str) -> RolloutState | None:
        """``model``'s rollout.json, read again only when its ``stat`` changed; None when absent or damaged."""
        path = self._rollout_paths.get(model)
        if path is None:
            path = self._rollout_paths[model] = str(self._model_dir(model).rollout_path)
        try:
            stat = os.stat(path)
        except OSError:  # absent (no bake), or unreadable: either way the committed version alone
            if model in self._states:
                del self._states[model]
                self._drained(model, None)
            return None
        key = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
        cached = self._states.get(model)
        if cached is not None and cached[0] == key:
            return cached[1]
        state = self._read_rollout(model)
        self._states[model] = (key, state)
        self._drained(model, state)
        return state

    def draining(self) -> frozenset[str]:
        """The replicas (URLs) some model's rolling rollout lists as draining: no new request goes to them. A
        routed model's change is seen at its next request; any other model's within :data:`DRAIN_SCAN_S`."""
        now = time.monotonic()
        if now - self._scanned >= DRAIN_SCAN_S:
            self._scanned = now
            self._scan()
        return self._draining

    def _scan(self) -> None:
        try:
            entries = [entry.name for entry in os.scandir(self.repository / STATE_DIR) if entry.is_dir()]
        except OSError:
            entries = []
        for model in {*entries, *self._drains}:
            try:
                self.rollout(model)
            except UnknownModel:  # a directory whose name is no model's
                continue

    def _drained(self, model: str, state: RolloutState | None) -> None:
        drains = frozenset(state.draining) if state is not None and state.plan.mode == "rolling" else frozenset()
        if drains == self._drains.get(model, frozenset()):
            return
        if drains:
            self._drains[model] = drains
        else:
            self._drains.pop(model, None)
        self._draining = frozenset().union(*self._drains.values())

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
