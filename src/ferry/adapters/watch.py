"""``ferry watch``: an alias moved in the MLflow Model Registry starts a deploy of the version it names.

An adapter (uvicorn and FastAPI, as the gateway) with three parts:

- **The receiver**, ``POST /mlflow/webhook``: MLflow 3 registry webhooks, signed with HMAC-SHA256
  (``X-MLflow-Signature: v1,<base64(HMAC(secret, "<delivery id>.<timestamp>.<body>"))>``). A delivery is
  refused with 401 when unsigned or wrongly signed, or when its timestamp is more than 5 minutes away;
  with 409 when its delivery id was already received; 400 when malformed; 413 over 64 KiB. A verified
  ``model_version_alias.created`` for a watched alias is accepted (202); every other verified event,
  alias or name is acknowledged and ignored (200, with the reason). The serving alias, which ferry moves
  itself, is never acted on.
- **The poller** (``--poll 30s``), for where webhooks cannot reach: each round reads every registered
  model's aliases and acts on the watched ones that differ from what it saw last (kept in
  ``$FERRY_HOME/watch/seen.json``, so a move made while the watcher was down is acted on when it comes
  back; an alias never seen before is acted on when it names another version than the committed one).
- **The dispatcher**: a deploy per trigger, one at a time per model, queued (a trigger whose model and
  alias are already waiting is coalesced: the deploy resolves the alias when it starts). The deploy is
  an Airflow DAG run through Airflow's REST API when FERRY_AIRFLOW_URL is set, its ``dag_run_id``
  derived from the delivery so that a redelivered event cannot start a second run; else ferry's own
  deploy in this process. Each trigger and its outcome are logged, counted on ``/metrics`` and listed
  on ``/triggers``.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import re
import secrets
import socket
import threading
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, generate_latest
from starlette.exceptions import HTTPException

from ferry.core.config import Settings
from ferry.core.current import read_current
from ferry.core.errors import FerryError, InvalidInput, Unavailable
from ferry.core.fsutil import atomic_write
from ferry.core.records import DeployReport, Outcome, utc_stamp
from ferry.core.repository import ModelDir, check_name
from ferry.core.steps import Ferry

log = logging.getLogger("ferry.watch")

WEBHOOK_PATH = "/mlflow/webhook"
ALIAS_CREATED = "model_version_alias.created"
SIGNATURE, TIMESTAMP, DELIVERY_ID = "X-MLflow-Signature", "X-MLflow-Timestamp", "X-MLflow-Delivery-Id"
TOLERANCE_S = 300  # a delivery signed further from now than this is stale
MAX_BODY_BYTES = 64 * 1024  # MLflow's registry events are a few hundred bytes
BODY_TIMEOUT_S = 10.0
DELIVERY_ID_PATTERN = re.compile(r"^[A-Za-z0-9_.:-]{1,100}$")  # MLflow's are UUIDs; Airflow run ids allow these
RECENT = 200  # triggers kept for /triggers
AIRFLOW_TIMEOUT_S = 10.0
AIRFLOW_FOLLOW_S = 3600.0  # how long a dispatcher follows a DAG run to its end before taking the next trigger


# ---------------------------------------------------------------- settings the watcher reads


def watched_aliases(settings: Settings, override: str | None = None) -> tuple[str, ...]:
    """FERRY_WATCH_ALIASES (or ``override``), default the DAG's default alias; never the serving alias."""
    raw = override if override is not None else settings.watch_aliases
    aliases = tuple(dict.fromkeys(a.strip() for a in (raw or settings.default_alias).split(",") if a.strip()))
    for alias in aliases:
        check_name("alias", alias)
    if settings.serving_alias and settings.serving_alias in aliases:
        raise InvalidInput(f"the watched aliases {list(aliases)} include @{settings.serving_alias}, the alias ferry "
                           "moves itself after each commit: each commit would start another deploy",
                           "watch the aliases people move (FERRY_WATCH_ALIASES, e.g. 'champion')")
    if not aliases:
        raise InvalidInput("no alias to watch", "set FERRY_WATCH_ALIASES, e.g. 'champion'")
    return aliases


def secret_path(settings: Settings) -> Path:
    return settings.watch_secret_file or settings.home / "watch" / "webhook-secret"


def seen_path(settings: Settings) -> Path:
    return settings.home / "watch" / "seen.json"


def read_or_create_secret(path: Path, renew: bool = False) -> tuple[str, bool]:
    """The webhook secret in ``path`` (mode 0600), generated when there is none or ``renew``; True if new."""
    if not renew:
        try:
            secret = path.read_text().strip()
            if secret:
                return secret, False
        except FileNotFoundError:
            pass
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    secret = secrets.token_urlsafe(32)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, (secret + "\n").encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return secret, True


class SecretFile:
    """The receiver's secret, read again when the file changes (``ferry watch register`` while it runs)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: tuple[int, int] | None = None
        self._secret = b""

    def get(self) -> bytes:
        try:
            stat = self.path.stat()
        except OSError:
            self._stamp, self._secret = None, b""
            return b""
        if (stat.st_ino, stat.st_mtime_ns) != self._stamp:
            try:
                self._secret = self.path.read_bytes().strip()
            except OSError:
                return b""
            self._stamp = (stat.st_ino, stat.st_mtime_ns)
            if stat.st_mode & 0o077:
                log.warning("%s is readable by others (mode %o): chmod 600 it", self.path, stat.st_mode & 0o777)
        return self._secret


# ---------------------------------------------------------------- verifying a delivery


class Refusal(Exception):
    """A delivery the receiver answers with ``status`` and does nothing for; ``label`` is its metric value."""

    def __init__(self, status: int, label: str, reason: str) -> None:
        super().__init__(reason)
        self.status, self.label, self.reason = status, label, reason


def sign(secret: bytes, delivery_id: str, timestamp: str, body: bytes) -> str:
    """MLflow's signature of a delivery (what the sender computes; tests and tools use it too)."""
    digest = hmac.new(secret, f"{delivery_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


class ReplayGuard:
    """The delivery ids received within the window in which their timestamp is still fresh."""

    def __init__(self, window_s: float = 2 * TOLERANCE_S, limit: int = 100_000) -> None:
        self.window_s, self.limit = window_s, limit
        self._seen: OrderedDict[str, float] = OrderedDict()
        self._lock = threading.Lock()

    def first_time(self, delivery_id: str, now: float) -> bool:
        with self._lock:
            while self._seen and next(iter(self._seen.values())) < now - self.window_s:
                self._seen.popitem(last=False)
            if delivery_id in self._seen:
                return False
            self._seen[delivery_id] = now
            if len(self._seen) > self.limit:
                self._seen.popitem(last=False)
            return True


def verify(secret: bytes, headers: Mapping[str, str], body: bytes, now: float) -> str:
    """The delivery id of an authentic, fresh delivery; Refusal otherwise (``headers`` named in lower case)."""
    if not secret:
        raise Refusal(403, "no_secret", "this receiver has no webhook secret yet: run `ferry watch register`")
    signature, stamp, delivery_id = (headers.get(h.lower(), "") for h in (SIGNATURE, TIMESTAMP, DELIVERY_ID))
    if not signature:
        raise Refusal(401, "unsigned", f"no {SIGNATURE} header: create the webhook with a secret "
                                       "(`ferry watch register`)")
    if not DELIVERY_ID_PATTERN.match(delivery_id):
        raise Refusal(400, "malformed", f"{DELIVERY_ID} is missing or not a plain id")
    if not (stamp.isascii() and stamp.isdigit() and len(stamp) <= 12):
        raise Refusal(400, "malformed", f"{TIMESTAMP} is missing or not Unix seconds")
    expected = sign(secret, delivery_id, stamp, body).encode()
    offered = [s.strip().encode("utf-8", "replace") for s in signature.split(" ")[:8] if s.strip()]
    if not any(hmac.compare_digest(expected, s) for s in offered):
        raise Refusal(401, "bad_signature", "the signature does not match: the webhook's secret differs from "
                                            "this receiver's (run `ferry watch register` again)")
    age = now - int(stamp)
    if abs(age) > TOLERANCE_S:
        when = f"{age:.0f} s ago" if age > 0 else f"{-age:.0f} s in the future"
        raise Refusal(401, "stale", f"the delivery was signed {when}; at most {TOLERANCE_S} s either way are "
                                    "accepted (a replay, or a clock that is off: check both clocks)")
    return delivery_id


@dataclass(frozen=True)
class AliasMove:
    model: str
    alias: str
    version: int | None


def parse_event(body: bytes) -> tuple[str, dict[str, Any]]:
    """``(entity.action, data)`` of a registry event; Refusal (400) when it is not one."""
    try:
        event = json.loads(body)
    except (ValueError, RecursionError):
        raise Refusal(400, "malformed", "the body is not JSON") from None
    if not isinstance(event, dict) or not isinstance(event.get("entity"), str) \
            or not isinstance(event.get("action"), str):
        raise Refusal(400, "malformed", "the body is not an MLflow event ({entity, action, timestamp, data})")
    data = event.get("data")
    return f"{event['entity'][:64]}.{event['action'][:64]}", data if isinstance(data, dict) else {}


def alias_move(data: dict[str, Any]) -> AliasMove:
    """The ``data`` of model_version_alias.created; Refusal (400) when its fields have the wrong types."""
    name, alias, version = data.get("name"), data.get("alias"), data.get("version")
    if not isinstance(name, str) or not isinstance(alias, str):
        raise Refusal(400, "malformed", "model_version_alias.created needs string 'name' and 'alias'")
    if isinstance(version, str) and version.isascii() and version.isdigit() and len(version) < 10:
        number: int | None = int(version)
    elif isinstance(version, int) and not isinstance(version, bool) and 0 < version < 10**9:
        number = version
    elif version is None:
        number = None
    else:
        raise Refusal(400, "malformed", "'version' must be a version number")
    return AliasMove(name, alias, number)


# ---------------------------------------------------------------- metrics


class WatchMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.deliveries = Counter("ferry_watch_deliveries", "Webhook deliveries by result (accepted, ignored, "
                                  "coalesced, or why refused)", ["result"], registry=self.registry)
        self.triggers = Counter("ferry_watch_triggers", "Deploys an alias move started, by source (webhook, poll)",
                                ["model", "alias", "source"], registry=self.registry)
        self.outcomes = Counter("ferry_watch_trigger_outcomes", "Ends of triggered deploys: ferry's outcome "
                                "(committed, noop, rolled_back, rejected), or the Airflow run's (airflow_success, "
                                "airflow_failed, airflow_<state> when no longer followed, duplicate), or error",
                                ["model", "via", "outcome"], registry=self.registry)
        self.last = Gauge("ferry_watch_last_outcome_timestamp_seconds", "When a triggered deploy last ended",
                          ["model", "outcome"], registry=self.registry)
        self.queued = Gauge("ferry_watch_queued", "Triggers waiting or running, per model", ["model"],
                            registry=self.registry)
        self.polls = Counter("ferry_watch_polls", "Rounds of the alias poller by result (ok, error)", ["result"],
                             registry=self.registry)


# ---------------------------------------------------------------- triggers and the dispatcher


@dataclass
class Trigger:
    model: str
    alias: str
    version: int | None  # what the alias named when it moved (the deploy resolves the alias again)
    source: str  # webhook | poll
    key: str  # the delivery id, or poll-v<N>-<UTC> (an Airflow run's id is derived from it)
    received_at_utc: str = field(default_factory=utc_stamp)
    state: str = "queued"  # queued | running | done | coalesced | dropped
    outcome: str = ""
    detail: str = ""
    finished_at_utc: str = ""

    @property
    def label(self) -> str:
        seen = f" (v{self.version})" if self.version is not None else ""
        return f"{self.model}@{self.alias}{seen} [{self.source} {self.key}]"


class Deployer(Protocol):
    via: str

    def run(self, trigger: Trigger) -> tuple[str, str]:
        """Deploy what the trigger names; ``(outcome, one-line detail)``."""
        ...


def describe(report: DeployReport) -> str:
    if report.outcome == Outcome.COMMITTED:
        was = f"v{report.previous_version}" if report.previous_version else "nothing"
        text = f"v{report.version} committed (was {was})"
    elif report.outcome == Outcome.NOOP:
        text = f"v{report.version} already active"
    elif report.outcome == Outcome.ROLLED_BACK:
        text = f"v{report.version} refused at {report.failed_step}: {report.error}"
    else:
        text = f"rejected: {report.error}"
    return "; ".join([text, *report.warnings[1 if report.outcome == Outcome.NOOP else 0:]])


class LocalDeployer:
    """ferry's own deploy, in this process (the runner writes the outcome back to MLflow)."""

    via = "ferry"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def run(self, trigger: Trigger) -> tuple[str, str]:
        from ferry.core.runner import deploy

        report = deploy(Ferry(self.settings), trigger.model, alias=trigger.alias)
        return str(report.outcome), describe(report)


def dag_run_id(trigger: Trigger) -> str:
    """One Airflow run per delivery: a retried delivery gets the same id, and Airflow refuses it (409)."""
    return f"ferry__{trigger.model}__{trigger.alias}"[:170] + f"__{trigger.key}"


class AirflowDeployer:
    """A run of the deploy DAG through Airflow's REST API, followed until it ends (or ``follow_s``)."""

    via = "airflow"

    def __init__(self, settings: Settings, follow_s: float = AIRFLOW_FOLLOW_S, poll_s: float = 3.0,
                 stopping: threading.Event | None = None) -> None:
        import requests

        self.url = settings.airflow_url.rstrip("/")
        self.dag_id = settings.airflow_dag_id
        self.username, self.password = settings.airflow_username, settings.airflow_password
        self.follow_s, self.poll_s = follow_s, poll_s
        self.stopping = stopping or threading.Event()
        self.session = requests.Session()
        self.session.trust_env = False
        self._token: str | None = None

    def _send(self, method: str, path: str, **kwargs: Any) -> Any:
        import requests

        for attempt in range(3):
            try:
                return self.session.request(method, f"{self.url}{path}", timeout=AIRFLOW_TIMEOUT_S, **kwargs)
            except requests.RequestException as error:
                if attempt == 2 or self.stopping.wait(2**attempt):
                    raise Unavailable(f"Airflow at {self.url} did not answer: {type(error).__name__}: {error}",
                                      "check FERRY_AIRFLOW_URL and that Airflow's API server runs") from None
        raise AssertionError("unreachable")

    def _login(self) -> None:
        if not self.password:
            return
        reply = self._send("POST", "/auth/token", json={"username": self.username, "password": self.password})
        if reply.status_code not in (200, 201):
            raise InvalidInput(f"Airflow refused the login of '{self.username}': HTTP {reply.status_code} "
                               f"{reply.text[:200]}", "check FERRY_AIRFLOW_USERNAME and FERRY_AIRFLOW_PASSWORD")
        try:
            self._token = str(reply.json()["access_token"])
        except (ValueError, KeyError, TypeError):
            raise InvalidInput(f"Airflow's /auth/token at {self.url} answered without an access_token",
                               "check that FERRY_AIRFLOW_URL is Airflow 3's API server") from None

    def _api(self, method: str, path: str, **kwargs: Any) -> Any:
        if self.password and self._token is None:
            self._login()
        for retry in (False, True):
            headers = {"Authorization": f"Bearer {self._token}"} if self._token else {}
            reply = self._send(method, path, headers=headers, **kwargs)
            if reply.status_code != 401 or retry or not self.password:
                return reply
            self._login()  # the token expired
        raise AssertionError("unreachable")

    def run(self, trigger: Trigger) -> tuple[str, str]:
        run_id = dag_run_id(trigger)
        body = {"dag_run_id": run_id, "logical_date": None, "conf": {"model": trigger.model, "alias": trigger.alias}}
        reply = self._api("POST", f"/api/v2/dags/{self.dag_id}/dagRuns", json=body)
        duplicate = reply.status_code == 409
        if not duplicate and reply.status_code not in (200, 201):
            return "error", f"Airflow refused run {run_id}: HTTP {reply.status_code} {reply.text[:300]}"
        log.info("%s: Airflow run %s %s", trigger.label, run_id,
                 "already exists (a redelivered event): not started again" if duplicate else "started")
        state = self.follow(run_id)
        outcome = "duplicate" if duplicate else f"airflow_{state}"
        return outcome, f"DAG run {run_id}: {state}{self._paused_note(state)}"

    def _paused_note(self, state: str) -> str:
        if state != "queued":
            return ""
        reply = self._api("GET", f"/api/v2/dags/{self.dag_id}")
        paused = reply.status_code == 200 and reply.json().get("is_paused")
        return f" (the DAG is paused: `airflow dags unpause {self.dag_id}`)" if paused else ""

    def follow(self, run_id: str) -> str:
        """The run's state once it ends, or its state when ``follow_s`` has passed."""
        deadline, state = time.monotonic() + self.follow_s, "unknown"
        while True:
            reply = self._api("GET", f"/api/v2/dags/{self.dag_id}/dagRuns/{run_id}")
            if reply.status_code == 200:
                state = str(reply.json().get("state") or "unknown")
            if state in ("success", "failed") or time.monotonic() >= deadline or self.stopping.wait(self.poll_s):
                return state


class Dispatcher:
    """Runs triggers one at a time per model (a thread per model while it has work), in arrival order."""

    def __init__(self, deployer: Deployer, metrics: WatchMetrics, join_s: float = 300.0) -> None:
        self.deployer, self.metrics, self.join_s = deployer, metrics, join_s
        self.recent: deque[Trigger] = deque(maxlen=RECENT)
        self._queues: dict[str, deque[Trigger]] = {}
        self._workers: dict[str, threading.Thread] = {}
        self._lock = threading.Lock()
        self.stopping = threading.Event()

    def submit(self, trigger: Trigger) -> str:
        with self._lock:
            queue = self._queues.setdefault(trigger.model, deque())
            if self.stopping.is_set():
                trigger.state = "dropped"
            elif any(t.alias == trigger.alias for t in queue):
                trigger.state = "coalesced"  # the waiting one deploys what the alias names when it starts
            else:
                queue.append(trigger)
                self.metrics.triggers.labels(trigger.model, trigger.alias, trigger.source).inc()
                self._gauge(trigger.model)
                if trigger.model not in self._workers:
                    worker = threading.Thread(target=self._work, args=(trigger.model,), daemon=True,
                                              name=f"ferry-watch-{trigger.model}")
                    self._workers[trigger.model] = worker
                    worker.start()
            self.recent.append(trigger)
        log.info("%s: %s", trigger.label, trigger.state)
        return trigger.state

    def _gauge(self, model: str) -> None:
        running = 1 if model in self._workers else 0
        self.metrics.queued.labels(model).set(len(self._queues.get(model, ())) + running)

    def _work(self, model: str) -> None:
        while True:
            with self._lock:
                queue = self._queues.get(model)
                if not queue or self.stopping.is_set():
                    for dropped in queue or ():
                        dropped.state = "dropped"
                        log.warning("%s: dropped, the watcher is stopping (deploy it with `ferry deploy %s --alias "
                                    "%s`, or let the poller find it)", dropped.label, dropped.model, dropped.alias)
                    self._queues.pop(model, None)
                    self._workers.pop(model, None)
                    self.metrics.queued.labels(model).set(0)
                    return
                trigger = queue.popleft()
                trigger.state = "running"
            self._run(trigger)
            with self._lock:
                self._gauge(model)

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


# ---------------------------------------------------------------- polling


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


AliasReader = Callable[[], dict[str, dict[str, int]]]


def mlflow_aliases(settings: Settings) -> AliasReader:
    """Every registered model's aliases, read through MLflow's client (paged)."""
    registry: list[Any] = []

    def read() -> dict[str, dict[str, int]]:
        if not registry:
            registry.append(Ferry(settings).registry)
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
    def __init__(self, watch: Watch, interval_s: float, read: AliasReader) -> None:
        self.watch, self.interval_s, self.read = watch, interval_s, read

    def poll_once(self) -> list[Trigger]:
        try:
            models = self.read()
        except Exception as error:
            self.watch.metrics.polls.labels("error").inc()
            log.warning("poll: MLflow could not be read: %s: %s", type(error).__name__, error)
            return []
        self.watch.metrics.polls.labels("ok").inc()
        triggers = []
        for model, aliases in sorted(models.items()):
            for alias in self.watch.aliases:
                version = aliases.get(alias)
                if version is not None and self._moved(model, alias, version):
                    trigger = Trigger(model, alias, version, "poll", f"poll-v{version}-{utc_stamp()}")
                    self.watch.dispatcher.submit(trigger)
                    triggers.append(trigger)
        return triggers

    def _moved(self, model: str, alias: str, version: int) -> bool:
        try:
            check_name("model name", model)
        except InvalidInput:
            return False  # not a name ferry deploys (the receiver says so for each webhook)
        before = self.watch.seen.get(model, alias)
        if before == version:
            return False
        self.watch.seen.note(model, alias, version)
        if before is not None:
            return True
        try:  # never seen: act unless the version is already the committed one
            current = read_current(ModelDir(self.watch.settings.repository, model))
        except FerryError:
            return True
        return current is None or current.active_version != version

    def run(self, stopping: threading.Event) -> None:
        while not stopping.is_set():
            self.poll_once()
            stopping.wait(self.interval_s)


# ---------------------------------------------------------------- the service


class Watch:
    """The receiver, the poller and the dispatcher, over one deployer."""

    def __init__(self, settings: Settings, deployer: Deployer | None = None, aliases: tuple[str, ...] | None = None,
                 poll_s: float | None = None, read_aliases: AliasReader | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.settings = settings
        self.aliases = aliases or watched_aliases(settings)
        self.metrics = WatchMetrics()
        self.secret = SecretFile(secret_path(settings))
        self.replay = ReplayGuard()
        self.clock = clock
        self.dispatcher = Dispatcher(deployer or default_deployer(settings), self.metrics)
        if isinstance(self.dispatcher.deployer, AirflowDeployer):
            self.dispatcher.deployer.stopping = self.dispatcher.stopping
        self.seen = Seen(seen_path(settings))
        interval = settings.watch_poll_s if poll_s is None else poll_s
        self.poller = Poller(self, interval, read_aliases or mlflow_aliases(settings)) if interval > 0 else None
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
                raise Refusal(409, "replayed", f"delivery {delivery_id} was already received; not acted on again")
            status, answer = self._act(delivery_id, *parse_event(body))
        except Refusal as refusal:
            self.metrics.deliveries.labels(refusal.label).inc()
            log.warning("webhook refused (%s): %s", refusal.status, refusal.reason)
            return refusal.status, {"error": refusal.reason}
        self.metrics.deliveries.labels(answer.get("result", "accepted")).inc()
        return status, answer

    def _act(self, delivery_id: str, event: str, data: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        if event != ALIAS_CREATED:
            return _ignored(f"event {event!r} is not acted on (only {ALIAS_CREATED})")
        move = alias_move(data)
        if move.alias == self.settings.serving_alias:
            return _ignored(f"@{move.alias} is the alias ferry moves itself")
        if move.alias not in self.aliases:
            return _ignored(f"@{move.alias[:128]!s} is not watched (watched: {', '.join(self.aliases)})")
        try:
            check_name("model name", move.model)
        except InvalidInput:
            return _ignored(f"model name {move.model[:128]!r} is not one ferry deploys (letters, digits, '_-.')")
        if move.version is not None:
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


def default_deployer(settings: Settings) -> Deployer:
    return AirflowDeployer(settings) if settings.airflow_url else LocalDeployer(settings)


async def _read_body(request: Request) -> bytes:
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > MAX_BODY_BYTES:
        raise Refusal(413, "too_large", f"the body is {int(length)} bytes; at most {MAX_BODY_BYTES} are accepted")
    chunks, size = [], 0
    try:
        async with asyncio.timeout(BODY_TIMEOUT_S):
            async for chunk in request.stream():
                size += len(chunk)
                if size > MAX_BODY_BYTES:
                    raise Refusal(413, "too_large", f"the body is over {MAX_BODY_BYTES} bytes")
                chunks.append(chunk)
    except TimeoutError:
        raise Refusal(408, "malformed", f"the body did not arrive within {BODY_TIMEOUT_S:.0f} s") from None
    return b"".join(chunks)


def build_app(watch: Watch) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        watch.start()
        yield
        await asyncio.to_thread(watch.stop)

    app = FastAPI(title="ferry watch", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)

    @app.post(WEBHOOK_PATH)
    async def webhook(request: Request) -> Response:
        try:
            body = await _read_body(request)
        except Refusal as refusal:
            watch.metrics.deliveries.labels(refusal.label).inc()
            return JSONResponse({"error": refusal.reason}, status_code=refusal.status)
        status, answer = watch.handle(request.headers, body)
        return JSONResponse(answer, status_code=status)

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok", "via": watch.via, "aliases": list(watch.aliases),
                "webhook_secret": bool(watch.secret.get()), "poll_s": watch.poller.interval_s if watch.poller else 0}

    @app.get("/triggers")
    async def triggers() -> list[dict[str, Any]]:
        return watch.triggers()

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(watch.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    _error_handlers(app)
    return app


def _error_handlers(app: FastAPI) -> None:
    """Every answer that is not a success is ``{"error": "..."}``, and hostile input never gets a 5xx."""

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException) -> JSONResponse:
        message = {404: f"ferry watch serves no {request.url.path[:200]!r}",
                   405: f"{request.url.path[:200]!r} does not take {request.method}"}.get(error.status_code,
                                                                                   str(error.detail))
        return JSONResponse({"error": message}, status_code=error.status_code, headers=error.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError) -> JSONResponse:
        return JSONResponse({"error": f"the request is not valid: {str(error.errors())[:300]}"}, status_code=400)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, error: Exception) -> JSONResponse:
        log.exception("unexpected error on %s", request.url.path[:200])
        return JSONResponse({"error": f"the request could not be handled: {type(error).__name__}"}, status_code=400)


def serve(settings: Settings, host: str, port: int, aliases: tuple[str, ...], poll_s: float) -> None:
    """Run ``ferry watch`` until interrupted."""
    import uvicorn

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("ferry.watch").setLevel(logging.INFO)
    watch = Watch(settings, aliases=aliases, poll_s=poll_s)
    uvicorn.run(build_app(watch), host=host, port=port, log_level="warning", access_log=False,
                proxy_headers=False, server_header=False)


# ---------------------------------------------------------------- registering the webhook in MLflow


@dataclass
class Registration:
    webhook_id: str
    name: str
    url: str
    created: bool  # False: the webhook of that name was updated
    secret_file: str
    new_secret: bool
    server_settings: list[str]  # what the MLflow server's environment needs for this receiver
    test: str = ""  # the outcome of MLflow's test delivery, when asked for


def server_settings_for(url: str) -> list[str]:
    """The variables an MLflow server needs to deliver to ``url``, and the ones every server needs."""
    parts = urlsplit(url)
    needed = []
    if parts.scheme == "http":
        needed.append("MLFLOW_WEBHOOK_ALLOWED_SCHEMES=http,https (the default allows https only)")
    if _private(parts.hostname or ""):
        needed.append("MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS=true (the receiver is on a loopback or private address)")
    needed.append("MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY=<one Fernet key for every server process, kept across "
                  "restarts> (without it each process encrypts the secret with a random key)")
    needed.append("a SQL backend store (--backend-store-uri sqlite:///... or postgresql://...): only `mlflow server` "
                  "sends webhooks; MLFLOW_WEBHOOK_CACHE_TTL (60 s) delays a new webhook")
    return needed


def _private(host: str) -> bool:
    if host in ("localhost", ""):
        return True
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, None)}
    except (OSError, UnicodeError):
        return False
    for address in addresses:
        ip = ipaddress.ip_address(address.split("%")[0])
        if ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_reserved:
            return True
    return False


def check_receiver_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname or parts.path != WEBHOOK_PATH:
        raise InvalidInput(f"{url!r} is not the receiver's address", f"give http(s)://HOST:PORT{WEBHOOK_PATH}, "
                           "where MLflow's server reaches `ferry watch`")
    if parts.hostname in ("0.0.0.0", "::"):
        raise InvalidInput(f"{url!r} names a wildcard address, which MLflow cannot send to",
                           "give the host name or address MLflow's server reaches this machine by")
    return url


def register_webhook(settings: Settings, url: str, name: str = "ferry", new_secret: bool = False,
                     test: bool = False) -> Registration:
    """Create (or update) the webhook that sends alias moves to ``url``, with this receiver's secret."""
    check_receiver_url(url)
    if not settings.tracking_uri.startswith(("http://", "https://")):
        raise InvalidInput(f"MLflow sends webhooks only from a tracking server, and MLFLOW_TRACKING_URI is "
                           f"{settings.tracking_uri}",
                           "point MLFLOW_TRACKING_URI at `mlflow server` (SQL backend), "
                           "or use `ferry watch --poll 30s`")
    path = secret_path(settings)
    secret, fresh = read_or_create_secret(path, renew=new_secret)
    client = Ferry(settings).registry.client
    needed = server_settings_for(url)
    try:
        existing = next((w for w in _webhooks(client) if w.name == name), None)
        if existing is None:
            hook = client.create_webhook(name, url, [ALIAS_CREATED], description="ferry watch: deploy moved aliases",
                                         secret=secret, status="ACTIVE")
        else:
            hook = client.update_webhook(existing.webhook_id, url=url, events=[ALIAS_CREATED], secret=secret,
                                         status="ACTIVE")
    except Exception as error:
        raise _refused(settings, error, needed) from None
    result = Registration(hook.webhook_id, name, url, existing is None, str(path), fresh, needed)
    if test:
        result.test = _test_delivery(client, hook.webhook_id)
    return result


def _refused(settings: Settings, error: Exception, needed: list[str]) -> FerryError:
    if getattr(error, "error_code", "") in ("INVALID_PARAMETER_VALUE", "BAD_REQUEST"):
        return InvalidInput(f"MLflow at {settings.tracking_uri} refused the webhook: {error}",
                            "the MLflow server's environment needs " + "; ".join(needed[:-2] or needed[-2:-1]))
    return Unavailable(f"MLflow at {settings.tracking_uri} failed while creating the webhook: "
                       f"{type(error).__name__}: {error}", "check that MLFLOW_TRACKING_URI names a running server")


def _test_delivery(client: Any, webhook_id: str) -> str:
    """MLflow's own test delivery to the receiver (an example event, which the receiver ignores)."""
    try:
        outcome = client.test_webhook(webhook_id)
    except Exception as error:
        return f"not sent: {type(error).__name__}: {error}"
    body = (outcome.response_body or "")[:200]
    if outcome.success:
        return f"delivered: HTTP {outcome.response_status} {body}"
    return f"not delivered: {outcome.error_message or f'HTTP {outcome.response_status}'} {body}"


def _webhooks(client: Any) -> list[Any]:
    found, token = [], None
    while True:
        page = client.list_webhooks(max_results=100, page_token=token)
        found.extend(page)
        token = page.token
        if not token:
            return found
