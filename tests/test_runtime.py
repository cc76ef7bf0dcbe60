"""The local Triton launcher and the config renderer."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

import onnx
import pytest

from conftest import World, make_settings
from ferry.core.config import load_settings
from ferry.core.errors import FerryError
from ferry.core.model_config import (
    build_config,
    config_signature,
    from_pbtxt,
    onnx_signature,
    signature_mismatches,
    to_pbtxt,
    with_versions,
)
from ferry.core.triton import Triton, TritonError
from ferry.runtime import server


def test_up_is_idempotent_and_down_stops_everything(tmp_path: Path) -> None:
    settings = make_settings(tmp_path)
    first = server.up(settings)
    try:
        assert first.running and first.ready
        assert server.up(settings).pid == first.pid, "a second `up` must not start a second server"
    finally:
        assert server.down(settings)
    after = server.status(settings)
    assert not after.running and not after.ready
    assert not list(Path("/dev/shm").glob(f"{server.shm_prefix(settings)}*")), "shared memory left behind"
    with pytest.raises(ProcessLookupError):
        os.kill(first.pid, 0)


def test_up_refuses_a_port_another_server_holds(world: World, tmp_path: Path) -> None:
    intruder = make_settings(tmp_path / "other").with_overrides(triton_url=world.settings.triton.urls)
    with pytest.raises(FerryError, match="another server already answers"):
        server.up(intruder)


def test_model_control_needs_the_key_and_every_port_is_on_loopback(world: World) -> None:
    settings = world.settings
    key_file = settings.triton_api_key_file
    assert key_file.stat().st_mode & 0o777 == 0o600, "the generated key must be readable by its owner only"
    world.register()
    assert world.deploy().outcome == "committed"  # ferry sends the key

    keyless = Triton(settings.triton.urls)
    with pytest.raises(TritonError, match="FERRY_TRITON_API_KEY") as refused:
        keyless.unload(world.model)
    assert "restricted" in refused.value.message or "authorized" in refused.value.message.lower()
    wrong = world.deploy(triton_api_key="not-the-key")
    assert wrong.outcome == "rejected" and "FERRY_TRITON_API_KEY" in wrong.hint
    assert keyless.version_ready(world.model, 1), "inference and health stay open; only model control needs the key"
    assert world.ferry.triton.ready_versions(world.model) == [1]

    listening = _listening_addresses()
    ports = (settings.triton.endpoint.port, settings.triton.endpoint.port + 1, settings.triton.endpoint.port + 2)
    assert all(port in listening and listening[port].is_loopback for port in ports), listening


def _listening_addresses() -> dict[int, ipaddress.IPv4Address | ipaddress.IPv6Address]:
    """port -> address of every listening TCP socket on this machine, from /proc/net/tcp and tcp6."""
    found = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            local, state = line.split()[1], line.split()[3]
            if state != "0A":  # LISTEN
                continue
            address, port = local.split(":")
            raw = bytes.fromhex(address)  # 32-bit words in host (little-endian) order
            ip = ipaddress.ip_address(b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4)))
            found[int(port, 16)] = getattr(ip, "ipv4_mapped", None) or ip
    return found


def _iris_signature(world: World):
    world.register()
    [onnx_path] = Path(world.settings.home).rglob("model.onnx")
    return onnx_signature(onnx.load(str(onnx_path)))


def test_config_renders_for_both_runtimes(world: World) -> None:
    signature = _iris_signature(world)
    python = from_pbtxt(to_pbtxt(with_versions(build_config("iris", signature, "python"), [3])))
    assert python.backend == "python" and list(python.version_policy.specific.versions) == [3]
    ort = from_pbtxt(to_pbtxt(build_config("iris", signature, "onnxruntime")))
    assert ort.platform == "onnxruntime_onnx" and ort.default_model_filename == "model.onnx"
    assert signature_mismatches(signature, config_signature(ort)) == []


def test_signature_mismatch_names_each_difference(world: World) -> None:
    signature = _iris_signature(world)
    config = build_config("iris", signature, "python")
    config.output[1].dims[1] = 4
    config.input[0].name = "features"
    problems = signature_mismatches(signature, config_signature(config))
    assert "input 'features' is missing" in problems
    assert "input 'X' is not in the config" in problems
    assert "output is probabilities FP32[-1, 3], the config says probabilities FP32[-1, 4]" in problems


def test_settings_come_from_the_environment_and_refuse_bad_values(tmp_path: Path) -> None:
    settings = load_settings({"FERRY_HOME": str(tmp_path), "FERRY_LOAD_TIMEOUT_S": "7", "FERRY_RUNTIME": "onnxruntime"})
    assert settings.repository == tmp_path / "repository" and settings.triton.load_timeout_s == 7.0
    assert settings.tracking_uri == f"sqlite:///{tmp_path / 'mlflow.db'}"
    with pytest.raises(FerryError, match="FERRY_RUNTIME"):
        load_settings({"FERRY_HOME": str(tmp_path), "FERRY_RUNTIME": "tensorrt"})
    with pytest.raises(FerryError, match="FERRY_LOAD_TIMEOUT_S='soon' is not a number"):
        load_settings({"FERRY_HOME": str(tmp_path), "FERRY_LOAD_TIMEOUT_S": "soon"})


@pytest.mark.parametrize("breakage", ["none", "unknown-op", "output-shape", "golden-mismatch"])
def test_signature_read_from_the_file_matches_a_full_parse(world: World, breakage: str) -> None:
    from ferry.core.model_config import read_onnx_signature

    world.register(breakage)
    [path] = Path(world.settings.home).rglob("model.onnx")
    assert read_onnx_signature(path) == onnx_signature(onnx.load(str(path)))


def test_signature_reader_refuses_what_is_not_onnx(tmp_path: Path) -> None:
    from ferry.core.model_config import NotOnnx, read_onnx_signature

    cases = {"empty": b"", "random": os.urandom(4096), "text": b"<html>not a model</html>"}
    for name, content in cases.items():
        (tmp_path / name).write_bytes(content)
        with pytest.raises(NotOnnx, match="is not a valid ONNX model"):
            read_onnx_signature(tmp_path / name)


def test_a_batching_config_is_compared_with_its_batch_dimension(world: World) -> None:
    signature = _iris_signature(world)
    config = build_config("iris", signature, "python")
    config.max_batch_size = 8
    for tensor in [*config.input, *config.output]:
        del tensor.dims[0]  # with batching on, Triton's dims leave the batch dimension out
    assert config_signature(config) == signature
    assert signature_mismatches(signature, config_signature(config)) == []
