"""The dispatcher: a deploy per trigger, one at a time per model, in arrival order."""

from __future__ import annotations

import threading
import time
from collections import deque

from ferry.adapters.watch.logs import log
from ferry.adapters.watch.metrics import WatchMetrics
from ferry.adapters.watch.triggers import Deployer, Trigger, TriggerLog
from ferry.core.errors import FerryError
from ferry.core.records import utc_stamp

RECENT = 200  # triggers kept for /triggers


class Dispatcher:
    """Runs triggers one at a time per model (a thread per model while it has work), in arrival order.

    A trigger whose model and alias are already waiting takes the waiting one's place (which ends
    ``superseded``): each deploy goes ahead only while the alias still names its version, so only the
    newest move can deploy.
    """

    def __init__(self, deployer: Deployer, metrics: WatchMetrics, ended: TriggerLog | None = None,
                 join_s: float = 300.0) -> None:
        self.deployer, self.metrics, self.join_s = deployer, metrics, join_s
        self.ended = ended or TriggerLog(None)
        self.recent: deque[Trigger] = deque(maxlen=RECENT)
        self._queues: dict[str, deque[Trigger]] = {}
        self._workers: dict[str, threading.Thread] = {}
        self._lock = threading.Lock()
        self.stopping = threading.Event()

    def submit(self, trigger: Trigger) -> str:
        superseded = None
        with self._lock:
            queue = self._queues.setdefault(trigger.model, deque())
            if self.stopping.is_set():
                trigger.state = "dropped"
            else:
                superseded = next((t for t in queue if t.alias == trigger.alias), None)
                if superseded is not None:
                    queue[queue.index(superseded)] = trigger
                    superseded.state, superseded.finished_at_utc = "superseded", utc_stamp()
                    superseded.detail = f"by {trigger.key} (v{trigger.version}) before it started"
                else:
                    queue.append(trigger)
                self.metrics.triggers.labels(trigger.model, trigger.alias, trigger.source).inc()
                self._gauge(trigger.model)
                self._start_worker(trigger.model)
            self.recent.append(trigger)
            state = trigger.state  # read under the lock: the worker may already be running it
        if superseded is not None:
            log.info("%s: superseded %s", superseded.label, superseded.detail)
            self.ended.append(superseded)
        if state == "dropped":
            self.ended.append(trigger)
        log.info("%s: %s", trigger.label, state)
        return state

    def _start_worker(self, model: str) -> None:
        if model not in self._workers:
            worker = threading.Thread(target=self._work, args=(model,), daemon=True, name=f"ferry-watch-{model}")
            self._workers[model] = worker
            worker.start()

    def _gauge(self, model: str) -> None:
        running = 1 if model in self._workers else 0
        self.metrics.queued.labels(model).set(len(self._queues.get(model, ())) + running)

    def _work(self, model: str) -> None:
        while True:
            with self._lock:
                queue = self._queues.get(model) or deque()
                ending = not queue or self.stopping.is_set()
                if ending:
                    dropped = list(queue)
                    self._queues.pop(model, None)
                    self._workers.pop(model, None)
                    self.metrics.queued.labels(model).set(0)
                else:
                    trigger = queue.popleft()
                    trigger.state = "running"
            if ending:
                self._drop(dropped)
                return
            self._run(trigger)
            with self._lock:
                self._gauge(model)

    def _drop(self, dropped: list[Trigger]) -> None:
        for trigger in dropped:
            trigger.state, trigger.finished_at_utc = "dropped", utc_stamp()
            log.warning("%s: dropped, the watcher is stopping (deploy it with `ferry deploy %s --alias %s`, or let "
                        "the poller find it)", trigger.label, trigger.model, trigger.alias)
            self.ended.append(trigger)

    def _run(self, trigger: Trigger) -> None:
        log.info("%s: deploying (%s)", trigger.label, self.deployer.via)
        try:
            trigger.outcome, trigger.detail = self.deployer.run(trigger)
        except FerryError as error:
            trigger.outcome, trigger.detail = "error", str(error)
        except Exception as error:  # a worker must survive anything, and say what it was
            log.exception("%s: the deploy failed unexpectedly", trigger.label)
            trigger.outcome, trigger.detail = "error", f"unexpected {type(error).__name__}: {error}"
        trigger.state, trigger.finished_at_utc = "done", utc_stamp()
        self.metrics.outcomes.labels(trigger.model, self.deployer.via, trigger.outcome).inc()
        self.metrics.last.labels(trigger.model, trigger.outcome).set(time.time())
        log.info("%s: %s: %s", trigger.label, trigger.outcome, trigger.detail)
        self.ended.append(trigger)

    def idle(self) -> bool:
        with self._lock:
            return not self._workers

    def drain(self, timeout_s: float) -> bool:
        """Wait until every trigger taken so far has ended; False if some still run after ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while not self.idle():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.05)
        return True

    def stop(self) -> None:
        """Take no more triggers, drop the waiting ones, let the running deploys finish (a deploy is a
        transaction: stopping it half-way would leave its journal for `ferry recover`)."""
        self.stopping.set()
        with self._lock:
            workers = list(self._workers.values())
        for worker in workers:
            log.info("waiting for %s to finish its deploy", worker.name)
            worker.join(self.join_s)
