"""MLflow's REST API for a tracking server (http(s)://), without the mlflow package (seconds to import).

Resolves aliases, reads versions and lists and downloads a version's files: from s3:// (boto3, streamed), through
the server's artifact proxy (mlflow-artifacts:/), and what runs:/ and models:/ resolve to. Every call has a timeout;
not found is RegistryError, no answer is Unavailable. Downloads stream to the target file and hash while writing.
Usable by any caller that holds a tracking URL (the write-back's REST client included).
"""

from __future__ import annotations

import base64
import json
import os
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO, cast

from ferry.core.errors import FerryError, Misconfigured, RegistryError, Unavailable
from ferry.core.fsutil import write_and_hash

API = "/api/2.0/mlflow"
NOT_FOUND = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND")


class ServerError(Unavailable):
    """The tracking server answered, with an error of its own (HTTP 5xx, or another refusal than not found)."""


class MlflowRest:
    """One tracking server's REST API; ``timeout_s`` bounds every request (connect and each read)."""

    def __init__(self, tracking_uri: str, timeout_s: float = 30.0) -> None:
        self.base = tracking_uri.rstrip("/")
        self.timeout_s = timeout_s

    def request(self, method: str, path: str, query: dict[str, str] | None = None,
                body: dict[str, Any] | None = None) -> dict[str, Any]:
        """A JSON call to ``path`` (under the server's root); MLflow's not-found codes become RegistryError."""
        url = f"{self.base}{path}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
        data = json.dumps(body).encode() if body is not None else None
        try:
            with self.open_url(url, data, method, {"Content-Type": "application/json"}) as answer:
                return dict(json.loads(answer.read() or b"{}"))
        except urllib.error.HTTPError as error:
            raise self._refusal(url, error) from None
        except (OSError, ValueError) as error:
            raise self.unavailable(f"calling {url}", error) from None

    def open_url(self, url: str, data: bytes | None = None, method: str = "GET",
                 headers: dict[str, str] | None = None) -> Any:
        """An HTTP request to the server with the credentials MLflow's own variables hold (as MLflow's client
        sends them): a bearer token, or a user name and password."""
        headers = {**(headers or {}), **_credentials()}
        request = urllib.request.Request(url, data=data, method=method, headers=headers)
        return urllib.request.urlopen(request, timeout=self.timeout_s)

    def _refusal(self, url: str, error: urllib.error.HTTPError) -> FerryError:
        if error.code in (401, 403):
            return Misconfigured(f"MLflow at {self.base} refused the credentials (HTTP {error.code}) for {url}",
                                 "set MLFLOW_TRACKING_TOKEN, or MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD, "
                                 "to an identity the server lets read the registry")
        try:
            answer = json.loads(error.read() or b"{}")
        except ValueError:
            answer = {}
        code = str(answer.get("error_code", ""))
        if error.code == 404 or code in NOT_FOUND:
            return RegistryError(f"MLflow: {answer.get('message') or url}: {code or error.code}",
                                 "check the name, alias or version in the MLflow Model Registry")
        failed = self.unavailable(f"calling {url}", Exception(f"HTTP {error.code} {answer.get('message', '')}"))
        return ServerError(failed.message, failed.hint)

    def unavailable(self, what: str, error: Exception) -> Unavailable:
        return Unavailable(f"MLflow at {self.base} failed while {what}: {type(error).__name__}: {error}",
                           "check that MLFLOW_TRACKING_URI points at a reachable tracking server")

    def version_by_alias(self, model: str, alias: str) -> dict[str, Any]:
        """MLflow's ModelVersion (name, version, run_id, source, ...) that ``alias`` names."""
        found = self.request("GET", f"{API}/registered-models/alias", {"name": model, "alias": alias})
        return dict(found["model_version"])

    def version(self, model: str, version: int) -> dict[str, Any]:
        found = self.request("GET", f"{API}/model-versions/get", {"name": model, "version": str(version)})
        return dict(found["model_version"])

    def aliases(self, model: str) -> dict[str, int]:
        found = self.request("GET", f"{API}/registered-models/get", {"name": model})["registered_model"]
        return {a["alias"]: int(a["version"]) for a in found.get("aliases", [])}

    def download_uri(self, model: str, version: int) -> str:
        query = {"name": model, "version": str(version)}
        return str(self.request("GET", f"{API}/model-versions/get-download-uri", query)["artifact_uri"])

    def run_artifact_uri(self, run_id: str) -> str:
        return str(self.request("GET", f"{API}/runs/get", {"run_id": run_id})["run"]["info"]["artifact_uri"])

    def resolve(self, uri: str, model: str = "", version: int = 0) -> str:
        """Where a version's files are: runs:/ through the run's artifact root, models:/ through the registry."""
        if uri.startswith("runs:/"):
            run_id, _, path = uri[len("runs:/"):].strip("/").partition("/")
            root = self.run_artifact_uri(run_id).rstrip("/")
            return f"{root}/{path}" if path else root
        if uri.startswith("models:/"):
            return self.download_uri(model, version)
        return uri

    def store(self, uri: str) -> ArtifactStore:
        if uri.startswith("s3://"):
            return S3Store(uri, self.timeout_s)
        if uri.startswith("mlflow-artifacts:"):
            return ProxyStore(self, uri)
        raise RegistryError(f"artifacts at {uri}: ferry reads a tracking server's artifacts from s3:// or "
                            "mlflow-artifacts:/ only", "store the model's artifacts on S3 or behind the server's proxy")


def artifact_path(path: str, where: str) -> str:
    """``path`` itself when it is a plain relative posix path, one that stays inside the folder it is read from
    and names a file the same on every store and file system; else RegistryError."""
    why = _unsafe(path)
    if why:
        raise RegistryError(f"artifact path {path!r} in {where} {why}: ferry reads only plain relative paths inside "
                            "the version's folder",
                            "log the model's files under plain relative names (no absolute path, no '..', '.' or "
                            "empty segment, no backslash or NUL)")
    return path


def _unsafe(path: str) -> str:
    """What makes ``path`` unsafe to read or write under a folder ("" when nothing does)."""
    if "\x00" in path:
        return "holds a NUL"
    if "\\" in path:
        return "holds a backslash"
    if path.startswith("/"):
        return "is absolute"
    if any(part in ("", ".", "..") for part in path.split("/")):
        return "has an empty, '.' or '..' segment"
    return ""


class ArtifactStore:
    """A folder of files: their sizes, and one file streamed into a local file with its sha256."""

    uri: str

    def sizes(self) -> dict[str, int]:
        raise NotImplementedError

    def tree(self, folder: str) -> dict[str, int]:
        """Every file under ``folder`` ("" for the whole folder), recursively: its path relative to the store's
        folder, as the store names it (the caller checks each one) -> its size in bytes."""
        raise NotImplementedError

    def open(self, name: str) -> BinaryIO:
        raise NotImplementedError

    def download(self, name: str, target: Path) -> str:
        """Stream ``name`` into ``target`` and return its sha256, computed on the way. A read that fails (the
        store stopped in the middle of the body) is the store's failure; a write that fails stays an OSError."""
        # Not `with self.open(name) as source`: botocore's body enters as its raw urllib3 stream, which skips
        # the body's own checks (its Content-Length, its CRC32) and reads a body cut short as complete.
        source = self.open(name)
        try:
            reading = _Reading(source, lambda error: self.read_failed(name, error))
            return write_and_hash(cast(BinaryIO, reading), target)  # write_and_hash only reads it
        finally:
            source.close()

    def read_failed(self, name: str, error: Exception) -> FerryError:
        raise NotImplementedError


class _Reading:
    """A download's stream whose read errors are the store's (``failed`` says them as ferry's)."""

    def __init__(self, source: BinaryIO, failed: Callable[[Exception], FerryError]) -> None:
        self.source, self.failed = source, failed

    def read(self, size: int = -1) -> bytes:
        try:
            return self.source.read(size)
        except Exception as error:  # whatever the client raises mid-body: urllib3, botocore, http.client
            raise self.failed(error) from error


class ProxyStore(ArtifactStore):
    """The server's artifact proxy (``--serve-artifacts``): mlflow-artifacts:/<path>."""

    def __init__(self, rest: MlflowRest, uri: str) -> None:
        self.rest = rest
        self.uri = uri
        parsed = urllib.parse.urlparse(uri)
        self.path = parsed.path.strip("/")

    def sizes(self) -> dict[str, int]:
        return {Path(f["path"]).name: int(f.get("file_size", 0)) for f in self._list("") if not f.get("is_dir")}

    def tree(self, folder: str) -> dict[str, int]:
        """One listing per folder: the proxy lists one level, each entry by its base name."""
        found: dict[str, int] = {}
        pending = [folder]
        while pending:
            here = pending.pop()
            for entry in self._list(here):
                path = f"{here}/{entry['path']}" if here else str(entry["path"])
                if entry.get("is_dir"):
                    pending.append(artifact_path(path, self.uri))  # never list a folder outside this one
                else:
                    found[path] = int(entry.get("file_size", 0))
        return found

    def _list(self, folder: str) -> list[dict[str, Any]]:
        """The entries of one folder under this one ("" for this one)."""
        path = "/".join(part for part in (self.path, folder) if part)
        try:
            found = self.rest.request("GET", "/api/2.0/mlflow-artifacts/artifacts", {"path": path})
        except ServerError as error:
            raise self._store_failed(error) from None
        return list(found.get("files", []))

    def open(self, name: str) -> BinaryIO:
        url = f"{self.rest.base}/api/2.0/mlflow-artifacts/artifacts/{urllib.parse.quote(f'{self.path}/{name}')}"
        try:
            answer: BinaryIO = self.rest.open_url(url)
            return answer
        except urllib.error.HTTPError as error:
            refusal = self.rest._refusal(url, error)
            raise (self._store_failed(refusal) if isinstance(refusal, ServerError) else refusal) from None
        except OSError as error:
            raise self.rest.unavailable(f"downloading {name} of {self.uri}", error) from None


    def read_failed(self, name: str, error: Exception) -> FerryError:
        return self.rest.unavailable(f"downloading {name} of {self.uri}", error)

    @staticmethod
    def _store_failed(error: ServerError) -> Unavailable:
        """The server answered, with an error: its proxy's own store (S3 behind it) is the likely cause, and only
        the server's log says more (MLflow answers a failing store with a bare HTTP 500)."""
        return Unavailable(f"{error.message} (the server's artifact proxy: its store may not answer)",
                           "check the tracking server's log and that its --artifacts-destination answers")


class S3Store(ArtifactStore):
    """An s3:// folder, read with boto3 (imported here only) and MLflow's own variables for the endpoint."""

    def __init__(self, uri: str, timeout_s: float) -> None:
        self.uri = uri
        parsed = urllib.parse.urlparse(uri)
        self.bucket, self.prefix = parsed.netloc, parsed.path.strip("/")
        self.client = _s3_client(timeout_s)

    def _fail(self, what: str, error: Exception) -> FerryError:
        return s3_failure(what, error, str(self.client.meta.endpoint_url))

    def read_failed(self, name: str, error: Exception) -> FerryError:
        return self._fail(f"downloading {name} of {self.uri}", error)

    def sizes(self) -> dict[str, int]:
        try:
            found = self.client.list_objects_v2(Bucket=self.bucket, Prefix=f"{self.prefix}/", Delimiter="/")
        except Exception as error:  # boto3's boundary: whatever it raises becomes ferry's
            raise self._fail(f"listing {self.uri}", error) from None
        return {Path(o["Key"]).name: int(o["Size"]) for o in found.get("Contents", [])}

    def tree(self, folder: str) -> dict[str, int]:
        """A listing by prefix is recursive already; a page holds at most 1000 keys."""
        root = f"{self.prefix}/" if self.prefix else ""
        below = f"{root}{folder}/" if folder else root
        found: dict[str, int] = {}
        more: dict[str, str] = {}
        while True:
            try:
                page = self.client.list_objects_v2(Bucket=self.bucket, Prefix=below, **more)
            except Exception as error:  # boto3's boundary: whatever it raises becomes ferry's
                raise self._fail(f"listing {self.uri}/{folder}", error) from None
            for entry in page.get("Contents", []):
                key, size = str(entry["Key"]), int(entry["Size"])
                if not (key.endswith("/") and size == 0):  # an empty key ending in / marks a folder (S3 consoles)
                    found[key[len(root):]] = size
            if not page.get("IsTruncated"):
                return found
            more = {"ContinuationToken": str(page["NextContinuationToken"])}

    def open(self, name: str) -> BinaryIO:
        key = f"{self.prefix}/{name}" if self.prefix else name
        try:
            body: BinaryIO = self.client.get_object(Bucket=self.bucket, Key=key)["Body"]
            return body
        except Exception as error:  # boto3's boundary: whatever it raises becomes ferry's
            raise self._fail(f"downloading {name} of {self.uri}", error) from None


# What each refusal of the credentials says about the variable that holds them.
REFUSED_CREDENTIALS = {
    "InvalidAccessKeyId": "the store knows no AWS_ACCESS_KEY_ID of that name",
    "SignatureDoesNotMatch": "AWS_SECRET_ACCESS_KEY is not the secret of that AWS_ACCESS_KEY_ID",
    "AccessDenied": "the identity of AWS_ACCESS_KEY_ID may not read there",
    "403": "the store refused AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY",
}


def s3_failure(what: str, error: Exception, endpoint: str) -> FerryError:
    """An S3 client's error as ferry's: not found, credentials refused (naming the variable), or unavailable."""
    code = str(getattr(error, "response", {}).get("Error", {}).get("Code", ""))
    if code in ("NoSuchKey", "NoSuchBucket", "404"):
        return RegistryError(f"S3: {what}: {code}", "check the version's artifacts in its bucket")
    if code in REFUSED_CREDENTIALS:
        return Misconfigured(f"S3 refused the credentials while {what}: {code}: {REFUSED_CREDENTIALS[code]}",
                             "check AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY")
    if type(error).__name__ in ("NoCredentialsError", "PartialCredentialsError"):  # botocore's, before any request
        return Misconfigured(f"no S3 credentials for {what}: {error}",
                             "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or give the process a profile or role "
                             "boto3 finds (AWS_PROFILE, an instance or pod identity)")
    return Unavailable(f"S3 at {endpoint} failed while {what}: {type(error).__name__}: {error}",
                       "check MLFLOW_S3_ENDPOINT_URL and that the object store answers")


def _credentials() -> dict[str, str]:
    """The Authorization header MLflow's variables give, as MLflow's client builds it (none without them)."""
    if token := os.environ.get("MLFLOW_TRACKING_TOKEN"):
        return {"Authorization": f"Bearer {token}"}
    user, password = os.environ.get("MLFLOW_TRACKING_USERNAME"), os.environ.get("MLFLOW_TRACKING_PASSWORD")
    if user and password:
        return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}
    return {}


def _s3_client(timeout_s: float) -> Any:
    """boto3's client, with boto3's own search for credentials (variables, a profile, an instance or pod role)."""
    try:
        import boto3
        from botocore.config import Config
    except ImportError:
        raise Misconfigured("this version's artifacts are on S3, and boto3 is not installed",
                            "install ferry with its s3 extra: pip install 'ferry[s3]'") from None

    config = Config(connect_timeout=timeout_s, read_timeout=timeout_s, retries={"max_attempts": 2})
    endpoint = os.environ.get("MLFLOW_S3_ENDPOINT_URL") or None
    try:
        return boto3.client("s3", endpoint_url=endpoint, config=config)
    except Exception as error:  # botocore's, at once: partial credentials in the environment, a bad endpoint URL
        raise s3_failure("starting the S3 client", error, endpoint or "AWS") from None
