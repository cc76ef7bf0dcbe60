"""What a bake costs live traffic, and how fast its gate gives production back.

1. `shadow added latency p50: X ms` (target <= 0.2 ms): a real deploy bakes v2 in shadow mode beside v1
   (mirror 100 %, a gate that waits) and requests go through the gateway one at a time, in rounds that
   alternate rollout.json present (every request also copied to v2, off the response path) and removed (no
   bake; v2 stays loaded, so Triton is the same in both). The figure is the difference of the medians over
   the rounds of each round's p50, HTTP JSON (gRPC on its own line); both baselines are printed. For scale,
   the same rounds measure Triton alone (no gateway): one request at a time to v1, without and with a
   second one to v2 sent beside it by the load generator, which is what a shadow copy asks of Triton
   (`triton's own cost of a second inference beside p50: Z ms`).
2. `gate failure to rollback verified: Y s` (target <= 0.25 s): under a steady load, deploys whose canary
   fails on a share of live inputs (tests/fakes/fake_errors_outside_sample_runner.py) with
   FERRY_GATE_FAILURES=1; from the gate's first failing evaluation (its event) to the rollback's verified
   end (Triton serves exactly v1 again, rollout.json gone, the candidate quarantined). Median of --rollbacks.

    .venv/bin/python bench/rollout.py [--rounds 6] [--seconds 3] [--rollbacks 3]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import aiohttp
import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "examples"), str(ROOT / "bench")]

from gateway_overhead import BODY, GATEWAY, Target, measure, percentile, start_gateway  # noqa: E402
from sklearn.datasets import load_iris  # noqa: E402

from conftest import FAKES, World, make_settings  # noqa: E402
from ferry.core import rollout  # noqa: E402
from ferry.core.records import DeployReport, RolloutPlan, RolloutState  # noqa: E402
from ferry.core.runner import GATE, Runner  # noqa: E402
from ferry.core.steps import Services  # noqa: E402
from ferry.core.target import Target as DeployTarget  # noqa: E402
from ferry.runtime import server  # noqa: E402

ROWS = load_iris(return_X_y=True)[0].astype(np.float32)


class Baking:
    """A deploy baking in a thread of this process until told to stop (``ferry rollout abort``'s way)."""

    def __init__(self, world: World, gateway: str, plan: RolloutPlan, **overrides: object) -> None:
        settings = world.settings.with_overrides(gateways=gateway, **overrides)
        self.world, self.events, self.report = world, [], None
        self.runner = Runner(Services(settings), world.model, on_event=self._seen)
        self.thread = threading.Thread(target=self._run, args=(plan,), daemon=True)

    def _seen(self, step: str, status: str, elapsed: float, detail: str) -> None:
        self.events.append((time.perf_counter(), step, status, detail))

    def _run(self, plan: RolloutPlan) -> None:
        self.report = self.runner.deploy(DeployTarget.of_alias("champion", rollout=plan))

    def start(self, timeout_s: float = 60) -> Baking:
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        while not self.world.model_dir.rollout_path.exists():
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise SystemExit(f"the deploy did not bake: {self.report}")
            time.sleep(0.05)
        return self

    def finish(self, timeout_s: float = 120) -> DeployReport:
        self.thread.join(timeout_s)
        if self.report is None:
            raise SystemExit("the deploy did not finish")
        return self.report


# ---------------------------------------------------------------- 1. shadow's added latency


def shadow_latency(world: World, gateway: str, port: int, args: argparse.Namespace) -> dict[str, dict]:
    world.register()
    plan = RolloutPlan(mode="shadow", bake_s=3600, mirror_percent=100)
    baking = Baking(world, gateway, plan, gate_interval_s=60, gate_min_requests=10**9).start()
    path = world.model_dir.rollout_path
    state = path.read_bytes()
    targets = [Target("gateway", "http", f"{gateway}/v2/models/iris/infer"), Target("gateway", "grpc",
                                                                                   f"127.0.0.1:{port + 1}")]
    p50s: dict[str, dict[str, list[float]]] = {t.protocol: {"none": [], "shadow": []} for t in targets}
    p50s["triton"] = {"none": [], "shadow": []}
    candidate = RolloutState.model_validate_json(state).candidate_version
    try:
        for target in targets:
            measure(target, 1.0, 1)  # warm up, with the bake on
        for i in range(args.rounds):
            for arm in ("none", "shadow") if i % 2 == 0 else ("shadow", "none"):
                _set_rollout(path, state if arm == "shadow" else None)
                for target in targets:
                    measure(target, 0.3, 1)
                    _, latencies = measure(target, args.seconds, 1)
                    p50s[target.protocol][arm].append(percentile(latencies, 50))
                beside = candidate if arm == "shadow" else None
                latencies = asyncio.run(_triton_alone(world.settings.triton.urls, beside, args.seconds))
                p50s["triton"][arm].append(percentile(latencies, 50))
        _set_rollout(path, state)
        mirrored = _shadow_counts(world, gateway, candidate)
    finally:
        rollout.request_control(world.model_dir, "abort", "bench")
        report = baking.finish()
    if report.outcome != "rolled_back":
        raise SystemExit(f"the shadow bake ended {report.outcome}, not aborted: {report.error}")
    return {"p50": p50s, "mirrored": mirrored}


async def _triton_alone(triton: str, beside: int | None, seconds: float) -> list[float]:
    """One request at a time straight to Triton's active version; with ``beside``, a second one to that version
    sent at the same moment (not waited for), as a shadow copy would be."""
    latencies: list[float] = []
    tasks: set[asyncio.Task] = set()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:

        async def post(version: int) -> None:
            async with session.post(f"{triton}/v2/models/iris/versions/{version}/infer", data=BODY) as reply:
                await reply.read()

        deadline = time.perf_counter() + seconds
        while time.perf_counter() < deadline:
            began = time.perf_counter()
            if beside is not None and len(tasks) < 64:
                task = asyncio.ensure_future(post(beside))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            await post(1)
            latencies.append(time.perf_counter() - began)
        await asyncio.gather(*tasks)
    return latencies


def _set_rollout(path: Path, state: bytes | None) -> None:
    if state is None:
        path.unlink(missing_ok=True)
        return
    temporary = path.with_suffix(".bench")
    temporary.write_bytes(state)
    os.replace(temporary, path)


def _shadow_counts(world: World, gateway: str, candidate: int) -> dict[str, float]:
    counts = rollout.read_counts(world.settings.with_overrides(gateways=gateway), world.model)
    figures = rollout.figures(counts, {}, candidate, "shadow")
    return {"copies": figures.requests, "agreed": figures.agreed, "disagreed": figures.disagreed}


# ---------------------------------------------------------------- 2. from a failing gate to the previous state


def _load(url: str, stop: threading.Event) -> None:
    rng = np.random.default_rng(0)
    with httpx.Client(base_url=url, timeout=10) as client:
        for _ in range(10**6):  # bounded: stopped, or a million requests
            if stop.is_set():
                return
            row = ROWS[int(rng.integers(len(ROWS)))].tolist()
            client.post("/v2/models/iris/infer", json={"inputs": [
                {"name": "X", "shape": [1, 4], "datatype": "FP32", "data": row}]})
            time.sleep(0.005)


def gate_to_rollback(world: World, gateway: str, rounds: int) -> list[float]:
    stop = threading.Event()
    workers = [threading.Thread(target=_load, args=(gateway, stop), daemon=True) for _ in range(3)]
    for worker in workers:
        worker.start()
    spans = []
    try:
        for _ in range(rounds):
            world.register()
            plan = RolloutPlan(mode="canary", bake_s=60, canary_percent=20)
            baking = Baking(world, gateway, plan, gate_interval_s=1, gate_min_requests=30, gate_failures=1,
                            python_runner=FAKES / "fake_errors_outside_sample_runner.py")
            baking.thread.start()
            report = baking.finish()
            if report.outcome != "rolled_back" or not (report.rollback and report.rollback.verified):
                raise SystemExit(f"the failing canary was not rolled back and verified: {report}")
            failed = next(at for at, step, status, _ in baking.events if step == GATE and status == "fail")
            verified = next(at for at, step, status, _ in baking.events if step == "rollback" and status == "ok")
            spans.append(verified - failed)
    finally:
        stop.set()
        for worker in workers:
            worker.join(timeout=15)
    return spans


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=6, help="rounds of each arm (no rollout, shadow 100 %%)")
    parser.add_argument("--seconds", type=float, default=3.0, help="one-at-a-time requests per arm and round")
    parser.add_argument("--rollbacks", type=int, default=3, help="failing canaries rolled back")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ferry-rollout-bench-") as home:
        world = World(make_settings(Path(home)))
        world.register()
        server.up(world.settings)
        gateway: subprocess.Popen | None = None
        try:
            assert world.deploy().outcome == "committed"
            gateway, port = start_gateway(world, GATEWAY)
            url = f"http://127.0.0.1:{port}"
            latency = shadow_latency(world, url, port, args)
            spans = gate_to_rollback(world, url, args.rollbacks)
        finally:
            if gateway is not None:
                gateway.terminate()
                gateway.wait(timeout=10)
            server.down(world.settings)
    report(latency, spans)


def report(latency: dict[str, dict], spans: list[float]) -> None:
    print(f"shadow copies sent during the shadow rounds: {latency['mirrored']}")
    for protocol, arms in latency["p50"].items():
        none, shadow = statistics.median(arms["none"]), statistics.median(arms["shadow"])
        rounds = ", ".join(f"{(s - n) * 1000:+.3f}" for n, s in zip(arms["none"], arms["shadow"], strict=True))
        if protocol == "triton":
            print(f"triton alone: p50 one at a time {none * 1000:.3f} ms, with a second inference beside "
                  f"{shadow * 1000:.3f} ms (rounds: {rounds} ms)")
            print(f"triton's own cost of a second inference beside p50: {(shadow - none) * 1000:.3f} ms")
            continue
        print(f"{protocol}: p50 one at a time, no rollout {none * 1000:.3f} ms, shadow 100 % {shadow * 1000:.3f} ms "
              f"(rounds: {rounds} ms)")
        print(f"{'shadow' if protocol == 'http' else 'grpc shadow'} added latency p50: {(shadow - none) * 1000:.3f} ms")
    print(f"gate failure to rollback verified, each: {', '.join(f'{s:.3f}' for s in spans)} s")
    print(f"gate failure to rollback verified: {statistics.median(spans):.3f} s")


if __name__ == "__main__":
    main()
