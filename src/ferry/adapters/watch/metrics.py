"""What ``/metrics`` counts."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge


class WatchMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.deliveries = Counter("ferry_watch_deliveries", "Webhook deliveries by result (accepted, ignored, "
                                  "or why refused)", ["result"], registry=self.registry)
        self.triggers = Counter("ferry_watch_triggers", "Deploys an alias move started, by source (webhook, poll)",
                                ["model", "alias", "source"], registry=self.registry)
        self.outcomes = Counter("ferry_watch_trigger_outcomes", "Ends of triggered deploys: ferry's outcome "
                                "(committed, noop, rolled_back, rejected), or the Airflow run's (airflow_success, "
                                "airflow_failed, airflow_<state> when no longer followed, duplicate), or refused "
                                "(an unknown model, an alias moved since), or error",
                                ["model", "via", "outcome"], registry=self.registry)
        self.last = Gauge("ferry_watch_last_outcome_timestamp_seconds", "When a triggered deploy last ended",
                          ["model", "outcome"], registry=self.registry)
        self.queued = Gauge("ferry_watch_queued", "Triggers waiting or running, per model", ["model"],
                            registry=self.registry)
        self.polls = Counter("ferry_watch_polls", "Rounds of the alias poller by result (ok, error)", ["result"],
                             registry=self.registry)
