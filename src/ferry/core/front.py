"""The front: how Triton itself sends clients that name no version to the committed version only.

Each served model is a front and one store per loaded version, all over the same directory:

    <model>              the front: an ensemble of one step, loaded from a config override, whose only
                         version is the committed version N and whose step pins ``<model>.versions.N`` vN
    <model>.versions.N   version N's store: version N alone, under its own config (any backend), found
                         through the link <repository>/<model>.versions.N -> <model>

A version's config travels with it, so each version is its own Triton model: a candidate is loaded,
with its config, beside the active version, whose store (and config) nothing touches; a client of
``<model>`` (with no version, or naming N) never reaches it, since the front has one version. The
commit repoints the front (a few milliseconds: it holds no weights) and only then unloads the store of
the version it no longer needs (Triton drains it).

A load of the front makes Triton poll the store it names from disk, and reload it from config.pbtxt if
anything in the directory is newer than the store's last load: every change of the front is therefore
preceded by a load of that store with its override (an in-place update when nothing changed), and
config.pbtxt, which names no model so that every name can read it, is written after the loads.
"""

from __future__ import annotations

import re

from ferry.core.model_config import model_config_pb2, with_versions

STORE_SUFFIX = ".versions"
FRONT_FILE = "FRONT"  # the one file of the front's version folder (Triton needs the folder; an ensemble no files)
_STORE_NAME = re.compile(r"(?P<model>.+)\.versions\.(?P<version>[0-9]+)")


def store_name(model: str, version: int) -> str:
    """The Triton name of the store of ``model``'s version ``version``."""
    return f"{model}{STORE_SUFFIX}.{version}"


def legacy_store_name(model: str) -> str:
    """The one store of every version that earlier releases of ferry loaded (one config for all)."""
    return model + STORE_SUFFIX


def parse_store_name(name: str) -> tuple[str, int] | None:
    """The model and version a store's Triton name stands for; None if it is not a store's."""
    match = _STORE_NAME.fullmatch(name)
    return (match["model"], int(match["version"])) if match else None


def store_config(config: model_config_pb2.ModelConfig, model: str, version: int) -> model_config_pb2.ModelConfig:
    """Version ``version``'s config as its store loads it."""
    pinned = with_versions(config, [version])
    pinned.name = store_name(model, version)
    return pinned


def disk_config(config: model_config_pb2.ModelConfig, versions: list[int]) -> model_config_pb2.ModelConfig:
    """config.pbtxt as written to disk: no name, so that the model directory and its links all accept it."""
    pinned = with_versions(config, versions)
    pinned.ClearField("name")
    return pinned


def front_config(config: model_config_pb2.ModelConfig, model: str, version: int) -> model_config_pb2.ModelConfig:
    """An ensemble named ``model`` with the inputs and outputs of ``config``, serving ``version``'s store."""
    front = model_config_pb2.ModelConfig(name=model, platform="ensemble", max_batch_size=config.max_batch_size)
    for tensor in config.input:
        front.input.add(name=tensor.name, data_type=tensor.data_type, dims=tensor.dims, optional=tensor.optional)
    for out in config.output:
        front.output.add(name=out.name, data_type=out.data_type, dims=out.dims)
    step = front.ensemble_scheduling.step.add(model_name=store_name(model, version), model_version=version)
    for tensor in config.input:
        step.input_map[tensor.name] = tensor.name
    for out in config.output:
        step.output_map[out.name] = out.name
    front.version_policy.specific.versions[:] = [version]
    return front


def front_files(model: str, version: int) -> dict[str, bytes]:
    """The front's version folder, sent with its load (Triton keeps it in a temporary directory)."""
    text = f"front of {model}: serves {store_name(model, version)} v{version}\n"
    return {f"file:{version}/{FRONT_FILE}": text.encode()}
