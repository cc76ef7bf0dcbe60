"""A real MLflow tracking server as production runs it: the backend store on PostgreSQL, artifacts on S3.

Two artifact layouts, both real ``mlflow server`` processes:

- ``s3``: ``--default-artifact-root s3://<bucket>/direct --no-serve-artifacts``. Clients read and write the bucket
  themselves, with AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY and MLFLOW_S3_ENDPOINT_URL.
- ``proxy``: ``--serve-artifacts --artifacts-destination s3://<bucket>/proxied``. Clients see ``mlflow-artifacts:/``
  URIs and go through the server's artifact proxy; only the server holds S3 credentials.

Either sends webhooks (MLflow needs a SQL backend for them) to a receiver on loopback, as `ferry watch` is in tests.

The PostgreSQL database comes from ``support.postgres`` (``PostgresServer.url(dbname)``); this module never starts one.
"""

from __future__ import annotations

import base64
import os
import secrets
import subprocess
import sys
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from support.processes import free_port, stop_group, wait_healthy
from support.s3 import S3Server

BIN = Path(sys.executable).parent
Layout = Literal["s3", "proxy"]
PREFIX: dict[str, str] = {"s3": "direct", "proxy": "proxied"}  # where each layout keeps its artifacts in the bucket
START_TIMEOUT_S = 120.0


@dataclass
class TrackingServer:
    """``mlflow server`` on ``backend_uri`` (PostgreSQL) with artifacts on ``s3`` in the given ``layout``."""

    home: Path
    backend_uri: str
    s3: S3Server
    layout: Layout
    port: int = field(default_factory=free_port)
    webhook_key: str = field(default_factory=lambda: base64.urlsafe_b64encode(os.urandom(32)).decode())
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def client_env(self) -> dict[str, str]:
        """What a client (a trainer, ferry) needs: the tracking URI, and S3's variables only for the direct layout."""
        env = {"MLFLOW_TRACKING_URI": self.url}
        if self.layout == "s3":
            env.update(self.s3.env())
        return env

    def _artifact_args(self) -> list[str]:
        root = f"s3://{self.s3.bucket}/{PREFIX[self.layout]}"
        if self.layout == "s3":
            return ["--default-artifact-root", root, "--no-serve-artifacts"]
        return ["--serve-artifacts", "--artifacts-destination", root]

    def _server_env(self) -> dict[str, str]:
        """S3's variables, and webhooks allowed to a receiver on loopback over plain http (cached 1 s)."""
        return {**os.environ, **self.s3.env(), "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
                "MLFLOW_WEBHOOK_ALLOWED_SCHEMES": "http,https", "MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS": "true",
                "MLFLOW_WEBHOOK_CACHE_TTL": "1", "MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY": self.webhook_key}

    def start(self) -> TrackingServer:
        if self.process is not None and self.process.poll() is None:
            return self
        self.home.mkdir(parents=True, exist_ok=True)
        log_path = self.home / "mlflow-server.log"
        with open(log_path, "ab") as log:
            self.process = subprocess.Popen(
                [str(BIN / "mlflow"), "server", "--backend-store-uri", self.backend_uri, *self._artifact_args(),
                 "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"],
                env=self._server_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        wait_healthy(self.process, f"{self.url}/health", log_path, START_TIMEOUT_S, "mlflow server")
        return self

    def stop(self) -> None:
        stop_group(self.process, grace_s=15)  # the group this module started: the server and its worker

    def client(self) -> Any:
        from mlflow import MlflowClient

        return MlflowClient(tracking_uri=self.url, registry_uri=self.url)

    def artifact_key(self, model: str, version: int, name: str) -> str:
        """The bucket key of the file ``name`` of a version registered from ``runs:/<run>/<path>``."""
        client = self.client()
        found = client.get_model_version(model, str(version))
        path = str(found.source).removeprefix(f"runs:/{found.run_id}").strip("/")
        root = urllib.parse.urlparse(client.get_run(found.run_id).info.artifact_uri)
        # s3://<bucket>/direct/<experiment>/<run>/artifacts, or mlflow-artifacts:/<experiment>/<run>/artifacts
        folder = root.path.strip("/") if root.scheme == "s3" else f"{PREFIX[self.layout]}/{root.path.strip('/')}"
        return f"{folder}/{path}/{name}" if path else f"{folder}/{name}"


def register_example(server: TrackingServer, model: str, alias: str, **kwargs: Any) -> int:
    """A model version logged and registered by the repo's own examples/train_model.py, through ``server``."""
    root = Path(__file__).resolve().parents[2]
    sys.path.insert(0, str(root / "examples"))
    saved = {k: os.environ.get(k) for k in server.client_env()}
    os.environ.update(server.client_env())
    try:
        from train_model import train_and_register

        return int(train_and_register(model, alias, tracking_uri=server.url, **kwargs))
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def start_tracking(home: Path, postgres: Any, s3: S3Server, layout: Layout) -> TrackingServer:
    """A tracking server on its own new PostgreSQL database (``postgres``: a ``support.postgres.PostgresServer``)."""
    # Unique: under xdist one worker's session PostgreSQL may serve this module's layouts more than once.
    dbname = f"mlflow_{layout}_{secrets.token_hex(4)}"
    postgres.create_database(dbname)
    return TrackingServer(home / f"mlflow-{layout}", postgres.url(dbname), s3, layout).start()
