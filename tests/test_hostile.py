"""Hostile or broken input: refused with a clear error, current.json and what Triton serves unchanged.

Rows of the list covered elsewhere: names with path separators or '..' and an unreachable Triton
(test_deploy.py), bytes that are not ONNX (the corrupt-bytes case of BROKEN_VERSIONS), version
directories ferry did not write (test_deploy.py).
"""

from __future__ import annotations

import errno
import socket
import threading
from pathlib import Path

import pytest

from conftest import World, assert_invariants, make_settings
from ferry.core.registry import Artifacts
from ferry.core.runner import deploy
from ferry.core.services import Services


@pytest.fixture
def serving_v1(world: World) -> World:
    """v1 committed and serving, v2 registered under the alias: the state each hostile deploy must keep."""
    world.register()
    assert world.deploy().outcome == "committed"
    world.register(trees=5)
    return world


def assert_unchanged(world: World, before: bytes | None, attempts: int = 2) -> None:
    assert world.current_bytes() == before
    assert world.ferry.triton.ready_versions(world.model) == [1]
    assert not world.model_dir.version_dir(2).exists()
    assert_invariants(world, attempts)


def test_an_artifact_that_is_a_symbolic_link_is_refused(serving_v1: World, tmp_path: Path) -> None:
    world, before = serving_v1, serving_v1.current_bytes()
    ref = world.ferry.registry.resolve_alias(world.model, "champion")
    store = Path(world.ferry.registry.artifacts(ref).repository.artifact_dir)
    outside = tmp_path / "elsewhere.onnx"  # a valid model, outside the artifact store
    (store / "model.onnx").rename(outside)
    (store / "model.onnx").symlink_to(outside)

    report = world.deploy()
    assert (report.outcome, report.failed_step) == ("rolled_back", "materialize")
    assert "model.onnx" in report.error and "a symbolic link" in report.error
    assert_unchanged(world, before)


def test_an_artifact_over_the_size_limit_is_refused_before_download(serving_v1: World) -> None:
    world, before = serving_v1, serving_v1.current_bytes()
    report = world.deploy(max_artifact_mb=0.001)
    assert (report.outcome, report.failed_step) == ("rolled_back", "materialize")
    assert "over the limit of 1048" in report.error and "FERRY_MAX_ARTIFACT_MB" in report.hint
    assert report.rollback.quarantined == []  # refused from the listing: nothing was downloaded
    assert_unchanged(world, before)


@pytest.mark.parametrize("content", [b"", b'{"active_version": 1, "run_id": "ab', b"not json at all\n"],
                         ids=["empty", "truncated", "not-json"])
def test_a_damaged_current_json_is_refused_and_left_as_it_is(serving_v1: World, content: bytes) -> None:
    world = serving_v1
    world.model_dir.current_path.write_bytes(content)
    report = world.deploy()
    assert report.outcome == "rejected"
    assert "current.json is unreadable" in report.error and "will not guess" in report.error
    assert "restore it from the last 'committed' line of history.jsonl" in report.hint
    assert world.model_dir.current_path.read_bytes() == content
    assert world.ferry.triton.ready_versions(world.model) == [1]
    assert not world.model_dir.version_dir(2).exists()


def test_a_full_disk_during_materialize_is_reported_and_cleaned_up(serving_v1: World,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    world, before = serving_v1, serving_v1.current_bytes()

    def fake_full_disk_download(self: Artifacts, name: str, destination: Path) -> Path:
        (destination / name).write_bytes(b"\0" * 4096)  # a partial file, then the device is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Artifacts, "download", fake_full_disk_download)
    report = world.deploy()
    assert (report.outcome, report.failed_step) == ("rolled_back", "materialize")
    assert "no space left on the device" in report.error and "free space" in report.hint
    assert report.rollback.quarantined == []  # the partial files were removed, not kept
    assert_unchanged(world, before)


def test_an_unreachable_mlflow_is_rejected_and_nothing_changes(serving_v1: World, tmp_path: Path) -> None:
    world, before = serving_v1, serving_v1.current_bytes()
    closed_port = make_settings(tmp_path).triton.urls.rsplit(":", 1)[1]
    report = deploy(Services(world.settings.with_overrides(tracking_uri=f"http://127.0.0.1:{closed_port}")),
                    world.model, alias="champion")
    assert report.outcome == "rejected"
    assert f"MLflow at http://127.0.0.1:{closed_port} failed" in report.error and "MLFLOW_TRACKING_URI" in report.hint
    assert_unchanged(world, before)


@pytest.fixture
def fake_silent_triton():
    """Fault injection: a server that accepts connections and never answers, like a Triton stuck in a load."""
    listener = socket.create_server(("127.0.0.1", 0))
    held: list[socket.socket] = []

    def accept() -> None:
        while True:
            try:
                held.append(listener.accept()[0])
            except OSError:
                return

    threading.Thread(target=accept, daemon=True).start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    listener.close()
    for connection in held:
        connection.close()


def test_a_triton_that_does_not_answer_times_out_and_nothing_changes(serving_v1: World,
                                                                     fake_silent_triton: str) -> None:
    world, before = serving_v1, serving_v1.current_bytes()
    silent = world.settings.with_overrides(triton_url=fake_silent_triton, triton_timeout_s=1.0)
    report = deploy(Services(silent), world.model, alias="champion")
    assert report.outcome == "rejected"
    assert f"Triton at {fake_silent_triton} did not answer" in report.error and "within 1 s" in report.error
    assert_unchanged(world, before)
