"""``ferry watch register``: the webhook in MLflow that sends alias moves to this receiver, with its secret."""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from ferry.adapters.watch.delivery import ALIAS_CREATED, WEBHOOK_PATH
from ferry.adapters.watch.files import read_or_create_secret, secret_path
from ferry.core.config import Settings
from ferry.core.errors import FerryError, InvalidInput, Unavailable
from ferry.core.services import Services


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
        ip = ipaddress.ip_address(str(address).split("%")[0])
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
    client = Services(settings).registry.client
    needed = server_settings_for(url)
    try:
        existing = next((w for w in _webhooks(client) if w.name == name), None)
        if existing is None:
            hook = client.create_webhook(name, url, [ALIAS_CREATED], description="ferry watch: deploy moved aliases",
                                         secret=secret, status="ACTIVE")
        else:
            hook = client.update_webhook(existing.webhook_id, url=url, events=[ALIAS_CREATED], secret=secret,
                                         status="ACTIVE")
    except Exception as error:  # MLflow's client raises many kinds: each is said as ferry's error
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
    except Exception as error:  # the test delivery is a report, never a failure of the registration
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
