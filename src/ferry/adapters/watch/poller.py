"""The poller (``--poll 30s``), for where webhooks cannot reach: each round reads every registered model's
aliases and acts on the watched ones that differ from what it saw last (kept in a file, so a move made
while the watcher was down is acted on when it comes back; an alias never seen before is acted on when it
names another version than the committed one)."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ferry.adapters.watch.delivery import plain_name
from ferry.adapters.watch.dispatcher import Dispatcher
from ferry.adapters.watch.logs import log, shown
from ferry.adapters.watch.metrics import WatchMetrics
from ferry.adapters.watch.triggers import Trigger
from ferry.core.config import Settings
from ferry.core.current import read_current
from ferry.core.errors import FerryError, InvalidInput
from ferry.core.fsutil import atomic_write
from ferry.core.records import utc_stamp
from ferry.core.repository import ModelDir

AliasReader = Callable[[], dict[str, dict[str, int]]]


class Seen:
    """What the watched aliases named when last seen: {model: {alias: version}}, kept in a file."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._lock = threading.Lock()
        self.versions: dict[str, dict[str, int]] = self._load()

    def _load(self) -> dict[str, dict[str, int]]:
        if self.path is None or not self.path.exists():
            return {}
        try:
            raw = json.loads(self.path.read_text())
            return {str(m): {str(a): int(v) for a, v in aliases.items()} for m, aliases in raw.items()}
        except (OSError, ValueError, AttributeError, TypeError) as error:
            log.warning("%s is unreadable (%s): every watched alias counts as not seen yet", self.path, error)
            return {}

    def get(self, model: str, alias: str) -> int | None:
        with self._lock:
            return self.versions.get(model, {}).get(alias)

    def note(self, model: str, alias: str, version: int) -> None:
        with self._lock:
            self.versions.setdefault(model, {})[alias] = version
            if self.path is not None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                atomic_write(self.path, json.dumps(self.versions, indent=1, sort_keys=True).encode(), durable=False)


def mlflow_aliases(settings: Settings) -> AliasReader:
    """Every registered model's aliases, read through MLflow's client (paged)."""
    registry: list[Any] = []

    def read() -> dict[str, dict[str, int]]:
        if not registry:
            from ferry.core.services import Services

            registry.append(Services(settings).registry)
        client = registry[0].client
        found: dict[str, dict[str, int]] = {}
        token = None
        while True:
            page = client.search_registered_models(max_results=1000, page_token=token)
            for model in page:
                found[model.name] = {a: int(v) for a, v in (model.aliases or {}).items()}
            token = page.token
            if not token:
                return found

    return read


class Poller:
    def __init__(self, settings: Settings, aliases: tuple[str, ...], seen: Seen, dispatcher: Dispatcher,
                 metrics: WatchMetrics, interval_s: float, read: AliasReader) -> None:
        self.settings, self.aliases, self.seen = settings, aliases, seen
        self.dispatcher, self.metrics = dispatcher, metrics
        self.interval_s, self.read = interval_s, read
        self._not_names: set[str] = set()

    def poll_once(self) -> list[Trigger]:
        try:
            models = self.read()
        except Exception as error:  # a round that fails must not end the poller: the next one tries again
            self.metrics.polls.labels("error").inc()
            log.warning("poll: MLflow could not be read: %s: %s", type(error).__name__, error)
            return []
        self.metrics.polls.labels("ok").inc()
        triggers = []
        for model, aliases in sorted(models.items()):
            for alias in self.aliases:
                version = aliases.get(alias)
                if version is not None and self._moved(model, alias, version):
                    trigger = Trigger(model, alias, version, "poll", f"poll-v{version}-{utc_stamp()}")
                    self.dispatcher.submit(trigger)
                    triggers.append(trigger)
        return triggers

    def _moved(self, model: str, alias: str, version: int) -> bool:
        try:
            plain_name("model name", model)
        except InvalidInput:
            if model not in self._not_names:  # said once, not every round
                self._not_names.add(model)
                log.info("poll: model name '%s' is not a plain name: never deployed", shown(model))
            return False
        before = self.seen.get(model, alias)
        if before == version:
            return False
        self.seen.note(model, alias, version)
        if before is not None:
            return True
        try:  # never seen: act unless the version is already the committed one
            current = read_current(ModelDir(self.settings.repository, model))
        except FerryError:
            return True
        return current is None or current.active_version != version

    def run(self, stopping: threading.Event) -> None:
        while not stopping.is_set():
            self.poll_once()
            stopping.wait(self.interval_s)
