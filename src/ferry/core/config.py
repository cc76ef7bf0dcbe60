"""Settings: embedded defaults, overridden by a TOML file (FERRY_CONFIG) and then by FERRY_* variables."""

from __future__ import annotations

import dataclasses
import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ferry.core.errors import InvalidInput

RUNTIMES = ("python", "onnxruntime")
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
    """Seconds from ``30s``, ``5m``, ``1h`` or a plain number of seconds."""
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


def default_home() -> Path:
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "ferry"


# The settings whose numbers have bounds, and the bounds (every float must also be finite).
_NUMBER_RANGES: tuple[tuple[tuple[str, ...], Callable[[float], bool], str], ...] = (
    (("triton_timeout_s", "load_timeout_s", "ready_timeout_s", "writeback_timeout_s", "gateway_body_timeout_s",
      "gate_interval_s", "max_artifact_mb", "gate_latency_factor"), lambda v: v > 0, "more than 0"),
    (("lock_wait_s", "drain_timeout_s", "keep_previous_s", "quarantine_keep", "rtol", "atol", "watch_poll_s",
      "gate_error_margin", "gate_latency_slack_ms", "gate_failures", "gate_min_requests"),
     lambda v: v >= 0, "0 or more"),
    (("gate_max_error_ratio", "gate_min_agreement"), lambda v: 0 <= v <= 1, "from 0 to 1"),
)


@dataclass(frozen=True)
class Settings:
    home: Path
    repository: Path
    tracking_uri: str
    triton_url: str = "http://127.0.0.1:8000"
    triton_grpc_port: int = 0
    triton_metrics_port: int = 0
    runtime: str = "python"
    python_runner: Path | None = None
    triton_api_key: str = ""  # the key Triton's model-control API wants (default: the one `ferry triton up` made)
    triton_timeout_s: float = 10.0
    load_timeout_s: float = 120.0
    ready_timeout_s: float = 30.0
    max_artifact_mb: float = 1024.0
    lock_wait_s: float = 0.0
    drain_timeout_s: float = 30.0  # a rolling deploy waits this long at most for the gateways to drain a batch
    keep_previous_s: float = 0.0  # after a commit the previous version stays loaded this long (a fast rollback)
    quarantine_keep: int = 0  # keep the files of this many newest failed versions per model (0: all); reasons always
    prometheus_url: str = ""  # where `ferry status` reads live latency and failures (none: Triton's metrics)
    gateway_host: str = "127.0.0.1"
    gateway_port: int = 8080
    gateway_token: str = ""  # a bearer token the gateway requires on inference requests (none: open)
    gateway_grpc_port: int = 0  # KServe v2 gRPC port of `ferry gateway` (0: HTTP only)
    gateway_max_elements: int = 16 * 1024 * 1024  # elements one inference request may declare
    gateway_body_timeout_s: float = 30.0  # a request body that takes longer to arrive gets a 408
    default_model: str = "iris"  # the DAG's default params
    default_alias: str = "champion"
    rtol: float = 1e-4
    atol: float = 1e-5
    # The MLflow loop (ferry.core.writeback, ferry watch).
    serving_alias: str = "serving"  # the alias ferry moves to the committed version ("" : no write-back)
    writeback_timeout_s: float = 3.0  # each write-back call to MLflow (no retries): a rollback must stay fast
    watch_aliases: str = ""  # comma-separated aliases `ferry watch` deploys when they move (default: default_alias)
    watch_host: str = "127.0.0.1"
    watch_port: int = 8090
    watch_secret_file: Path | None = None  # the webhook's HMAC secret (default: $FERRY_HOME/watch/webhook-secret)
    watch_poll_s: float = 0.0  # `ferry watch` polls MLflow's aliases every N seconds (0: webhooks only)
    airflow_url: str = ""  # set: `ferry watch` starts the DAG through Airflow's REST API; else deploys itself
    airflow_username: str = "admin"
    airflow_password: str = ""  # for POST /auth/token (none: no token is asked for)
    airflow_dag_id: str = "mlflow_to_triton_deploy"
    # The bake (ferry.core.rollout): the gate that proves a candidate on live traffic before the commit.
    gateways: str = ""  # comma-separated gateway URLs whose counters the gate sums (default: the local one)
    gate_interval_s: float = 10.0  # one evaluation every this many seconds
    gate_failures: int = 2  # consecutive failed evaluations that roll back at once
    gate_min_requests: int = 100  # fewer candidate requests than this: no verdict (inconclusive at the end)
    gate_max_error_ratio: float = 0.01  # the candidate's error ratio may reach max(active's + margin, this)
    gate_error_margin: float = 0.005
    gate_latency_factor: float = 1.25  # the candidate's p95 may reach factor x active's + slack
    gate_latency_slack_ms: float = 2.0
    gate_min_agreement: float = 0.99  # shadow: the share of mirrored requests whose outputs must agree

    def __post_init__(self) -> None:
        """Checked however the settings were made (load_settings, with_overrides, a test, a library call), so
        that a bad value is refused before anything runs."""
        if self.runtime not in RUNTIMES:
            raise InvalidInput(f"unknown runtime {self.runtime!r}", f"set FERRY_RUNTIME to one of {RUNTIMES}")
        parse_replica_sources(self.triton_url)
        if self.gateway_max_elements < 1:
            raise InvalidInput(f"FERRY_GATEWAY_MAX_ELEMENTS={self.gateway_max_elements} lets no request through",
                               "give a positive number of elements (default 16777216)")
        for name in ("gateway_port", "gateway_grpc_port", "triton_grpc_port", "triton_metrics_port", "watch_port"):
            if getattr(self, name):
                check_port(getattr(self, name), f"FERRY_{name.upper()}")
        for name, value in vars(self).items():
            if isinstance(value, float) and not math.isfinite(value):
                raise InvalidInput(f"FERRY_{name.upper()}={value} is not a finite number", "give a number")
        for names, fits, wanted in _NUMBER_RANGES:
            for name in names:
                if not fits(getattr(self, name)):
                    raise InvalidInput(f"FERRY_{name.upper()}={getattr(self, name)} must be {wanted}",
                                       f"set a number {wanted}, or unset it for the default")

    @cached_property
    def replica_sources(self) -> tuple[ReplicaSource, ...]:
        return parse_replica_sources(self.triton_url)

    @property
    def triton(self) -> Endpoint:
        """The first replica's address: the server `ferry triton up` starts, and the one a single-server setup uses."""
        return self.replica_sources[0].endpoint

    @property
    def triton_http_port(self) -> int:
        return self.triton.port

    @property
    def triton_grpc(self) -> Endpoint:
        return self.triton.with_port(self.triton_grpc_port or self.triton.port + 1)

    @property
    def triton_metrics_url(self) -> str:
        port = self.triton_metrics_port or self.triton.port + 2
        return f"{self.triton.with_port(port).url}/metrics"

    @property
    def max_artifact_bytes(self) -> int:
        return int(self.max_artifact_mb * 1024 * 1024)

    @property
    def triton_dir(self) -> Path:
        """Where `ferry triton up` keeps the server's pid file, log and backend directory."""
        return self.home / "triton"

    @property
    def triton_api_key_file(self) -> Path:
        """Where `ferry triton up` keeps the model-control key it generated (mode 0600): in the repository, so
        that every replica started on a shared repository, and every controller, has the same key."""
        return self.repository / ".ferry" / "triton-api-key"

    def model_control_key(self) -> str:
        """FERRY_TRITON_API_KEY if set, else the key of the Triton that `ferry triton up` started, else none
        (``$FERRY_HOME/triton/api-key`` is where a `ferry triton up` before the repository's key kept it)."""
        if self.triton_api_key:
            return self.triton_api_key
        for path in (self.triton_api_key_file, self.triton_dir / "api-key"):
            try:
                return path.read_text().strip()
            except FileNotFoundError:
                continue
        return ""

    def with_overrides(self, **changes: Any) -> Settings:
        return dataclasses.replace(self, **changes)


# FERRY_<NAME> variables and TOML keys map onto these fields.
_FIELDS = {f.name: f for f in dataclasses.fields(Settings)}


def _coerce(name: str, raw: Any) -> Any:
    kind = _FIELDS[name].type
    try:
        if "Path" in str(kind):
            return Path(str(raw)).expanduser()
        if kind == "float":
            return float(raw)
        if kind == "int":
            return int(raw)
        return str(raw)
    except ValueError:
        raise InvalidInput(f"setting {name} = {raw!r} is not a valid {kind}",
                           "fix the FERRY_* variable or config file") from None


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    config_file = env.get("FERRY_CONFIG")
    if config_file:
        try:
            values.update(tomllib.loads(Path(config_file).read_text()).get("ferry", {}))
        except (OSError, tomllib.TOMLDecodeError) as error:
            raise InvalidInput(f"cannot read config file {config_file}: {error}", "fix or unset FERRY_CONFIG") from None
    for name in _FIELDS:
        if f"FERRY_{name.upper()}" in env:
            values[name] = env[f"FERRY_{name.upper()}"]
    unknown = set(values) - set(_FIELDS)
    if unknown:
        raise InvalidInput(f"unknown settings {sorted(unknown)}", f"known settings: {sorted(_FIELDS)}")
    typed = {name: _coerce(name, raw) for name, raw in values.items()}
    home = typed.pop("home", None) or default_home()
    typed.setdefault("repository", home / "repository")
    typed.setdefault("tracking_uri", env.get("MLFLOW_TRACKING_URI") or f"sqlite:///{home / 'mlflow.db'}")
    return Settings(home=home, **typed)
