"""Triton's HTTP API as ferry uses it. Every call has a timeout: a load can hang forever.

``tritonclient.http`` (geventhttpclient) binds a client to the thread that created it, so each
thread gets its own clients: the exporter serves every scrape on a new thread. It is imported at
the first call that needs it (it brings numpy and gevent, 0.1 s): the repository index, all that
``ferry status`` asks, is one POST made with http.client.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from ferry.core.addresses import Endpoint, parse_endpoint
from ferry.core.errors import TritonError, TritonTimeout, one_line
from ferry.core.front import legacy_store_name, parse_store_name

if TYPE_CHECKING:
    import tritonclient.http as triton_http

    from ferry.core.smoke import Array

# The header that carries the key of Triton's restricted model-control API (load, unload, repository index).
API_KEY_HEADER = "ferry-api-key"
READY = "READY"
UNLOADING = "UNLOADING"  # a model Triton is unloading: its requests in flight still run
T = TypeVar("T")


@dataclass(frozen=True)
class VersionState:
    version: int
    state: str  # READY, LOADING, UNLOADING, UNAVAILABLE
    reason: str = ""


RepositoryIndex = dict[str, list[VersionState]]  # model name (a front or a store) -> its versions


def ready_versions(states: list[VersionState]) -> list[int]:
    """The versions that are READY, sorted."""
    return sorted(v.version for v in states if v.state == READY)


@dataclass(frozen=True)
class Placement:
    """What Triton holds of one model: the front's version (what clients of the model's name reach) and
    the versions whose stores are loaded (:mod:`ferry.core.front`)."""

    front: list[int]
    store: list[int]
    legacy: list[int] = field(default_factory=list)  # held by the one store earlier releases of ferry loaded

    @property
    def serving(self) -> list[int]:
        """The versions clients of the model's name reach: the one place that decides what "serving" means.
        With no store loaded the name is not a front (a model deployed by an earlier release of ferry, or by
        another tool): what it serves itself."""
        stores = set(self.store) | set(self.legacy)
        return sorted(set(self.front) & stores) if stores else self.front

    def settled(self, wanted: list[int], held: list[int] | None = None) -> bool:
        """Whether the front serves ``wanted`` and the stores hold nothing else (no candidate left), or ``held``
        (``wanted`` and the previous version, kept warm)."""
        return self.front == wanted and self.store in (wanted, held or wanted) and not self.legacy


def store_states(index: RepositoryIndex, model: str) -> list[VersionState]:
    """The state of each version of ``model`` that has a store (its own version of it), by version."""
    states = []
    for name, versions in index.items():
        parsed = parse_store_name(name)
        if parsed is not None and parsed[0] == model:
            states += [v for v in versions if v.version == parsed[1]]
    return sorted(states, key=lambda v: v.version)


def placement(index: RepositoryIndex, model: str) -> Placement:
    return Placement(ready_versions(index.get(model, [])), ready_versions(store_states(index, model)),
                     ready_versions(index.get(legacy_store_name(model), [])))


class Triton:
    def __init__(self, url: str, timeout_s: float = 10.0, load_timeout_s: float = 120.0, api_key: str = "") -> None:
        self.endpoint: Endpoint = parse_endpoint(url)
        self.url = self.endpoint.url
        self.timeout_s = timeout_s
        self.load_timeout_s = load_timeout_s
        self.headers = {API_KEY_HEADER: api_key} if api_key else None
        self._local = threading.local()
        self._worker: ThreadPoolExecutor | None = None

    def submit(self, call: Callable[[], T]) -> Future[T]:
        """Run ``call`` on this replica's own worker thread (made on first use), where its client lives."""
        if self._worker is None:
            self._worker = ThreadPoolExecutor(1, thread_name_prefix=f"ferry-{self.endpoint.host_port}")
        return self._worker.submit(call)

    def _client(self, timeout_s: float) -> triton_http.InferenceServerClient:
        import tritonclient.http as triton_http

        clients: dict[float, triton_http.InferenceServerClient] = self._local.__dict__.setdefault("clients", {})
        if timeout_s not in clients:
            clients[timeout_s] = triton_http.InferenceServerClient(
                self.endpoint.host_port, connection_timeout=timeout_s, network_timeout=timeout_s)
        return clients[timeout_s]

    @contextlib.contextmanager
    def _network_errors(self, what: str, timeout_s: float) -> Iterator[None]:
        """A timeout or a connection that fails as ferry's errors: the one wording for every call."""
        try:
            yield
        except TimeoutError:
            raise TritonTimeout(f"Triton at {self.url} did not answer {what} within {timeout_s:g} s") from None
        except OSError as error:
            raise TritonError(f"Triton at {self.url} is not reachable ({what}): {error}",
                              "start it with `ferry triton up` or set FERRY_TRITON_URL", retryable=True) from None

    def _call(self, what: str, call: Callable[..., Any], *args: Any, timeout_s: float | None = None,
              **kwargs: Any) -> Any:
        from tritonclient.utils import InferenceServerException

        timeout_s = timeout_s or self.timeout_s
        try:
            with self._network_errors(what, timeout_s):
                return call(self._client(timeout_s))(*args, headers=self.headers, **kwargs)
        except InferenceServerException as error:
            raise self._refusal(what, error.message() or "", error.status()) from None

    def _post(self, what: str, path: str) -> tuple[int, bytes]:
        """One POST with an empty body, as tritonclient.http sends it, on a connection of its own (any thread
        may call it): the status and the body of the answer."""
        connection = http.client.HTTPConnection(self.endpoint.host, self.endpoint.port, timeout=self.timeout_s)
        try:
            with self._network_errors(what, self.timeout_s):
                connection.request("POST", path, body=b"", headers=self.headers or {})
                response = connection.getresponse()
                return response.status, response.read()
        except http.client.HTTPException as error:
            raise TritonError(f"something at {self.endpoint.host_port} does not answer HTTP as Triton does "
                              f"({what}): {error!r}",
                              "check FERRY_TRITON_URL: it must name Triton's HTTP port") from None
        finally:
            connection.close()

    def _refusal(self, what: str, message: str, status: str | None) -> TritonError:
        if "restricted" in message or "not authorized" in message.lower():
            return TritonError(f"Triton refused {what}: {one_line(message)}",
                               "set FERRY_TRITON_API_KEY to the key its --http-restricted-api flag names")
        if "<html" in message.lower() or "<!doctype" in message.lower():
            return TritonError(f"something at {self.endpoint.host_port} answers HTTP (status {status}) but is not "
                               f"Triton ({what})", "check FERRY_TRITON_URL: it must name Triton's HTTP port",
                               detail=message)
        return TritonError(f"Triton refused {what}: {one_line(message)}", detail=message if "\n" in message else "")

    def check_live(self) -> None:
        if not self._call("the health check", lambda c: c.is_server_live):
            raise TritonError(f"Triton at {self.url} is not live", "check its log, or restart it")

    def load(self, model: str, config_json: str, files: dict[str, bytes] | None = None) -> None:
        self._call(f"loading '{model}'", lambda c: c.load_model, model, config=config_json, files=files,
                   timeout_s=self.load_timeout_s)

    def unload(self, model: str) -> None:
        self._call(f"unloading '{model}'", lambda c: c.unload_model, model)

    def index(self) -> RepositoryIndex:
        """Every model's versions, from one call of the repository index."""
        models: RepositoryIndex = {}
        entries = self._read_index()
        if not isinstance(entries, list):
            raise TritonError(f"something at {self.endpoint.host_port} is not Triton (its repository index is "
                              f"{type(entries).__name__})", "check FERRY_TRITON_URL")
        for entry in entries:
            if str(entry.get("version", "")).isdigit():
                state = VersionState(int(entry["version"]), entry.get("state", ""), entry.get("reason", ""))
                models.setdefault(entry.get("name", ""), []).append(state)
        return models

    def _read_index(self) -> Any:
        what = "the repository index"
        status, body = self._post(what, "/v2/repository/index")
        if status != 200:
            raise self._refusal(what, _error_message(body), str(status))
        try:
            return json.loads(body)
        except ValueError:
            raise TritonError(f"something at {self.endpoint.host_port} is not Triton (its repository index is not "
                              "JSON)", "check FERRY_TRITON_URL: it must name Triton's HTTP port",
                              detail=body.decode(errors="replace")[:2000]) from None

    def versions(self, model: str) -> list[VersionState]:
        return self.index().get(model, [])

    def ready_versions(self, model: str) -> list[int]:
        """The READY versions of the Triton model named ``model`` (a front, a store, or another tool's model)."""
        return ready_versions(self.versions(model))

    def placement(self, model: str) -> Placement:
        return placement(self.index(), model)

    def version_ready(self, model: str, version: int) -> bool:
        return bool(self._call("the readiness check", lambda c: c.is_model_ready, model, str(version)))

    def infer(self, model: str, version: int, inputs: dict[str, Array],
              datatypes: dict[str, str]) -> dict[str, Array]:
        import tritonclient.http as triton_http

        tensors = []
        for name, value in inputs.items():
            tensor = triton_http.InferInput(name, list(value.shape), datatypes[name])
            tensor.set_data_from_numpy(value)
            tensors.append(tensor)
        result = self._call(f"inference on '{model}' v{version}", lambda c: c.infer, model, tensors, str(version))
        response = result.get_response()
        return {out["name"]: result.as_numpy(out["name"]) for out in response.get("outputs", [])}


def _error_message(body: bytes) -> str:
    """Triton's reason in an error answer (``{"error": ...}``), else the body as it came (a page from
    something that is not Triton, which :meth:`Triton._refusal` names as such)."""
    text = body.decode(errors="replace")
    if not text:
        return "client received an empty response from the server."
    try:
        reason = json.loads(text)["error"]
    except (ValueError, TypeError, KeyError):
        return text
    return str(reason)
