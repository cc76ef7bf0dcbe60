"""What users write for an address or a duration, parsed once: Triton's URLs (one, a list, ``dns+``), ports and
durations. Every module that takes one of these from a user reads it through here."""

from __future__ import annotations

import re
from dataclasses import dataclass
from urllib.parse import urlsplit

from ferry.core.errors import InvalidInput

DEFAULT_TRITON_PORT = 8000


@dataclass(frozen=True)
class Endpoint:
    """A Triton server's HTTP address: the one parse of FERRY_TRITON_URL every module uses."""

    host: str
    port: int

    @property
    def host_port(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host_port}"

    def with_port(self, port: int) -> Endpoint:
        return Endpoint(self.host, port)


_HOST = re.compile(r"[A-Za-z0-9_.-]+|[0-9A-Fa-f:.]+")  # a name, an IPv4 or an IPv6 address


def parse_endpoint(raw: str, setting: str = "FERRY_TRITON_URL") -> Endpoint:
    """``http://host[:port]`` (port 8000 when none is given); anything else is refused with the reason."""
    hint = f"set {setting} to http://HOST:PORT"
    parts = urlsplit(raw.strip() if "://" in raw else f"http://{raw.strip()}")
    if parts.scheme != "http":
        tls = ("; for TLS, put Triton's port behind a sidecar or keep it on a private network (ferry sends the "
               "model-control key with every load, so it refuses to fall back to plain http silently)")
        raise InvalidInput(f"{setting}={raw!r} uses {parts.scheme}://, which ferry does not speak to Triton",
                           hint + (tls if parts.scheme == "https" else ""))
    try:
        port = parts.port
    except ValueError:
        raise InvalidInput(f"{setting}={raw!r} has no valid port (1-65535)", hint) from None
    if not parts.hostname or parts.path.strip("/") or parts.query or parts.fragment or parts.username \
            or not _HOST.fullmatch(parts.hostname):
        raise InvalidInput(f"{setting}={raw!r} is not a plain http://HOST:PORT address", hint)
    return Endpoint(parts.hostname, port or DEFAULT_TRITON_PORT)


@dataclass(frozen=True)
class ReplicaSource:
    """One entry of FERRY_TRITON_URL: a server, or (``dns``) a name whose every address is a replica."""

    endpoint: Endpoint
    dns: bool = False

    def __str__(self) -> str:
        return f"dns+{self.endpoint.url}" if self.dns else self.endpoint.url


def parse_replica_sources(raw: str) -> tuple[ReplicaSource, ...]:
    """FERRY_TRITON_URL: one URL or a comma-separated list; ``dns+http://name:port`` is resolved at each use."""
    entries = [entry.strip() for entry in raw.split(",") if entry.strip()]
    if not entries:
        raise InvalidInput("FERRY_TRITON_URL is empty", "set it to http://HOST:PORT, a list of them, or dns+http://NAME:PORT")
    sources = []
    for entry in entries:
        dns = entry.startswith("dns+")
        sources.append(ReplicaSource(parse_endpoint(entry.removeprefix("dns+")), dns))
    return tuple(dict.fromkeys(sources))  # the same replica listed twice is one replica


def parse_duration(text: str, what: str) -> float:
    """Positive from ``30s``, ``5m``, ``1h`` or a plain number of seconds."""
    units = {"s": 1, "m": 60, "h": 3600}
    number, unit = (text[:-1], text[-1]) if text[-1:] in units else (text, "s")
    try:
        seconds = float(number) * units[unit]
    except ValueError:
        seconds = -1.0
    if not 0 < seconds < 366 * 86400:
        raise InvalidInput(f"{what} {text!r} is not a duration", "write it as 30s, 5m or 1h")
    return seconds


def check_port(port: int, what: str) -> int:
    if not 0 < port < 65536:
        raise InvalidInput(f"{what} {port} is not a TCP port", "give a number from 1 to 65535")
    return port
