"""Verifying a webhook delivery: MLflow's signature, its freshness, replays, and the event it carries."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import threading
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from ferry.adapters.watch.logs import log, shown
from ferry.core.errors import DeliveryRefused, InvalidInput
from ferry.core.fsutil import atomic_write
from ferry.core.repository import check_name

WEBHOOK_PATH = "/mlflow/webhook"
ALIAS_CREATED: Final = "model_version_alias.created"
SIGNATURE, TIMESTAMP, DELIVERY_ID = "X-MLflow-Signature", "X-MLflow-Timestamp", "X-MLflow-Delivery-Id"
TOLERANCE_S = 300  # a delivery signed further from now than this is stale
DELIVERY_ID_PATTERN = re.compile(r"^[A-Za-z0-9_.:-]{1,100}$")  # MLflow's are UUIDs; Airflow run ids allow these
REPLAY_LIMIT = 10_000  # delivery ids kept at most (only authentic ones are kept: a flood needs the secret)
MAX_VERSION = 10**9


# The HTTP status each kind of refused delivery is answered with (the kind is also its metric label).
HTTP_STATUS = {"bad_name": 400, "malformed": 400, "bad_signature": 401, "stale": 401, "unsigned": 401,
               "no_secret": 403, "slow_body": 408, "replayed": 409, "too_large": 413}


def sign(secret: bytes, delivery_id: str, timestamp: str, body: bytes) -> str:
    """MLflow's signature of a delivery (what the sender computes; tests and tools use it too)."""
    digest = hmac.new(secret, f"{delivery_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()
    return "v1," + base64.b64encode(digest).decode()


def verify(secret: bytes, headers: Mapping[str, str], body: bytes, now: float) -> str:
    """The delivery id of an authentic, fresh delivery; DeliveryRefused otherwise (``headers`` named in lower case)."""
    if not secret:
        raise DeliveryRefused("no_secret", "this receiver has no webhook secret yet: run `ferry watch register`")
    signature, stamp, delivery_id = (headers.get(h.lower(), "") for h in (SIGNATURE, TIMESTAMP, DELIVERY_ID))
    if not signature:
        raise DeliveryRefused("unsigned", f"no {SIGNATURE} header: create the webhook with a secret "
                                       "(`ferry watch register`)")
    if not DELIVERY_ID_PATTERN.match(delivery_id):
        raise DeliveryRefused("malformed", f"{DELIVERY_ID} is missing or not a plain id")
    if not (stamp.isascii() and stamp.isdigit() and len(stamp) <= 12):
        raise DeliveryRefused("malformed", f"{TIMESTAMP} is missing or not Unix seconds")
    expected = sign(secret, delivery_id, stamp, body).encode()
    offered = [s.strip().encode("utf-8", "replace") for s in signature.split(" ")[:8] if s.strip()]
    if not any(hmac.compare_digest(expected, s) for s in offered):
        raise DeliveryRefused("bad_signature", "the signature does not match: the webhook's secret differs from "
                                            "this receiver's (run `ferry watch register` again)")
    age = now - int(stamp)
    if abs(age) > TOLERANCE_S:
        when = f"{age:.0f} s ago" if age > 0 else f"{-age:.0f} s in the future"
        raise DeliveryRefused("stale", f"the delivery was signed {when}; at most {TOLERANCE_S} s either way are "
                                    "accepted (a replay, or a clock that is off: check both clocks)")
    return delivery_id


class ReplayGuard:
    """The delivery ids received within the window in which their timestamp is still fresh, kept in ``path``
    (rewritten atomically after each one) so that a restarted watcher refuses a replay too."""

    def __init__(self, path: Path | None, window_s: float = 2 * TOLERANCE_S, limit: int = REPLAY_LIMIT) -> None:
        self.path, self.window_s, self.limit = path, window_s, limit
        self._lock = threading.Lock()
        self._seen: OrderedDict[str, float] = self._load()

    def _load(self) -> OrderedDict[str, float]:
        if self.path is None or not self.path.exists():
            return OrderedDict()
        try:
            raw = json.loads(self.path.read_text())
            pairs = [(str(k), float(v)) for k, v in raw.items() if DELIVERY_ID_PATTERN.match(str(k))]
        except (OSError, ValueError, AttributeError, TypeError) as error:
            log.warning("%s is unreadable (%s): a delivery received before this start is not recognised as a "
                        "replay (a redelivered one does not start a second Airflow run)", self.path, error)
            return OrderedDict()
        return OrderedDict(sorted(pairs, key=lambda pair: pair[1])[-self.limit:])

    def first_time(self, delivery_id: str, now: float) -> bool:
        with self._lock:
            while self._seen and next(iter(self._seen.values())) < now - self.window_s:
                self._seen.popitem(last=False)
            if delivery_id in self._seen:
                return False
            self._seen[delivery_id] = now
            while len(self._seen) > self.limit:
                self._seen.popitem(last=False)
            self._save()
            return True

    def _save(self) -> None:
        if self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(self.path, json.dumps(self._seen).encode())
        except OSError as error:
            log.warning("%s could not be written (%s): after a restart, a replay of the deliveries since would "
                        "not be recognised; free the disk or fix the directory's permissions", self.path, error)


@dataclass(frozen=True)
class AliasMove:
    model: str
    alias: str
    version: int


def parse_event(body: bytes) -> tuple[str, dict[str, Any]]:
    """``(entity.action, data)`` of a registry event; DeliveryRefused (400) when it is not one."""
    try:
        event = json.loads(body)
    except (ValueError, RecursionError):
        raise DeliveryRefused("malformed", "the body is not JSON") from None
    if not isinstance(event, dict) or not isinstance(event.get("entity"), str) \
            or not isinstance(event.get("action"), str):
        raise DeliveryRefused("malformed", "the body is not an MLflow event ({entity, action, timestamp, data})")
    data = event.get("data")
    return f"{event['entity'][:64]}.{event['action'][:64]}", data if isinstance(data, dict) else {}


def plain_name(kind: str, value: str) -> str:
    """``value`` if it is a name ferry deploys; InvalidInput otherwise."""
    if not value.isprintable():  # check_name's pattern ends in $, which lets a trailing newline through
        raise InvalidInput(f"{kind} '{shown(value)}' holds a control character", "use a plain name")
    return check_name(kind, value)


def alias_move(data: dict[str, Any]) -> AliasMove:
    """The ``data`` of model_version_alias.created; DeliveryRefused (400) unless it names a plain model name, a plain
    alias and the version the alias was set to."""
    name, alias, version = data.get("name"), data.get("alias"), data.get("version")
    if not isinstance(name, str) or not isinstance(alias, str):
        raise DeliveryRefused("malformed", f"{ALIAS_CREATED} needs string 'name' and 'alias'")
    for kind, value in (("model name", name), ("alias", alias)):
        try:
            plain_name(kind, value)
        except InvalidInput:
            raise DeliveryRefused("bad_name", f"{kind} '{shown(value)}' is not a plain name (letters, digits, '_', "
                                           "'-', '.', starting with a letter or digit, no '..'): ferry deploys "
                                           "no such model") from None
    return AliasMove(name, alias, _version(version))


def _version(version: object) -> int:
    if isinstance(version, str) and version.isascii() and version.isdigit() and len(version) < 10:
        number = int(version)
    elif isinstance(version, int) and not isinstance(version, bool):
        number = version
    else:
        given = "no 'version'" if version is None else f"'version' {shown(version, 40)}"
        raise DeliveryRefused("malformed", f"{ALIAS_CREATED} with {given}: it must name the version the alias was set "
                                        "to (a number, as MLflow sends it)")
    if not 0 < number < MAX_VERSION:
        raise DeliveryRefused("malformed", f"'version' {number} is not a model version (they are numbered from 1)")
    return number
