"""The guarantee inside Triton: clients that call Triton directly, naming no version, reach only committed versions.

Each model is a front and a store (ferry.core.front); these tests drive real Triton clients straight at the
server (no gateway) while ferry deploys good and broken versions, and check the instances Triton keeps.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import numpy as np
import onnxruntime
import pytest
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http

from conftest import World, assert_invariants
from ferry.core.current import read_current
from ferry.core.front import store_name
from ferry.core.runner import deploy
from ferry.core.services import Services
from ferry.core.stubs import stubs_of
from ferry.runtime import server

SAMPLE = np.array([[5.1, 3.5, 1.4, 0.2], [5.9, 3.0, 4.2, 1.5], [6.9, 3.1, 5.4, 2.1]], dtype=np.float32)


@dataclass
class DirectClients:
    """Two clients (HTTP and gRPC) calling Triton in a loop with no version named, recording every answer."""

    world: World
    answers: list[tuple[str, float, np.ndarray]] = field(default_factory=list)  # protocol, received at, output
    failures: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def __enter__(self) -> DirectClients:
        self.threads = [threading.Thread(target=self._loop, args=(p,), daemon=True) for p in ("http", "grpc")]
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=10)

    def _loop(self, protocol: str) -> None:
        endpoint = self.world.settings.triton
        if protocol == "http":
            client, module = triton_http.InferenceServerClient(endpoint.host_port, network_timeout=10), triton_http
        else:
            client, module = triton_grpc.InferenceServerClient(self.world.settings.triton.grpc.host_port), triton_grpc
        while not self.stop.is_set():
            tensor = module.InferInput("X", list(SAMPLE.shape), "FP32")
            tensor.set_data_from_numpy(SAMPLE)
            try:
                result = client.infer(self.world.model, [tensor], client_timeout=10) if protocol == "grpc" \
                    else client.infer(self.world.model, [tensor])
                self.answers.append((protocol, time.time(), result.as_numpy("probabilities")))
            except Exception as error:  # any failure is what the test counts
                self.failures.append(f"{protocol}: {error}")
            time.sleep(0.002)


def _expected(world: World) -> dict[int, np.ndarray]:
    """Each version's answer to SAMPLE, computed with onnxruntime from its files (staged or quarantined)."""
    found = {}
    folders = [*world.model_dir.path.iterdir(), *world.model_dir.quarantine_root.glob("*.failed_*")]
    for folder in folders:
        version = folder.name.split(".")[0]
        if version.isdigit() and (folder / "model.onnx").is_file():
            try:
                session = onnxruntime.InferenceSession(str(folder / "model.onnx"))
            except Exception:  # a version onnxruntime cannot load never answers anyone
                continue
            outputs = session.run(["probabilities"], {"X": SAMPLE})[0]
            found[int(version)] = np.asarray(outputs, dtype=np.float32)
    return found


def _version_of(answer: np.ndarray, expected: dict[int, np.ndarray]) -> int | None:
    matches = [v for v, want in expected.items() if want.shape == answer.shape and np.allclose(want, answer, atol=1e-5)]
    return matches[0] if len(matches) == 1 else None


def test_direct_clients_reach_only_committed_versions_through_good_and_broken_deploys(world: World) -> None:
    world.register()
    assert world.deploy().outcome == "committed"
    committed_at: list[tuple[float, int]] = [(0.0, 1)]
    with DirectClients(world) as clients:
        time.sleep(0.5)
        plan = [("none", 5, "committed"), ("output-shape", 0, "rolled_back"), ("golden-mismatch", 0, "rolled_back"),
                ("unknown-op", 0, "rolled_back")]
        for breakage, trees, outcome in plan:
            world.register(breakage, trees=trees)
            report = world.deploy()
            assert report.outcome == outcome, (breakage, report.error)
            if outcome == "committed":
                committed_at.append((world.model_dir.current_path.stat().st_mtime, report.version))
            time.sleep(0.3)
        rollback = deploy(world.ferry, world.model, version=1)
        assert rollback.outcome == "committed"
        committed_at.append((world.model_dir.current_path.stat().st_mtime, 1))
        time.sleep(0.5)
    assert clients.failures == []
    expected = _expected(world)
    assert sorted(expected) == [1, 2, 3, 4], "v5 (unknown-op) cannot run anywhere; every other version can"
    committed = {version for _, version in committed_at}
    seen: dict[int | None, int] = {}
    for protocol, received, answer in clients.answers:
        version = _version_of(answer, expected)
        seen[version] = seen.get(version, 0) + 1
        assert version in committed, f"a {protocol} client got an answer of v{version}, never committed"
        # The version committed at the moment of the answer, or the one before while the front is repointed.
        moment = max(i for i, (at, _) in enumerate(committed_at) if at <= received)
        allowed = {committed_at[moment][1]} | ({committed_at[moment - 1][1]} if moment else set())
        assert version in allowed, f"a {protocol} answer of v{version} at {received} (committed: {committed_at})"
    assert seen.get(1, 0) > 10 and seen.get(2, 0) > 10, seen
    assert_invariants(world, attempts=6)


def test_a_candidate_load_leaves_the_active_instance_alone(world: World) -> None:
    """The active version's backend stub is the same process before, during and after a candidate's load."""
    world.register()
    world.deploy()
    active = stubs_of(world.model_dir.version_dir(1))
    assert len(active) == 1
    world.register(trees=5)
    report = world.deploy()
    assert report.outcome == "committed"
    assert stubs_of(world.model_dir.version_dir(1)) in (active, [])  # the same instance, or drained and gone
    world.register("golden-mismatch")
    before = stubs_of(world.model_dir.version_dir(2))
    assert world.deploy().outcome == "rolled_back"
    assert stubs_of(world.model_dir.version_dir(2)) == before
    assert_invariants(world, attempts=3)


def test_the_front_is_what_clients_see(world: World) -> None:
    """Metadata, config and answers of the model's name: the committed version alone; a candidate's
    version named by a direct client is refused by Triton."""
    world.register()
    world.deploy()
    client = triton_http.InferenceServerClient(world.settings.triton.endpoint.host_port)
    metadata = client.get_model_metadata(world.model)
    assert metadata["versions"] == ["1"] and metadata["platform"] == "ensemble"
    assert [i["name"] for i in metadata["inputs"]] == ["X"]
    tensor = triton_http.InferInput("X", list(SAMPLE.shape), "FP32")
    tensor.set_data_from_numpy(SAMPLE)
    assert client.infer(world.model, [tensor]).get_response()["model_version"] == "1"
    world.register(trees=5)
    from ferry.core import steps

    snapshot = steps.take_snapshot(world.ferry, world.model)
    candidate = steps.materialize(world.ferry, snapshot, alias="champion")
    steps.load(world.ferry, snapshot, candidate)
    steps.wait_ready(world.ferry, snapshot, candidate)
    with pytest.raises(Exception, match="unknown model"):  # loaded in the store, out of the front's reach
        client.infer(world.model, [tensor], model_version="2")
    assert client.infer(world.model, [tensor]).get_response()["model_version"] == "1"
    steps.smoke(world.ferry, snapshot, candidate)
    steps.commit(world.ferry, snapshot, candidate)
    assert client.infer(world.model, [tensor]).get_response()["model_version"] == "2"
    assert client.get_model_metadata(world.model)["versions"] == ["2"]


def test_a_warm_previous_version_comes_back_without_a_load(world: World) -> None:
    world.register()
    world.deploy()
    world.register(trees=5)
    ferry = Services(world.settings.with_overrides(keep_previous_s=60))
    assert deploy(ferry, world.model, alias="champion").outcome == "committed"
    warm = stubs_of(world.model_dir.version_dir(1))
    assert len(warm) == 1, "the previous version is kept loaded"
    assert ferry.triton.placement(world.model).front == [2]
    current = read_current(world.model_dir)
    assert current.previous_warm_until_utc is not None
    began = time.perf_counter()
    report = deploy(ferry, world.model, version=1)
    elapsed = time.perf_counter() - began
    assert report.outcome == "committed" and "load" not in report.steps, report.steps
    assert stubs_of(world.model_dir.version_dir(1)) == warm, "served again by the same instance: no load"
    assert ferry.triton.placement(world.model).front == [1]
    assert elapsed < 5.0
    # Outside the window (none kept): a rollback loads the version again.
    plain = Services(world.settings)
    assert deploy(plain, world.model, version=2).outcome == "committed"
    assert "load" in deploy(plain, world.model, version=1).steps


def test_a_restarted_triton_gets_its_front_back_from_reconcile(world: World) -> None:
    from ferry.core.reconcile import reconcile

    world.register()
    world.deploy()
    server.down(world.settings, grace_s=0)
    server.up(world.settings)
    assert world.ferry.triton.placement(world.model).front == []
    result = reconcile(world.ferry, world.model)
    assert result.action == "loaded", result.detail
    placement = world.ferry.triton.placement(world.model)
    assert placement.front == [1] and placement.store == [1]
    assert world.ferry.triton.ready_versions(store_name(world.model, 1)) == [1]
    assert_invariants(world, attempts=1)


def test_the_gateway_names_the_model_the_client_asked_for(world: World) -> None:
    """The gateway sends requests to the store's committed version; its answers name the model, not the store."""
    import httpx

    from support.gateway import auth, running_gateway

    world.register()
    world.deploy()
    with running_gateway(world) as gateway:
        body = {"inputs": [{"name": "X", "shape": [1, 4], "datatype": "FP32", "data": [5.1, 3.5, 1.4, 0.2]}]}
        reply = httpx.post(f"{gateway.url}/v2/models/iris/infer", json=body, timeout=10,
                           headers={**auth(), "accept-encoding": "gzip"})
        assert reply.status_code == 200 and reply.json()["model_name"] == "iris", reply.text
        http = triton_http.InferenceServerClient(gateway.url.removeprefix("http://"))
        tensor = triton_http.InferInput("X", [1, 4], "FP32")
        tensor.set_data_from_numpy(SAMPLE[:1], binary_data=True)
        assert http.infer("iris", [tensor], headers=auth()).get_response()["model_name"] == "iris"
        assert http.get_model_metadata("iris", headers=auth())["name"] == "iris"
        assert http.get_model_config("iris", headers=auth())["name"] == "iris"
        grpc = triton_grpc.InferenceServerClient(gateway.grpc)
        tensor = triton_grpc.InferInput("X", [1, 4], "FP32")
        tensor.set_data_from_numpy(SAMPLE[:1])
        answer = grpc.infer("iris", [tensor], headers=auth()).get_response()
        assert (answer.model_name, answer.model_version) == ("iris", "1")
        assert grpc.get_model_metadata("iris", headers=auth()).name == "iris"
