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

from conftest import FAKES, World, _free_port_block, assert_invariants, make_settings, replica_settings
from ferry.core.current import read_current, read_history
from ferry.core.placement import retire
from ferry.runtime import server
from strict_json import loads

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
    assert down.returncode == 0 and loads(down.stdout) == {"stopped": True}


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
    assert result.returncode == 3, "Triton did not answer: retry later (the README's exit codes)"
    assert loads(result.stdout)[0]["drift"] == "unknown"
    table = serving_v1.cli("status")
    assert table.returncode == 3 and "unknown" in table.stdout and "unreachable" in table.stdout


def test_status_says_no_traffic_rather_than_nan(serving_v1: World) -> None:
    from ferry.runtime import server

    server.down(serving_v1.settings, grace_s=0)
    server.up(serving_v1.settings)
    assert serving_v1.cli("reconcile").returncode == 0  # loaded, never asked: Triton's p95 is NaN
    result = serving_v1.cli("status")
    assert result.returncode == 0 and "no traffic" in result.stdout and "nan" not in result.stdout
    as_json = serving_v1.cli("status", "iris", "--json")
    assert as_json.returncode == 0, as_json.stderr
    live = loads(as_json.stdout)[0]["live"]  # NaN is not JSON: a strict parser refuses it
    assert live["p95_ms"] is None and live["source"] == "triton (since load)", live


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
    assert none.returncode == 0 and loads(none.stdout) == []
    one = serving_v1.cli("history", "iris", "-n", "1", "--json")
    assert [r["outcome"] for r in loads(one.stdout)] == ["rolled_back"]
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
        retire(serving_v1.ferry.triton, "iris")  # front and store, as after a Triton restart, before reconcile
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


# ---------------------------------------------------------------- the README's exit codes, one row per code


@pytest.fixture
def empty_prometheus() -> Iterator[str]:
    """A Prometheus API that answers every query with no series (a Prometheus that never scraped Triton)."""
    class Empty(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = json.dumps({"status": "success", "data": {"resultType": "matrix", "result": []}}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Empty)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def _invoke(world: World, *args: str, **env: str) -> tuple[int, str]:
    """The command line in this process (each subprocess would import MLflow again): exit code and output."""
    import signal

    from typer.testing import CliRunner

    from ferry.adapters.cli import app

    handlers = {stop: signal.getsignal(stop) for stop in (signal.SIGINT, signal.SIGTERM)}  # deploy changes them
    try:
        result = CliRunner().invoke(app, list(args), env={**world.env(), **env})
    finally:
        for stop, handler in handlers.items():
            signal.signal(stop, handler)
    crash = result.exception if not isinstance(result.exception, SystemExit) else None
    assert crash is None, f"ferry {' '.join(args)} raised {crash!r}"
    return result.exit_code, result.output


def test_every_command_family_exits_as_the_readme_table_says(world: World, tmp_path: Path,
                                                             empty_prometheus: str) -> None:
    """0 done; 1 rolled back, or a problem found (drift, a replica not fixed, no data); 2 refused, bad input,
    nothing changed; 3 MLflow, Triton or Prometheus did not answer, nothing changed."""
    triton_down = {"FERRY_TRITON_URL": f"http://127.0.0.1:{_free_port_block(1)}"}
    mlflow_down = {"MLFLOW_TRACKING_URI": UNREACHABLE_MLFLOW, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
                   "MLFLOW_HTTP_REQUEST_TIMEOUT": "2", "FERRY_WRITEBACK_TIMEOUT_S": "2"}
    other_registry = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'another-registry.db'}"}
    model_dir, rows = world.model_dir, []

    def row(family: str, expected: int, *args: str, **env: str) -> str:
        code, output = _invoke(world, *args, **env)
        rows.append((family, expected, code, " ".join(args), output.strip().splitlines()[:2]))
        return output

    world.register()
    row("deploy", 0, "deploy", "iris", "--alias", "champion")
    row("deploy", 2, "deploy", "iris", "--alias", "../x")
    row("deploy", 2, "deploy", "iris", "--alias", "nope")
    row("deploy", 3, "deploy", "iris", "--alias", "champion", **mlflow_down)
    row("deploy", 3, "deploy", "iris", "--alias", "champion", **triton_down)
    world.register("golden-mismatch")
    row("deploy", 1, "deploy", "iris", "--alias", "champion")
    world.register(trees=3)
    hand_made = model_dir.version_dir(3)
    hand_made.mkdir()
    (hand_made / "model.onnx").write_bytes(b"copied here by hand")
    refused = row("deploy", 2, "deploy", "iris", "--alias", "champion")
    assert "holds no ferry manifest" in refused and "rollback" not in refused, refused
    assert read_history(model_dir)[-1]["outcome"] == "rejected", "refused, not rolled back"
    assert (hand_made / "model.onnx").read_bytes() == b"copied here by hand" and not list(
        model_dir.quarantine_root.glob("3.*")), "the directory is left untouched"
    hand_made.joinpath("model.onnx").unlink()
    hand_made.rmdir()

    row("rollback", 0, "rollback", "iris", "--to", "1")  # already active and served: nothing to do
    row("rollback", 2, "rollback", "iris")  # no previous version recorded
    row("rollback", 2, "rollback", "iris", "--to", "2")  # its last deploy failed: needs --force
    row("rollback", 1, "rollback", "iris", "--to", "2", "--force")
    row("rollback", 3, "rollback", "iris", "--to", "1", **triton_down)

    row("status", 0, "status", "iris", "--json")
    row("status", 2, "status", "zzz")
    row("status", 3, "status", "iris", "--json", **triton_down)
    world.ferry.triton.unload("iris")
    row("status", 1, "status", "iris")
    row("reconcile", 1, "reconcile", "iris", **triton_down)  # a replica it could not fix, whatever the cause
    row("reconcile", 2, "reconcile", "zzz")
    row("reconcile", 0, "reconcile", "iris")

    row("history", 0, "history", "iris", "--json")
    row("history", 2, "history", "zzz")
    row("history", 2, "history", "iris", "-n", "-1")

    row("sync", 0, "sync", "iris", "--json")
    row("sync", 1, "sync", "iris", **other_registry)
    row("sync", 2, "sync", "zzz")
    row("sync", 3, "sync", "iris", **mlflow_down)

    (world.settings.repository / "other").mkdir()
    (world.settings.repository / "other" / "config.pbtxt").write_text('name: "other"\n')
    row("adopt", 2, "adopt", "iris")  # already ferry's
    row("adopt", 2, "adopt", "other")  # nothing serves it and nothing says which version
    row("adopt", 3, "adopt", "other", **triton_down)

    row("recover", 0, "recover", "iris")
    row("recover", 2, "recover", "zzz")
    row("rollout", 0, "rollout", "status", "iris", "--json")
    row("rollout", 2, "rollout", "promote", "iris")
    row("report", 1, "report", "iris", "--out", str(tmp_path / "r.png"), FERRY_PROMETHEUS_URL=empty_prometheus)
    row("report", 2, "report", "iris", "--out", str(tmp_path / "r.png"))
    row("report", 3, "report", "iris", "--out", str(tmp_path / "r.png"), FERRY_PROMETHEUS_URL=UNREACHABLE_MLFLOW)
    row("triton", 0, "triton", "status")
    row("triton", 1, "triton", "status", **triton_down)

    wrong = [f"{family:<9} wanted {want}, got {got}: ferry {args}  {out}" for family, want, got, args, out in rows
             if want != got]
    assert not wrong, "\n".join(wrong)
    assert not (tmp_path / "r.png").exists(), "no data, no PNG"
    families = {family for family, *_ in rows}
    assert {code for family, code, *_ in rows if family in ("deploy", "rollback", "status")} == {0, 1, 2, 3}
    assert len(families) == 11
    assert_invariants(world, attempts=len(read_history(model_dir)))


def test_sync_against_another_registry_says_not_in_sync(serving_v1: World, tmp_path: Path) -> None:
    result = serving_v1.cli("sync", "iris", MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'another.db'}")
    _no_traceback(result)
    assert result.returncode == 1, result.stdout + result.stderr
    assert "already in sync" not in result.stdout and "NOT in sync" in result.stdout
    assert "does not have v1, @serving of 'iris'" in result.stdout
    again = serving_v1.cli("sync", "iris", "--json")
    assert again.returncode == 0 and loads(again.stdout)[0]["in_sync"] is True, again.stdout + again.stderr


# ---------------------------------------------------------------- a fleet set up as the README says


def test_replicas_started_with_their_own_ferry_home_share_the_repositorys_key(tmp_path: Path) -> None:
    """Three `ferry triton up` (here two), each with its own FERRY_HOME, on one shared FERRY_REPOSITORY and no
    FERRY_TRITON_API_KEY: a controller with yet another FERRY_HOME deploys to every replica."""
    urls = ",".join(f"http://127.0.0.1:{_free_port_block()}" for _ in range(2))
    settings = make_settings(tmp_path, triton_url=urls)
    world = World(settings)
    replicas = replica_settings(settings)
    env = {k: v for k, v in os.environ.items() if k != "FERRY_TRITON_API_KEY"}
    try:
        for replica in replicas:
            started = subprocess.run(
                [sys.executable, "-m", "ferry", "triton", "up"], capture_output=True, text=True, timeout=120,
                env={**env, "FERRY_HOME": str(replica.home), "FERRY_REPOSITORY": str(settings.repository),
                     "FERRY_TRITON_URL": replica.triton.urls})
            assert started.returncode == 0, started.stderr
        key_file = settings.repository / ".ferry" / "triton-api-key"
        assert key_file.stat().st_mode & 0o777 == 0o600
        world.register()
        controller = {"FERRY_HOME": str(tmp_path / "controller")}
        deployed = world.cli("deploy", "iris", "--alias", "champion", **controller)
        assert deployed.returncode == 0, deployed.stderr
        assert "committed iris v1" in deployed.stdout
        assert_invariants(world, attempts=1)
    finally:
        for replica in replicas:
            server.down(replica, grace_s=0)
    assert read_current(world.model_dir).active_version == 1
