"""Settings, names, URLs, the ONNX signature reader and the history: the inputs somebody else wrote."""

from __future__ import annotations

from pathlib import Path

import pytest

from ferry.core.addresses import Endpoint, parse_endpoint
from ferry.core.config import GatewaySettings, Settings, load_settings
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
    assert settings.triton.endpoint == endpoint
    assert settings.triton.metrics_url == f"{endpoint.with_port(endpoint.port + 2).url}/metrics"


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
    ("FERRY_LOAD_TIMEOUT_S", "soon", "FERRY_LOAD_TIMEOUT_S='soon' is not a number"),
    ("FERRY_LOAD_TIMEOUT_S", "", "FERRY_LOAD_TIMEOUT_S='' is not a number"),
    ("FERRY_GATEWAY_MAX_BODY_BYTES", str(2**31), "must be from 1 to 2147483647"),
    ("FERRY_QUARANTINE_KEEP", "1.5", "is not a whole number"),
    ("FERRY_RUNTIME", "tensorrt", "unknown runtime .*onnxruntime"),
    ("FERRY_GATEWAY_MAX_BODY_BYTES", "0", "must be from 1 to 2147483647"),
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


def test_settings_are_grouped_and_every_way_of_making_them_agrees(tmp_path: Path) -> None:
    config = tmp_path / "ferry.toml"
    config.write_text('[ferry]\nload_timeout_s = 7\n\n[ferry.gateway]\nport = 9090\ntoken = "t"\n')
    loaded = load_settings({"FERRY_HOME": "/tmp/x", "FERRY_CONFIG": str(config), "FERRY_GATE_FAILURES": "4"})
    assert (loaded.triton.load_timeout_s, loaded.gateway.port, loaded.gateway.token) == (7.0, 9090, "t")
    assert loaded.bake.failures == 4 and loaded.bake.min_requests == 100, "a group keeps the defaults not given"
    by_group = Settings(home="/tmp/x", repository="/tmp/x/repository", tracking_uri=loaded.tracking_uri,
                        triton={"load_timeout_s": 7}, gateway={"port": 9090, "token": "t"}, bake={"failures": 4})
    assert by_group == loaded == Settings(**loaded.flat())
    assert loaded.with_overrides(gateway_port=9091).gateway == loaded.gateway.model_copy(update={"port": 9091})


def test_a_setting_ferry_does_not_know_is_refused_however_it_comes(tmp_path: Path) -> None:
    settings = load_settings({"FERRY_HOME": "/tmp/x"})
    with pytest.raises(InvalidInput, match="unknown settings \\['gateway_prot'\\]"):
        settings.with_overrides(gateway_prot=1)
    with pytest.raises(InvalidInput, match=r"\[ferry\.gateway\] has no setting 'prot'"):
        Settings(home="/tmp/x", repository="/tmp/r", tracking_uri="sqlite://", gateway={"prot": 1})
    config = tmp_path / "ferry.toml"
    config.write_text("[ferry.gateway]\nprot = 1\n")
    with pytest.raises(InvalidInput, match=r"\[ferry\.gateway\] has no setting 'prot'"):
        load_settings({"FERRY_HOME": "/tmp/x", "FERRY_CONFIG": str(config)})


def test_an_empty_path_is_an_unset_one_however_it_is_given(tmp_path: Path) -> None:
    settings = load_settings({"FERRY_HOME": "/tmp/x", "FERRY_PYTHON_RUNNER": "", "FERRY_WATCH_SECRET_FILE": ""})
    assert settings.triton.python_runner is None and settings.watch.secret_file is None
    assert settings.with_overrides(python_runner="/r.py").with_overrides(python_runner="").triton.python_runner is None
    config = tmp_path / "ferry.toml"
    config.write_text('[ferry.triton]\npython_runner = ""\n')
    assert load_settings({"FERRY_HOME": "/tmp/x", "FERRY_CONFIG": str(config)}).triton.python_runner is None


def test_a_group_table_takes_flat_names_and_a_variable_still_wins(tmp_path: Path) -> None:
    config = tmp_path / "ferry.toml"
    config.write_text('[ferry.gateway]\ngateway_port = 9000\ngateway_token = 12345\n')
    loaded = load_settings({"FERRY_HOME": "/tmp/x", "FERRY_CONFIG": str(config), "FERRY_GATEWAY_PORT": "9100"})
    assert (loaded.gateway.port, loaded.gateway.token) == (9100, "12345"), "a TOML number is text where text is wanted"


@pytest.mark.parametrize(("text", "message"), [
    ("[ferry.gateway]\nload_timeout_s = 5\n", "no setting 'load_timeout_s' .*of \\[ferry.triton\\]"),
    ("ferry = 5\n", "'ferry' is not a table"),
    ("[ferry.triton]\nport = 9001\n", "\\[ferry.triton\\] has no setting 'port' .*gateway\\], \\[ferry.watch"),
    ("[ferry]\ngateway = 5\n", "gateway is a group of settings"),
    ("[ferry]\ngateway_port = true\n", "gateway_port = true .* is not a setting's value"),
    ("[ferry.gateway]\nport = true\n", "port = true is not a setting's value"),
    ("[ferry.gateway]\ngateway_port = 9000\nport = 9001\n", "gives 'port' twice"),
    ("\xff\xfe[ferry]\n", "cannot read config file"),
    ("[ferry.gateway]\nhost = \"\"\n", "FERRY_GATEWAY_HOST='' is empty"),
])
def test_a_config_file_in_the_wrong_shape_is_refused_saying_where(tmp_path: Path, text: str, message: str) -> None:
    config = tmp_path / "ferry.toml"
    config.write_bytes(text.encode("latin-1"))
    with pytest.raises(InvalidInput, match=message):
        load_settings({"FERRY_HOME": "/tmp/x", "FERRY_CONFIG": str(config)})


def test_a_group_made_alone_is_checked_as_the_whole_settings_are() -> None:
    with pytest.raises(InvalidInput, match="FERRY_GATEWAY_PORT=0 is not a TCP port"):
        GatewaySettings(port=0)


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
