"""`mlflow deployments ... -t ferry`: MLflow's deployments API over ferry's transaction.

A thin adapter, registered under the entry-point group ``mlflow.deployments`` as ``ferry``. A deployment
is a model: its name is the model's name in MLflow and in Triton, and what it serves is the version
``current.json`` commits. create and update run the one runner of the transaction (snapshot,
materialize, load, ready, smoke, commit, or rollback), get and list read ferry's status, delete
retires the model (:mod:`ferry.core.retire`), and predict goes through the gateway's routing and
request checks to the committed version. Every failure is an ``MlflowException`` with ferry's
one-line reason; ``target_help()`` documents it all.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import signal
import textwrap
import threading
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from mlflow.deployments import BaseDeploymentClient, PredictionsResponse
from mlflow.protos.databricks_pb2 import (
    INVALID_PARAMETER_VALUE,
    INVALID_STATE,
    RESOURCE_ALREADY_EXISTS,
    RESOURCE_DOES_NOT_EXIST,
    TEMPORARILY_UNAVAILABLE,
)

from ferry.adapters.mlflow_predict import predict_committed, refused
from ferry.adapters.mlflow_uris import URI_FORMS, mlflow_errors, target_of
from ferry.core.config import FLAT_NAMES, Settings, load_settings
from ferry.core.current import read_current
from ferry.core.errors import FerryError
from ferry.core.events import RECORDED, EventHandler
from ferry.core.records import CurrentState, DeployReport, Outcome, Strategy
from ferry.core.repository import ModelDir, check_name
from ferry.core.retire import retire
from ferry.core.runner import Runner
from ferry.core.services import Services
from ferry.core.status import ModelStatus, list_models, model_status, replica_indexes
from ferry.core.summary import failure_reason
from ferry.core.target import Target

_logger = logging.getLogger(__name__)

TARGET = "ferry"
FLAVOR = "onnx"
FLAVORS = (FLAVOR, "triton")  # model.onnx with its smoke.json, or a Triton model directory (any backend)
SETTING_KEYS = tuple(sorted(FLAT_NAMES))
# force: models:/m/N, deploy the version even though its last deploy failed; allow_signature_change: a version whose
# inputs or outputs differ from the active version's (it breaks their clients)
# strategy: beside or rolling; batch: rolling, replicas per batch (1, 2, 25%)
DEPLOY_KEYS = ("force", "allow_signature_change", "strategy", "batch")
TEXT_KEYS = ("strategy", "batch")  # the own keys that are not true or false
DELETE_KEYS = ("confirm",)  # delete unloads the model: say so
_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off", "")


# ---------------------------------------------------------------- errors and options


@dataclass(frozen=True)
class Options:
    """The ``-C key=value`` config of one call: ferry's settings, and the call's own keys."""

    settings: Settings
    force: bool = False
    allow_signature_change: bool = False
    confirm: bool = False
    strategy: Strategy = "beside"
    batch: str = "1"


def _flag(key: str, value: object) -> bool:
    text = str(value).strip().lower()
    if text not in _TRUE + _FALSE:
        raise refused(f"-C {key}={value!r} is not true or false", f"give -C {key}=true or -C {key}=false")
    return text in _TRUE


def options(config: Mapping[str, Any] | None, own_keys: tuple[str, ...] = ()) -> Options:
    """Settings as ``ferry`` builds them (FERRY_* variables, FERRY_CONFIG), each ``-C`` key overriding its setting.

    A key is a setting's name (``-C triton_url=...`` is FERRY_TRITON_URL); it goes through the same
    parsing and checks as the variable. An unknown key is refused with the list of valid ones.
    """
    config = dict(config or {})
    unknown = sorted(set(config) - set(SETTING_KEYS) - set(own_keys))
    if unknown:
        own = f"; and for this command: {', '.join(own_keys)}" if own_keys else ""
        raise refused(f"unknown -C key{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} for "
                       f"-t {TARGET}; valid keys (ferry's settings, FERRY_<KEY> as variables): "
                       f"{', '.join(SETTING_KEYS)}{own}")
    overrides = {f"FERRY_{key.upper()}": str(value) for key, value in config.items() if key in SETTING_KEYS}
    try:
        settings = load_settings({**os.environ, **overrides})
    except FerryError as error:
        raise refused(f"-C config or FERRY_* variables: {error}") from error
    flags = {key: _flag(key, config[key]) for key in own_keys if key in config and key not in TEXT_KEYS}
    strategy = str(config.get("strategy", "beside"))
    if strategy not in ("beside", "rolling"):
        raise refused(f"-C strategy={strategy!r} is not a strategy", "give -C strategy=beside or -C strategy=rolling")
    return Options(settings, **flags, strategy="rolling" if strategy == "rolling" else "beside",
                   batch=str(config.get("batch", "1")))


# ---------------------------------------------------------------- deploys


@contextmanager
def _stop_rolls_back() -> Iterator[EventHandler]:
    """While a deploy runs (in the main thread), SIGTERM rolls it back as Ctrl-C does, as with `ferry deploy`;
    once its history record is written, the previous handler is back."""
    if threading.current_thread() is not threading.main_thread():
        yield lambda step, status, seconds, detail: None
        return
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    previous = signal.SIG_DFL if previous is None else previous

    def on_event(step: str, status: str, seconds: float, detail: str) -> None:
        if step == RECORDED:
            signal.signal(signal.SIGTERM, previous)

    try:
        yield on_event
    finally:
        signal.signal(signal.SIGTERM, previous)


def deploy_uri(ferry: Services, name: str, model_uri: str, opts: Options) -> dict[str, Any]:
    """Deploy what ``model_uri`` names through the runner: the deployment dict, or an MlflowException."""
    with mlflow_errors():
        check_name("deployment name", name)
    target, registered = target_of(ferry, name, model_uri, opts.force)
    target = dataclasses.replace(target, allow_signature_change=opts.allow_signature_change, strategy=opts.strategy,
                                 batch=opts.batch)
    report = run_deploy(ferry, name, target)
    return deployed(report, registered, flavor_of(ferry, name, report.version))


def run_deploy(ferry: Services, name: str, target: Target) -> DeployReport:
    with mlflow_errors(), _stop_rolls_back() as on_event:
        return Runner(ferry, name, via="mlflow", on_event=on_event).deploy(target)


def flavor_of(ferry: Services, model: str, version: int | None) -> str:
    """The flavor of a staged version, from its manifest (onnx when there is none to read)."""
    manifest = ferry.model_dir(model).read_manifest(version) if version is not None else None
    return manifest.flavor if manifest is not None else FLAVOR


def deployed(report: DeployReport, registered: int | None = None, flavor: str = FLAVOR) -> dict[str, Any]:
    """A committed (or no-op) deploy as MLflow's deployment dict; a failed one as an MlflowException."""
    if report.outcome == Outcome.ROLLED_BACK:
        raise refused(failure_reason(report), code=INVALID_STATE)
    if report.outcome == Outcome.REJECTED:
        code = TEMPORARILY_UNAVAILABLE if report.retryable else INVALID_PARAMETER_VALUE
        raise refused(str(report.error), report.hint or "", code=code)
    for warning in report.warnings:
        _logger.warning("ferry: %s", warning)
    return {"name": report.model, "flavor": flavor, "outcome": str(report.outcome), "version": report.version,
            "previous_version": report.previous_version, "run_id": report.run_id, "deploy_id": report.deploy_id,
            "registered_version": registered, "steps": report.steps, "warnings": report.warnings}


def _check_flavor(flavor: str | None) -> None:
    if flavor not in (None, *FLAVORS):
        raise refused(f"ferry deploys the onnx flavor (a version's model.onnx, checked against its smoke.json) and "
                      f"the triton flavor (a Triton model directory), not {flavor!r}",
                      "leave out --flavor (ferry reads it from the version's artifacts), or give onnx or triton")


def _no_endpoint(endpoint: str | None) -> None:
    if endpoint is not None:
        raise refused(f"ferry has no endpoints (given {endpoint!r}): a deployment is a model in Triton",
                       "leave out --endpoint")


def _committed(ferry: Services, name: str) -> CurrentState | None:
    with mlflow_errors():
        return read_current(ModelDir(ferry.settings.repository, check_name("deployment name", name)))


# ---------------------------------------------------------------- status


def describe(status: ModelStatus, flavor: str = FLAVOR) -> dict[str, Any]:
    """ferry's status of one model as a deployment dict."""
    current = status.current
    active = current.active_version if current else None
    described: dict[str, Any] = {"name": status.model, "flavor": flavor, "active_version": active}
    described.update({key: getattr(current, key, None) for key in
                      ("run_id", "alias", "updated_at_utc", "previous_version", "deploy_id", "sha256")})
    described.update({
        "serving": status.serving,  # the versions any replica serves
        "replicas_serving": sum(1 for r in status.replicas if active is not None and r.serving == [active]),
        "replicas": len(status.replicas),
        "drift": status.drift,
        "in_flight": status.in_flight,
        "quarantined": len(status.quarantined),
        "errors": [e for e in (status.current_error, *(r.error for r in status.replicas)) if e],
    })
    return described


def deployment_statuses(ferry: Services, models: list[str]) -> list[ModelStatus]:
    """The status of each of ``models`` that is a deployment (something committed, unreadable or in flight);
    each replica's repository index is read once for all of them."""
    fleet = ferry.fleet()
    indexes = replica_indexes(fleet)
    statuses = [model_status(ferry.settings.repository, fleet, model, indexes) for model in models]
    return [s for s in statuses if s.current is not None or s.current_error is not None or s.in_flight is not None]


# ---------------------------------------------------------------- the client


def _deployment(name: str, flavor: str | None, config: Mapping[str, Any] | None,
                endpoint: str | None) -> tuple[Options, Services, CurrentState | None]:
    """What create and update both start from: the checked arguments, ferry, and what is committed now."""
    _no_endpoint(endpoint)
    _check_flavor(flavor)
    opts = options(config, DEPLOY_KEYS)
    ferry = Services(opts.settings)
    return opts, ferry, _committed(ferry, name)


class FerryDeploymentClient(BaseDeploymentClient):
    """`-t ferry`: deployments are models, each serving the version ferry committed (see ``target_help()``)."""

    def __init__(self, target_uri: str = TARGET) -> None:
        if target_uri.rstrip(":/") != TARGET:
            raise refused(f"the ferry target takes no suffix (given {target_uri!r})",
                           "use -t ferry; give Triton, the repository and MLflow with -C or FERRY_* variables")
        super().__init__(target_uri)

    def create_deployment(self, name: str, model_uri: str, flavor: str | None = None,
                          config: Mapping[str, Any] | None = None, endpoint: str | None = None) -> dict[str, Any]:
        """Deploy the version ``model_uri`` names as the model's first committed version; refused if one is."""
        opts, ferry, current = _deployment(name, flavor, config, endpoint)
        if current is not None:
            raise refused(f"deployment '{name}' exists: v{current.active_version} is committed",
                           "deploy another version with `mlflow deployments update`", code=RESOURCE_ALREADY_EXISTS)
        return deploy_uri(ferry, name, model_uri, opts)

    def update_deployment(self, name: str, model_uri: str | None = None, flavor: str | None = None,
                          config: Mapping[str, Any] | None = None, endpoint: str | None = None) -> dict[str, Any]:
        """Deploy another version; without ``model_uri``, prove and serve the committed version again."""
        opts, ferry, current = _deployment(name, flavor, config, endpoint)
        if current is None:
            raise refused(f"no deployment '{name}': nothing is committed",
                           f"create it with `mlflow deployments create -t ferry --name {name} -m MODEL_URI`",
                           code=RESOURCE_DOES_NOT_EXIST)
        if model_uri is None:
            with mlflow_errors():
                target = Target.of_version(current.active_version, opts.force, strategy=opts.strategy,
                                           batch=opts.batch)
            report = run_deploy(ferry, name, target)
            return deployed(report, flavor=flavor_of(ferry, name, report.version))
        return deploy_uri(ferry, name, model_uri, opts)

    def delete_deployment(self, name: str, config: Mapping[str, Any] | None = None,
                          endpoint: str | None = None) -> None:
        """Unload the model from Triton and retire its current.json (needs -C confirm=true); idempotent."""
        _no_endpoint(endpoint)
        opts = options(config, DELETE_KEYS)
        if not opts.confirm:
            raise refused(f"deleting '{name}' unloads it from Triton and retires its current.json (the versions' "
                           "files and the history stay): add -C confirm=true")
        with mlflow_errors():
            retired = retire(Services(opts.settings), name)
        for warning in retired.warnings:
            _logger.warning("ferry: %s", warning)

    def list_deployments(self, endpoint: str | None = None) -> list[dict[str, Any]]:
        """Every model with a committed version (or a deploy in flight), with ferry's status."""
        _no_endpoint(endpoint)
        ferry = Services(options(None).settings)
        with mlflow_errors():
            return [describe(s, flavor_of(ferry, s.model, s.current.active_version if s.current else None))
                    for s in deployment_statuses(ferry, list_models(ferry.settings.repository))]

    def get_deployment(self, name: str, endpoint: str | None = None) -> dict[str, Any]:
        """ferry's status of the model: active version, run, replicas serving it, drift."""
        _no_endpoint(endpoint)
        ferry = Services(options(None).settings)
        with mlflow_errors():
            found = deployment_statuses(ferry, [check_name("deployment name", name)])
        if not found:
            raise refused(f"no deployment '{name}': nothing is committed in {ferry.settings.repository}",
                           code=RESOURCE_DOES_NOT_EXIST)
        current = found[0].current
        return describe(found[0], flavor_of(ferry, name, current.active_version if current else None))

    def predict(self, deployment_name: str | None = None, inputs: Any = None,
                endpoint: str | None = None) -> PredictionsResponse:
        """Inference at the committed version; ``inputs``: a DataFrame, a dict of arrays or a list of arrays."""
        _no_endpoint(endpoint)
        if not deployment_name:
            raise refused("predict needs the deployment's name", "give --name MODEL")
        ferry = Services(options(None).settings)
        with mlflow_errors():
            return predict_committed(ferry, deployment_name, inputs)


# ---------------------------------------------------------------- the module's interface


def run_local(name: str, model_uri: str, flavor: str | None = None, config: Mapping[str, Any] | None = None) -> None:
    """Start the local Triton (as `ferry triton up`; kept running) and deploy ``model_uri`` to it."""
    _check_flavor(flavor)
    opts = options(config, DEPLOY_KEYS)
    settings = opts.settings
    try:
        from ferry.runtime import server
    except ImportError as error:
        raise refused(f"run-local starts the pip-installed Triton, which needs the 'local-triton' extra "
                       f"({error.name} is missing)", "pip install 'ferry[local-triton]'") from error
    with mlflow_errors():
        # A server `ferry triton up` started is used as it is: Triton's /v2/health/ready answers 400 once any
        # model has been unloaded (strict readiness), which server.up would take for a foreign server.
        state = server.status(settings)
        state = state if state.running else server.up(settings)
    deployment = deploy_uri(Services(settings), name, model_uri, opts)
    print(f"ferry: {name} v{deployment['version']} {deployment['outcome']} on the local Triton at {state.url} "
          f"(pid {state.pid}); stop it with `ferry triton down`")


def target_help() -> str:
    keys = textwrap.fill(", ".join(SETTING_KEYS), width=100, initial_indent="  ", subsequent_indent="  ")
    return _HELP.format(keys=keys, forms=URI_FORMS)


_HELP = """\
ferry: deploy MLflow model versions to NVIDIA Triton as one safe transaction

    snapshot -> materialize -> load -> ready -> smoke -> commit, or rollback

Target URI: `ferry` (no suffix). Deployment name: the model's name, in MLflow and in Triton.
Flavor: onnx (the default): a version's model.onnx, proven against its smoke.json.

  mlflow deployments create -t ferry --name iris -m models:/iris@champion
  mlflow deployments update -t ferry --name iris -m models:/iris/3 [-C force=true]
  mlflow deployments get    -t ferry --name iris
  mlflow deployments list   -t ferry
  mlflow deployments predict -t ferry --name iris -I input.json
  mlflow deployments delete -t ferry --name iris -C confirm=true
  mlflow deployments run-local -t ferry --name iris -m models:/iris@champion

Model URIs ({forms}):
  models:/<name>@<alias>    the version the alias names (as `ferry deploy <name> --alias <alias>`)
  models:/<name>/<version>  that version (as `ferry rollback <name> --to <version>`; a version whose last
                            deploy failed needs -C force=true)
  runs:/<run id>/<path>     registered first as a version of <name> (the version already registered from
                            that run and path is reused; a path without model.onnx registers nothing)
  The model in the URI must be the deployment's name. Stages, 'latest' and other URIs are refused.

create   deploys the first version; refused if one is committed (use update).
update   deploys another version through the same transaction; without -m, proves and serves the
         committed version again (after a Triton restart). A deploy that fails is rolled back first:
         the previous version still serves, the failed one is quarantined with its reason, and the
         MlflowException is ferry's one-line reason, naming the step ("failed at smoke: ...").
get/list ferry's status: active_version, run_id, alias, updated_at_utc, previous_version, deploy_id,
         serving (the versions any replica serves), replicas_serving / replicas, drift, in_flight,
         quarantined (how many failed versions are kept), errors (current.json or a replica unreadable).
delete   needs -C confirm=true: unloads the model from every replica and retires current.json (kept under
         .ferry/<name>/retired/; the history and the versions' files stay). Idempotent.
predict  a pandas DataFrame (one column per input and a row per item; or one column indexed by the
         inputs' names, as the triton plugin took it; or, for a model with one input, the whole frame),
         a dict of arrays, or a list of arrays in the model's input order; sent to the committed version
         through the gateway's routing and checks. Returns {{"predictions": {{output: values}}, "model",
         "version"}}.
run-local starts the local Triton (as `ferry triton up`, left running) and deploys.

Config (-C key=value): any of ferry's settings, by name, as the FERRY_<KEY> variable would set it
(-C wins over the variables and FERRY_CONFIG), e.g. -C triton_url=http://127.0.0.1:8000
-C runtime=onnxruntime -C load_timeout_s=60 -C repository=/models. Valid keys:
{keys}
and force, allow_signature_change, strategy, batch (create, update, run-local), confirm (delete).
Unknown keys are refused. Keep secrets (triton_api_key, gateway_token, ...) in FERRY_* variables:
-C values show in the process list.
MLflow itself is read from MLFLOW_TRACKING_URI (or -C tracking_uri=...).
"""
