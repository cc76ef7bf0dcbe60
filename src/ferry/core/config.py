"""Settings: embedded defaults, overridden by a TOML file (FERRY_CONFIG) and then by FERRY_* variables.

The settings are grouped (``settings.triton.load_timeout_s``, ``settings.gateway.port``, ...); each field is also
known by its flat name, the ``FERRY_<NAME>`` variable and TOML key (``load_timeout_s``), given once as its alias.
They are validated in one place, the models below, whichever way they are made: loaded, changed with
:meth:`Settings.with_overrides`, or built by a test or a library call.
"""

from __future__ import annotations

import os
import tomllib
from collections.abc import Callable, Mapping
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from ferry.core.addresses import Endpoint, ReplicaSource, parse_replica_sources
from ferry.core.errors import InvalidInput


def default_home() -> Path:
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "ferry"


def _bounded(fits: Callable[[Any], bool], wanted: str) -> AfterValidator:
    def check(value: Any) -> Any:
        if not fits(value):
            raise ValueError(wanted)
        return value
    return AfterValidator(check)


_Finite = Field(allow_inf_nan=False)
Positive = Annotated[float, _Finite, _bounded(lambda v: v > 0, "must be more than 0")]
NonNegative = Annotated[float, _Finite, _bounded(lambda v: v >= 0, "must be 0 or more")]
Count = Annotated[int, _bounded(lambda v: v >= 0, "must be 0 or more")]
Ratio = Annotated[float, _Finite, _bounded(lambda v: 0 <= v <= 1, "must be from 0 to 1")]
Port = Annotated[int, _bounded(lambda v: 0 < v < 65536, "is not a TCP port: give a number from 1 to 65535")]
OptionalPort = Annotated[int, _bounded(lambda v: 0 <= v < 65536,
                                        "is not a TCP port: give a number from 1 to 65535, or 0 for none")]
UserPath = Annotated[Path, AfterValidator(lambda path: path.expanduser())]
Host = Annotated[str, _bounded(lambda v: bool(v.strip()), "is empty: give a host name or address")]
OptionalPath = Annotated[UserPath | None, BeforeValidator(lambda v: None if v == "" else v)]  # "": unset


class _Group(BaseModel):
    """A group of settings; each field's alias is its flat name (FERRY_<ALIAS>, the TOML key)."""

    model_config = ConfigDict(frozen=True, extra="forbid", validate_by_name=True, validate_by_alias=True,
                              coerce_numbers_to_str=True)  # a TOML number where text is wanted: gateway_token = 1

    def __init__(self, **values: Any) -> None:
        try:
            super().__init__(**values)
        except ValidationError as error:
            raise _refusal(error, type(self)) from None


class TritonSettings(_Group):
    """The Triton servers ferry deploys to, and how long it waits for them."""

    urls: str = Field("http://127.0.0.1:8000", alias="triton_url")  # one URL, a comma-separated list, dns+http://
    grpc_port: OptionalPort = Field(0, alias="triton_grpc_port")  # 0: the HTTP port + 1
    metrics_port: OptionalPort = Field(0, alias="triton_metrics_port")  # 0: the HTTP port + 2
    runtime: Literal["python", "onnxruntime"] = "python"
    python_runner: OptionalPath = None
    api_key: str = Field("", alias="triton_api_key")  # the model-control key (default: the one `ferry triton up` made)
    timeout_s: Positive = Field(10.0, alias="triton_timeout_s")
    load_timeout_s: Positive = 120.0
    ready_timeout_s: Positive = 30.0

    @field_validator("urls")
    @classmethod
    def _parses(cls, urls: str) -> str:
        parse_replica_sources(urls)  # raises InvalidInput, with the reason and the fix
        return urls

    @cached_property
    def sources(self) -> tuple[ReplicaSource, ...]:
        return parse_replica_sources(self.urls)

    @property
    def endpoint(self) -> Endpoint:
        """The first replica's address: the server `ferry triton up` starts, and the one a single-server setup uses."""
        return self.sources[0].endpoint

    @property
    def grpc(self) -> Endpoint:
        return self.endpoint.with_port(self.grpc_port or self.endpoint.port + 1)

    @property
    def metrics_url(self) -> str:
        return f"{self.endpoint.with_port(self.metrics_port or self.endpoint.port + 2).url}/metrics"


class DeploySettings(_Group):
    """The transaction: what it accepts, how it waits, what it keeps, and the smoke's tolerance."""

    max_artifact_mb: Positive = 1024.0
    lock_wait_s: NonNegative = 0.0
    drain_timeout_s: NonNegative = 30.0  # a rolling deploy waits this long at most for the gateways to drain a batch
    keep_previous_s: NonNegative = 0.0  # after a commit the previous version stays loaded this long (a fast rollback)
    quarantine_keep: Count = 0  # keep the files of this many newest failed versions per model (0: all)
    rtol: NonNegative = 1e-4
    atol: NonNegative = 1e-5
    default_model: str = "iris"  # the DAG's default params
    default_alias: str = "champion"

    @property
    def max_artifact_bytes(self) -> int:
        return int(self.max_artifact_mb * 1024 * 1024)


class GatewaySettings(_Group):
    """`ferry gateway`: where it listens and what it lets through."""

    host: Host = Field("127.0.0.1", alias="gateway_host")
    port: Port = Field(8080, alias="gateway_port")
    token: str = Field("", alias="gateway_token")  # a bearer token required on inference requests (none: open)
    grpc_port: OptionalPort = Field(0, alias="gateway_grpc_port")  # KServe v2 gRPC (0: HTTP only)
    max_elements: Annotated[int, _bounded(lambda v: v >= 1, "lets no request through: give a positive number")] = \
        Field(16 * 1024 * 1024, alias="gateway_max_elements")  # elements one inference request may declare
    max_body_bytes: Annotated[int, _bounded(lambda v: 0 < v < 2**31, "must be from 1 to 2147483647")] = \
        Field(16 * 1024 * 1024, alias="gateway_max_body_bytes")  # a larger request body gets a 413
    body_timeout_s: Positive = Field(30.0, alias="gateway_body_timeout_s")  # a slower request body gets a 408


class MlflowSettings(_Group):
    """The write-back to MLflow after a commit (ferry.core.writeback)."""

    serving_alias: str = "serving"  # the alias ferry moves to the committed version ("": no write-back)
    writeback_timeout_s: Positive = 3.0  # each write-back call (no retries): a rollback must stay fast


class WatchSettings(_Group):
    """`ferry watch`: the webhook receiver and the poller."""

    aliases: str = Field("", alias="watch_aliases")  # comma-separated aliases it deploys (default: default_alias)
    host: Host = Field("127.0.0.1", alias="watch_host")
    port: Port = Field(8090, alias="watch_port")
    secret_file: OptionalPath = Field(None, alias="watch_secret_file")  # default: $FERRY_HOME/watch/webhook-secret
    poll_s: NonNegative = Field(0.0, alias="watch_poll_s")  # poll MLflow's aliases every N seconds (0: webhooks only)


class AirflowSettings(_Group):
    """Set: `ferry watch` starts the DAG through Airflow's REST API; else it deploys itself."""

    url: str = Field("", alias="airflow_url")
    username: str = Field("admin", alias="airflow_username")
    password: str = Field("", alias="airflow_password")  # for POST /auth/token (none: no token is asked for)
    dag_id: str = Field("mlflow_to_triton_deploy", alias="airflow_dag_id")


class BakeSettings(_Group):
    """The bake (ferry.core.rollout): the gate that proves a candidate on live traffic before the commit."""

    gateways: str = ""  # comma-separated gateway URLs whose counters the gate sums (default: the local one)
    interval_s: Positive = Field(10.0, alias="gate_interval_s")  # one evaluation every this many seconds
    failures: Count = Field(2, alias="gate_failures")  # consecutive failed evaluations that roll back at once
    min_requests: Count = Field(100, alias="gate_min_requests")  # fewer candidate requests: no verdict
    max_error_ratio: Ratio = Field(0.01, alias="gate_max_error_ratio")  # may reach max(active's + margin, this)
    error_margin: NonNegative = Field(0.005, alias="gate_error_margin")
    latency_factor: Positive = Field(1.25, alias="gate_latency_factor")  # p95 may reach factor x active's + slack
    latency_slack_ms: NonNegative = Field(2.0, alias="gate_latency_slack_ms")
    min_agreement: Ratio = Field(0.99, alias="gate_min_agreement")  # shadow: mirrored requests that must agree


_GROUPS: dict[str, type[_Group]] = {
    "triton": TritonSettings, "deploy": DeploySettings, "gateway": GatewaySettings, "mlflow": MlflowSettings,
    "watch": WatchSettings, "airflow": AirflowSettings, "bake": BakeSettings,
}
# Every flat name (FERRY_<NAME>, the TOML key) and where it lives: (group, field); the top-level ones: (None, name).
FLAT_NAMES: dict[str, tuple[str | None, str]] = {
    **{name: (None, name) for name in ("home", "repository", "tracking_uri", "prometheus_url")},
    **{info.alias or field: (group, field) for group, model in _GROUPS.items()
       for field, info in model.model_fields.items()},
}


class Settings(BaseModel):
    """All of ferry's settings: where its state lives, and one group per part (see the module's docstring)."""

    model_config = ConfigDict(frozen=True, extra="forbid", coerce_numbers_to_str=True)

    home: UserPath
    repository: UserPath
    tracking_uri: str
    prometheus_url: str = ""  # where `ferry status` reads live latency and failures (none: Triton's metrics)
    triton: TritonSettings = Field(default_factory=TritonSettings)
    deploy: DeploySettings = Field(default_factory=DeploySettings)
    gateway: GatewaySettings = Field(default_factory=GatewaySettings)
    mlflow: MlflowSettings = Field(default_factory=MlflowSettings)
    watch: WatchSettings = Field(default_factory=WatchSettings)
    airflow: AirflowSettings = Field(default_factory=AirflowSettings)
    bake: BakeSettings = Field(default_factory=BakeSettings)

    def __init__(self, **values: Any) -> None:
        """Flat names (``triton_url=...``), groups (``triton={...}``) or both; a bad value is an InvalidInput."""
        try:
            super().__init__(**values)
        except ValidationError as error:
            raise _refusal(error) from None

    @model_validator(mode="before")
    @classmethod
    def _group_flat_names(cls, values: Any) -> Any:
        if not isinstance(values, dict):
            return values
        grouped: dict[str, Any] = {}
        for whole in _GROUPS:  # a group given whole, by its fields' names or flat names
            if isinstance(given := values.get(whole), _Group):
                grouped[whole] = given.model_dump()
            elif isinstance(given, dict):
                grouped[whole] = _by_field(whole, given)
            elif given is not None:
                raise InvalidInput(f"{whole} = {given!r}: {whole} is a group of settings",
                                   f"give it as a table [ferry.{whole}], or its settings by their flat names")
        for name, value in values.items():  # flat names, over the groups given whole
            _refuse_true_or_false(name, value, " (by its flat name)")
            group, field = FLAT_NAMES.get(name, (None, name))
            if group is None:
                if name not in _GROUPS:
                    grouped[name] = value
            elif isinstance(members := grouped.setdefault(group, {}), dict):
                grouped[group] = {**members, field: value}
        return grouped

    def flat(self) -> dict[str, Any]:
        """Every setting by its flat name, as with_overrides and the FERRY_* variables take them."""
        values: dict[str, Any] = {}
        for name, (group, field) in FLAT_NAMES.items():
            values[name] = getattr(getattr(self, group) if group else self, field)
        return values

    def with_overrides(self, **changes: Any) -> Settings:
        """These settings with some changed, by flat name (``load_timeout_s=5``), validated as loaded ones are."""
        unknown = set(changes) - set(FLAT_NAMES)
        if unknown:
            raise InvalidInput(f"unknown settings {sorted(unknown)}", f"known settings: {sorted(FLAT_NAMES)}")
        return Settings(**{**self.flat(), **changes})

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
        if self.triton.api_key:
            return self.triton.api_key
        for path in (self.triton_api_key_file, self.triton_dir / "api-key"):
            try:
                return path.read_text().strip()
            except FileNotFoundError:
                continue
        return ""


def _field_in(group: str, name: str) -> str:
    """A group's field by its own name or by its flat name."""
    return FLAT_NAMES[name][1] if FLAT_NAMES.get(name, (None, ""))[0] == group else name


def _refuse_true_or_false(name: str, value: Any, where: str = "") -> None:
    """No setting is a true/false: TOML's would pass as 1/0 where a number is wanted."""
    if isinstance(value, bool):
        raise InvalidInput(f"{name} = {str(value).lower()}{where} is not a setting's value", "give a number or text")


def _by_field(group: str, given: dict[str, Any]) -> dict[str, Any]:
    """A group's table by field name; a field given twice (by both its names), or as true/false, is refused."""
    fields: dict[str, Any] = {}
    for name, value in given.items():
        field = _field_in(group, name)
        _refuse_true_or_false(f"[ferry.{group}] {name}", value)
        if field in fields:
            raise InvalidInput(f"[ferry.{group}] gives {field!r} twice", f"keep one of {name!r} and {field!r}")
        fields[field] = value
    return fields


_PARSE_FAILURES = {"float_parsing": "is not a number", "float_type": "is not a number",
                   "int_parsing": "is not a whole number", "int_type": "is not a whole number",
                   "int_from_float": "is not a whole number", "finite_number": "is not a finite number",
                   "string_type": "is not text", "path_type": "is not a path"}


def _refusal(error: ValidationError, group: type[_Group] | None = None) -> InvalidInput:
    """The first problem pydantic found, named by its FERRY_* variable, with what to do."""
    problem = error.errors()[0]
    location = [str(part) for part in problem["loc"]]
    name = location[-1] if location else "?"
    if len(location) > 1 and location[0] in _GROUPS:
        group = _GROUPS[location[0]]
    if group is not None and name in group.model_fields:  # a group's field, by its flat name
        name = group.model_fields[name].alias or name
    variable, value = f"FERRY_{name.upper()}", problem.get("input")
    shown = repr(value) if isinstance(value, str) else value
    kind = problem["type"]
    if kind == "extra_forbidden" and group is not None:
        given_in = next((table for table, model in _GROUPS.items() if model is group), "?")
        homes = {f"[ferry.{table}]" for table, model in _GROUPS.items() if name in model.model_fields}
        if name in FLAT_NAMES:
            homes.add(f"[ferry.{FLAT_NAMES[name][0]}]" if FLAT_NAMES[name][0] else "[ferry]")
        known = sorted(group.model_fields)
        where = f"it is a setting of {', '.join(sorted(homes))}" if homes else f"known in it: {known}"
        return InvalidInput(f"[ferry.{given_in}] has no setting {name!r}", where)
    if kind == "extra_forbidden":
        return InvalidInput(f"unknown setting {name!r}", f"known settings: {sorted(FLAT_NAMES)}")
    if kind == "missing":
        return InvalidInput(f"the setting {name} is missing", f"set {variable}")
    if kind == "literal_error":
        return InvalidInput(f"unknown {name} {value!r}", f"set {variable} to one of {problem['ctx']['expected']}")
    wanted = str(problem["ctx"]["error"]) if kind == "value_error" else _PARSE_FAILURES.get(kind, problem["msg"])
    return InvalidInput(f"{variable}={shown} {wanted}", f"fix {variable} (or its key in FERRY_CONFIG), "
                        "or unset it for the default")


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    config_file = env.get("FERRY_CONFIG")
    if config_file:
        try:
            table = tomllib.loads(Path(config_file).read_text()).get("ferry", {})
        except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as error:
            raise InvalidInput(f"cannot read config file {config_file}: {error}", "fix or unset FERRY_CONFIG") from None
        if not isinstance(table, dict):
            raise InvalidInput(f"config file {config_file}: 'ferry' is not a table", "write the settings under [ferry]")
        values.update(table)
    for name in FLAT_NAMES:
        if f"FERRY_{name.upper()}" in env:
            values[name] = env[f"FERRY_{name.upper()}"]
    unknown = {name for name in values if name not in FLAT_NAMES and name not in _GROUPS}  # [ferry.gateway]
    if unknown:
        raise InvalidInput(f"unknown settings {sorted(unknown)}", f"known settings: {sorted(FLAT_NAMES)}, or a "
                           f"table [ferry.<group>] of one of {sorted(_GROUPS)}")
    home = Path(str(values.pop("home", "") or default_home())).expanduser()
    values.setdefault("repository", home / "repository")
    values.setdefault("tracking_uri", env.get("MLFLOW_TRACKING_URI") or f"sqlite:///{home / 'mlflow.db'}")
    return Settings(home=home, **values)
