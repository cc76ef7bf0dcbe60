"""MLflow Model Registry access: resolve an alias or a version, list and download its artifacts.

mlflow is imported lazily: it costs seconds to import and only deploys need it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from ferry.errors import FerryError


@dataclass(frozen=True)
class VersionRef:
    model: str
    version: int
    run_id: str
    source: str
    alias: str | None
    artifact_uri: str  # where the version's files are: runs:/<id>/onnx, models:/m-<id>, s3://...


class Registry:
    def __init__(self, tracking_uri: str, timeout_s: float = 30.0) -> None:
        # Without these, the MLflow client retries an unreachable server for minutes.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(int(timeout_s)))
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        from mlflow import MlflowClient

        self.tracking_uri = tracking_uri
        self.client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)

    def _fail(self, what: str, error: Exception) -> FerryError:
        code = getattr(error, "error_code", "")
        if code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return FerryError(f"MLflow: {what}: {error}", "check the name, alias or version in the MLflow Model Registry")
        return FerryError(
            f"MLflow at {self.tracking_uri} failed while {what}: {type(error).__name__}: {error}",
            "check that MLFLOW_TRACKING_URI points at a reachable tracking server",
        )

    def _ref(self, found, alias: str | None) -> VersionRef:
        uri = self.client.get_model_version_download_uri(found.name, str(found.version))
        return VersionRef(found.name, int(found.version), found.run_id or "", found.source or "", alias, uri)

    def _aliases(self, model: str) -> dict[str, int]:
        try:
            return {alias: int(v) for alias, v in self.client.get_registered_model(model).aliases.items()}
        except Exception as error:
            raise self._fail(f"reading registered model '{model}'", error)

    def resolve_alias(self, model: str, alias: str) -> VersionRef:
        aliases = self._aliases(model)
        if alias not in aliases:
            known = ", ".join(f"{a} -> v{v}" for a, v in sorted(aliases.items())) or "none"
            raise FerryError(f"model '{model}' has no alias '{alias}' in MLflow", f"its aliases: {known}")
        return self.get_version(model, aliases[alias], alias)

    def get_version(self, model: str, version: int, alias: str | None = None) -> VersionRef:
        try:
            return self._ref(self.client.get_model_version(model, str(version)), alias)
        except Exception as error:
            raise self._fail(f"reading version {version} of '{model}'", error)

    def artifact_sizes(self, ref: VersionRef) -> dict[str, int]:
        """File name -> size in bytes of the version's top-level artifacts."""
        import mlflow

        try:
            listing = mlflow.artifacts.list_artifacts(artifact_uri=ref.artifact_uri, tracking_uri=self.tracking_uri)
        except Exception as error:
            raise self._fail(f"listing the artifacts of {ref.artifact_uri}", error)
        return {Path(f.path).name: (f.file_size or 0) for f in listing if not f.is_dir}

    def download(self, ref: VersionRef, name: str, destination: Path) -> Path:
        import mlflow

        try:
            path = mlflow.artifacts.download_artifacts(
                artifact_uri=f"{ref.artifact_uri}/{name}", dst_path=str(destination), tracking_uri=self.tracking_uri
            )
        except Exception as error:
            raise self._fail(f"downloading {name} of {ref.artifact_uri}", error)
        return Path(path)
