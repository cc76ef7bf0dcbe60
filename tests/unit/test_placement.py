"""How a replica is moved from one version to another: the front is never left pointing at a store already
unloaded, and each version's store keeps its own config."""

from __future__ import annotations

from pathlib import Path

from ferry.core.model_config import build_config, onnx_signature
from ferry.core.placement import serve
from ferry.core.repository import ModelDir

from .fakes import FakeTriton, tiny_onnx, write_version_files


def _replica(tmp_path: Path, front: int, store: list[int]) -> FakeTriton:
    model_dir = ModelDir(tmp_path, "iris")
    for version in store:
        write_version_files(model_dir.version_dir(version), tiny_onnx())
    model_dir.ensure()
    for version in store:
        model_dir.ensure_store_link(version)
    stores = {f"iris.versions.{v}": {v: "READY"} for v in store}
    return FakeTriton(tmp_path, models={"iris": {front: "READY"}, **stores})


def test_a_replica_astray_keeps_what_its_front_serves_until_the_front_is_repointed(tmp_path: Path) -> None:
    import onnx

    triton = _replica(tmp_path, front=5, store=[5, 7])
    config = build_config("iris", onnx_signature(onnx.load_from_string(tiny_onnx())), "python")
    serve(triton, "iris", config, 7, [7])  # reconcile's call: what the replica holds is looked up
    assert triton.loads == [("iris.versions.7", [7]), ("iris", [7])]
    assert triton.unloads == ["iris.versions.5"]  # after the front was repointed away from it
    assert triton.placement("iris").settled([7])


def test_a_known_previous_version_is_used_as_it_is(tmp_path: Path) -> None:
    import onnx

    triton = _replica(tmp_path, front=5, store=[5, 7])
    config = build_config("iris", onnx_signature(onnx.load_from_string(tiny_onnx())), "python")
    serve(triton, "iris", config, 7, [7, 5], loaded=[5, 7])  # the commit's call, keeping 5 warm: no lookup
    assert triton.loads == [("iris.versions.7", [7]), ("iris", [7])]
    assert triton.unloads == []
