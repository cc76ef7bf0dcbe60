"""make demo-watch: the MLflow registry drives ferry, and ferry tells MLflow what happened.

Starts a real `mlflow server` (sqlite backend, lean: one worker, no job runner, on 127.0.0.1), a real
Triton and `ferry watch`, and registers ferry's webhook in MLflow. The example trainer then moves
@champion to a good version (deployed: MLflow shows it serving, and @serving on it), then to a broken
one (refused: its tags say at which step and why; @serving unchanged). Prints the tags as MLflow shows
them, and stops everything it started.
"""

from __future__ import annotations

import base64
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import httpx
from demo_support import BIN, ROOT, free_port, run, say, wait_for

MODEL = "iris"







def start(name: str, args: list[str], home: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    log = open(home / f"{name}.log", "ab")  # noqa: SIM115 - the process's output until it stops
    return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, env=env or os.environ, start_new_session=True)


def stop(process: subprocess.Popen | None, sig: int = signal.SIGINT) -> None:
    if process is None or process.poll() is not None:
        return
    os.killpg(process.pid, sig)
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)


def mlflow_server(home: Path, port: int) -> subprocess.Popen:
    """`mlflow server` as webhooks need it: SQL backend, loopback receiver over http, one encryption key."""
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
           "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true", "MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http,https",
           "MLFLOW_WEBHOOK_CACHE_TTL": "2",
           "MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY": base64.urlsafe_b64encode(os.urandom(32)).decode()}
    return start("mlflow-server", [str(BIN / "mlflow"), "server", "--backend-store-uri",
                                   f"sqlite:///{home / 'mlflow.db'}", "--artifacts-destination",
                                   str(home / "mlartifacts"), "--host", "127.0.0.1", "--port", str(port),
                                   "--workers", "1"], home, env)


def triggers_done(watch_url: str, count: int) -> list[dict] | None:
    done = [t for t in httpx.get(f"{watch_url}/triggers", timeout=5).json() if t["state"] == "done"]
    return done if len(done) >= count else None


def show_registry(tracking_uri: str) -> dict[int, dict[str, str]]:
    """Every version of the model with its aliases and ferry.* tags, as MLflow's client reads them."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    aliases = client.get_registered_model(MODEL).aliases
    versions = sorted(client.search_model_versions(f"name='{MODEL}'"), key=lambda v: int(v.version))
    tags = {}
    for version in versions:
        named = " ".join(f"@{a}" for a, v in sorted(aliases.items()) if v == version.version) or "-"
        print(f"  {MODEL} v{version.version}  aliases: {named}")
        for key, value in sorted(version.tags.items()):
            if key.startswith("ferry."):
                print(f"      {key:<22} {value}")
        tags[int(version.version)] = {**version.tags, "aliases": named}
    return tags


def story(home: Path, tracking_uri: str, watch_url: str) -> None:
    say(f"Register ferry's webhook in MLflow ({tracking_uri}), pointing at {watch_url}/mlflow/webhook")
    run(str(BIN / "ferry"), "watch", "register", "--url", f"{watch_url}/mlflow/webhook", "--test")

    say("Train iris, register v1 and move @champion to it: MLflow sends the webhook, ferry watch deploys")
    run(sys.executable, str(ROOT / "examples" / "train_model.py"), "--model", MODEL, "--alias", "champion")
    first = wait_for("the deploy of v1", lambda: triggers_done(watch_url, 1), timeout_s=180)[-1]
    print(f"  trigger: {first['source']} {first['key']}: {first['outcome']}: {first['detail']}")
    say("What MLflow shows now")
    tags = show_registry(tracking_uri)
    if tags[1].get("ferry.status") != "serving" or "@serving" not in tags[1]["aliases"]:
        raise SystemExit("v1 should be serving, with @serving on it")

    say("Register a broken v2 (one output column too many) and move @champion to it")
    run(sys.executable, str(ROOT / "examples" / "train_model.py"), "--model", MODEL, "--alias", "champion",
        "--break", "output-shape")
    second = wait_for("the deploy of v2", lambda: triggers_done(watch_url, 2), timeout_s=180)[-1]
    print(f"  trigger: {second['source']} {second['key']}: {second['outcome']}: {second['detail']}")
    say("What MLflow shows now: v2 refused (where and why), @serving still on v1")
    tags = show_registry(tracking_uri)
    if tags[2].get("ferry.status") != "refused" or "@serving" not in tags[1]["aliases"]:
        raise SystemExit("v2 should be refused and @serving still on v1")

    say("ferry status, and what ferry watch counted")
    subprocess.run([str(BIN / "ferry"), "status", MODEL], env=os.environ)
    metrics = httpx.get(f"{watch_url}/metrics", timeout=5).text
    print("\n".join(line for line in metrics.splitlines()
                    if line.startswith("ferry_watch_") and "_created" not in line and not line.endswith(" 0.0")))


def main() -> None:
    home = Path(os.environ.setdefault("FERRY_HOME", str(ROOT / ".ferry-demo-watch")))
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir(parents=True)
    mlflow_port, watch_port = free_port(), free_port()
    tracking_uri, watch_url = f"http://127.0.0.1:{mlflow_port}", f"http://127.0.0.1:{watch_port}"
    os.environ.setdefault("FERRY_TRITON_URL", f"http://127.0.0.1:{free_port(3)}")
    os.environ.update({"MLFLOW_TRACKING_URI": tracking_uri, "FERRY_WATCH_PORT": str(watch_port),
                       "FERRY_WATCH_ALIASES": "champion", "PATH": f"{BIN}:{os.environ['PATH']}"})
    server = watcher = None
    try:
        say(f"Start mlflow server on {tracking_uri} (sqlite, one worker, no job runner) and Triton")
        server = mlflow_server(home, mlflow_port)
        run(str(BIN / "ferry"), "triton", "up")
        wait_for("mlflow server", lambda: httpx.get(f"{tracking_uri}/health", timeout=2).status_code == 200)
        say(f"Start ferry watch on {watch_url} (log: {home / 'watch.log'})")
        watcher = start("watch", [str(BIN / "ferry"), "watch"], home)
        wait_for("ferry watch", lambda: httpx.get(f"{watch_url}/healthz", timeout=2).status_code == 200)
        story(home, tracking_uri, watch_url)
    finally:
        say("Stop ferry watch, mlflow server and Triton")
        stop(watcher)
        stop(server, signal.SIGTERM)
        subprocess.run([str(BIN / "ferry"), "triton", "down"], env=os.environ)


if __name__ == "__main__":
    main()
