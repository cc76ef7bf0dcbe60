"""`ferry watch` against a real MLflow tracking server and a real Triton (and, for the Airflow path, a real
`airflow standalone`): an alias set through MLflow's client deploys through the webhook, with the outcome
written back; hostile deliveries and stalled connections change nothing; polling catches a move made while
the watcher was down; an Airflow run is started once per delivery, with the model and alias in its conf."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from conftest import ROOT, World, make_settings
from ferry.adapters.watch import (
    Trigger,
    TriggerLog,
    Watch,
    build_app,
    dag_run_id,
    read_or_create_secret,
    secret_path,
    sign,
)
from ferry.adapters.watch.connections import server_config
from ferry.adapters.watch.files import deliveries_path, triggers_path
from ferry.core.config import Settings
from support.mlflow_sqlite import BIN, MlflowServer, ferry_tags, mlflow_server, on_server, serving_version
from support.processes import free_port
from support.watch import Watcher, start_watch, watchers

__all__ = ["mlflow_server", "watchers"]  # the fixtures


# ---------------------------------------------------------------- helpers


def delivery(secret: bytes, payload: dict | bytes, *, delivery_id: str | None = None, timestamp: int | None = None,
             key: bytes | None = None) -> tuple[dict[str, str], bytes]:
    """A delivery as MLflow sends it: the body and its three headers, signed with ``key`` (default ``secret``)."""
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    delivery_id = delivery_id or str(uuid.uuid4())
    stamp = str(int(time.time()) if timestamp is None else timestamp)
    return {"Content-Type": "application/json", "X-MLflow-Delivery-Id": delivery_id, "X-MLflow-Timestamp": stamp,
            "X-MLflow-Signature": sign(key or secret, delivery_id, stamp, body)}, body


def alias_created(name: str = "iris", alias: str = "champion", version: object = "1") -> dict:
    return {"entity": "model_version_alias", "action": "created", "timestamp": "2026-11-29T07:14:20+00:00",
            "data": {"name": name, "alias": alias, "version": version}}


# ---------------------------------------------------------------- the webhook, end to end


def test_an_alias_set_in_mlflow_deploys_through_the_webhook(world: World, mlflow_server: MlflowServer,
                                                            watchers: list[Watcher]) -> None:
    world = on_server(world, mlflow_server)
    port = free_port()
    watchers.append(watcher := start_watch(world, port=port))
    registered = world.cli("watch", "register", "--url", f"http://127.0.0.1:{port}/mlflow/webhook", "--test")
    assert registered.returncode == 0, registered.stdout + registered.stderr
    for needed in ("MLFLOW_WEBHOOK_ALLOWED_SCHEMES=http,https", "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS=true",
                   "MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY", "test event: delivered: HTTP 200"):
        assert needed in registered.stdout, registered.stdout
    assert stat.S_IMODE(secret_path(world.settings).stat().st_mode) == 0o600
    [hook] = mlflow_server.client().list_webhooks()
    assert hook.name == "ferry" and [str(e) for e in hook.events] == ["model_version_alias.created"]

    world.register()  # trains v1 and sets @champion through MLflow's client: the server sends the webhook
    [first] = watcher.wait_done(1)
    assert (first["source"], first["version"], first["outcome"]) == ("webhook", 1, "committed"), first
    assert ferry_tags(mlflow_server, "iris", 1)["ferry.status"] == "serving"
    assert serving_version(mlflow_server, "iris") == 1

    world.register("output-shape")
    second = watcher.wait_done(2)[-1]
    assert (second["version"], second["outcome"]) == (2, "rolled_back"), second
    tags = ferry_tags(mlflow_server, "iris", 2)
    assert tags["ferry.status"] == "refused" and tags["ferry.failed_step"] == "smoke"
    assert "has shape [3, 4]" in tags["ferry.error"]
    assert serving_version(mlflow_server, "iris") == 1 and ferry_tags(mlflow_server, "iris", 1)["ferry.status"] == \
        "serving"

    assert all(t["alias"] == "champion" for t in watcher.triggers()), "ferry's own @serving move started nothing"
    metrics = watcher.metrics()
    assert 'ferry_watch_trigger_outcomes_total{model="iris",outcome="committed",via="ferry"} 1.0' in metrics
    assert 'ferry_watch_trigger_outcomes_total{model="iris",outcome="rolled_back",via="ferry"} 1.0' in metrics
    deliveries = [line for line in metrics.splitlines() if line.startswith("ferry_watch_deliveries_total{")]
    assert 'ferry_watch_deliveries_total{result="accepted"} 2.0' in deliveries, deliveries
    assert 'ferry_watch_deliveries_total{result="ignored"}' in metrics  # MLflow's test event and @serving
    log = watcher.log.read_text()
    assert "iris@champion (v1) [webhook" in log and "committed: v1 committed (was nothing)" in log
    assert "rolled_back: v2 failed at smoke" in log and "v1 still active and serving" in log


# ---------------------------------------------------------------- hostile deliveries


class Recorder:
    via = "test"

    def __init__(self) -> None:
        self.calls: list[Trigger] = []

    def run(self, trigger: Trigger) -> tuple[str, str]:
        self.calls.append(trigger)
        return "committed", "recorded"


HEADER_TIMEOUT_S, MAX_CONNECTIONS = 1.0, 8  # the receiver's bounds in these tests (ferry watch: 10 s, 64)


@pytest.fixture
def receiver(tmp_path: Path) -> Iterator[tuple[str, bytes, Recorder, Watch]]:
    """The receiver on a real HTTP server (uvicorn in a thread, served as `ferry watch` serves it), deploying
    into a recorder."""
    import uvicorn

    settings = Settings(home=tmp_path, repository=tmp_path / "repository", tracking_uri="sqlite:///unused.db")
    secret = read_or_create_secret(secret_path(settings))[0].encode()
    recorder = Recorder()
    watch = Watch(settings, deployer=recorder)
    port = free_port()
    server = uvicorn.Server(server_config(build_app(watch), "127.0.0.1", port, header_timeout_s=HEADER_TIMEOUT_S,
                                          max_connections=MAX_CONNECTIONS))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}", secret, recorder, watch
    finally:
        server.should_exit = True
        thread.join(10)


def test_hostile_deliveries_are_refused_or_ignored_and_deploy_nothing(receiver) -> None:
    url, secret, recorder, watch = receiver
    hook = f"{url}/mlflow/webhook"

    def post(headers: dict, body: bytes) -> httpx.Response:
        return httpx.post(hook, headers=headers, content=body, timeout=10)

    def expect(status: int, headers_body: tuple[dict, bytes], text: str = "") -> None:
        reply = post(*headers_body)
        assert reply.status_code == status, (reply.status_code, reply.text)
        assert text in reply.text, reply.text

    good = delivery(secret, alias_created())
    expect(202, good, "accepted")
    expect(409, good, "already received")
    headers, body = delivery(secret, alias_created(version="2"))
    expect(401, ({**headers, "X-MLflow-Signature": sign(b"another secret", headers["X-MLflow-Delivery-Id"],
                                                         headers["X-MLflow-Timestamp"], body)}, body), "does not match")
    expect(401, (headers, body.replace(b"champion", b"champ1on")), "does not match")
    expect(401, ({k: v for k, v in headers.items() if k != "X-MLflow-Signature"}, body), "no X-MLflow-Signature")
    expect(401, ({**headers, "X-MLflow-Signature": "v1,garbage v0,more"}, body), "does not match")
    expect(401, delivery(secret, alias_created(), timestamp=int(time.time()) - 310), "s ago; at most 300 s")
    expect(401, delivery(secret, alias_created(), timestamp=int(time.time()) + 400), "s in the future")
    expect(400, ({**headers, "X-MLflow-Timestamp": "soon"}, body), "not Unix seconds")
    expect(400, ({**headers, "X-MLflow-Delivery-Id": "../../x"}, body), "not a plain id")
    expect(400, ({k: v for k, v in headers.items() if k != "X-MLflow-Delivery-Id"}, body), "not a plain id")
    expect(200, delivery(secret, {**alias_created(), "entity": "model_version", "action": "created"}), "ignored")
    expect(200, delivery(secret, alias_created(alias="challenger")), "is not watched")
    expect(200, delivery(secret, alias_created(alias="serving")), "ferry moves itself")
    expect(400, delivery(secret, alias_created(name="../../etc")), "not a plain name")
    expect(400, delivery(secret, alias_created(alias="champion\nforged")), "not a plain name")
    expect(400, delivery(secret, {**alias_created(), "data": {"name": "iris", "alias": "champion"}}), "no 'version'")
    expect(400, delivery(secret, alias_created(name=123)), "string 'name'")
    expect(400, delivery(secret, alias_created(version="two")), "must name the version")
    expect(400, delivery(secret, alias_created(version=[1])), "must name the version")
    expect(400, delivery(secret, {**alias_created(), "data": "iris@champion"}), "string 'name'")
    expect(400, delivery(secret, b"{not json"), "not JSON")
    expect(400, delivery(secret, b"\xff\xfe\x00"), "not JSON")
    expect(413, delivery(secret, b"[" * 50_000 + b"]" * 50_000), "at most 65536")
    expect(400, delivery(secret, b"[" * 30_000 + b"]" * 30_000), "not JSON")  # nested too deep for the parser
    expect(400, delivery(secret, b'["model_version_alias", "created"]'), "not an MLflow event")
    expect(400, delivery(secret, {"entity": 1, "action": None}), "not an MLflow event")

    big = delivery(secret, b'{"pad": "' + b"x" * (1 << 20) + b'"}')
    expect(413, big, "at most 65536")

    def chunks() -> Iterator[bytes]:
        for _ in range(100):
            yield b"x" * 4096

    chunked = httpx.post(hook, headers=big[0], content=chunks(), timeout=10)
    assert chunked.status_code == 413, chunked.text
    assert httpx.get(hook, timeout=5).status_code == 405
    assert httpx.post(f"{url}/mlflow/other", content=b"{}", timeout=5).status_code == 404

    rng = random.Random(13)
    for _ in range(150):
        body = rng.randbytes(rng.randint(0, 300))
        if rng.random() < 0.5:
            body = json.dumps(rng.choice([alias_created(name=rng.choice(["", " ", "x" * 300, None])),
                                          {"entity": "model_version_alias", "action": "created",
                                           "data": rng.choice([None, [], {}, {"name": {}}])},
                                          [1, 2], "text", 3.5, None])).encode()
        signed = delivery(secret, body, key=secret if rng.random() < 0.7 else b"wrong")
        headers = {k: v for k, v in signed[0].items() if rng.random() < 0.9}
        reply = post(headers, body)
        assert reply.status_code in (200, 400, 401), (reply.status_code, reply.text, body[:100])
        assert "error" in reply.json() if reply.status_code != 200 else reply.json()["result"] == "ignored"

    secret_path(watch.settings).unlink()
    expect(403, delivery(secret, alias_created()), "ferry watch register")
    assert watch.dispatcher.drain(10)
    assert [(t.model, t.alias, t.version) for t in recorder.calls] == [("iris", "champion", 1)], \
        "only the one authentic, fresh, watched delivery deployed"
    metrics = httpx.get(f"{url}/metrics", timeout=5).text
    for result in ("accepted", "replayed", "bad_signature", "unsigned", "stale", "malformed", "bad_name", "ignored",
                   "too_large", "no_secret"):
        assert f'ferry_watch_deliveries_total{{result="{result}"}}' in metrics, result


def _read_to_end(sock: socket.socket, timeout_s: float) -> bytes:
    """What the server sends until it closes the connection; raises TimeoutError if it keeps it open."""
    sock.settimeout(timeout_s)
    received = b""
    while chunk := sock.recv(65536):
        received += chunk
    return received


def test_stalled_headers_time_out_and_the_connections_are_bounded(receiver) -> None:
    """Half a request held its connection forever: now it gets 408 after the header deadline, the
    connections beyond the bound get 503 at once, and the receiver answers again afterwards."""
    url = receiver[0]
    address = ("127.0.0.1", int(url.rsplit(":", 1)[1]))
    opened: list[socket.socket] = []
    try:
        started = time.monotonic()
        for number in range(MAX_CONNECTIONS):
            sock = socket.create_connection(address, timeout=5)
            opened.append(sock)
            if number % 2:  # half send part of their headers, half send nothing at all
                sock.sendall(b"POST /mlflow/webhook HTTP/1.1\r\nHost: 127.0.0.1\r\nX-MLflow-Sig")
        time.sleep(0.3)  # accepted by the server
        over = socket.create_connection(address, timeout=5)
        opened.append(over)
        assert _read_to_end(over, 3).startswith(b"HTTP/1.1 503 "), "a connection over the bound is refused at once"
        for sock in opened[:MAX_CONNECTIONS]:
            answer = _read_to_end(sock, HEADER_TIMEOUT_S + 5)
            assert answer.startswith(b"HTTP/1.1 408 ") and b"headers did not arrive" in answer, answer
        took = time.monotonic() - started
        assert took < HEADER_TIMEOUT_S + 3, f"the stalled connections were closed after {took:.1f} s"

        kept_alive = socket.create_connection(address, timeout=5)
        opened.append(kept_alive)
        kept_alive.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        first = b""
        while b'"poll_s"' not in first and (chunk := kept_alive.recv(65536)):
            first += chunk
        assert first.startswith(b"HTTP/1.1 200 "), first
        kept_alive.sendall(b"GET /healthz HTTP/1.1\r\nHo")  # the next request on it stalls
        answer = _read_to_end(kept_alive, HEADER_TIMEOUT_S + 5)
        assert answer.startswith(b"HTTP/1.1 408 "), answer
        assert httpx.get(f"{url}/healthz", timeout=5).status_code == 200
    finally:
        for sock in opened:
            sock.close()


def test_an_unknown_model_is_refused_with_the_reason_and_written_down(tmp_path: Path) -> None:
    """ferry's own deploy behind the receiver, MLflow on sqlite that has no such model (and no Triton)."""
    settings = make_settings(tmp_path)
    secret = read_or_create_secret(secret_path(settings))[0].encode()
    watch = Watch(settings, poll_s=0)
    status, answer = watch.handle(*delivery(secret, alias_created(name="ghost")))
    assert status == 202, answer
    assert watch.dispatcher.drain(120)
    [ghost] = watch.dispatcher.recent
    assert ghost.outcome == "refused" and "no model named 'ghost'" in ghost.detail, ghost
    [record] = TriggerLog(triggers_path(settings)).read()
    assert (record["model"], record["outcome"], record["detail"]) == ("ghost", "refused", ghost.detail)
    assert not (settings.repository / "ghost").exists()


def test_the_serving_alias_cannot_be_watched(tmp_path: Path) -> None:
    from ferry.core.errors import InvalidInput

    settings = Settings(home=tmp_path, repository=tmp_path / "r", tracking_uri="sqlite:///x.db",
                        watch_aliases="champion,serving")
    with pytest.raises(InvalidInput, match="moves itself"):
        Watch(settings, deployer=Recorder())


# ---------------------------------------------------------------- polling


def test_poll_mode_deploys_a_move_made_while_the_watcher_was_down(world: World, mlflow_server: MlflowServer,
                                                                   watchers: list[Watcher]) -> None:
    world = on_server(world, mlflow_server)
    world.register()  # @champion -> v1 before the watcher ever ran
    watchers.append(first := start_watch(world, "--poll", "1s", name="watch-1"))
    [deployed] = first.wait_done(1)
    assert (deployed["source"], deployed["version"], deployed["outcome"]) == ("poll", 1, "committed"), deployed
    first.stop()

    world.register()  # @champion -> v2 while nothing watches
    watchers.append(second := start_watch(world, "--poll", "1s", name="watch-2"))
    [caught_up] = second.wait_done(1)
    assert (caught_up["version"], caught_up["outcome"]) == (2, "committed"), caught_up
    assert read_active(world) == 2 and serving_version(mlflow_server, "iris") == 2
    assert ferry_tags(mlflow_server, "iris", 1)["ferry.status"] == "retired"
    time.sleep(2.5)  # a few more rounds: nothing moved, nothing more is started
    assert len(second.triggers()) == 1
    assert "ferry_watch_polls_total{result=\"ok\"}" in second.metrics()


def read_active(world: World) -> int | None:
    from ferry.core.current import read_current

    current = read_current(world.model_dir)
    return current.active_version if current else None


# ---------------------------------------------------------------- Airflow


@dataclass
class Airflow:
    home: Path
    port: int
    process: subprocess.Popen

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def password(self) -> str:
        return json.loads((self.home / "simple_auth_manager_passwords.json.generated").read_text())["admin"]

    def client(self) -> httpx.Client:
        token = httpx.post(f"{self.url}/auth/token", json={"username": "admin", "password": self.password()},
                           timeout=10).json()["access_token"]
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {token}"}, timeout=10)


@pytest.fixture
def airflow(tmp_path: Path) -> Iterator[Airflow]:
    """`airflow standalone` as `make demo-airflow` runs it, its log servers moved off their fixed ports. The DAG
    stays paused: runs are created and stay queued, which is all the trigger needs."""
    home, port = tmp_path / "airflow", free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    env.update({
        "PATH": f"{BIN}:{os.environ['PATH']}", "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"), "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__PARALLELISM": "2", "AIRFLOW__API__HOST": "127.0.0.1", "AIRFLOW__API__PORT": str(port),
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/",
        "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
        "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(free_port()),
    })
    home.mkdir()
    log = open(tmp_path / "airflow-standalone.log", "wb")  # noqa: SIM115 - the server's output until the end
    process = subprocess.Popen([str(BIN / "airflow"), "standalone"], stdout=log, stderr=subprocess.STDOUT, env=env,
                               start_new_session=True)
    log.close()
    server = Airflow(home, port, process)
    try:
        deadline = time.monotonic() + 240
        while True:
            assert process.poll() is None and time.monotonic() < deadline, \
                (tmp_path / "airflow-standalone.log").read_text()[-3000:]
            try:
                if (home / "simple_auth_manager_passwords.json.generated").exists():
                    with server.client() as client:
                        if client.get("/api/v2/dags/mlflow_to_triton_deploy").status_code == 200:
                            break
            except (httpx.HTTPError, KeyError, ValueError):
                pass
            time.sleep(1)
        yield server
    finally:
        process.send_signal(signal.SIGINT)  # it stops its components (SIGTERM would orphan them)
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)


def test_the_trigger_starts_one_airflow_run_per_delivery(tmp_path: Path, airflow: Airflow) -> None:
    from ferry.adapters.watch import AirflowDeployer

    settings = make_settings(tmp_path / "ferry", airflow_url=airflow.url, airflow_password=airflow.password())
    secret = read_or_create_secret(secret_path(settings))[0].encode()
    register_versions(settings, "iris", 3, alias="champion")  # the run is started while @champion names v3

    def watcher() -> Watch:  # a fresh process: nothing remembered of earlier deliveries
        return Watch(settings, deployer=AirflowDeployer(settings, follow_s=0))

    headers, body = delivery(secret, alias_created(version="3"))
    first = watcher()
    assert first.handle(headers, body)[0] == 202
    assert first.handle(headers, body)[0] == 409, "a replay to the same receiver is refused"
    assert first.dispatcher.drain(60)
    [started] = first.dispatcher.recent
    assert started.outcome == "airflow_queued" and "the DAG is paused" in started.detail, started

    restarted = watcher()  # MLflow retries the delivery after the receiver restarted
    assert restarted.handle(headers, body)[0] == 409, "the delivery ids of the replay window are kept on disk"
    deliveries_path(settings).unlink()  # a receiver that lost them (another host) still starts no second run
    lost = watcher()
    assert lost.handle(headers, body)[0] == 202
    assert lost.dispatcher.drain(60)
    [again] = lost.dispatcher.recent
    assert again.outcome == "duplicate", again

    with airflow.client() as client:
        runs = client.get("/api/v2/dags/mlflow_to_triton_deploy/dagRuns").json()["dag_runs"]
    assert [r["dag_run_id"] for r in runs] == [dag_run_id(started)] == [f"ferry__iris__champion__{started.key}"]
    assert runs[0]["conf"] == {"model": "iris", "alias": "champion"}


def register_versions(settings: Settings, model: str, count: int, alias: str) -> None:
    """``count`` versions of ``model`` in the MLflow ``settings`` names (no files: nothing deploys them here)."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=settings.tracking_uri, registry_uri=settings.tracking_uri)
    client.create_registered_model(model)
    for _ in range(count):
        client.create_model_version(model, source=str(settings.home / "no-files"))
    client.set_registered_model_alias(model, alias, str(count))


def test_demo_watch_tells_the_story(tmp_path: Path) -> None:
    env = {**os.environ, "FERRY_HOME": str(tmp_path / "demo"), "FERRY_TRITON_URL": make_settings(tmp_path).triton.urls}
    env.pop("MLFLOW_TRACKING_URI", None)
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "demo_watch.py")], env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    out = result.stdout
    assert "test event: delivered: HTTP 200" in out and "committed: v1 committed (was nothing)" in out
    assert "rolled_back: v2 failed at smoke" in out
    v1, v2 = out.rindex("iris v1  aliases: @serving"), out.rindex("iris v2  aliases: @champion")
    assert "ferry.status           serving" in out[v1:v2] and "ferry.failed_step      smoke" in out[v2:]
    assert "ferry.status           refused" in out[v2:] and "has shape [3, 4]" in out[v2:]
