"""The settings the watcher reads, and the files it keeps under ``$FERRY_HOME/watch/``."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from ferry.adapters.watch.logs import log
from ferry.core.config import Settings
from ferry.core.errors import InvalidInput
from ferry.core.repository import check_name


def watched_aliases(settings: Settings, override: str | None = None) -> tuple[str, ...]:
    """FERRY_WATCH_ALIASES (or ``override``), default the DAG's default alias; never the serving alias."""
    raw = override if override is not None else settings.watch.aliases
    aliases = tuple(dict.fromkeys(a.strip() for a in (raw or settings.deploy.default_alias).split(",") if a.strip()))
    for alias in aliases:
        check_name("alias", alias)
    serving = settings.mlflow.serving_alias
    if serving and serving in aliases:
        raise InvalidInput(f"the watched aliases {list(aliases)} include @{serving}, the alias ferry "
                           "moves itself after each commit: each commit would start another deploy",
                           "watch the aliases people move (FERRY_WATCH_ALIASES, e.g. 'champion')")
    if not aliases:
        raise InvalidInput("no alias to watch", "set FERRY_WATCH_ALIASES, e.g. 'champion'")
    return aliases


def secret_path(settings: Settings) -> Path:
    return settings.watch.secret_file or settings.home / "watch" / "webhook-secret"


def seen_path(settings: Settings) -> Path:
    """What the watched aliases named when last seen (the poller's memory)."""
    return settings.home / "watch" / "seen.json"


def deliveries_path(settings: Settings) -> Path:
    """The delivery ids received within the replay window."""
    return settings.home / "watch" / "deliveries.json"


def triggers_path(settings: Settings) -> Path:
    """Every trigger that ended, with its outcome, one JSON line each."""
    return settings.home / "watch" / "triggers.jsonl"


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
