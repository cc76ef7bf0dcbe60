"""How the write-back reaches MLflow: a tracking server over REST, or MLflow's client for a store without one.

Every call has its own timeout and no retries; an answer that the model or version does not exist is
:class:`~ferry.core.errors.MlflowRefused`, anything else that fails is :class:`~ferry.core.errors.MlflowDown`
(nothing more is tried).
"""

from __future__ import annotations

from typing import Any, Protocol

from ferry.core.config import Settings
from ferry.core.errors import FerryError, MlflowDown, MlflowRefused, RegistryError, one_line
from ferry.core.mlflow_rest import API, NOT_FOUND, MlflowRest
from ferry.core.registry import Registry


class MlflowWriter(Protocol):
    def aliases(self, model: str) -> dict[str, int]: ...
    def tags(self, model: str, version: int) -> dict[str, str]: ...
    def versions_tagged(self, model: str, key: str, value: str) -> list[int]: ...
    def set_tag(self, model: str, version: int, key: str, value: str) -> None: ...
    def delete_tag(self, model: str, version: int, key: str) -> None: ...
    def set_alias(self, model: str, alias: str, version: int) -> None: ...


def _classify(what: str, error: Exception) -> Exception:
    if getattr(error, "error_code", "") in NOT_FOUND:
        return MlflowRefused(f"{what}: {one_line(str(error), 300)}")
    return MlflowDown(f"{what}: {type(error).__name__}: {one_line(str(error), 300)}")


def _tagged_filter(model: str, key: str, value: str) -> str:
    return f"name='{model}' and tags.`{key}`='{value}'"


class _RestMlflow:
    """A tracking server over its REST API (ferry.core.mlflow_rest: MLflow's credentials, no mlflow import),
    each call with the write-back's own timeout and no retries."""

    def __init__(self, tracking_uri: str, timeout_s: float) -> None:
        self.rest = MlflowRest(tracking_uri, timeout_s)

    def _call(self, method: str, endpoint: str, what: str, **body: Any) -> dict[str, Any]:
        path = f"{API}/{endpoint}"
        try:
            if method == "GET":
                return self.rest.request(method, path, query={k: str(v) for k, v in body.items()})
            return self.rest.request(method, path, body=body)
        except RegistryError as refused:  # MLflow's not found: nothing more is written for it
            raise MlflowRefused(f"{what}: {one_line(refused.message, 300)}") from None
        except FerryError as failed:  # no answer, a server error, or credentials it refuses
            raise MlflowDown(f"{what}: {one_line(failed.message, 300)}") from None

    def aliases(self, model: str) -> dict[str, int]:
        found = self._call("GET", "registered-models/get", f"reading '{model}'", name=model)
        return {a["alias"]: int(a["version"]) for a in found.get("registered_model", {}).get("aliases", [])}

    def tags(self, model: str, version: int) -> dict[str, str]:
        found = self._call("GET", "model-versions/get", f"reading v{version}", name=model, version=str(version))
        return {t["key"]: t.get("value", "") for t in found.get("model_version", {}).get("tags", [])}

    def versions_tagged(self, model: str, key: str, value: str) -> list[int]:
        found = self._call("GET", "model-versions/search", f"searching versions tagged {key}={value}",
                           filter=_tagged_filter(model, key, value), max_results=100)
        return [int(v["version"]) for v in found.get("model_versions", [])]

    def set_tag(self, model: str, version: int, key: str, value: str) -> None:
        self._call("POST", "model-versions/set-tag", f"tagging v{version}", name=model, version=str(version),
                   key=key, value=value)

    def delete_tag(self, model: str, version: int, key: str) -> None:
        self._call("DELETE", "model-versions/delete-tag", f"untagging v{version}", name=model, version=str(version),
                   key=key)

    def set_alias(self, model: str, alias: str, version: int) -> None:
        self._call("POST", "registered-models/alias", f"setting @{alias}", name=model, alias=alias,
                   version=str(version))


class _ClientMlflow:
    """An MLflow the client reaches without a server (sqlite, a file store), or an in-process fake of it."""

    def __init__(self, client: Any) -> None:
        self.client = client

    def _call(self, what: str, method: str, *args: Any, **kwargs: Any) -> Any:
        try:
            return getattr(self.client, method)(*args, **kwargs)
        except Exception as error:  # MLflow's client raises any type: each is Refused or Down
            raise _classify(what, error) from None

    def aliases(self, model: str) -> dict[str, int]:
        found = self._call(f"reading '{model}'", "get_registered_model", model)
        return {alias: int(version) for alias, version in (found.aliases or {}).items()}

    def tags(self, model: str, version: int) -> dict[str, str]:
        return dict(self._call(f"reading v{version}", "get_model_version", model, str(version)).tags or {})

    def versions_tagged(self, model: str, key: str, value: str) -> list[int]:
        found = self._call(f"searching versions tagged {key}={value}", "search_model_versions",
                           filter_string=_tagged_filter(model, key, value), max_results=100)
        return [int(v.version) for v in found]

    def set_tag(self, model: str, version: int, key: str, value: str) -> None:
        self._call(f"tagging v{version}", "set_model_version_tag", model, str(version), key, value)

    def delete_tag(self, model: str, version: int, key: str) -> None:
        self._call(f"untagging v{version}", "delete_model_version_tag", model, str(version), key)

    def set_alias(self, model: str, alias: str, version: int) -> None:
        self._call(f"setting @{alias}", "set_registered_model_alias", model, alias, str(version))


def connect(settings: Settings, registry: Registry) -> MlflowWriter | None:
    """The MLflow the registry reads, for writing; None for a registry that is not MLflow's (a unit-test fake)."""
    uri = getattr(registry, "tracking_uri", "") or settings.tracking_uri
    if uri.startswith(("http://", "https://")):
        return _RestMlflow(uri, settings.mlflow.writeback_timeout_s)
    client = getattr(registry, "client", None)
    return _ClientMlflow(client) if client is not None else None
