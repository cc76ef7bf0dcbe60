"""What a trigger deploys: exactly the version the alias moved to, while the alias still names it.

A trigger whose alias names another version by the time it runs (it moved again, or it was removed), or
whose model MLflow does not know, is refused with the reason, and nothing is deployed for it; a newer
move is deployed by its own delivery (or poll). ferry's own deploy checks again inside the transaction,
under the model's lock, where it resolves the alias (an alias moved in between: rejected, in the
model's history).
"""

from __future__ import annotations

import threading
from typing import Any, cast

from ferry.adapters.watch.triggers import Trigger
from ferry.core.config import Settings
from ferry.core.errors import NoSuchModel, RegistryError, Unavailable
from ferry.core.registry import Registry, VersionRef
from ferry.core.services import Services
from ferry.core.summary import outcome_line

REFUSED = "refused"


def moved_on(trigger: Trigger, named: int) -> str:
    return (f"@{trigger.alias} of '{trigger.model}' names v{named} now, not v{trigger.version} as when it moved: "
            f"v{trigger.version} not deployed (the move to v{named} is deployed on its own delivery or poll)")


def refusal(registry: Registry, trigger: Trigger) -> str | None:
    """Why ``trigger`` must not deploy, or None while its alias names its version; Unavailable when MLflow
    does not answer."""
    try:
        ref = registry.resolve_alias(trigger.model, trigger.alias)
    except NoSuchModel as error:
        return f"{error.message}: nothing deployed"
    except RegistryError as error:
        return f"{error.message}: nothing deployed"
    return moved_on(trigger, ref.version) if ref.version != trigger.version else None


class PinnedRegistry:
    """A registry whose ``resolve_alias`` of the trigger's alias fails unless it names the trigger's version."""

    def __init__(self, registry: Registry, trigger: Trigger) -> None:
        self._registry, self._trigger = registry, trigger

    def resolve_alias(self, model: str, alias: str) -> VersionRef:
        ref = self._registry.resolve_alias(model, alias)
        if (model, alias) == (self._trigger.model, self._trigger.alias) and ref.version != self._trigger.version:
            raise RegistryError(moved_on(self._trigger, ref.version), "nothing was touched")
        return ref

    def __getattr__(self, name: str) -> Any:
        return getattr(self._registry, name)


class MlflowRegistry:
    """One MLflow client for every trigger, made when the first one needs it (importing mlflow takes a second)."""

    def __init__(self, settings: Settings, given: Registry | None = None) -> None:
        self.settings, self._registry = settings, given
        self._lock = threading.Lock()

    def get(self) -> Registry:
        with self._lock:
            if self._registry is None:
                self._registry = Registry(self.settings.tracking_uri)
            return self._registry


class LocalDeployer:
    """ferry's own deploy, in this process (the runner writes the outcome back to MLflow)."""

    via = "ferry"

    def __init__(self, settings: Settings, registry: Registry | None = None, replicas: list[Any] | None = None) -> None:
        self.settings, self.registry, self.replicas = settings, MlflowRegistry(settings, registry), replicas

    def run(self, trigger: Trigger) -> tuple[str, str]:
        from ferry.core.runner import deploy

        registry = self.registry.get()
        try:
            reason = refusal(registry, trigger)
        except Unavailable:
            reason = None  # the deploy attempt finds MLflow down too, and records it in the model's history
        if reason is not None:
            return REFUSED, reason
        ferry = Services(self.settings, given_replicas=self.replicas,
                      given_registry=cast(Registry, PinnedRegistry(registry, trigger)))
        try:
            report = deploy(ferry, trigger.model, alias=trigger.alias)
        except NoSuchModel as error:  # removed from MLflow since the check: the runner keeps no record of it
            return REFUSED, f"{error.message}: nothing deployed"
        return str(report.outcome), outcome_line(report)
