"""What a fleet costs: deploy wall time on 1, 2 and 4 real Triton replicas, and on 64 simulated ones.

Prints, from one run:
  `fleet ratio 4/1: X`                 deploy wall on 4 real replicas over 1 (they share this machine's
                                       2 cores, so this is CPU contention as much as coordination: no target)
  `fleet coordination ratio: Y`        a 4-replica deploy's wall over its irreducible part, measured in the same
                                       run under the same contention: materialize + the slowest replica's
                                       load + ready + inference, done bare on all replicas at once (target <= 1.15)
  `simulated 64-replica coordination ratio: Z`
                                       deploy wall on 64 fake replicas (bench/fake_replicas.py, a load of
                                       0.3 s each) over the same on 1 (target <= 1.25)
  `most requests in flight at once: N` at the 64 fake replicas (each holds one connection; bounded by MAX_PARALLEL)
  `rolling ratio: R`                   a rolling deploy (--strategy rolling, batch 1) on 4 real replicas over
                                       materialize + 4 x one replica's bare swap (unload, load, ready, one
                                       inference), measured in the same run: the cost of draining, proving and
                                       repointing batch by batch (no target)

    .venv/bin/python bench/fleet.py [--rounds 4]
"""

from __future__ import annotations

import argparse
import contextlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "examples")]

from train_model import train_and_register  # noqa: E402

from conftest import World, _free_port_block, make_settings, start_fleet, stop_fleet  # noqa: E402
from ferry.core.errors import FerryError  # noqa: E402
from ferry.core.fleet import MAX_PARALLEL  # noqa: E402
from ferry.core.model_config import from_pbtxt, to_override_json, with_versions  # noqa: E402
from ferry.core.runner import deploy  # noqa: E402
from ferry.core.steps import Services  # noqa: E402
from ferry.core.triton import Triton  # noqa: E402

TWIN = "iris-bare"
SAMPLE = {"X": np.array([[5.1, 3.5, 1.4, 0.2]], dtype=np.float32)}


def bare_on_every_replica(world: World, version: int) -> float:
    """The candidate's load (beside the active twin), readiness and one inference, on all replicas at once,
    as a deploy does them; the slowest replica's time."""
    source = world.model_dir.version_dir(version)
    target = world.settings.repository / TWIN / str(version)
    shutil.copytree(source, target)
    config = with_versions(from_pbtxt(world.model_dir.read_config_text() or ""), [])
    config.name = TWIN
    active = [int(p.name) for p in target.parent.iterdir() if p.name.isdigit() and int(p.name) < version]
    override = to_override_json(with_versions(config, [*active[-1:], version]))

    def one(triton: Triton) -> float:
        began = time.perf_counter()
        triton.load(TWIN, override)
        while not triton.version_ready(TWIN, version):
            time.sleep(0.01)
        triton.infer(TWIN, version, SAMPLE, {"X": "FP32"})
        return time.perf_counter() - began

    replicas = world.ferry.fleet().replicas
    with ThreadPoolExecutor(len(replicas)) as pool:
        slowest = max(pool.map(one, replicas))
    with ThreadPoolExecutor(len(replicas)) as pool:  # retire the older twin, as a commit would
        list(pool.map(lambda t: t.load(TWIN, to_override_json(with_versions(config, [version]))), replicas))
    return slowest


def real_fleet(replicas: int, rounds: int, home: Path) -> tuple[float, float]:
    """(median deploy wall, median coordination ratio) on ``replicas`` real Triton servers."""
    world = start_fleet(home, replicas)
    try:
        train_and_register("iris", "champion", tracking_uri=world.settings.tracking_uri)
        deploy(world.ferry, "iris", alias="champion")
        bare_on_every_replica(world, 1)
        walls, ratios = [], []
        controller = Services(world.settings)  # MLflow's client warm, as in a long-running controller
        for _ in range(rounds):
            version = train_and_register("iris", "champion", tracking_uri=world.settings.tracking_uri)
            began = time.perf_counter()
            report = deploy(controller, "iris", alias="champion")
            wall = time.perf_counter() - began
            assert report.outcome == "committed", report.error
            time.sleep(0.5)  # the retired version's stubs exit
            irreducible = report.steps["materialize"] + bare_on_every_replica(world, version)
            walls.append(wall)
            ratios.append(wall / irreducible)
            time.sleep(0.5)
        return statistics.median(walls), statistics.median(ratios)
    finally:
        stop_fleet(world)


def bare_swap(world: World, version: int) -> float:
    """One replica's swap of the twin model to ``version``, bare: unload, load it alone, ready, one inference."""
    source = world.model_dir.version_dir(version)
    shutil.copytree(source, world.settings.repository / TWIN / str(version))
    config = with_versions(from_pbtxt(world.model_dir.read_config_text() or ""), [version])
    config.name = TWIN
    triton = world.ferry.fleet().replicas[0]
    began = time.perf_counter()
    with contextlib.suppress(FerryError):  # the first swap has nothing to unload
        triton.unload(TWIN)
    triton.load(TWIN, to_override_json(config))
    while not triton.version_ready(TWIN, version):
        time.sleep(0.01)
    triton.infer(TWIN, version, SAMPLE, {"X": "FP32"})
    return time.perf_counter() - began


def rolling_fleet(replicas: int, rounds: int, home: Path) -> float:
    """The median of a rolling deploy's wall over materialize + ``replicas`` bare swaps, on real servers."""
    world = start_fleet(home, replicas)
    try:
        train_and_register("iris", "champion", tracking_uri=world.settings.tracking_uri)
        deploy(world.ferry, "iris", alias="champion")
        bare_swap(world, 1)
        controller = Services(world.settings)
        ratios = []
        for _ in range(rounds):
            version = train_and_register("iris", "champion", tracking_uri=world.settings.tracking_uri)
            began = time.perf_counter()
            report = deploy(controller, "iris", alias="champion", strategy="rolling")
            wall = time.perf_counter() - began
            assert report.outcome == "committed", report.error
            time.sleep(0.5)
            ratios.append(wall / (report.steps["materialize"] + replicas * bare_swap(world, version)))
        print(f"{replicas} real replicas, rolling: steps of the last deploy: "
              + ", ".join(f"{step} {seconds:.3f}" for step, seconds in report.steps.items()), flush=True)
        return statistics.median(ratios)
    finally:
        stop_fleet(world)


def simulated_fleet(replicas: int, rounds: int, home: Path, load_delay_s: float = 0.3) -> tuple[float, str]:
    """(median deploy wall, the fake servers' connection count line) on ``replicas`` fake replicas."""
    base = _free_port_block(replicas)
    settings = make_settings(home, triton_url=",".join(f"http://127.0.0.1:{base + i}" for i in range(replicas)),
                             triton_api_key="bench")
    fakes = subprocess.Popen([sys.executable, str(ROOT / "bench" / "fake_replicas.py"), str(settings.repository),
                              str(base), str(replicas), str(load_delay_s)], stdout=subprocess.PIPE, text=True)
    try:
        assert fakes.stdout is not None and fakes.stdout.readline().strip() == "ready"
        settings.repository.mkdir(parents=True, exist_ok=True)
        walls = []
        controller = Services(settings)
        for _ in range(rounds + 1):
            train_and_register("iris", "champion", tracking_uri=settings.tracking_uri)
            began = time.perf_counter()
            report = deploy(controller, "iris", alias="champion")
            walls.append(time.perf_counter() - began)
            assert report.outcome == "committed", report.error
        print(f"{replicas} simulated replica(s), steps of the last deploy: "
              + ", ".join(f"{step} {seconds:.3f}" for step, seconds in report.steps.items()), flush=True)
    finally:
        fakes.terminate()
        connections = fakes.communicate(timeout=30)[0].strip()
    return statistics.median(walls[1:]), connections  # the first deploy also started MLflow's client


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--simulated-only", action="store_true", help="skip the real replicas")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        walls = {}
        for replicas in () if args.simulated_only else (1, 2, 4):
            walls[replicas], ratio = real_fleet(replicas, args.rounds, root / f"real-{replicas}")
            print(f"{replicas} real replica(s): deploy wall {walls[replicas]:.3f} s (median of {args.rounds}), "
                  f"coordination ratio {ratio:.3f}", flush=True)
        if walls:
            print(f"fleet ratio 4/1: {walls[4] / walls[1]:.3f}")
            print(f"fleet coordination ratio: {ratio:.3f}")
            print(f"rolling ratio: {rolling_fleet(4, args.rounds, root / 'rolling-4'):.3f}", flush=True)
        one, _ = simulated_fleet(1, args.rounds, root / "fake-1")
        many, connections = simulated_fleet(64, args.rounds, root / "fake-64")
        print(f"simulated deploy wall: 1 replica {one:.3f} s, 64 replicas {many:.3f} s")
        print(f"simulated 64-replica coordination ratio: {many / one:.3f}")
        print(f"{connections} (bound: one per replica, at most MAX_PARALLEL = {MAX_PARALLEL})")


if __name__ == "__main__":
    main()
