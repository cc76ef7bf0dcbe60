"""The Triton replicas a deploy acts on, and running one action on all of them at once.

Replicas share the model repository, so a version is staged once; every call to Triton (load,
readiness, smoke, pin) goes to each replica, concurrently, through a bounded pool: a deploy's wall
time follows the slowest replica, not their number, and it never holds more than ``MAX_PARALLEL``
connections at a time.

``dns+http://name:port`` stands for every address ``name`` resolves to, looked up at each use (a
Kubernetes headless Service publishes the addresses of its ready pods). A dual-stack pod has an IPv4
and an IPv6 address: IPv4 addresses are used when there are any, so that no replica counts twice.
"""

from __future__ import annotations

import functools
import socket
import threading
from collections.abc import Callable, Iterable
from typing import TypeVar

from ferry.core.addresses import Endpoint, ReplicaSource
from ferry.core.errors import FerryError, ReplicaFailed, StepFailed, Unavailable
from ferry.core.triton import Triton

MAX_PARALLEL = 128  # concurrent calls to replicas (and so connections) of one action, at most
_SLOTS = threading.BoundedSemaphore(MAX_PARALLEL)
T = TypeVar("T")


def resolve_replicas(sources: Iterable[ReplicaSource]) -> list[Endpoint]:
    """Every replica's address, in a stable order, each once."""
    endpoints: list[Endpoint] = []
    for source in sources:
        endpoints += _lookup(source.endpoint) if source.dns else [source.endpoint]
    return list(dict.fromkeys(endpoints))


def _lookup(endpoint: Endpoint) -> list[Endpoint]:
    try:
        found = socket.getaddrinfo(endpoint.host, endpoint.port, type=socket.SOCK_STREAM)
    except socket.gaierror as error:
        raise Unavailable(f"the replicas' name {endpoint.host} does not resolve: {error.strerror}",
                          "check the DNS name in FERRY_TRITON_URL (a headless Service lists only ready pods)") from None
    v4 = sorted({info[4][0] for info in found if info[0] == socket.AF_INET})
    v6 = sorted({info[4][0] for info in found if info[0] == socket.AF_INET6})
    if not v4 and not v6:
        raise Unavailable(f"{endpoint.host} resolves to no address", "is any Triton replica ready?")
    return [Endpoint(str(address), endpoint.port) for address in (v4 or v6)]


class Fleet:
    """The replicas of one action: a deploy fixes them at its snapshot; reconcile and status resolve them anew."""

    def __init__(self, replicas: list[Triton]) -> None:
        self.replicas = replicas

    @property
    def urls(self) -> list[str]:
        return [r.url for r in self.replicas]

    def settled(self, action: Callable[[Triton], T]) -> dict[str, T | FerryError]:
        """``action`` on every replica at once; each replica's result or the error it raised."""
        def run(replica: Triton) -> T | FerryError:
            try:
                return action(replica)
            except FerryError as error:
                return error

        if len(self.replicas) == 1:  # no thread for the common case
            return {self.replicas[0].url: run(self.replicas[0])}

        def bounded(replica: Triton) -> T | FerryError:
            with _SLOTS:
                return run(replica)

        # Each replica's calls run on its own worker thread, so its connection is made once and reused by
        # every step (a tritonclient HTTP client is bound to the thread that made it).
        futures = [replica.submit(functools.partial(bounded, replica)) for replica in self.replicas]
        return {replica.url: future.result() for replica, future in zip(self.replicas, futures)}

    def each(self, action: Callable[[Triton], T]) -> dict[str, T]:
        """``action`` on every replica at once; all must succeed, else ReplicaFailed for the first that did not.

        Every replica's action has finished when this returns or raises: an undo never races a load.
        """
        results = self.settled(action)
        for url, result in results.items():
            if isinstance(result, FerryError):
                raise ReplicaFailed(url, result) if len(results) > 1 else result
        return results  # type: ignore[return-value]

    def each_step(self, action: Callable[[Triton], T]) -> dict[str, T]:
        """:meth:`each` for a step of the deploy: a step's failure names the replica it failed on."""
        try:
            return self.each(action)
        except ReplicaFailed as failed:
            cause = failed.cause
            if isinstance(cause, StepFailed):
                raise StepFailed(cause.step, cause.message, cause.hint, cause.version, cause.retryable,
                                 cause.detail, replica=failed.replica) from None
            raise

