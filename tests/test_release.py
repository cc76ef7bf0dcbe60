"""Releases on a real Triton: an ensemble (examples/release.py: scale -> score) and its two Python-backend members,
deployed, failed and rolled back as one, under steady load through the gateway (HTTP and gRPC) and straight at
Triton's front; a member shared by two releases. Every answer names the member versions that computed it."""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import mlflow
import numpy as np
import pytest
import tritonclient.grpc as grpcclient
from release import pipeline_config, register_release
from sklearn.datasets import load_iris
from tritonclient.utils import InferenceServerException

from conftest import World, assert_invariants, assert_replica_invariants
from ferry.core.config import Settings
from ferry.core.current import read_current, read_history
from ferry.core.errors import InvalidInput
from ferry.core.front import store_name
from ferry.core.release import pinned_versions
from ferry.core.repository import ModelDir
from ferry.core.retire import retire
from ferry.publish import log_triton_model, register_version
from support.gateway import TOKEN, auth, running_gateway

PREFIX = "rel"
ENTRY, SCALE, SCORE = f"{PREFIX}_pipeline", f"{PREFIX}_scale", f"{PREFIX}_score"
ROW = [5.1, 3.5, 1.4, 0.2]
BODY = {"inputs": [{"name": "X", "shape": [1, 4], "datatype": "FP32", "data": ROW}]}


class ReleaseWorld(World):
    """A world whose model is the entry of examples/release.py's pipeline (<prefix>_pipeline)."""

    def register_release(self, breakage: str = "none", factor: float = 1.0) -> dict[str, int]:
        prefix = self.model.removesuffix("_pipeline")
        return register_release(prefix, "champion", breakage, factor, self.settings.tracking_uri)

    def member_dir(self, name: str) -> ModelDir:
        return ModelDir(self.settings.repository, name)


@pytest.fixture(scope="module")
def released(triton_settings: Settings) -> ReleaseWorld:
    return ReleaseWorld(triton_settings, model=ENTRY)


def assert_release_invariants(world: ReleaseWorld, attempts: int | None, entry: str = ENTRY) -> None:
    """The design's invariants for the entry, and for each member of the committed release: its version's files
    are the ones recorded, every replica holds its store ready, it has no current.json and no front, and its
    stores hold nothing that no committed release pins (a failed release left no candidate loaded).
    ``attempts`` None: what Triton holds only (a rollback that could not reach a dead replica is recorded
    unverified, as it should be)."""
    entry_world = ReleaseWorld(world.settings, model=entry)
    if attempts is None:
        for replica in world.ferry.fleet().replicas:
            assert_replica_invariants(entry_world, replica.placement(entry), read_current(entry_world.model_dir),
                                      replica.url)
    else:
        assert_invariants(entry_world, attempts)
    current = read_current(entry_world.model_dir)
    assert current is not None and current.members, "a committed release records its members"
    for member in current.members:
        member_dir = world.member_dir(member.model)
        manifest = member_dir.read_manifest(member.version)
        assert manifest is not None and manifest.sha256 == member.sha256, f"{member.label}'s files changed"
        assert read_current(member_dir) is None, f"{member.model} has a current.json of its own"
        pinned = sorted(pinned_versions(entry_world.model_dir, member.model))
        for replica in world.ferry.fleet().replicas:
            where = replica.placement(member.model)
            assert where.front == [], f"{member.model} has a front on {replica.url}"
            assert where.store == pinned, f"{replica.url} holds {member.model} {where.store}, releases pin {pinned}"


def member_pair(outputs: dict[str, list]) -> tuple[int, int]:
    return int(outputs["SCALE_VERSION"][0]), int(outputs["SCORE_VERSION"][0])


@dataclass
class Answer:
    via: str
    pair: tuple[int, int] | None  # (scale version, score version); None for a failed request
    error: str = ""


def _http_load(url: str, headers: dict[str, str], stop: threading.Event, answers: list[Answer], via: str) -> None:
    with httpx.Client(base_url=url, headers=headers, timeout=30) as session:
        while not stop.is_set():
            reply = session.post(f"/v2/models/{ENTRY}/infer", json=BODY)
            if reply.status_code != 200:
                answers.append(Answer(via, None, f"{reply.status_code} {reply.text[:200]}"))
                continue
            outputs = {o["name"]: o["data"] for o in reply.json()["outputs"]}
            answers.append(Answer(via, member_pair(outputs)))


def _grpc_load(address: str, stop: threading.Event, answers: list[Answer]) -> None:
    triton = grpcclient.InferenceServerClient(address)
    tensor = grpcclient.InferInput("X", [1, 4], "FP32")
    tensor.set_data_from_numpy(np.array([ROW], dtype=np.float32))
    while not stop.is_set():
        try:
            answer = triton.infer(ENTRY, [tensor], headers=auth(), client_timeout=30)
        except InferenceServerException as error:
            answers.append(Answer("grpc", None, f"{error.status()} {error.message()}"))
            continue
        outputs = {name: answer.as_numpy(name).tolist() for name in ("SCALE_VERSION", "SCORE_VERSION")}
        answers.append(Answer("grpc", member_pair(outputs)))
    triton.close()


class Load:
    """Clients calling the pipeline without pause: through the gateway (HTTP, gRPC) and at Triton's front."""

    def __init__(self, gateway_url: str, gateway_grpc: str, triton_url: str) -> None:
        self.answers: list[Answer] = []
        self.stop = threading.Event()
        bearer = {"Authorization": f"Bearer {TOKEN}"}
        self.clients = [(_http_load, (gateway_url, bearer, self.stop, self.answers, "gateway http")),
                        (_grpc_load, (gateway_grpc, self.stop, self.answers)),
                        (_http_load, (triton_url, {}, self.stop, self.answers, "triton http"))]
        self.pool = ThreadPoolExecutor(len(self.clients))

    def __enter__(self) -> Load:
        self.running = [self.pool.submit(client, *args) for client, args in self.clients]
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.pool.shutdown(wait=True)
        for client in self.running:
            client.result()  # a client that died says why

    def wait_for(self, count: int, timeout_s: float = 30) -> None:
        """Until ``count`` more answers than now (so that every client has been answered across a switch)."""
        target, deadline = len(self.answers) + count, time.monotonic() + timeout_s
        while len(self.answers) < target and time.monotonic() < deadline:
            time.sleep(0.05)


def committed_pairs(world: ReleaseWorld) -> set[tuple[int, int]]:
    """Every (scale, score) tuple a committed attempt of the entry recorded."""
    pairs = set()
    for record in read_history(world.model_dir):
        members = {m["model"]: m["version"] for m in (record.get("current") or {}).get("members", [])}
        if record["outcome"] == "committed" and members:
            pairs.add((members[SCALE], members[SCORE]))
    return pairs


def test_a_release_switches_as_one_under_load_and_never_answers_with_a_mix(released: ReleaseWorld) -> None:
    released.register_release()
    first = released.deploy()
    assert first.outcome == "committed", first.error
    assert [(m.model, m.version) for m in first.members] == [(SCALE, 1), (SCORE, 1)]
    assert {"load", "ready", "smoke"} <= set(first.steps) and first.steps.get("smoke", 0) > 0
    assert_release_invariants(released, attempts=1)
    with running_gateway(released) as gateway, Load(gateway.url, gateway.grpc, released.settings.triton.urls) as load:
        load.wait_for(30)
        released.register_release(factor=2.0)
        good = released.deploy()
        assert good.outcome == "committed" and good.version == 2, good.error
        assert [m.version for m in read_current(released.model_dir).members] == [2, 2]
        load.wait_for(30)
        assert_release_invariants(released, attempts=2)

        released.register_release("member-smoke", factor=2.0)
        member_fails = released.deploy()
        assert member_fails.outcome == "rolled_back" and member_fails.failed_step == "smoke", member_fails.error
        assert f"member '{SCORE}' v3" in member_fails.error and "golden" in member_fails.error
        quarantined = " ".join(member_fails.rollback.quarantined)
        assert f"/{ENTRY}/quarantine/3." in quarantined and f"/{SCORE}/quarantine/3." in quarantined
        assert_release_invariants(released, attempts=3)

        released.register_release("pipeline", factor=2.0)
        whole_fails = released.deploy()
        assert whole_fails.outcome == "rolled_back" and whole_fails.failed_step == "smoke", whole_fails.error
        assert "the release end to end" in whole_fails.error and "each of which passed its own smoke" in \
            whole_fails.error and "golden" in whole_fails.error
        load.wait_for(30)
        assert_release_invariants(released, attempts=4)

        back = released.cli("rollback", ENTRY)
        assert back.returncode == 0, back.stderr
        assert [m.version for m in read_current(released.model_dir).members] == [1, 1]
        load.wait_for(30)
        assert_release_invariants(released, attempts=5)
    failed = [a for a in load.answers if a.pair is None]
    assert not failed, f"{len(failed)} failed requests, the first: {failed[0]}"
    seen = Counter((a.via, a.pair) for a in load.answers)
    allowed = committed_pairs(released)
    assert allowed == {(1, 1), (2, 2)}
    mixed = {key: n for key, n in seen.items() if key[1] not in allowed}
    assert not mixed, f"answers from a mix of member versions (or from an uncommitted release): {mixed}"
    for via in ("gateway http", "grpc", "triton http"):
        assert seen[(via, (1, 1))] and seen[(via, (2, 2))], f"{via} did not see both releases: {seen}"

    status = released.cli("status")
    assert f"v{read_current(released.model_dir).active_version} ({SCALE} v1, {SCORE} v1)" in status.stdout, \
        status.stdout
    assert f"member of '{ENTRY}' (which pins" in status.stdout, status.stdout
    history = released.cli("history", ENTRY)
    assert f"({SCALE} v2, {SCORE} v2)" in history.stdout, history.stdout


def test_a_member_that_cannot_load_rolls_the_release_back_naming_it(released: ReleaseWorld) -> None:
    if read_current(released.model_dir) is None:
        released.register_release()
        assert released.deploy().outcome == "committed"
    attempts = len(read_history(released.model_dir)) + 1
    before = read_current(released.model_dir)
    versions = released.register_release("member-load")
    report = released.deploy()
    assert report.outcome == "rolled_back" and report.failed_step == "load", report.error
    assert f"Triton could not load member '{SCORE}' v{versions[SCORE]}" in report.error
    assert "params.json holds []" in report.error
    assert read_current(released.model_dir) == before
    reason = Path(next(p for p in report.rollback.quarantined if f"/{SCORE}/" in p)) / "reason.json"
    assert "params.json" in reason.read_text()
    assert_release_invariants(released, attempts)
    client = mlflow.MlflowClient(released.settings.tracking_uri)  # every member's outcome is written back
    refused = client.get_model_version(SCORE, str(versions[SCORE])).tags
    assert refused["ferry.status"] == "refused" and f"release {ENTRY} v{versions[ENTRY]}" in refused["ferry.error"]
    for member in before.members:
        assert client.get_model_version(member.model, str(member.version)).tags["ferry.status"] == "serving"
        assert int(client.get_model_version_by_alias(member.model, "serving").version) == member.version
    serving = before.members[0]
    client.set_model_version_tag(serving.model, str(serving.version), "ferry.status", "retired")  # MLflow drifted
    client.delete_model_version_tag(SCORE, str(versions[SCORE]), "ferry.status")
    synced = released.cli("sync")  # every model, members included
    assert synced.returncode == 0, synced.stdout + synced.stderr
    assert client.get_model_version(serving.model, str(serving.version)).tags["ferry.status"] == "serving"
    assert client.get_model_version(SCORE, str(versions[SCORE])).tags["ferry.status"] == "refused"
    again = released.cli("rollback", ENTRY, "--to", str(versions[ENTRY]))  # refused before anything is touched
    assert again.returncode == 2 and "failed its last deploy" in again.stderr, again.stderr
    assert_release_invariants(released, attempts + 1)


def _register_other_entry(world: ReleaseWorld, name: str) -> int:
    """A second ensemble over the same two members (their versions under the same alias)."""
    sample = load_iris(return_X_y=True)[0][[0]].astype(np.float32)
    mlflow.set_tracking_uri(world.settings.tracking_uri)
    with tempfile.TemporaryDirectory() as tmp, mlflow.start_run() as run:
        folder = Path(tmp, name)
        (folder / "1").mkdir(parents=True)
        (folder / "config.pbtxt").write_text(pipeline_config(SCALE, SCORE))
        source = log_triton_model(folder, {"X": sample})
        shutil.rmtree(folder)
    return register_version(name, source, run.info.run_id, "champion", tracking_uri=world.settings.tracking_uri)


def test_a_member_two_releases_pin_stays_loaded_for_the_one_that_still_pins_it(released: ReleaseWorld) -> None:
    released.register_release()
    assert released.deploy().outcome == "committed"
    other = ReleaseWorld(released.settings, model=f"{PREFIX}_other")
    _register_other_entry(released, other.model)
    shared = other.deploy()
    assert shared.outcome == "committed", shared.error
    pinned = {m.model: m.version for m in shared.members}
    assert pinned == {m.model: m.version for m in read_current(released.model_dir).members}

    released.register_release(factor=3.0)
    moved = released.deploy()
    assert moved.outcome == "committed", moved.error
    assert all(pinned[m.model] != m.version for m in moved.members)
    triton = httpx.post(f"{released.settings.triton.urls}/v2/models/{other.model}/infer", json=BODY, timeout=10)
    assert triton.status_code == 200, triton.text
    outputs = {o["name"]: o["data"] for o in triton.json()["outputs"]}
    assert member_pair(outputs) == (pinned[SCALE], pinned[SCORE]), "the other release lost its members"
    assert_release_invariants(released, len(read_history(released.model_dir)))
    assert_release_invariants(released, 1, entry=other.model)

    with pytest.raises(InvalidInput, match="is a member of the release") as refused:
        retire(released.ferry, SCALE)
    assert ENTRY in refused.value.message and other.model in refused.value.message
    direct = released.cli("deploy", SCORE, "--alias", "champion")
    assert direct.returncode == 2 and "is a member of the release" in direct.stderr, direct.stderr
    assert_release_invariants(released, len(read_history(released.model_dir)))

    assert retire(released.ferry, other.model).verified
    for replica in released.ferry.fleet().replicas:
        assert replica.placement(SCALE).store == [m.version for m in moved.members if m.model == SCALE]
        assert not replica.ready_versions(store_name(other.model, 1))
    assert_release_invariants(released, len(read_history(released.model_dir)))


def test_demo_release_tells_its_story(tmp_path: Path) -> None:
    from conftest import ROOT, _free_port_block
    from support.processes import run_demo

    result = run_demo(ROOT / "scripts" / "demo_release.sh", tmp_path / "demo", _free_port_block(3))
    out = result.stdout
    answers = [line for line in out.splitlines() if line.startswith("iris_pipeline answers")]
    assert [line.rsplit("computed by ", 1)[1] for line in answers] == [
        "iris_scale v1 and iris_score v1", "iris_scale v2 and iris_score v2", "iris_scale v2 and iris_score v2",
        "iris_scale v1 and iris_score v1"]
    assert "a release of iris_scale v2, iris_score v2" in out
    assert "committed iris_pipeline v1 (was v2)" in out and "member of 'iris_pipeline' (which pins" in out
    assert "failed at smoke: the release end to end (iris_scale v3, iris_score v3" in result.stderr


def test_the_dags_tasks_and_the_mlflow_plugin_deploy_a_release(released: ReleaseWorld,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from mlflow.deployments import get_deploy_client

    from ferry.adapters import dag_steps

    versions = released.register_release(factor=4.0)
    attempts = len(read_history(released.model_dir)) + 1
    handle = dag_steps.snapshot_current(released.ferry, ENTRY, "champion")  # plain JSON between the DAG's tasks
    for step in (dag_steps.materialize_repo, dag_steps.triton_load, dag_steps.triton_ready,
                 dag_steps.triton_infer_smoke):
        handle = step(released.ferry, handle)
    assert handle["smoke"]["members"] == 2
    assert dag_steps.commit_current(released.ferry, handle)["outcome"] == "committed"
    committed = read_current(released.model_dir)
    assert [(m.model, m.version) for m in committed.members] == [(SCALE, versions[SCALE]), (SCORE, versions[SCORE])]
    assert_release_invariants(released, attempts)

    for name, value in released.env().items():
        monkeypatch.setenv(name, value)
    client = get_deploy_client("ferry")
    back = client.update_deployment(ENTRY, f"models:/{ENTRY}/1")  # -t ferry: back to the first release
    assert back["outcome"] == "committed" and back["version"] == 1, back
    assert [m.version for m in read_current(released.model_dir).members] == [1, 1]
    assert_release_invariants(released, attempts + 1)
    metrics = released.cli("metrics")
    for member in (SCALE, SCORE):
        assert f'ferry_release_member{{member="{member}",model="{ENTRY}",version="1"}} 1.0' in metrics.stdout


def test_a_canary_bakes_the_whole_pipeline_and_no_answer_mixes_its_members(released: ReleaseWorld) -> None:
    from ferry.core.records import RolloutPlan
    from ferry.core.runner import Runner
    from ferry.core.services import Services
    from ferry.core.target import Target

    if read_current(released.model_dir) is None:
        released.register_release()
        assert released.deploy().outcome == "committed"
    attempts = len(read_history(released.model_dir)) + 1
    before = {m.model: m.version for m in read_current(released.model_dir).members}
    versions = released.register_release(factor=5.0)
    with running_gateway(released) as gateway, Load(gateway.url, gateway.grpc, released.settings.triton.urls) as load:
        load.wait_for(20)
        baking = Services(released.settings.with_overrides(
            gateways=gateway.url, gate_interval_s=1.0, gate_min_requests=20, gate_latency_slack_ms=50.0))
        plan = RolloutPlan(mode="canary", bake_s=4, canary_percent=50)
        report = Runner(baking, ENTRY).deploy(Target.of_alias("champion", rollout=plan))
        load.wait_for(20)
    assert report.outcome == "committed", report.error
    assert report.gate and report.gate[-1].verdict == "pass" and report.gate[-1].candidate.requests >= 20
    assert_release_invariants(released, attempts)
    old, new = (before[SCALE], before[SCORE]), (versions[SCALE], versions[SCORE])
    assert not [a for a in load.answers if a.pair is None], "a request failed during the canary"
    seen = Counter((a.via, a.pair) for a in load.answers)
    assert set(pair for _, pair in seen) <= {old, new}, f"a mix of members: {seen}"
    assert seen[("gateway http", new)] and seen[("gateway http", old)], seen
