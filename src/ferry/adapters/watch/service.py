"""The watcher: the receiver's decision on each delivery, the poller and the dispatcher, over one deployer."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict
from typing import Any

from ferry.adapters.watch.airflow import AirflowDeployer
from ferry.adapters.watch.delivery import ALIAS_CREATED, HTTP_STATUS, ReplayGuard, alias_move, parse_event, verify
from ferry.adapters.watch.deployers import LocalDeployer
from ferry.adapters.watch.dispatcher import Dispatcher
from ferry.adapters.watch.files import (
    SecretFile,
    deliveries_path,
    secret_path,
    seen_path,
    triggers_path,
    watched_aliases,
)
from ferry.adapters.watch.logs import log, shown
from ferry.adapters.watch.metrics import WatchMetrics
from ferry.adapters.watch.poller import AliasReader, Poller, Seen, mlflow_aliases
from ferry.adapters.watch.triggers import Deployer, Trigger, TriggerLog
from ferry.core.config import Settings
from ferry.core.errors import DeliveryRefused


def default_deployer(settings: Settings) -> Deployer:
    return AirflowDeployer(settings) if settings.airflow.url else LocalDeployer(settings)


class Watch:
    """The receiver, the poller and the dispatcher, over one deployer."""

    def __init__(self, settings: Settings, deployer: Deployer | None = None, aliases: tuple[str, ...] | None = None,
                 poll_s: float | None = None, read_aliases: AliasReader | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.aliases = aliases or watched_aliases(settings)
        self.metrics = WatchMetrics()
        self.secret = SecretFile(secret_path(settings))
        self.replay = ReplayGuard(deliveries_path(settings))
        self.clock = clock
        self.ended = TriggerLog(triggers_path(settings))
        self.dispatcher = Dispatcher(deployer or default_deployer(settings), self.metrics, self.ended)
        if isinstance(self.dispatcher.deployer, AirflowDeployer):
            self.dispatcher.deployer.stopping = self.dispatcher.stopping
        self.seen = Seen(seen_path(settings))
        interval = settings.watch.poll_s if poll_s is None else poll_s
        self.poller = Poller(settings, self.aliases, self.seen, self.dispatcher, self.metrics, interval,
                             read_aliases or mlflow_aliases(settings)) if interval > 0 else None
        self._poll_thread: threading.Thread | None = None

    @property
    def via(self) -> str:
        return self.dispatcher.deployer.via

    def handle(self, headers: Mapping[str, str], body: bytes) -> tuple[int, dict[str, Any]]:
        """The receiver's whole decision on one delivery: ``(status, answer)``."""
        headers = {str(k).lower(): str(v) for k, v in headers.items()}
        try:
            delivery_id = verify(self.secret.get(), headers, body, self.clock())
            if not self.replay.first_time(delivery_id, self.clock()):
                raise DeliveryRefused("replayed", f"delivery {delivery_id} was already received; not acted on again")
            status, answer = self._act(delivery_id, *parse_event(body))
        except DeliveryRefused as refusal:
            self.metrics.deliveries.labels(refusal.result).inc()
            log.warning("webhook refused (%s): %s", HTTP_STATUS[refusal.result], refusal.message)
            return HTTP_STATUS[refusal.result], {"error": refusal.message}
        self.metrics.deliveries.labels(answer.get("result", "accepted")).inc()
        return status, answer

    def _act(self, delivery_id: str, event: str, data: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        if event != ALIAS_CREATED:
            return _ignored(f"event '{shown(event)}' is not acted on (only {ALIAS_CREATED})")
        move = alias_move(data)
        if move.alias == self.settings.mlflow.serving_alias:
            return _ignored(f"@{move.alias} is the alias ferry moves itself")
        if move.alias not in self.aliases:
            return _ignored(f"@{move.alias} is not watched (watched: {', '.join(self.aliases)})")
        self.seen.note(move.model, move.alias, move.version)
        trigger = Trigger(move.model, move.alias, move.version, "webhook", delivery_id)
        state = self.dispatcher.submit(trigger)
        result = "accepted" if state == "queued" else state
        return 202, {"result": result, "trigger": trigger.label, "via": self.via}

    def start(self) -> None:
        if self.poller is not None and self._poll_thread is None:
            self._poll_thread = threading.Thread(target=self.poller.run, args=(self.dispatcher.stopping,),
                                                 daemon=True, name="ferry-watch-poller")
            self._poll_thread.start()

    def stop(self) -> None:
        self.dispatcher.stop()
        if self._poll_thread is not None:
            self._poll_thread.join(10)

    def triggers(self) -> list[dict[str, Any]]:
        return [asdict(t) for t in list(self.dispatcher.recent)]


def _ignored(reason: str) -> tuple[int, dict[str, Any]]:
    log.info("webhook ignored: %s", reason)
    return 200, {"result": "ignored", "reason": reason}
