"""What a model URI given to ``-t ferry`` deploys (``models:/<name>@<alias>``, ``models:/<name>/<version>``, or a
``runs:/`` URI registered first), and ferry's errors as MLflow's."""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import (
    INVALID_PARAMETER_VALUE,
    INVALID_STATE,
    RESOURCE_DOES_NOT_EXIST,
    TEMPORARILY_UNAVAILABLE,
)

from ferry.adapters.mlflow_predict import refused
from ferry.core.errors import Busy, FerryError, NoSuchModel, unreachable
from ferry.core.services import Services
from ferry.core.target import Target

_logger = logging.getLogger("ferry.adapters.mlflow_plugin")

URI_FORMS = "models:/<name>@<alias>, models:/<name>/<version> or runs:/<run id>/<path>"
_MODELS_URI = re.compile(r"^models:/(?P<model>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>[^/]+))/?$")
_RUNS_URI = re.compile(r"^runs:/(?P<run_id>[A-Za-z0-9_-]+)/(?P<path>[^?#]+?)/?$")
REGISTRATION_TIMEOUT_S = 60.0


def as_mlflow(error: FerryError) -> MlflowException:
    """A ferry error as MLflow's, with ferry's one line (message and hint)."""
    if isinstance(error, NoSuchModel):
        code = RESOURCE_DOES_NOT_EXIST
    elif unreachable(error):
        code = TEMPORARILY_UNAVAILABLE
    elif isinstance(error, Busy):
        code = INVALID_STATE
    else:
        code = INVALID_PARAMETER_VALUE
    return refused(str(error), code=code)


@contextmanager
def mlflow_errors() -> Iterator[None]:
    try:
        yield
    except FerryError as error:
        raise as_mlflow(error) from error


def _same_model(name: str, named: str, model_uri: str) -> None:
    if named != name:
        raise refused(f"{model_uri} names model '{named}', the deployment is '{name}': a deployment is named "
                       f"after its model", f"use --name {named}, or a URI of '{name}'")


def target_of(ferry: Services, name: str, model_uri: str, force: bool = False) -> tuple[Target, int | None]:
    """What ``model_uri`` deploys, and the version registered for it (a runs:/ URI) if one was."""
    uri = model_uri.strip()
    if (found := _MODELS_URI.match(uri)) is not None:
        _same_model(name, found["model"], uri)
        if found["alias"] is not None:
            with mlflow_errors():
                return Target.of_alias(found["alias"]), None
        if not found["version"].isdigit():
            raise refused(f"{uri}: ferry deploys a version number or an alias, not {found['version']!r}: a stage "
                           "or 'latest' does not pin one version", f"give {URI_FORMS}")
        with mlflow_errors():
            return Target.of_version(int(found["version"]), force=force), None
    if (found := _RUNS_URI.match(uri)) is not None:
        version = register_run(ferry, name, found["run_id"], found["path"])
        with mlflow_errors():
            return Target.of_version(version, force=force), version
    raise refused(f"ferry deploys registered versions of a model; {model_uri!r} is not one of {URI_FORMS}",
                   "register it first: MlflowClient().create_model_version(name, source, run_id)")


def register_run(ferry: Services, name: str, run_id: str, path: str) -> int:
    """The version of ``name`` registered from ``runs:/<run_id>/<path>``: an existing one, else a new one.

    The artifacts are checked first (model.onnx must be there), so a URI ferry cannot deploy registers nothing.
    """
    source = f"runs:/{run_id}/{path}"
    with mlflow_errors():
        client = ferry.registry.client
    existing = [int(v.version) for v in client.search_model_versions(f"name='{name}' and run_id='{run_id}'")
                if (v.source or "").rstrip("/") == source]
    if existing:
        return max(existing)
    _check_run_artifacts(ferry, source)
    try:
        client.get_registered_model(name)
    except MlflowException as error:
        if error.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        client.create_registered_model(name)
    version = client.create_model_version(name, source=source, run_id=run_id)
    _wait_registered(client, name, str(version.version))
    _logger.info("registered %s as %s v%s", source, name, version.version)
    return int(version.version)


def _check_run_artifacts(ferry: Services, source: str) -> None:
    from mlflow.artifacts import list_artifacts

    try:
        names = sorted(os.path.basename(f.path) for f in list_artifacts(artifact_uri=source,
                                                                        tracking_uri=ferry.settings.tracking_uri))
    except Exception as error:  # MLflow's client raises any type
        raise refused(f"cannot list the artifacts of {source} in MLflow at {ferry.settings.tracking_uri}: {error}",
                       code=RESOURCE_DOES_NOT_EXIST) from error
    if "model.onnx" not in names:
        raise refused(f"{source} holds no model.onnx (it has {', '.join(names) or 'nothing'}): nothing was "
                       "registered", "log the model with ferry.publish.log_onnx_model and give its URI")


def _wait_registered(client: Any, name: str, version: str) -> None:
    """A tracking server may register asynchronously: wait (bounded) until the version is READY."""
    deadline = time.monotonic() + REGISTRATION_TIMEOUT_S
    while (status := str(client.get_model_version(name, version).status)) != "READY":
        if status == "FAILED_REGISTRATION" or time.monotonic() > deadline:
            raise refused(f"MLflow did not register {name} v{version} (status {status})", code=INVALID_STATE)
        time.sleep(0.5)
