"""Triton's HTTP API as ferry uses it. Every call has a timeout: a load can hang forever."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit

import numpy as np
import tritonclient.http as triton_http
from tritonclient.utils import InferenceServerException

from ferry.errors import FerryError

# The header that carries the key of Triton's restricted model-control API (load, unload, repository index).
API_KEY_HEADER = "ferry-api-key"


class TritonError(FerryError):
    pass


class TritonTimeout(TritonError):
    pass


@dataclass(frozen=True)
class VersionState:
    version: int
    state: str  # READY, LOADING, UNLOADING, UNAVAILABLE
    reason: str = ""


def host_port(url: str) -> str:
    parts = urlsplit(url if "://" in url else f"http://{url}")
    return f"{parts.hostname}:{parts.port or 8000}"


class Triton:
    def __init__(self, url: str, timeout_s: float = 10.0, load_timeout_s: float = 120.0, api_key: str = "") -> None:
        self.url = url
        self.timeout_s = timeout_s
        self.load_timeout_s = load_timeout_s
        self.headers = {API_KEY_HEADER: api_key} if api_key else None
        self._client = self._connect(timeout_s)
        self._load_client = self._connect(load_timeout_s)

    def _connect(self, timeout_s: float) -> triton_http.InferenceServerClient:
        return triton_http.InferenceServerClient(
            host_port(self.url), connection_timeout=timeout_s, network_timeout=timeout_s
        )

    def _call(self, what: str, call, *args, timeout_s: float | None = None, **kwargs):
        try:
            return call(*args, headers=self.headers, **kwargs)
        except (TimeoutError, OSError) as error:
            if isinstance(error, TimeoutError):
                raise TritonTimeout(
                    f"Triton at {self.url} did not answer {what} within {timeout_s or self.timeout_s:g} s", retryable=True
                )
            raise TritonError(
                f"Triton at {self.url} is not reachable ({what}): {error}",
                "start it with `ferry triton up` or set FERRY_TRITON_URL",
                retryable=True,
            )
        except InferenceServerException as error:
            if "restricted" in error.message() or "not authorized" in error.message().lower():
                raise TritonError(f"Triton refused {what}: {error.message()}",
                                  "set FERRY_TRITON_API_KEY to the key its --http-restricted-api flag names")
            raise TritonError(f"Triton refused {what}: {error.message()}")

    def check_live(self) -> None:
        if not self._call("the health check", self._client.is_server_live):
            raise TritonError(f"Triton at {self.url} is not live", "check its log, or restart it")

    def load(self, model: str, config_json: str) -> None:
        self._call(
            f"loading '{model}'", self._load_client.load_model, model, config=config_json, timeout_s=self.load_timeout_s
        )

    def unload(self, model: str) -> None:
        self._call(f"unloading '{model}'", self._client.unload_model, model)

    def index(self) -> dict[str, list[VersionState]]:
        """Every model's versions, from one call of the repository index."""
        models: dict[str, list[VersionState]] = {}
        for entry in self._call("the repository index", self._client.get_model_repository_index):
            if entry.get("version", "").isdigit():
                state = VersionState(int(entry["version"]), entry.get("state", ""), entry.get("reason", ""))
                models.setdefault(entry.get("name", ""), []).append(state)
        return models

    def versions(self, model: str) -> list[VersionState]:
        return self.index().get(model, [])

    def ready_versions(self, model: str) -> list[int]:
        return sorted(v.version for v in self.versions(model) if v.state == "READY")

    def version_ready(self, model: str, version: int) -> bool:
        return bool(self._call("the readiness check", self._client.is_model_ready, model, str(version)))

    def infer(self, model: str, version: int, inputs: dict[str, np.ndarray], datatypes: dict[str, str]) -> dict[str, np.ndarray]:
        tensors = []
        for name, value in inputs.items():
            tensor = triton_http.InferInput(name, list(value.shape), datatypes[name])
            tensor.set_data_from_numpy(value)
            tensors.append(tensor)
        result = self._call(f"inference on '{model}' v{version}", self._client.infer, model, tensors, str(version))
        response = result.get_response()
        return {out["name"]: result.as_numpy(out["name"]) for out in response.get("outputs", [])}

