"""The front: how Triton itself sends clients that name no version to the committed version only.

Each served model is two Triton models over the same directory:

    <model>            the front: an ensemble of one step, loaded from a config override, whose only
                       version is the committed version N and whose step pins ``<model>.versions`` vN
    <model>.versions   the version store: the model's own config (any backend) over every version
                       ferry loaded, found through the link <repository>/<model>.versions -> <model>

A candidate is loaded into the version store beside the active version, so a client of ``<model>``
(with no version, or naming N) never reaches it: Triton sends unversioned requests to the highest
loaded version of the model they name, and the front has one. The commit repoints the front (a few
milliseconds: it holds no weights) and only then lets the store drop what it no longer needs.

A load of the front makes Triton poll the store from disk, and reload it from config.pbtxt if anything
in the directory is newer than the store's last load: every change of the front is therefore preceded by
a load of the store with its override (an in-place update when nothing changed), and config.pbtxt, which
names no model so that both names can read it, is written after the loads.
"""

from __future__ import annotations

from ferry.core.model_config import model_config_pb2, with_versions

STORE_SUFFIX = ".versions"
FRONT_FILE = "FRONT"  # the one file of the front's version folder (Triton needs the folder; an ensemble no files)


def store_name(model: str) -> str:
    """The Triton name of the model's version store."""
    return model + STORE_SUFFIX


def store_config(config: model_config_pb2.ModelConfig, model: str,
                 versions: list[int]) -> model_config_pb2.ModelConfig:
    """The model's config as the version store loads it, holding ``versions``."""
    pinned = with_versions(config, versions)
    pinned.name = store_name(model)
    return pinned


def disk_config(config: model_config_pb2.ModelConfig, versions: list[int]) -> model_config_pb2.ModelConfig:
    """config.pbtxt as written to disk: no name, so that the model directory and its link both accept it."""
    pinned = with_versions(config, versions)
    pinned.ClearField("name")
    return pinned


def front_config(config: model_config_pb2.ModelConfig, model: str, version: int) -> model_config_pb2.ModelConfig:
    """An ensemble named ``model`` with the inputs and outputs of ``config``, serving ``version`` of the store."""
    front = model_config_pb2.ModelConfig(name=model, platform="ensemble", max_batch_size=config.max_batch_size)
    for tensor in config.input:
        front.input.add(name=tensor.name, data_type=tensor.data_type, dims=tensor.dims, optional=tensor.optional)
    for out in config.output:
        front.output.add(name=out.name, data_type=out.data_type, dims=out.dims)
    step = front.ensemble_scheduling.step.add(model_name=store_name(model), model_version=version)
    for tensor in config.input:
        step.input_map[tensor.name] = tensor.name
    for out in config.output:
        step.output_map[out.name] = out.name
    front.version_policy.specific.versions[:] = [version]
    return front


def front_files(model: str, version: int) -> dict[str, bytes]:
    """The front's version folder, sent with its load (Triton keeps it in a temporary directory)."""
    return {f"file:{version}/{FRONT_FILE}": f"front of {model}: serves {store_name(model)} v{version}\n".encode()}
