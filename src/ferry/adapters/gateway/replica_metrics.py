"""The balancers' metrics, one set per registry (the HTTP and gRPC balancers share it): ``ferry_gateway_replica_*``
by replica and protocol, and ``ferry_gateway_in_flight`` by replica, over both protocols."""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Sequence
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector


class Counted(Protocol):
    name: str
    in_flight: int


class Balancing(Protocol):
    """What the in-flight gauge reads of a balancer: its replicas, and those dropped with calls still out."""

    @property
    def replicas(self) -> Sequence[Counted]: ...

    @property
    def leaving(self) -> Iterable[Counted]: ...


class ReplicaMetrics:
    """``ferry_gateway_replica_*``, one set per registry (the HTTP and gRPC balancers share it)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.up = Gauge("ferry_gateway_replica_up", "1 if the gateway sends calls to the Triton replica, 0 if it "
                        "took the replica out (a connection failed or its probe did)", ["replica", "protocol"],
                        registry=registry)
        self.requests = Counter("ferry_gateway_replica_requests", "Calls the gateway sent to each Triton replica",
                                ["replica", "protocol"], registry=registry)
        self.ejections = Counter("ferry_gateway_replica_ejections", "Times a replica was taken out, by reason "
                                 "(connect: a call could not reach it; probe: it failed its readiness probe)",
                                 ["replica", "protocol", "reason"], registry=registry)
        self.retried = Counter("ferry_gateway_replica_retried", "Calls sent once more, to another replica, after "
                               "their replica could not be reached", ["protocol"], registry=registry)
        self.balancers: weakref.WeakSet[Balancing] = weakref.WeakSet()
        registry.register(_InFlight(self.balancers))

    @classmethod
    def of(cls, registry: CollectorRegistry | None) -> ReplicaMetrics:
        registry = registry or CollectorRegistry()
        if registry not in _SHARED:
            _SHARED[registry] = cls(registry)
        return _SHARED[registry]


_SHARED: weakref.WeakKeyDictionary[CollectorRegistry, ReplicaMetrics] = weakref.WeakKeyDictionary()


class _InFlight(Collector):
    """``ferry_gateway_in_flight{replica}``: read off the balancers when scraped (nothing counted per call)."""

    def __init__(self, balancers: weakref.WeakSet[Balancing]) -> None:
        self.balancers = balancers

    def collect(self) -> Iterable[GaugeMetricFamily]:
        family = GaugeMetricFamily("ferry_gateway_in_flight", "Calls the gateway sent to each Triton replica and "
                                   "has not seen answered yet (HTTP and gRPC)", labels=["replica"])
        totals: dict[str, int] = {}
        for balancer in list(self.balancers):
            for replica in [*balancer.replicas, *balancer.leaving]:
                totals[replica.name] = totals.get(replica.name, 0) + replica.in_flight
        for name, count in sorted(totals.items()):
            family.add_metric([name], count)
        yield family
