"""MLflow Model Registry access: resolve an alias or a version, list and download its artifacts.

mlflow is imported lazily: it costs seconds to import and only deploys need it. Against a tracking server
(http(s)://) the deploy path does not import it at all: ferry.core.mlflow_rest talks to the server's REST API.
"""

from __future__ import annotations

import errno
import os
import stat
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ferry.core.errors import FerryError, NoSuchModel, RegistryError, Unavailable
from ferry.core.fsutil import copy_and_hash, sha256_file
from ferry.core.mlflow_rest import NOT_FOUND, ArtifactStore, MlflowRest, artifact_path

if TYPE_CHECKING:
    from mlflow.store.artifact.artifact_repo import ArtifactRepository


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
        self.tracking_uri = tracking_uri
        self.rest = MlflowRest(tracking_uri, timeout_s) if tracking_uri.startswith(("http://", "https://")) else None
        self._client: Any = None
        if self.rest is None:
            self._client = self.client

    @property
    def client(self) -> Any:
        """MLflow's own client (imported on first use; a server's deploy path never needs it)."""
        if self._client is None:
            from mlflow import MlflowClient

            self._client = MlflowClient(tracking_uri=self.tracking_uri, registry_uri=self.tracking_uri)
        return self._client

    def fail(self, what: str, error: Exception) -> FerryError:
        """An MLflow error as ferry's: a refusal (unknown name, alias, version) or an MLflow that did not answer."""
        if getattr(error, "error_code", "") in NOT_FOUND:
            return RegistryError(f"MLflow: {what}: {error}",
                                 "check the name, alias or version in the MLflow Model Registry")
        return Unavailable(
            f"MLflow at {self.tracking_uri} failed while {what}: {type(error).__name__}: {error}",
            "check that MLFLOW_TRACKING_URI points at a reachable tracking server",
        )

    def _unknown_model(self, model: str, error: Exception) -> NoSuchModel | None:
        """NoSuchModel when ``error`` came from a registered model that does not exist."""
        if getattr(error, "error_code", "") != "RESOURCE_DOES_NOT_EXIST":
            return None
        try:
            self.client.get_registered_model(model)
        except Exception as lookup:  # MLflow's boundary: whatever its client raises
            if getattr(lookup, "error_code", "") == "RESOURCE_DOES_NOT_EXIST":
                return NoSuchModel(f"no model named '{model}' in MLflow at {self.tracking_uri}",
                                   "check the name, or register the model first")
        return None

    def _ref(self, found: Any, alias: str | None) -> VersionRef:
        source = found.source or ""
        # A run's artifacts are found through the run; other sources may be stored elsewhere.
        if source.startswith("runs:/"):
            uri = source
        else:
            uri = self.client.get_model_version_download_uri(found.name, str(found.version))
        return VersionRef(found.name, int(found.version), found.run_id or "", found.source or "", alias, uri)

    def _aliases(self, model: str) -> dict[str, int]:
        try:
            return {alias: int(v) for alias, v in self.client.get_registered_model(model).aliases.items()}
        except Exception as error:  # MLflow's boundary: whatever its client raises
            raise self._unknown_model(model, error) or self.fail(f"reading registered model '{model}'", error) from None

    def _rest_ref(self, model: str, alias: str | None, version: int | None) -> VersionRef:
        assert self.rest is not None
        try:
            found = self.rest.version_by_alias(model, alias) if version is None and alias else \
                self.rest.version(model, int(version or 0))
        except RegistryError:
            try:
                known = ", ".join(f"{a} -> v{v}" for a, v in sorted(self.rest.aliases(model).items())) or "none"
            except RegistryError:
                raise NoSuchModel(f"no model named '{model}' in MLflow at {self.tracking_uri}",
                                  "check the name, or register the model first") from None
            what = f"no alias '{alias}'" if version is None else f"no version {version}"
            raise RegistryError(f"model '{model}' has {what} in MLflow", f"its aliases: {known}") from None
        source = str(found.get("source", ""))
        return VersionRef(str(found["name"]), int(found["version"]), str(found.get("run_id", "")), source, alias,
                          source)

    def resolve_alias(self, model: str, alias: str) -> VersionRef:
        if self.rest is not None:
            return self._rest_ref(model, alias, None)
        try:
            return self._ref(self.client.get_model_version_by_alias(model, alias), alias)
        except Exception as error:  # MLflow's boundary: whatever its client raises
            if getattr(error, "error_code", "") != "INVALID_PARAMETER_VALUE":
                raise self._unknown_model(model, error) or self.fail(f"resolving '{model}@{alias}'", error) from None
        known = ", ".join(f"{a} -> v{v}" for a, v in sorted(self._aliases(model).items())) or "none"
        raise RegistryError(f"model '{model}' has no alias '{alias}' in MLflow", f"its aliases: {known}")

    def get_version(self, model: str, version: int, alias: str | None = None) -> VersionRef:
        if self.rest is not None:
            return self._rest_ref(model, alias, version)
        try:
            return self._ref(self.client.get_model_version(model, str(version)), alias)
        except Exception as error:  # MLflow's boundary: whatever its client raises
            raise self._unknown_model(model, error) or self.fail(f"reading version {version} of '{model}'",
                                                                 error) from None

    def _open(self, ref: VersionRef, uri: str) -> Artifacts:
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        try:
            repository = get_artifact_repository(uri, self.tracking_uri, self.tracking_uri)
        except Exception as error:  # MLflow's boundary: whatever its client raises
            raise self.fail(f"opening the artifacts at {uri}", error) from None
        return Artifacts(self, ref, uri, repository)

    def artifacts(self, ref: VersionRef,
                  expected: tuple[str, ...] = ("model.onnx", "MLmodel", "config.pbtxt")) -> Artifacts:
        """The version's artifact folder. A runs:/ URI is resolved once to the run's own store, which
        MLflow's runs:/ repository would look up again (with its logged models) on every call; it is
        still the fallback when the run's store does not hold the files."""
        if self.rest is not None:
            store = self.rest.store(self.rest.resolve(ref.artifact_uri, ref.model, ref.version))
            return RestArtifacts(self, ref, store)
        if ref.artifact_uri.startswith("runs:/"):
            from mlflow.store.artifact.runs_artifact_repo import RunsArtifactRepository
            from mlflow.tracking.artifact_utils import get_artifact_uri

            try:
                # MLflow leaves both unannotated
                run_id, path = RunsArtifactRepository.parse_runs_uri(ref.artifact_uri)  # type: ignore[no-untyped-call]
                uri = get_artifact_uri(run_id, path, tracking_uri=self.tracking_uri)  # type: ignore[no-untyped-call]
                direct = self._open(ref, uri)
                if set(expected) & set(direct.sizes()):  # a version's file: ONNX, or a Triton model directory
                    return direct
            except Exception:  # FerryError included: the runs:/ repository below reports it with the user's URI
                pass
        return self._open(ref, ref.artifact_uri)


class Artifacts:
    """One version's artifact folder, resolved once for the listing and every download.

    Downloads may run in several threads at once: the caches are filled under a lock, the digests are set
    one key at a time."""

    def __init__(self, registry: Registry, ref: VersionRef, uri: str, repository: ArtifactRepository | None) -> None:
        self.registry = registry
        self.ref = ref
        self.uri = uri
        self.repository = repository
        self._sizes: dict[str, int] | None = None
        self._trees: dict[str, dict[str, int]] = {}  # folder -> its files, as tree() gives them
        self._listing = threading.Lock()
        self._digests: dict[str, str] = {}  # sha256 of the files copied and hashed in one pass

    @property
    def local_dir(self) -> Path | None:
        """The folder itself, when MLflow's local-filesystem store holds it."""
        found = getattr(self.repository, "artifact_dir", None)
        return Path(found) if found is not None else None

    def sha256(self, name: str, path: Path) -> str:
        """The sha256 of a downloaded file: the one computed while copying it, else read back from disk."""
        return self._digests.get(name) or sha256_file(path)

    def sizes(self) -> dict[str, int]:
        """File name -> size in bytes of the files at the top of the folder."""
        if self._sizes is None:
            assert self.repository is not None, "a folder without MLflow's repository lists itself (RestArtifacts)"
            try:
                listing = self.repository.list_artifacts()
            except Exception as error:  # MLflow's boundary: whatever its client raises
                raise self.registry.fail(f"listing the artifacts of {self.uri}", error) from None
            self._sizes = {Path(f.path).name: (f.file_size or 0) for f in listing if not f.is_dir}
        return self._sizes

    def tree(self, folder: str = "") -> dict[str, int]:
        """Every regular file under ``folder`` ("" for the whole folder), recursively: its posix path relative to
        the version's folder -> its size in bytes. A link, or a path that could leave the folder, is refused."""
        if folder:
            artifact_path(folder, self.uri)
        with self._listing:
            if folder not in self._trees:
                listed = self._list_tree(folder)
                self._trees[folder] = {self._checked(path, folder): size for path, size in sorted(listed.items())}
            return self._trees[folder]

    def _checked(self, path: str, folder: str) -> str:
        artifact_path(path, self.uri)
        if folder and not path.startswith(f"{folder}/"):
            raise RegistryError(f"listing {folder} of {self.uri} gave {path!r}, which is not under it",
                                "check the logged artifacts and the artifact store")
        return path

    def _list_tree(self, folder: str) -> dict[str, int]:
        """MLflow's listing, one folder at a time; on the local store each entry is checked before it is used."""
        assert self.repository is not None, "a folder without MLflow's repository lists itself (RestArtifacts)"
        local = self.local_dir
        if local is not None and folder:
            refuse_links(local, folder, self.uri)
        found: dict[str, int] = {}
        pending = [folder]
        while pending:
            here = pending.pop()
            try:
                listing = self.repository.list_artifacts(here or None)
            except Exception as error:  # MLflow's boundary: whatever its client raises
                raise self.registry.fail(f"listing {here or 'the artifacts'} of {self.uri}", error) from None
            for entry in listing:
                path = artifact_path(str(entry.path), self.uri)
                size = self._local_entry(local, path, bool(entry.is_dir)) if local is not None else None
                if entry.is_dir:
                    pending.append(path)
                else:
                    found[path] = (entry.file_size or 0) if size is None else size
        return found

    def _local_entry(self, local: Path, path: str, is_dir: bool) -> int:
        """The size of a regular file of the local store; a link, or anything else than what was listed, is refused."""
        mode = os.lstat(local / path)
        if stat.S_ISLNK(mode.st_mode):
            raise RegistryError(f"{path} in {self.uri} is a symbolic link; ferry copies only regular files",
                                "log the model's real files, not links to them")
        if not (stat.S_ISDIR(mode.st_mode) if is_dir else stat.S_ISREG(mode.st_mode)):
            raise RegistryError(f"{path} in {self.uri} is not a regular file or folder",
                                "log the model's files as regular files")
        return mode.st_size

    def download(self, name: str, destination: Path) -> Path:
        """Copy the file ``name`` (a relative path, nested or not) to ``destination / name``: a regular file, never
        a link, and never written through one. Safe from several threads at once.

        A full disk raises the OSError itself, so that the caller can clean up and say so.
        """
        assert self.repository is not None, "a folder without MLflow's repository downloads itself (RestArtifacts)"
        artifact_path(name, self.uri)
        local = self.local_dir
        if local is not None:
            refuse_links(local, name, self.uri)
            if (local / name).is_file():
                target = prepare_target(destination, name)
                self._digests[name] = copy_and_hash(local / name, target)
                return target
        prepare_target(destination, name, create=False)
        try:
            path = Path(self.repository.download_artifacts(  # type: ignore[no-untyped-call]  # MLflow: unannotated
                name, dst_path=str(destination)))
        except Exception as error:  # MLflow's boundary: whatever its client raises
            if full := disk_full(error):
                raise full from error
            raise self.registry.fail(f"downloading {name} of {self.uri}", error) from None
        if os.path.abspath(path) != os.path.abspath(destination / name) or path.is_symlink() or not path.is_file():
            raise RegistryError(f"downloading {name} of {self.uri} gave {path}, not a regular file "
                                f"{destination / name}",
                             "the artifact store returned something else than the file; check the logged artifact")
        return path


class RestArtifacts(Artifacts):
    """A tracking server's version folder (s3:// or its proxy), read without mlflow: Artifacts' calls."""

    def __init__(self, registry: Registry, ref: VersionRef, store: ArtifactStore) -> None:
        super().__init__(registry, ref, store.uri, None)  # its sizes and downloads go through the store
        self.store = store

    def sizes(self) -> dict[str, int]:
        if self._sizes is None:
            self._sizes = self.store.sizes()
        return self._sizes

    def _list_tree(self, folder: str) -> dict[str, int]:
        return self.store.tree(folder)

    def download(self, name: str, destination: Path) -> Path:
        """Stream ``name`` into ``destination / name``, hashed on the way; a full disk raises its OSError.

        The bytes written must be as many as the listing said: a body cut short reads as a complete one
        through the server's proxy (http.client does not raise on a connection closed early)."""
        path = prepare_target(destination, artifact_path(name, self.uri))
        try:
            self._digests[name] = self.store.download(name, path)
        except FerryError:
            path.unlink(missing_ok=True)  # the store's failure leaves no file behind (a full disk: the caller's)
            raise
        listed, written = self._listed(name), path.stat().st_size
        if listed and written != listed:
            raise Unavailable(f"downloading {name} of {self.uri} gave {written} bytes, its listing {listed}: the "
                              "transfer was cut short, or the file changed meanwhile",
                              "deploy again; if it happens again, check the artifact store and its proxy")
        return path

    def _listed(self, name: str) -> int:
        """The size the listing gave ``name``: the folder's top, a tree already listed, else its own folder's."""
        if "/" not in name:
            return self.sizes().get(name, 0)
        with self._listing:
            sizes = [files[name] for files in self._trees.values() if name in files]
        return sizes[0] if sizes else self.tree(name.rpartition("/")[0]).get(name, 0)


def refuse_links(root: Path, name: str, uri: str) -> None:
    """RegistryError when ``root / name``, or a folder on the way to it, is a symbolic link."""
    here = root
    for part in name.split("/"):
        here = here / part
        if here.is_symlink():
            raise RegistryError(f"{name} in {uri} is, or lies under, a symbolic link ({here}); ferry copies only "
                                "regular files", "log the model's real files, not links to them")


def prepare_target(destination: Path, name: str, create: bool = True) -> Path:
    """``destination / name`` with its folders made, none of them a link; ``create`` makes it an empty regular
    file (never a link's target: O_NOFOLLOW), which the download then writes."""
    target = destination / name
    target.parent.mkdir(parents=True, exist_ok=True)
    here = destination
    for part in name.split("/"):
        here = here / part
        if here.is_symlink():
            raise RegistryError(f"the download of {name} would be written through the symbolic link {here}",
                                f"remove the link from {destination}; ferry writes regular files only")
    if create:
        try:
            os.close(os.open(target, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o644))
        except OSError as error:
            if error.errno != errno.ELOOP:
                raise
            raise RegistryError(f"{target} became a symbolic link before the download of {name}",
                                f"remove the link from {destination}; ferry writes regular files only") from None
    return target


def disk_full(error: BaseException | None) -> OSError | None:
    """The out-of-space error behind ``error`` (MLflow may wrap it), if there is one."""
    while error is not None:
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return error
        error = error.__cause__ or error.__context__
    return None
