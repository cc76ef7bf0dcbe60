"""The bake on live traffic: a real Triton, a real gateway process and a steady load through it (HTTP JSON and
binary, /predict, gRPC) while a deploy bakes its candidate in canary or shadow mode, and the gate decides.

One installation serves the whole module (Triton, MLflow, v1 committed, the gateway): each test registers
the next version and deploys it with a bake; whatever it ends with is the active version for the next one.
"""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import httpx
import numpy as np
import pytest
from sklearn.datasets import load_iris
from tritonclient.grpc import service_pb2

from conftest import FAKES, World, assert_invariants, make_settings
from ferry.adapters.gateway.shadow import grpc_outputs, http_copy_of_grpc, http_outputs, json_copy, outputs_agree
from ferry.adapters.gateway.upstream import Reply
from ferry.adapters.inference import guard
from ferry.core import rollout
from ferry.core.config import Settings
from ferry.core.current import read_current
from ferry.core.records import DeployReport, RolloutPlan, RolloutState, utc_stamp
from ferry.core.runner import Runner
from ferry.core.services import Services
from ferry.core.target import Target
from ferry.runtime import server
from support.gateway import TOKEN, Running, running_gateway

ROWS = load_iris(return_X_y=True)[0].astype(np.float32)
SAMPLE = ROWS[[0, 60, 120]]  # the smoke sample of examples/train_model.py
LOW, HIGH = SAMPLE.min(axis=0), SAMPLE.max(axis=0)
INSIDE = np.flatnonzero(((LOW <= ROWS) & (ROWS <= HIGH)).all(axis=1))  # 90 of the 150 rows, inside its range
EVERY = np.arange(len(ROWS))
GATE = {"gate_interval_s": 1.0, "gate_min_requests": 30}
GATE_ENV = {"FERRY_GATE_INTERVAL_S": "1", "FERRY_GATE_MIN_REQUESTS": "30"}
# For a bake whose candidate is as good as the active version: the latency criterion has its own test, and a
# machine shared with other work can make one version's p95 jump past the other's for a second.
LENIENT = {"gate_latency_slack_ms": 50.0}
PROTOCOLS = ("json", "binary", "predict", "grpc")
AUTH = {"Authorization": f"Bearer {TOKEN}"}
INFER = "/inference.GRPCInferenceService/ModelInfer"


# ---------------------------------------------------------------- the installation


@dataclass
class Stage:
    world: World
    gateway: Running
    attempts: int = 1  # deploy attempts so far (one history record each)

    @property
    def active(self) -> int:
        current = read_current(self.world.model_dir)
        assert current is not None
        return current.active_version

    def settings(self, runner: str | None = None, **overrides: object) -> Settings:
        python_runner = FAKES / runner if runner else None
        return self.world.settings.with_overrides(gateways=self.gateway.url, python_runner=python_runner,
                                                  **{**GATE, **overrides})

    def deploy(self, plan: RolloutPlan, runner: str | None = None,
               events: list | None = None, **overrides: object) -> DeployReport:
        """Register the next version and deploy it with a bake, in this process (the gate's events in ``events``)."""
        self.world.register()
        self.attempts += 1

        def seen(step: str, status: str, elapsed: float, detail: str) -> None:
            if events is not None:
                events.append((time.monotonic(), step, status, detail))

        deployer = Runner(Services(self.settings(runner, **overrides)), "iris", on_event=seen)
        return deployer.deploy(Target.of_alias("champion", rollout=plan))

    def cli_deploy(self, *args: str) -> subprocess.Popen:
        """Register the next version and start `ferry deploy` with a bake in its own process."""
        self.world.register()
        self.attempts += 1
        env = {**os.environ, **self.world.env(), **GATE_ENV, "FERRY_GATEWAYS": self.gateway.url,
               "FERRY_GATE_LATENCY_SLACK_MS": str(LENIENT["gate_latency_slack_ms"])}
        return subprocess.Popen([sys.executable, "-m", "ferry", "deploy", "iris", "--alias", "champion", "--json",
                                 *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def counts(self) -> rollout.Counts:
        return rollout.read_counts(self.settings(), "iris")


@pytest.fixture(scope="module")
def stage(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stage]:
    settings = make_settings(tmp_path_factory.mktemp("bake"))
    server.up(settings)
    try:
        world = World(settings)
        world.register()
        assert world.deploy().outcome == "committed"
        with running_gateway(world) as gateway:
            yield Stage(world, gateway)
    finally:
        server.down(settings, grace_s=0)


# ---------------------------------------------------------------- the load


@dataclass
class Sent:
    began: float
    ended: float
    protocol: str
    ok: bool
    status: str  # the HTTP status or the gRPC code's name
    version: int | None  # X-Ferry-Model-Version (gRPC: trailing metadata)
    canary: bool  # X-Ferry-Canary: 1
    row: int
    label: int | None = None


class Client:
    """One load thread's connections: each request goes by the next protocol in turn."""

    def __init__(self, gateway: Running) -> None:
        self.http = httpx.Client(base_url=gateway.url, headers=AUTH, timeout=10)
        self.channel = grpc.insecure_channel(gateway.grpc)
        self.infer = self.channel.unary_unary(INFER, request_serializer=service_pb2.ModelInferRequest.SerializeToString,
                                              response_deserializer=service_pb2.ModelInferResponse.FromString)

    def close(self) -> None:
        self.http.close()
        self.channel.close()

    def send(self, protocol: str, index: int) -> Sent:
        began, row = time.monotonic(), ROWS[index]
        if protocol == "grpc":
            return self._grpc(began, index, row)
        if protocol == "json":
            reply = self.http.post("/v2/models/iris/infer", json={"inputs": [
                {"name": "X", "shape": [1, 4], "datatype": "FP32", "data": row.tolist()}]})
            label = _json_label(reply, lambda outputs: next(o["data"][0] for o in outputs if o["name"] == "label"))
        elif protocol == "predict":
            reply = self.http.post("/predict/iris", json={"inputs": {"X": [row.tolist()]}})
            label = _json_label(reply, lambda outputs: outputs["label"][0])
        else:
            reply = self.http.post("/v2/models/iris/infer", content=_binary_body(row),
                                   headers={"inference-header-content-length": str(len(_binary_header()))})
            label = _binary_label(reply)
        return Sent(began, time.monotonic(), protocol, reply.status_code == 200, str(reply.status_code),
                    _int(reply.headers.get("x-ferry-model-version")), reply.headers.get("x-ferry-canary") == "1",
                    index, label)

    def _grpc(self, began: float, index: int, row: np.ndarray) -> Sent:
        request = service_pb2.ModelInferRequest(model_name="iris")
        request.inputs.add(name="X", datatype="FP32", shape=[1, 4])
        request.raw_input_contents.append(row.tobytes())
        try:
            response, call = self.infer.with_call(request, metadata=(("authorization", f"Bearer {TOKEN}"),),
                                                  timeout=10)
        except grpc.RpcError as error:
            trailing = dict(error.trailing_metadata() or ())
            return Sent(began, time.monotonic(), "grpc", False, error.code().name,
                        _int(trailing.get("x-ferry-model-version")), trailing.get("x-ferry-canary") == "1", index)
        trailing = dict(call.trailing_metadata() or ())
        names = [o.name for o in response.outputs]
        label = int(np.frombuffer(response.raw_output_contents[names.index("label")], dtype=np.int64)[0])
        return Sent(began, time.monotonic(), "grpc", True, "OK", _int(trailing.get("x-ferry-model-version")),
                    trailing.get("x-ferry-canary") == "1", index, label)


def _int(text: str | None) -> int | None:
    return int(text) if text else None


def _json_label(reply: httpx.Response, pick: Callable) -> int | None:
    return int(pick(reply.json()["outputs"])) if reply.status_code == 200 else None


def _binary_header() -> bytes:
    return json.dumps({"inputs": [{"name": "X", "shape": [1, 4], "datatype": "FP32",
                                   "parameters": {"binary_data_size": 16}}],
                       "outputs": [{"name": "label", "parameters": {"binary_data": True}},
                                   {"name": "probabilities", "parameters": {"binary_data": True}}]}).encode()


def _binary_body(row: np.ndarray) -> bytes:
    return _binary_header() + row.tobytes()


def _binary_label(reply: httpx.Response) -> int | None:
    if reply.status_code != 200:
        return None
    split = int(reply.headers["inference-header-content-length"])
    offset = 0
    for output in json.loads(reply.content[:split])["outputs"]:
        size = output["parameters"]["binary_data_size"]
        if output["name"] == "label":
            return int(np.frombuffer(reply.content[split + offset:split + offset + size], dtype=np.int64)[0])
        offset += size
    return None


@dataclass
class Load:
    """A steady load through the gateway from a few threads (at most ``rate`` requests/s in all, for at most
    ``limit_s``), on the rows ``rows`` of iris picked at random; and a watch on rollout.json: when it appeared
    and when it was gone again (monotonic times, each observed at most 5 ms after the fact)."""

    gateway: Running
    rollout_path: Path
    rows: np.ndarray
    rate: float = 200.0
    threads: int = 4
    limit_s: float = 60.0
    sent: list[Sent] = field(default_factory=list)
    appeared: float | None = None
    removed: float | None = None

    def __post_init__(self) -> None:
        self.stop = threading.Event()
        self.workers = [threading.Thread(target=self._run, args=(i,), daemon=True) for i in range(self.threads)]
        self.workers.append(threading.Thread(target=self._watch, daemon=True))

    def __enter__(self) -> Load:
        for worker in self.workers:
            worker.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for worker in self.workers:
            worker.join(timeout=15)

    def _run(self, index: int) -> None:
        client, rng = Client(self.gateway), np.random.default_rng(index)
        interval, deadline = self.threads / self.rate, time.monotonic() + self.limit_s
        following = time.monotonic()
        try:
            for n in range(10**6):  # bounded: stopped, or at the deadline
                if self.stop.is_set() or time.monotonic() > deadline:
                    break
                self.sent.append(client.send(PROTOCOLS[(n + index) % len(PROTOCOLS)], int(rng.choice(self.rows))))
                following += interval
                time.sleep(max(0.0, following - time.monotonic()))
        finally:
            client.close()

    def _watch(self) -> None:
        deadline = time.monotonic() + self.limit_s
        while not self.stop.is_set() and time.monotonic() < deadline:
            present = self.rollout_path.exists()
            if present and self.appeared is None:
                self.appeared = time.monotonic()
            elif not present and self.appeared is not None and self.removed is None:
                self.removed = time.monotonic()
            time.sleep(0.005)

    def wait_for_bake(self, timeout_s: float = 30) -> None:
        deadline = time.monotonic() + timeout_s
        while self.appeared is None:
            assert time.monotonic() < deadline, "the bake did not start (no rollout.json)"
            time.sleep(0.05)

    def after_decision(self) -> list[Sent]:
        """The requests that started after rollout.json was gone."""
        assert self.removed is not None, "rollout.json was never removed"
        return [s for s in self.sent if s.began > self.removed]

    def during_bake(self) -> list[Sent]:
        assert self.appeared is not None and self.removed is not None
        return [s for s in self.sent if self.appeared < s.began and s.ended < self.removed]


def load(stage: Stage, rows: np.ndarray = INSIDE, **options: object) -> Load:
    return Load(stage.gateway, stage.world.model_dir.rollout_path, rows, **options)


def assert_settled(stage: Stage, load_: Load | None, committed: int, candidate: int) -> None:
    """After the decision: the invariants, no rollout.json, and no request reached the candidate unless committed."""
    assert not stage.world.model_dir.rollout_path.exists()
    assert stage.active == committed
    assert_invariants(stage.world, stage.attempts)
    if load_ is None:
        return
    after = load_.after_decision()
    assert after, "no request after the decision: the test shows nothing"
    assert all(not s.canary for s in after), "a canary answer after the decision"
    if committed != candidate:
        assert candidate not in {s.version for s in after}, "a request reached the candidate after the decision"
    assert {s.version for s in after if s.ok} == {committed}


def figures(stage: Stage, version: int, role: str, before: rollout.Counts) -> rollout.GateFigures:
    return rollout.figures(stage.counts(), before, version, role)


# ---------------------------------------------------------------- canary


def test_a_canary_that_fails_on_live_inputs_is_rolled_back_on_its_error_ratio(stage: Stage) -> None:
    active, before = stage.active, stage.counts()
    with load(stage, EVERY) as traffic:  # every row: 60 of 150 are outside the smoke sample's range
        report = stage.deploy(RolloutPlan(mode="canary", bake_s=20, canary_percent=20),
                              "fake_errors_outside_sample_runner.py")
        time.sleep(0.3)
    candidate = report.version
    assert report.outcome == "rolled_back" and report.failed_step == "bake", report.error
    assert "error ratio" in report.error, report.error
    assert report.gate[-1].verdict == "fail" and report.gate[-1].candidate.errors > 0
    failed = [s for s in traffic.sent if not s.ok]
    assert failed, "no request failed: the candidate's fault was not exercised"
    assert all(s.canary and s.version == candidate for s in failed), \
        f"a failure that was not the canary's: {[s for s in failed if not s.canary][:3]}"
    during = traffic.during_bake()
    assert {s.version for s in during if not s.canary} == {active}
    assert {s.version for s in during if s.canary} == {candidate}
    assert {s.protocol for s in failed} == set(PROTOCOLS)
    # The gateway's own counters: the candidate's errors under role "candidate", none for the active version.
    assert figures(stage, candidate, "candidate", before).errors == len(failed)
    served = figures(stage, active, "active", before)
    assert served.errors == 0 and served.requests >= len([s for s in traffic.sent if not s.canary])
    assert_settled(stage, traffic, active, candidate)


def test_a_canary_three_times_slower_under_load_is_rolled_back_on_latency(stage: Stage) -> None:
    active = stage.active
    with load(stage) as traffic:
        report = stage.deploy(RolloutPlan(mode="canary", bake_s=20, canary_percent=30), "fake_slower_runner.py")
        time.sleep(0.3)
    assert report.outcome == "rolled_back" and report.failed_step == "bake", report.error
    assert "p95" in report.error and "error ratio" not in report.error, report.error
    last = report.gate[-1]
    assert last.candidate.p95_s > stage.world.settings.bake.latency_factor * last.active.p95_s, last
    assert all(s.ok for s in traffic.sent), "the slow candidate answered every request, slowly"
    assert_settled(stage, traffic, active, report.version)


def test_a_good_canary_is_committed_at_the_end_of_the_bake_having_answered_its_share(stage: Stage) -> None:
    active, events = stage.active, []
    with load(stage, EVERY) as traffic:
        report = stage.deploy(RolloutPlan(mode="canary", bake_s=5, canary_percent=20), events=events, **LENIENT)
        time.sleep(0.3)
    candidate = report.version
    assert report.outcome == "committed", report.error
    assert report.gate and all(g.verdict != "fail" for g in report.gate)
    assert report.gate[-1].verdict == "pass" and report.gate[-1].elapsed_s >= 5
    # Until the commit writes current.json (it removes rollout.json after), only the canary reaches the candidate.
    committing = next(at for at, step, status, _ in events if step == "commit" and status == "start")
    during = [s for s in traffic.during_bake() if s.ended < committing]
    assert len(during) >= 400, f"only {len(during)} requests during the bake"
    share = sum(s.canary for s in during) / len(during)
    assert 0.15 <= share <= 0.25, f"the canary answered {share:.1%} of {len(during)} requests, not 20% ± 5 pp"
    assert all(s.ok for s in traffic.sent)
    assert {s.version for s in during if s.canary} == {candidate}
    assert {s.version for s in during if not s.canary} == {active}
    assert_settled(stage, traffic, candidate, candidate)


def test_a_bake_with_too_little_traffic_is_inconclusive_and_rolled_back(stage: Stage) -> None:
    active = stage.active
    report = stage.deploy(RolloutPlan(mode="canary", bake_s=2, canary_percent=20))
    assert report.outcome == "rolled_back" and report.failed_step == "bake"
    assert "inconclusive" in report.error and "the gate needs 30" in report.error, report.error
    assert "not committed" in report.error
    assert_settled(stage, None, active, report.version)


# ---------------------------------------------------------------- shadow


def test_a_shadow_candidate_that_disagrees_is_rolled_back_and_no_client_sees_its_outputs(stage: Stage) -> None:
    active, before = stage.active, stage.counts()
    labels = _labels(stage)
    with load(stage, EVERY) as traffic:
        report = stage.deploy(RolloutPlan(mode="shadow", bake_s=20, mirror_percent=100), "fake_disagreeing_runner.py")
        time.sleep(0.3)
    candidate = report.version
    assert report.outcome == "rolled_back" and report.failed_step == "bake", report.error
    assert "agree" in report.error and "error ratio" not in report.error, report.error
    assert all(s.ok and s.version == active and not s.canary for s in traffic.sent), "a client saw the candidate"
    assert all(s.label == labels[s.row] for s in traffic.sent), "an answer that was not the active version's"
    assert {s.protocol for s in traffic.sent} == set(PROTOCOLS)
    shadow = figures(stage, candidate, "shadow", before)
    assert shadow.requests >= 30 and shadow.disagreed > shadow.agreed, shadow
    # Every copy that got an answer was compared: the active answers decoded (JSON, binary outputs, gRPC) as well.
    unjudged = stage.counts().get((str(candidate), "shadow", "error"), rollout.Tally()).value
    assert shadow.agreed + shadow.disagreed + unjudged == shadow.requests and unjudged == shadow.errors, shadow
    assert_settled(stage, traffic, active, candidate)


def _labels(stage: Stage) -> list[int]:
    """The active version's label for every row of iris, asked before the bake."""
    reply = httpx.post(f"{stage.gateway.url}/predict/iris", json={"inputs": {"X": ROWS.tolist()}}, headers=AUTH,
                       timeout=10)
    assert reply.status_code == 200, reply.text
    return reply.json()["outputs"]["label"]


# ---------------------------------------------------------------- control and crashes, through the CLI


def _cli_bake(stage: Stage, traffic: Load) -> subprocess.Popen:
    process = stage.cli_deploy("--canary", "20", "--bake", "60s")
    try:
        traffic.wait_for_bake()
    except AssertionError:
        process.kill()
        raise AssertionError(f"the deploy did not bake: {process.communicate(timeout=10)}") from None
    time.sleep(1.0)  # the canary takes its share for a while
    return process


def _finished(process: subprocess.Popen) -> dict:
    out, err = process.communicate(timeout=60)
    assert out.strip(), f"the deploy printed no report: {err[-2000:]}"
    return json.loads(out)


@pytest.mark.parametrize("action", ["promote", "abort"])
def test_rollout_promote_and_abort_end_a_bake_at_once(stage: Stage, action: str) -> None:
    active = stage.active
    with load(stage) as traffic:
        process = _cli_bake(stage, traffic)
        asked = time.monotonic()
        control = stage.world.cli("rollout", action, "iris")
        assert control.returncode == 0, control.stderr
        report = _finished(process)
        decided = time.monotonic() - asked
        time.sleep(0.3)
    candidate = report["version"]
    assert any(s.canary and s.version == candidate for s in traffic.sent), "the canary took no share before"
    if action == "promote":
        assert report["outcome"] == "committed", report
        assert_settled(stage, traffic, candidate, candidate)
    else:
        assert report["outcome"] == "rolled_back" and "aborted by" in report["error"], report
        assert_settled(stage, traffic, active, candidate)
    assert decided < 10, f"{action} took {decided:.1f} s"
    status = stage.world.cli("rollout", "status", "iris")
    assert "no bake in progress" in status.stdout


def test_a_deploy_killed_during_its_bake_is_rolled_back_by_recover(stage: Stage) -> None:
    active = stage.active
    with load(stage) as traffic:
        process = _cli_bake(stage, traffic)
        process.send_signal(signal.SIGKILL)
        process.communicate(timeout=10)
        assert stage.world.model_dir.rollout_path.exists(), "the killed deploy's rollout.json is gone already"
        recovered = stage.world.cli("recover", "iris", "--json")
        time.sleep(0.3)
    assert recovered.returncode == 0, recovered.stderr
    report = json.loads(recovered.stdout)
    assert report["outcome"] == "rolled_back" and report["failed_step"] == "bake", report
    assert "removed rollout.json" in report["rollback"]["actions"]
    assert any(s.canary for s in traffic.sent), "the canary took no share before the kill"
    assert_settled(stage, traffic, active, report["version"])


# ---------------------------------------------------------------- what the gateway does with rollout.json


def test_a_damaged_or_stale_rollout_json_sends_nothing_to_any_candidate(stage: Stage) -> None:
    """A rollout.json that does not parse, or that bakes beside another version than the committed one, is
    no bake: every request goes to the committed version (the candidate it names is not even loaded)."""
    active, path = stage.active, stage.world.model_dir.rollout_path
    stale = RolloutState(model="iris", deploy_id="elsewhere", active_version=active + 100,
                         candidate_version=active + 101, plan=RolloutPlan(mode="canary", bake_s=60, canary_percent=50),
                         started_at_utc=utc_stamp())
    try:
        for content in (b'{"format": 1, "model": "iris", "deploy', stale.model_dump_json().encode()):
            path.write_bytes(content)
            with load(stage, rate=100) as traffic:
                time.sleep(1.0)
            assert len(traffic.sent) > 50
            assert all(s.ok and s.version == active and not s.canary for s in traffic.sent), content
    finally:
        path.unlink(missing_ok=True)
    assert_invariants(stage.world, stage.attempts)


# ---------------------------------------------------------------- shadow's comparison, without Triton


def test_shadow_compares_classifier_outputs_by_argmax_and_the_rest_within_the_smoke_tolerances() -> None:
    scores = np.array([[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]], dtype=np.float32)
    active = {"label": np.array([0, 2]), "probabilities": scores}

    def agree(**outputs: np.ndarray) -> bool:
        return outputs_agree(active, {**active, **outputs}, rtol=1e-4, atol=1e-5)

    assert agree()
    assert agree(probabilities=scores * 0.8 + 0.05), "other scores, the same argmax: a classifier that agrees"
    assert not agree(probabilities=scores[:, ::-1])
    assert not agree(label=np.array([1, 2]))
    assert not agree(probabilities=scores[:1])
    assert not outputs_agree(active, {"label": active["label"]}, rtol=1e-4, atol=1e-5)
    regression = {"y": np.array([1.0, 2.0], dtype=np.float32)}
    assert outputs_agree(regression, {"y": np.array([1.00005, 2.0], dtype=np.float32)}, rtol=1e-4, atol=1e-5)
    assert not outputs_agree(regression, {"y": np.array([1.001, 2.0], dtype=np.float32)}, rtol=1e-4, atol=1e-5)
    strings = {"s": np.array([b"a", b"b"], dtype=object)}
    assert outputs_agree(strings, {"s": np.array([b"a", b"b"], dtype=object)}, rtol=1e-4, atol=1e-5)
    assert not outputs_agree(strings, {"s": np.array([b"a", b"c"], dtype=object)}, rtol=1e-4, atol=1e-5)


def test_a_shadow_copy_asks_for_json_outputs_and_every_answer_format_is_decoded() -> None:
    header = json.dumps({"inputs": [{"name": "X", "shape": [1, 4], "datatype": "FP32",
                                     "parameters": {"binary_data_size": 16}}],
                         "parameters": {"binary_data_output": True},
                         "outputs": [{"name": "label", "parameters": {"binary_data": True}}]}).encode()
    body = header + ROWS[0].tobytes()
    copy, headers = json_copy(guard.parse_infer(body, str(len(header)).encode()), body, b"application/octet-stream")
    split = int(dict(headers)[b"inference-header-content-length"])
    document = json.loads(copy[:split])
    assert document["parameters"] == {} and document["outputs"] == [{"name": "label", "parameters": {}}]
    assert copy[split:] == ROWS[0].tobytes(), "the binary input goes as the client sent it"
    plain = json.dumps({"inputs": [{"name": "X", "shape": [1, 4], "datatype": "FP32", "data": [1, 2, 3, 4]}]})
    assert json_copy(guard.parse_infer(plain.encode(), None), plain.encode(), None) == (plain.encode(), [])

    answer = json.dumps({"outputs": [
        {"name": "label", "datatype": "INT64", "shape": [2], "parameters": {"binary_data_size": 16}},
        {"name": "probabilities", "datatype": "FP32", "shape": [2, 3], "data": [0.7, 0.2, 0.1, 0.1, 0.3, 0.6]}]})
    raw = answer.encode() + np.array([0, 2], dtype=np.int64).tobytes()
    reply = Reply(200, gzip.compress(raw), {b"content-encoding": b"gzip",
                                            b"inference-header-content-length": str(len(answer)).encode()})
    outputs = http_outputs(reply)
    assert outputs["label"].tolist() == [0, 2] and outputs["probabilities"].shape == (2, 3)
    response = service_pb2.ModelInferResponse(model_name="iris")
    response.outputs.add(name="label", datatype="INT64", shape=[2]).contents.int64_contents.extend([0, 2])
    assert grpc_outputs(response.SerializeToString())["label"].tolist() == [0, 2]


def test_a_shadow_copy_of_a_grpc_request_goes_over_http_with_the_same_tensors() -> None:
    request = service_pb2.ModelInferRequest(model_name="iris", id="r1")
    request.inputs.add(name="X", datatype="FP32", shape=[1, 4])
    request.raw_input_contents.append(ROWS[0].tobytes())
    request.parameters["priority"].int64_param = 2
    request.outputs.add(name="label")
    body, headers = http_copy_of_grpc(request)
    split = int(dict(headers)[b"inference-header-content-length"])
    request_ = guard.parse_infer(body, str(split).encode())
    assert request_.document == {"inputs": [{"name": "X", "shape": [1, 4], "datatype": "FP32",
                                             "parameters": {"binary_data_size": 16}}],
                                 "id": "r1", "parameters": {"priority": 2}, "outputs": [{"name": "label",
                                                                                         "parameters": {}}]}
    assert bytes(request_.binary) == ROWS[0].tobytes()
    typed = service_pb2.ModelInferRequest(model_name="iris")
    typed.inputs.add(name="X", datatype="FP32", shape=[1, 4]).contents.fp32_contents.extend([1.0, 2.0, 3.0, 4.0])
    typed.inputs.add(name="S", datatype="BYTES", shape=[1]).contents.bytes_contents.append(b"ab")
    body, headers = http_copy_of_grpc(typed)
    split = int(dict(headers)[b"inference-header-content-length"])
    document = json.loads(body[:split])
    assert document["inputs"][0]["data"] == [1.0, 2.0, 3.0, 4.0]
    assert body[split:] == b"\x02\x00\x00\x00ab" and document["inputs"][1]["parameters"] == {"binary_data_size": 6}
