"""A version's artifact folder as a tree (ferry.core.registry.Artifacts.tree and nested downloads), for the
`triton` flavor's model directory: listed recursively, links and paths that could leave the folder refused, and
files downloaded from several threads at once each with its own sha256."""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from ferry.core.errors import RegistryError
from ferry.core.mlflow_rest import ArtifactStore, MlflowRest, ProxyStore, S3Store
from ferry.core.registry import Artifacts, Registry, RestArtifacts, VersionRef

REF = VersionRef("iris", 1, "run", "runs:/run/model", None, "runs:/run/model")
FILES = {
    "MLmodel": b"flavors:\n  triton: {}\n",
    "triton/iris/config.pbtxt": b'backend: "python"\n',
    "triton/iris/1/model.py": b"class TritonPythonModel: ...\n",
    "triton/iris/1/model.savedmodel/saved_model.pb": os.urandom(300),
    "triton/iris/1/model.savedmodel/variables/variables.data-00000-of-00001": os.urandom(5000),
}
HOSTILE = ["../x", "/etc/passwd", "a//b", "a\\b", "a/./b", "triton/../MLmodel", "a\x00b", "", "triton/"]


def _logged(root: Path, files: dict[str, bytes] = FILES) -> Path:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def _artifacts(root: Path) -> Artifacts:
    """The real classes over MLflow's local-filesystem artifact repository (no MLflow client is started)."""
    return Registry("http://127.0.0.1:9")._open(REF, str(root))


@pytest.fixture
def version(tmp_path: Path) -> Artifacts:
    return _artifacts(_logged(tmp_path / "store"))


def test_the_tree_lists_every_nested_file_relative_to_the_root_with_its_size(version: Artifacts) -> None:
    triton = {name: len(data) for name, data in FILES.items() if name.startswith("triton/")}
    assert version.tree("triton") == triton
    assert version.tree("triton/iris/1") == {n: s for n, s in triton.items() if n.startswith("triton/iris/1/")}
    assert version.tree() == {name: len(data) for name, data in FILES.items()}
    assert version.tree("triton") is version.tree("triton"), "listed once per folder"
    assert version.tree("nothing") == {}
    assert version.sizes() == {"MLmodel": len(FILES["MLmodel"])}, "the top of the folder, as before"


@pytest.mark.parametrize("link", ["triton/iris/1/model.py", "triton/iris/1"])
def test_a_symbolic_link_is_refused_in_the_listing_and_the_download(tmp_path: Path, link: str) -> None:
    root = _logged(tmp_path / "store")
    outside = _logged(tmp_path / "outside", {"model.py": b"not the model's", "1/model.py": b"nor this"})
    real = root / link
    if real.is_dir():
        for child in sorted(real.rglob("*"), reverse=True):
            child.unlink() if child.is_file() else child.rmdir()
        real.rmdir()
    else:
        real.unlink()
    real.symlink_to(outside / Path(link).name)
    for listing in ("triton", ""):
        with pytest.raises(RegistryError, match="symbolic link") as refused:
            _artifacts(root).tree(listing)
        assert link in refused.value.message and refused.value.hint
    with pytest.raises(RegistryError, match="symbolic link"):
        _artifacts(root).download("triton/iris/1/model.py", tmp_path / "staging")
    assert not (tmp_path / "staging" / "triton/iris/1/model.py").exists()


@pytest.mark.parametrize("name", HOSTILE)
def test_a_hostile_name_is_refused_before_anything_is_read_or_written(version: Artifacts, tmp_path: Path,
                                                                       name: str) -> None:
    staging = tmp_path / "staging"
    staging.mkdir()
    with pytest.raises(RegistryError, match="ferry reads only plain relative paths") as refused:
        version.download(name, staging)
    assert refused.value.hint
    assert not any(staging.iterdir())


def test_a_hostile_folder_is_refused(version: Artifacts) -> None:
    for folder in ("../store", "/etc", "triton//iris", "triton\\iris"):
        with pytest.raises(RegistryError, match="plain relative paths"):
            version.tree(folder)


def test_downloads_from_a_thread_pool_each_give_their_own_bytes_and_sha256(tmp_path: Path) -> None:
    files = {f"triton/m/{k}/sub{k % 3}/part{i}.bin": os.urandom(1000 + 97 * i + k) for k in range(4) for i in range(12)}
    version = _artifacts(_logged(tmp_path / "store", files))
    listed = version.tree("triton")
    assert listed == {name: len(data) for name, data in files.items()}
    staging = tmp_path / "staging"
    with ThreadPoolExecutor(8) as pool:
        paths = dict(zip(listed, pool.map(lambda name: version.download(name, staging), listed), strict=True))
    for name, path in paths.items():
        assert path == staging / name and not path.is_symlink() and path.read_bytes() == files[name]
        assert version._digests[name] == hashlib.sha256(files[name]).hexdigest(), "hashed while it was copied"
        assert version.sha256(name, path) == hashlib.sha256(files[name]).hexdigest()


def test_a_top_level_download_is_as_before(version: Artifacts, tmp_path: Path) -> None:
    path = version.download("MLmodel", tmp_path)
    assert path == tmp_path / "MLmodel" and path.read_bytes() == FILES["MLmodel"]
    assert version.sha256("MLmodel", path) == hashlib.sha256(FILES["MLmodel"]).hexdigest()


def test_a_download_is_never_written_through_a_link_in_the_destination(version: Artifacts, tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    staging = tmp_path / "staging"
    (staging / "triton").mkdir(parents=True)
    (staging / "triton" / "iris").symlink_to(elsewhere)
    with pytest.raises(RegistryError, match="symbolic link"):
        version.download("triton/iris/config.pbtxt", staging)
    assert not any(elsewhere.iterdir())


# ---------------------------------------------------------------- a tracking server's stores


class TreeStore(ArtifactStore):
    """A store whose listing and files are given (what a tracking server's proxy or a bucket would answer)."""

    uri = "mlflow-artifacts:/1/run/artifacts/model"

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = files

    def sizes(self) -> dict[str, int]:
        return {name: len(data) for name, data in self.files.items() if "/" not in name}

    def tree(self, folder: str) -> dict[str, int]:
        return {name: len(data) for name, data in self.files.items() if name.startswith(f"{folder}/")}

    def open(self, name: str) -> Any:
        import io

        return io.BytesIO(self.files[name])


@pytest.mark.parametrize("listed", ["triton/../../x", "triton//m", "triton/m\\1", "triton/./m"])
def test_a_store_listing_a_hostile_path_is_refused(listed: str) -> None:
    store = TreeStore({"triton/m/config.pbtxt": b"x", listed: b"y"})
    with pytest.raises(RegistryError, match="plain relative paths"):
        RestArtifacts(Registry("http://127.0.0.1:9"), REF, store).tree("triton")


def test_a_nested_rest_download_is_checked_against_its_listing(tmp_path: Path) -> None:
    store = TreeStore({"triton/m/1/model.py": b"abc"})
    artifacts = RestArtifacts(Registry("http://127.0.0.1:9"), REF, store)
    path = artifacts.download("triton/m/1/model.py", tmp_path)
    assert path.read_bytes() == b"abc" and artifacts.sha256("triton/m/1/model.py", path) == \
        hashlib.sha256(b"abc").hexdigest()
    store.files["triton/m/1/model.py"] = b"abcdef"  # the listing above said 3 bytes
    with pytest.raises(Exception, match="gave 6 bytes, its listing 3"):
        artifacts.download("triton/m/1/model.py", tmp_path / "again")


class ListingRest(MlflowRest):
    """The proxy's list API, one folder per call (MLflow's handler answers base names)."""

    def __init__(self, folders: dict[str, list[dict[str, Any]]]) -> None:
        super().__init__("http://127.0.0.1:9", timeout_s=1)
        self.folders, self.asked = folders, []

    def request(self, method: str, path: str, query: dict[str, str] | None = None,
                body: dict[str, Any] | None = None) -> dict[str, Any]:
        assert query is not None
        self.asked.append(query["path"])
        return {"files": self.folders.get(query["path"], [])}


def test_the_proxy_lists_one_folder_at_a_time_and_never_outside_its_folder() -> None:
    root = "1/run/artifacts/model"
    rest = ListingRest({
        f"{root}/triton": [{"path": "m", "is_dir": True}],
        f"{root}/triton/m": [{"path": "config.pbtxt", "file_size": 5}, {"path": "1", "is_dir": True}],
        f"{root}/triton/m/1": [{"path": "model.py", "file_size": 7}],
    })
    store = ProxyStore(rest, f"mlflow-artifacts:/{root}")
    assert store.tree("triton") == {"triton/m/config.pbtxt": 5, "triton/m/1/model.py": 7}
    rest.folders[f"{root}/triton/m/1"] = [{"path": "..", "is_dir": True}]
    with pytest.raises(RegistryError, match="plain relative paths"):
        store.tree("triton")
    assert f"{root}/triton/m/1/.." not in rest.asked


class PagedS3:
    """list_objects_v2 as S3 answers a long listing: pages joined by a continuation token."""

    class meta:
        endpoint_url = "http://127.0.0.1:9"

    def __init__(self) -> None:
        self.calls: list[dict[str, Any]] = []

    def list_objects_v2(self, **asked: Any) -> dict[str, Any]:
        self.calls.append(asked)
        if "ContinuationToken" not in asked:
            return {"Contents": [{"Key": "direct/1/run/artifacts/model/triton/m/", "Size": 0},
                                 {"Key": "direct/1/run/artifacts/model/triton/m/config.pbtxt", "Size": 5}],
                    "IsTruncated": True, "NextContinuationToken": "next"}
        return {"Contents": [{"Key": "direct/1/run/artifacts/model/triton/m/1/sub/data.bin", "Size": 9}],
                "IsTruncated": False}


def test_s3_lists_a_folder_by_its_prefix_page_after_page() -> None:
    store = S3Store("s3://bucket/direct/1/run/artifacts/model", timeout_s=1)
    store.client = PagedS3()
    assert store.tree("triton") == {"triton/m/config.pbtxt": 5, "triton/m/1/sub/data.bin": 9}
    assert [c["Prefix"] for c in store.client.calls] == ["direct/1/run/artifacts/model/triton/"] * 2
    assert store.client.calls[1]["ContinuationToken"] == "next"
