"""Settings, names, URLs, the ONNX signature reader and the history: the inputs somebody else wrote."""

from __future__ import annotations

from pathlib import Path

import pytest

from ferry.core.config import Endpoint, load_settings, parse_endpoint
from ferry.core.current import read_history
from ferry.core.errors import InvalidInput
from ferry.core.model_config import NotOnnx, read_onnx_signature, shape_fits
from ferry.core.repository import ModelDir


@pytest.mark.parametrize(("url", "endpoint"), [
    ("http://127.0.0.1:8000", Endpoint("127.0.0.1", 8000)),
    ("http://127.0.0.1", Endpoint("127.0.0.1", 8000)),
    ("http://triton", Endpoint("triton", 8000)),
    ("triton:9000", Endpoint("triton", 9000)),
    ("http://[::1]:8000/", Endpoint("::1", 8000)),
])
def test_a_triton_url_is_parsed_the_same_everywhere(url: str, endpoint: Endpoint) -> None:
    assert parse_endpoint(url) == endpoint
    settings = load_settings({"FERRY_TRITON_URL": url, "FERRY_HOME": "/tmp/x"})
    assert settings.triton == endpoint and settings.triton_http_port == endpoint.port
    assert settings.triton_metrics_url == f"{endpoint.with_port(endpoint.port + 2).url}/metrics"


@pytest.mark.parametrize(("url", "message"), [
    ("https://triton:8000", "uses https://, which ferry does not speak"),
    ("ftp://triton:8000", "uses ftp://"),
    ("http://triton:99999", "no valid port"),
    ("http://triton:8000/v2", "not a plain http://HOST:PORT"),
    ("http://:8000", "not a plain http://HOST:PORT"),
    ("http://a b:8000", "not a plain http://HOST:PORT"),
])
def test_a_triton_url_ferry_cannot_use_is_refused_with_the_reason(url: str, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        load_settings({"FERRY_TRITON_URL": url, "FERRY_HOME": "/tmp/x"})


@pytest.mark.parametrize(("variable", "value", "message"), [
    ("FERRY_GATEWAY_PORT", "99999", "is not a TCP port"),
    ("FERRY_LOAD_TIMEOUT_S", "soon", "is not a valid float"),
    ("FERRY_RUNTIME", "tensorrt", "unknown runtime"),
    ("FERRY_LOAD_TIMEOUT_S", "0", "must be more than 0"),
    ("FERRY_WATCH_PORT", "70000", "is not a TCP port"),
    ("FERRY_TRITON_TIMEOUT_S", "inf", "is not a finite number"),
    ("FERRY_RTOL", "nan", "is not a finite number"),
    ("FERRY_RTOL", "-1", "must be 0 or more"),
    ("FERRY_ATOL", "-0.5", "must be 0 or more"),
    ("FERRY_LOCK_WAIT_S", "-1", "must be 0 or more"),
    ("FERRY_KEEP_PREVIOUS_S", "-1", "must be 0 or more"),
    ("FERRY_QUARANTINE_KEEP", "-2", "must be 0 or more"),
    ("FERRY_GATE_MIN_AGREEMENT", "1.5", "must be from 0 to 1"),
])
def test_bad_settings_are_refused(variable: str, value: str, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        load_settings({variable: value, "FERRY_HOME": "/tmp/x"})


@pytest.mark.parametrize(("change", "message"), [
    ({"triton_url": "https://triton:8000"}, "uses https://"),
    ({"runtime": "tensorrt"}, "unknown runtime"),
    ({"gateway_max_elements": 0}, "lets no request through"),
    ({"ready_timeout_s": -1.0}, "must be more than 0"),
])
def test_settings_changed_in_code_are_checked_as_loaded_ones_are(change: dict[str, object], message: str) -> None:
    settings = load_settings({"FERRY_HOME": "/tmp/x"})
    with pytest.raises(InvalidInput, match=message):
        settings.with_overrides(**change)


@pytest.mark.parametrize("name", ["../etc", "a/b", "..", "", ".hidden", "x" * 200, "a..b", "iris\n", "iris\r"])
def test_names_that_could_leave_the_repository_are_refused(name: str, tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="not a valid name"):
        ModelDir(tmp_path, name)


@pytest.mark.parametrize("name", ["iris.versions", "iris.versions.3"])
def test_a_name_that_would_be_a_models_store_is_refused(name: str, tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="version store"):
        ModelDir(tmp_path, name)
    assert ModelDir(tmp_path, "iris.versions.x").model == "iris.versions.x", "only a number makes it a store's"


@pytest.mark.parametrize("content", [b"", b"\x00" * 10, b"\xff" * 64, b"\x0a\x05hello", b"not onnx at all"])
def test_bytes_that_are_not_onnx_raise_one_error(content: bytes, tmp_path: Path) -> None:
    path = tmp_path / "model.onnx"
    path.write_bytes(content)
    with pytest.raises(NotOnnx, match="is not a valid ONNX model"):
        read_onnx_signature(path)


@pytest.mark.parametrize(("shape", "dims", "fits"), [
    ([1, 4], (-1, 4), True), ([7, 4], (-1, 4), True), ([1, 5], (-1, 4), False), ([4], (-1, 4), False),
    ([1, -1], (-1, 4), False), ([1.0, 4], (-1, 4), False), ([True, 4], (-1, 4), False), ("14", (-1, 4), False),
])
def test_the_one_shape_rule(shape: object, dims: tuple[int, ...], fits: bool) -> None:
    assert shape_fits(shape, dims) is fits


def test_history_limits_and_damaged_lines(tmp_path: Path) -> None:
    model_dir = ModelDir(tmp_path, "iris")
    model_dir.state_dir.mkdir(parents=True)
    model_dir.history_path.write_text('{"n": 1}\n{"n": 2}\nnot json\n5\n{"n": 3}\n')
    assert [r["n"] for r in read_history(model_dir)] == [1, 2, 3]
    assert [r["n"] for r in read_history(model_dir, 2)] == [2, 3]
    assert read_history(model_dir, 0) == []


def test_the_typed_history_skips_lines_that_are_not_attempts(tmp_path: Path) -> None:
    from ferry.core.current import find_attempt, read_attempts
    from ferry.core.records import DeployReport, Kind, Outcome

    model_dir = ModelDir(tmp_path, "iris")
    model_dir.state_dir.mkdir(parents=True)
    good = [DeployReport(deploy_id=f"d{i}", model="iris", kind=Kind.DEPLOY, target="@champion",
                         outcome=Outcome.COMMITTED, version=i) for i in (1, 2)]
    lines = [good[0].model_dump_json(), '{"n": 1}', "not json", good[1].model_dump_json(), '{"outcome": "won"}']
    model_dir.history_path.write_text("\n".join(lines) + "\n")
    assert read_attempts(model_dir) == good and read_attempts(model_dir, 1) == good[1:]
    assert find_attempt(model_dir, "d1") == good[0] and find_attempt(model_dir, "d9") is None
