"""How an S3 client's errors read as ferry's (ferry.core.mlflow_rest.s3_failure): the refused credential is named;
a download shorter than its listing is a transfer cut short (retryable), not a bad model."""

from __future__ import annotations

import hashlib
import io
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import BinaryIO, ClassVar, cast

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError
from botocore.response import StreamingBody

from ferry.core.errors import FerryError, InvalidInput, Misconfigured, RegistryError, Unavailable
from ferry.core.mlflow_rest import ArtifactStore, MlflowRest, s3_failure
from ferry.core.registry import Registry, RestArtifacts, VersionRef

ENDPOINT = "http://127.0.0.1:9000"


def refused(code: str) -> ClientError:
    return ClientError({"Error": {"Code": code, "Message": "refused"}}, "ListObjectsV2")


@pytest.mark.parametrize(("code", "named"), [
    ("InvalidAccessKeyId", "AWS_ACCESS_KEY_ID"),
    ("SignatureDoesNotMatch", "AWS_SECRET_ACCESS_KEY"),
    ("AccessDenied", "AWS_ACCESS_KEY_ID"),
])
def test_refused_credentials_name_the_variable_in_the_message(code: str, named: str) -> None:
    error = s3_failure("listing s3://b/p", refused(code), ENDPOINT)
    assert isinstance(error, InvalidInput) and not error.retryable
    assert code in error.message and named in error.message, error.message


def test_a_missing_object_is_not_found_and_a_store_that_does_not_answer_is_unavailable() -> None:
    assert isinstance(s3_failure("downloading model.onnx", refused("NoSuchKey"), ENDPOINT), RegistryError)
    down = s3_failure("listing s3://b/p", EndpointConnectionError(endpoint_url=ENDPOINT), ENDPOINT)
    assert isinstance(down, Unavailable) and down.retryable and ENDPOINT in down.message
    failing = s3_failure("downloading model.onnx", refused("InternalError"), ENDPOINT)
    assert isinstance(failing, Unavailable) and "InternalError" in failing.message


class ShortStore(ArtifactStore):
    """A store whose listing says more bytes than its download gives (a body cut short on the way)."""

    uri = "mlflow-artifacts:/1/run/artifacts/onnx"

    def __init__(self, listed: int, body: bytes) -> None:
        self.listed, self.body = listed, body

    def sizes(self) -> dict[str, int]:
        return {"model.onnx": self.listed}

    def open(self, name: str) -> BinaryIO:
        return io.BytesIO(self.body)


def _artifacts(store: ArtifactStore) -> RestArtifacts:
    ref = VersionRef("iris", 1, "run", "runs:/run/onnx", None, "runs:/run/onnx")
    return RestArtifacts(Registry("http://127.0.0.1:9"), ref, store)


def test_a_download_shorter_than_its_listing_is_unavailable_not_a_bad_model(tmp_path: Path) -> None:
    with pytest.raises(Unavailable, match="gave 3 bytes, its listing 10: the transfer was cut short"):
        _artifacts(ShortStore(10, b"abc")).download("model.onnx", tmp_path)


def test_a_download_as_long_as_its_listing_is_kept_with_its_digest(tmp_path: Path) -> None:
    artifacts = _artifacts(ShortStore(3, b"abc"))
    path = artifacts.download("model.onnx", tmp_path)
    assert path.read_bytes() == b"abc"
    assert artifacts.sha256("model.onnx", path) == hashlib.sha256(b"abc").hexdigest()


class FailingServer(BaseHTTPRequestHandler):
    """A tracking server whose artifact proxy fails as MLflow's does when its store is down: a bare HTTP 500."""

    def do_GET(self) -> None:
        self.send_response(500)
        self.send_header("Content-Length", "21")
        self.end_headers()
        self.wfile.write(b"Internal Server Error")

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def failing_server() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), FailingServer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_the_proxy_answering_500_points_at_its_store(failing_server: str, tmp_path: Path) -> None:
    store = MlflowRest(failing_server, timeout_s=5).store("mlflow-artifacts:/1/run/artifacts/onnx")
    for call in (store.sizes, lambda: store.download("model.onnx", tmp_path / "model.onnx")):
        with pytest.raises(Unavailable, match=r"HTTP 500 .*the server's artifact proxy: its store may not answer"):
            call()


def test_a_server_that_does_not_answer_is_not_blamed_on_its_store() -> None:
    with pytest.raises(Unavailable) as error:
        MlflowRest("http://127.0.0.1:9", timeout_s=2).store("mlflow-artifacts:/1/run/artifacts/onnx").sizes()
    assert "artifact proxy" not in error.value.message and "MLflow at http://127.0.0.1:9" in error.value.message


class BrokenStream(io.BytesIO):
    """A body that stops in the middle: the first read gives bytes, the next one fails as a reset connection."""

    def read(self, size: int | None = -1) -> bytes:
        if self.tell():
            raise ConnectionResetError(104, "Connection reset by peer")
        return super().read(4)


class BrokenStore(ShortStore):
    def open(self, name: str) -> BinaryIO:
        return BrokenStream(b"abcdefgh")

    def read_failed(self, name: str, error: Exception) -> FerryError:
        return Unavailable(f"the store failed while downloading {name}: {error}")


def test_a_read_that_fails_mid_body_is_the_stores_failure(tmp_path: Path) -> None:
    with pytest.raises(Unavailable, match=r"downloading model\.onnx: .*Connection reset by peer"):
        BrokenStore(8, b"").download("model.onnx", tmp_path / "model.onnx")


def test_a_write_that_fails_stays_an_oserror(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):  # the caller tells a full disk from the rest by its errno
        ShortStore(3, b"abc").download("model.onnx", tmp_path / "missing" / "model.onnx")


class BotoStore(ShortStore):
    """A store whose open() gives botocore's own body: 100 bytes sent of the 518 its Content-Length says."""

    def open(self, name: str) -> BinaryIO:
        return cast(BinaryIO, StreamingBody(io.BytesIO(b"y" * 100), 518))

    def read_failed(self, name: str, error: Exception) -> FerryError:
        return s3_failure(f"downloading {name}", error, ENDPOINT)


def test_botocore_s_body_is_read_with_its_own_checks(tmp_path: Path) -> None:
    """Entered as a context, botocore's body gives its raw stream, which reads a body cut short as complete."""
    with pytest.raises(Unavailable, match="IncompleteReadError: 100 read, but total bytes expected is 518"):
        BotoStore(0, b"").download("model.onnx", tmp_path / "model.onnx")


class GuardedServer(BaseHTTPRequestHandler):
    """A tracking server behind authentication: it records each request's Authorization header and answers 401
    unless it is the bearer token ``s3cret``."""

    seen: ClassVar[list[str | None]] = []

    def do_GET(self) -> None:
        GuardedServer.seen.append(self.headers.get("Authorization"))
        allowed = self.headers.get("Authorization") == "Bearer s3cret"
        body = b'{"registered_model": {"aliases": []}}' if allowed else b'{"error_code": "UNAUTHENTICATED"}'
        self.send_response(200 if allowed else 401)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def guarded_server() -> Iterator[str]:
    GuardedServer.seen = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), GuardedServer)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def test_the_tracking_token_is_sent_and_a_refusal_names_the_variables(guarded_server: str,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    rest = MlflowRest(guarded_server, timeout_s=5)
    for variable in ("MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(variable, raising=False)
    with pytest.raises(Misconfigured, match=r"refused the credentials \(HTTP 401\)") as refused:
        rest.aliases("iris")
    assert "MLFLOW_TRACKING_TOKEN" in refused.value.hint and not refused.value.retryable
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "ann")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "pw")
    with pytest.raises(Misconfigured):
        rest.aliases("iris")
    monkeypatch.setenv("MLFLOW_TRACKING_TOKEN", "s3cret")
    assert rest.aliases("iris") == {}
    assert GuardedServer.seen == [None, "Basic YW5uOnB3", "Bearer s3cret"]


def test_no_s3_credentials_anywhere_is_ferrys_setup_not_the_versions() -> None:
    from botocore.exceptions import NoCredentialsError, PartialCredentialsError

    for error in (NoCredentialsError(), PartialCredentialsError(provider="env", cred_var="AWS_SECRET_ACCESS_KEY")):
        failure = s3_failure("listing s3://b/p", error, ENDPOINT)
        assert isinstance(failure, Misconfigured) and not failure.retryable
        assert "AWS_ACCESS_KEY_ID" in failure.hint and "profile or role" in failure.hint
    partial = s3_failure("listing s3://b/p", PartialCredentialsError(provider="env", cred_var="AWS_SECRET_ACCESS_KEY"),
                         ENDPOINT)
    assert "AWS_SECRET_ACCESS_KEY" in partial.message
