"""What a new user meets with the README in hand: every rough edge found that way, at the command line."""

from __future__ import annotations

import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from conftest import FAKES, World, _free_port_block, assert_invariants
from ferry.core.current import read_history

UNREACHABLE_MLFLOW = "http://127.0.0.1:9"  # the discard port: nothing answers there


@pytest.fixture
def serving_v1(world: World) -> World:
    world.register()
    assert world.deploy().outcome == "committed"
    return world


def _no_traceback(result: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in result.stderr, result.stderr[-2000:]


def test_a_triton_url_without_a_port_means_8000_everywhere(serving_v1: World) -> None:
    port_less = {"FERRY_TRITON_URL": "http://127.0.0.1"}
    for args in (["status"], ["status", "iris", "--json"], ["triton", "status"], ["reconcile", "iris"]):
        result = serving_v1.cli(*args, **port_less)
        _no_traceback(result)
        assert result.returncode != 0 and "127.0.0.1:8000" in result.stdout + result.stderr, args


@pytest.mark.parametrize("url", ["https://127.0.0.1:8000", "ftp://127.0.0.1:8000", "http://127.0.0.1:99999"])
def test_a_triton_url_ferry_cannot_use_is_refused(serving_v1: World, url: str) -> None:
    result = serving_v1.cli("deploy", "iris", "--alias", "champion", FERRY_TRITON_URL=url)
    _no_traceback(result)
    assert result.returncode == 2 and "FERRY_TRITON_URL" in result.stderr


def test_the_exporter_answers_every_scrape(serving_v1: World) -> None:
    """prometheus_client serves each scrape on a new thread; Triton's HTTP client is bound to its thread."""
    port = _free_port_block(1)
    exporter = subprocess.Popen([sys.executable, "-m", "ferry", "exporter", "--port", str(port)],
                                env={**os.environ, **serving_v1.env()}, stdout=subprocess.DEVNULL)
    try:
        url, deadline = f"http://127.0.0.1:{port}/metrics", time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                httpx.get(url, timeout=5)
                break
            except httpx.TransportError:
                time.sleep(0.2)
        answers = [httpx.get(url, timeout=10) for _ in range(50)]
        assert [a.status_code for a in answers] == [200] * 50
        assert all('ferry_triton_reachable{replica=' in a.text and '} 1.0' in a.text for a in answers)
    finally:
        exporter.terminate()
        exporter.wait(timeout=10)


def test_metrics_textfile_into_a_missing_folder_says_so(serving_v1: World, tmp_path: Path) -> None:
    result = serving_v1.cli("metrics", "--textfile", str(tmp_path / "missing" / "ferry.prom"))
    _no_traceback(result)
    assert result.returncode == 2 and "does not exist" in result.stderr
    written = serving_v1.cli("metrics", "--textfile", str(tmp_path / "ferry.prom"))
    assert written.returncode == 0 and 'ferry_active_version{model="iris"} 1.0' in (tmp_path / "ferry.prom").read_text()


def test_redeploying_the_active_version_after_a_triton_restart_serves_it(serving_v1: World) -> None:
    from ferry.runtime import server

    server.down(serving_v1.settings, grace_s=0)
    server.up(serving_v1.settings)
    assert serving_v1.ferry.triton.ready_versions("iris") == []
    result = serving_v1.cli("deploy", "iris", "--alias", "champion")
    assert result.returncode == 0, result.stderr
    assert "v1 is already active: proven and served again" in result.stdout
    assert_invariants(serving_v1, attempts=2)


def test_triton_up_with_a_port_taken_fails_with_that_reason(tmp_path: Path) -> None:
    base = _free_port_block()
    env = {**os.environ, "FERRY_HOME": str(tmp_path), "FERRY_TRITON_URL": f"http://127.0.0.1:{base}"}
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", base + 2))  # the metrics port
        taken.listen()
        result = subprocess.run([sys.executable, "-m", "ferry", "triton", "up"], env=env, capture_output=True,
                                text=True, timeout=60)
    _no_traceback(result)
    assert result.returncode == 2 and f"port {base + 2} on 127.0.0.1 (metrics, for Triton) is in use" in result.stderr
    assert len(result.stderr.splitlines()) <= 2, "one line and a hint, not Triton's config table"
    status = subprocess.run([sys.executable, "-m", "ferry", "triton", "status"], env=env, capture_output=True,
                            text=True, timeout=60)
    assert status.returncode == 1 and "running: False" in status.stdout


def test_triton_up_twice_says_already_running_and_down_speaks_json(world: World) -> None:
    again = world.cli("triton", "up")
    assert again.returncode == 0 and "already running" in again.stdout
    down = world.cli("triton", "down", "--json")
    assert down.returncode == 0 and json.loads(down.stdout) == {"stopped": True}


def test_rollback_to_a_kept_version_works_with_mlflow_down(serving_v1: World) -> None:
    serving_v1.register(trees=3)
    assert serving_v1.deploy().outcome == "committed"
    result = serving_v1.cli("rollback", "iris", MLFLOW_TRACKING_URI=UNREACHABLE_MLFLOW)
    assert result.returncode == 0, result.stderr
    assert "committed iris v1 (was v2)" in result.stdout
    assert_invariants(serving_v1, attempts=3)


def test_rollback_to_a_version_that_failed_needs_force(serving_v1: World) -> None:
    serving_v1.register("golden-mismatch")
    assert serving_v1.deploy().outcome == "rolled_back"
    refused = serving_v1.cli("rollback", "iris", "--to", "2")
    assert refused.returncode == 2 and "v2 failed its last deploy" in refused.stderr and "--force" in refused.stderr
    forced = serving_v1.cli("rollback", "iris", "--to", "2", "--force")
    assert forced.returncode == 1 and "failed at smoke" in forced.stderr
    assert_invariants(serving_v1, attempts=4)


def test_a_load_failure_is_one_line_and_the_stack_is_kept_in_the_records(serving_v1: World) -> None:
    serving_v1.register("unknown-op")
    result = serving_v1.cli("deploy", "iris", "--alias", "champion")
    assert result.returncode == 1
    [failed] = [line for line in result.stderr.splitlines() if line.startswith("failed at load")]
    assert "is not a registered function/op" in failed
    assert "At:" not in result.stderr and "At:" not in result.stdout
    record = read_history(serving_v1.model_dir)[-1]
    assert "\n" not in record["error"]
    assert_invariants(serving_v1, attempts=2)


@pytest.fixture
def not_triton() -> Iterator[str]:
    """An HTTP server that is not Triton (answers 501 to POST), on the port where Triton is expected."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_something_else_on_tritons_port_is_named_as_such(serving_v1: World, not_triton: str) -> None:
    result = serving_v1.cli("status", "iris", FERRY_TRITON_URL=not_triton)
    _no_traceback(result)
    assert "is not Triton" in result.stderr and "<html" not in result.stderr.lower()
    assert "unknown" in result.stdout, "drift cannot be known when Triton cannot be asked"


@pytest.mark.parametrize("args", [("status", "zzz"), ("reconcile", "zzz"), ("rollback", "zzz"), ("history", "zzz"),
                                  ("recover", "zzz")])
def test_a_model_that_does_not_exist_is_named_and_nothing_is_left(serving_v1: World, args: tuple[str, ...]) -> None:
    result = serving_v1.cli(*args)
    _no_traceback(result)
    assert result.returncode == 2 and "no model 'zzz'" in result.stderr and "iris" in result.stderr
    assert not (serving_v1.settings.repository / ".ferry" / "zzz").exists()


def test_deploying_a_model_mlflow_does_not_know_leaves_nothing(serving_v1: World) -> None:
    result = serving_v1.cli("deploy", "nosuch", "--alias", "champion")
    assert result.returncode == 2 and "no model named 'nosuch' in MLflow" in result.stderr
    assert not (serving_v1.settings.repository / ".ferry" / "nosuch").exists()
    assert not (serving_v1.settings.repository / "nosuch").exists()


def test_status_says_drift_unknown_when_triton_is_down(serving_v1: World) -> None:
    serving_v1.cli("triton", "down")
    result = serving_v1.cli("status", "iris", "--json")
    assert result.returncode == 1 and json.loads(result.stdout)[0]["drift"] == "unknown"
    table = serving_v1.cli("status")
    assert "unknown" in table.stdout and "unreachable" in table.stdout


def test_status_says_no_traffic_rather_than_nan(serving_v1: World) -> None:
    from ferry.runtime import server

    server.down(serving_v1.settings, grace_s=0)
    server.up(serving_v1.settings)
    assert serving_v1.cli("reconcile").returncode == 0  # loaded, never asked: Triton's p95 is NaN
    result = serving_v1.cli("status")
    assert result.returncode == 0 and "no traffic" in result.stdout and "nan" not in result.stdout


def test_exit_codes_tell_bad_input_from_an_unreachable_dependency(serving_v1: World) -> None:
    bad = serving_v1.cli("deploy", "iris", "--alias", "../x")
    assert bad.returncode == 2 and "not a valid name" in bad.stderr
    mlflow_down = serving_v1.cli("deploy", "iris", "--alias", "champion", MLFLOW_TRACKING_URI=UNREACHABLE_MLFLOW,
                                 MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="2")
    assert mlflow_down.returncode == 3, mlflow_down.stderr
    triton_down = serving_v1.cli("deploy", "iris", "--alias", "champion",
                                 FERRY_TRITON_URL=f"http://127.0.0.1:{_free_port_block(1)}")
    assert triton_down.returncode == 3 and "not reachable" in triton_down.stderr


def test_a_bad_name_is_refused_before_mlflow_is_imported(serving_v1: World) -> None:
    probe = ("import sys; from typer.testing import CliRunner; from ferry.adapters.cli import app; "
             "r = CliRunner().invoke(app, ['deploy', 'iris', '--alias', '../x']); "
             "print(r.exit_code, 'mlflow' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", probe], env={**os.environ, **serving_v1.env()},
                            capture_output=True, text=True, timeout=60)
    assert result.stdout.split() == ["2", "False"], result.stdout + result.stderr


def test_history_limits(serving_v1: World) -> None:
    serving_v1.register("golden-mismatch")
    serving_v1.deploy()
    none = serving_v1.cli("history", "iris", "-n", "0", "--json")
    assert none.returncode == 0 and json.loads(none.stdout) == []
    one = serving_v1.cli("history", "iris", "-n", "1", "--json")
    assert [r["outcome"] for r in json.loads(one.stdout)] == ["rolled_back"]
    negative = serving_v1.cli("history", "iris", "-n", "-1")
    assert negative.returncode == 2 and "Input should be greater than or equal to 0" in negative.stderr
    table = serving_v1.cli("history", "iris")
    assert "…" in table.stdout, "a cut error says it was cut"


def test_the_gateway_refuses_a_port_that_is_not_one(serving_v1: World) -> None:
    result = serving_v1.cli("gateway", "--port", "99999", timeout_s=30)
    assert result.returncode == 2 and "'--port': Input should be less than or equal to 65535" in result.stderr


def test_the_gateway_says_503_for_a_committed_model_triton_does_not_serve(serving_v1: World) -> None:
    port = _free_port_block(1)
    gateway = subprocess.Popen([sys.executable, "-m", "ferry", "gateway", "--port", str(port)],
                               env={**os.environ, **serving_v1.env()}, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        serving_v1.ferry.triton.unload("iris")  # as after a Triton restart, before `ferry reconcile`
        time.sleep(0.5)
        body = {"inputs": [{"name": "X", "shape": [1, 4], "datatype": "FP32", "data": [5.1, 3.5, 1.4, 0.2]}]}
        reply = httpx.post(f"{url}/v2/models/iris/infer", json=body, timeout=10)
        assert reply.status_code == 503 and "ferry reconcile" in reply.json()["error"]
        predict = httpx.post(f"{url}/predict/iris", json={"inputs": {"X": [[5.1, 3.5, 1.4, 0.2]]}}, timeout=10)
        assert predict.status_code == 503 and "ferry reconcile" in predict.json()["error"]
        assert httpx.post(f"{url}/v2/models/nothing/infer", json=body, timeout=10).status_code == 404
    finally:
        gateway.terminate()
        gateway.wait(timeout=10)


def test_a_ctrl_c_after_the_commit_does_not_turn_it_into_a_failure(serving_v1: World) -> None:
    serving_v1.register(trees=3)
    result = serving_v1.cli("deploy", "iris", "--alias", "champion",
                            program=[sys.executable, str(FAKES / "fake_late_interrupt.py")])
    assert result.returncode == 0, result.stderr
    assert "committed iris v2" in result.stdout
    assert_invariants(serving_v1, attempts=2)
