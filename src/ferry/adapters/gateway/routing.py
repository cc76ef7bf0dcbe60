"""Which version production traffic goes to: the one current.json commits, noticed as soon as it changes.

A commit replaces current.json with a rename, so its inode changes: one ``stat`` per request (about a
microsecond) tells whether to read it again. The first request after a commit goes to the new version.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from ferry.core.current import read_current
from ferry.core.errors import FerryError, NoSuchModel
from ferry.core.model_config import Signature, TensorSpec, config_signature
from ferry.core.records import CurrentState
from ferry.core.repository import ModelDir


@dataclass(frozen=True)
class Route:
    model: str
    version: int
    signature: Signature  # the model's inputs and outputs, from its config.pbtxt (batch dimension included)
    max_batch_size: int = 0  # from config.pbtxt; with batching on, the first dimension may not exceed it

    def serves(self, version: str) -> bool:
        """Whether a version a client named (a URL segment, a gRPC field; empty: none named) is this one."""
        return not version or version == str(self.version)

    @cached_property
    def inputs(self) -> dict[str, TensorSpec]:
        return {spec.name: spec for spec in self.signature.inputs}

    @cached_property
    def outputs(self) -> frozenset[str]:
        return frozenset(spec.name for spec in self.signature.outputs)


class UnknownModel(NoSuchModel):
    """Nothing is committed for this model (or the name is not one): the gateway answers 404."""


class Router:
    def __init__(self, repository: Path) -> None:
        self.repository = repository
        self._current_paths: dict[str, str] = {}  # model -> its current.json, for the names already checked
        self._cache: dict[str, tuple[tuple[int, int, int], Route]] = {}

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
        config = model_dir.read_config()
        if current is None or config is None:
            raise UnknownModel(f"model '{model_dir.model}' has no committed version", "deploy it with `ferry deploy`")
        return Route(model_dir.model, current.active_version, config_signature(config), config.max_batch_size)
