"""The services a deploy talks to: the Triton replicas and MLflow, built from settings or given."""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cached_property

from ferry.core.addresses import Endpoint, parse_endpoint
from ferry.core.config import Settings
from ferry.core.errors import InvalidInput
from ferry.core.fleet import Fleet, resolve_replicas
from ferry.core.registry import Registry
from ferry.core.repository import ModelDir
from ferry.core.triton import Triton


@dataclass
class Services:
    """The services a deploy talks to, built from settings (or given: the unit tests pass in-process fakes)."""

    settings: Settings
    given_replicas: list[Triton] | None = None
    given_registry: Registry | None = None
    _registry_future: Future[Registry] | None = field(default=None, repr=False)
    _clients: dict[str, Triton] = field(default_factory=dict, repr=False)

    def fleet(self, urls: list[str] | None = None) -> Fleet:
        """The replicas at ``urls`` (a deploy's, from its snapshot), else those FERRY_TRITON_URL names now."""
        if self.given_replicas is not None:
            return Fleet([r for r in self.given_replicas if urls is None or r.url in urls])
        endpoints = [parse_endpoint(url) for url in urls] if urls else resolve_replicas(self.settings.triton.sources)
        if not endpoints:
            raise InvalidInput("no Triton replica to act on", "set FERRY_TRITON_URL")
        return Fleet([self._client(endpoint) for endpoint in endpoints])

    def _client(self, endpoint: Endpoint) -> Triton:
        if endpoint.url not in self._clients:
            s = self.settings
            self._clients[endpoint.url] = Triton(endpoint.url, timeout_s=s.triton.timeout_s,
                                                 load_timeout_s=s.triton.load_timeout_s, api_key=s.model_control_key())
        return self._clients[endpoint.url]

    @property
    def triton(self) -> Triton:
        """The first replica: the one Triton of a single-server setup (the local one, in the demo and tests)."""
        return self.fleet().replicas[0]

    def start_registry(self) -> None:
        """Start MLflow's client in the background (importing mlflow takes about a second); ``registry`` waits."""
        if self.given_registry is None and self._registry_future is None and "registry" not in self.__dict__:
            pool = ThreadPoolExecutor(1, thread_name_prefix="ferry-registry")
            self._registry_future = pool.submit(Registry, self.settings.tracking_uri)
            pool.shutdown(wait=False)

    @cached_property
    def registry(self) -> Registry:
        if self.given_registry is not None:
            return self.given_registry
        if self._registry_future is not None:
            return self._registry_future.result()
        return Registry(self.settings.tracking_uri)

    def model_dir(self, model: str) -> ModelDir:
        return ModelDir(self.settings.repository, model)
