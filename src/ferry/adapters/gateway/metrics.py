"""The gateway's own counters and latency histogram, by routed model, served version, status, protocol and role."""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram

from ferry.adapters.inference.routing import ACTIVE, Route


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("ferry_gateway_requests", "Inference requests by model, served version, status "
                                "(HTTP; a gRPC code as its HTTP equivalent), protocol and role (active; candidate: "
                                "a canary's answer; shadow: a mirrored copy)",
                                ["model", "version", "code", "protocol", "role"], registry=self.registry)
        self.seconds = Histogram("ferry_gateway_request_seconds", "Time to answer, Triton included, by model, "
                                 "served version and role", ["model", "version", "role"], registry=self.registry,
                                 buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1, 2.5))
        self.rerouted = Counter("ferry_gateway_rerouted", "Requests sent again to the version a commit made active "
                                "after the version they were routed to had been retired", ["model"],
                                registry=self.registry)
        self.comparisons = Counter("ferry_gateway_shadow_comparisons", "Shadow copies whose outputs agreed with the "
                                   "active version's, disagreed, or could not be compared (error), by the "
                                   "candidate's model and version", ["model", "version", "result"],
                                   registry=self.registry)
        self.shadow_dropped = Counter("ferry_gateway_shadow_dropped", "Shadow copies not sent because too many "
                                      "were in flight", ["model"], registry=self.registry)
        self._children: dict[tuple[str, int, int, str, str], tuple[Any, Any]] = {}

    def count(self, route: Route | None, status: int, began: float, protocol: str = "http") -> None:
        # Labelled by the routed model only: a name from the URL would let any client grow the label set.
        model, version, role = (route.model, route.version, route.role) if route else ("", 0, ACTIVE)
        key = (model, version, status, protocol, role)
        children = self._children.get(key)
        if children is None:  # labels() costs more than the increment itself: look each child up once
            served = str(version) if route else ""
            children = (self.requests.labels(model, served, str(status), protocol, role),
                        self.seconds.labels(model, served, role))
            self._children[key] = children
        children[0].inc()
        children[1].observe(time.perf_counter() - began)

    def compared(self, candidate: Route, result: str) -> None:
        self.comparisons.labels(candidate.model, str(candidate.version), result).inc()

    def dropped(self, model: str) -> None:
        self.shadow_dropped.labels(model).inc()
