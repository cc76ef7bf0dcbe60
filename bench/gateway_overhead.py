"""What the gateway costs: the same load straight to Triton and through the gateway, over HTTP and gRPC, in one run.

For each protocol it prints `<protocol> throughput ratio: R` (gateway / direct, at --concurrency; target
>= 0.85), `<protocol> added latency p50: MS` (one request at a time; target <= 1 ms), and the CPU time the
gateway and Triton spend per request (`<protocol> gateway CPU us per request: G`, `<protocol> triton CPU us
per request: T`), read from /proc/<pid>/stat over the same rounds. Rounds alternate direct and gateway so
that machine noise hits both alike; each figure is the median over the rounds. The load generator (one
process: aiohttp for HTTP, grpc.aio for gRPC), Triton and the gateway share this machine's cores, so what
bounds the ratio is CPU: (Triton + load generator) / (Triton + load generator + gateway) once the cores are
busy. With --guard-off a second gateway runs with the request guard disabled (parse and checks), to show
what the guard costs.

    .venv/bin/python bench/gateway_overhead.py [--rounds 5] [--seconds 4] [--concurrency 8] [--guard-off]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import grpc
import httpx
from tritonclient.grpc import service_pb2

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "examples")]

from conftest import World, _free_port_block, make_settings  # noqa: E402
from ferry.runtime import server  # noqa: E402

ROW = [5.1, 3.5, 1.4, 0.2]
BODY = json.dumps({"inputs": [{"name": "X", "shape": [1, 4], "datatype": "FP32", "data": ROW}]}).encode()
SERVICE = "/inference.GRPCInferenceService/ModelInfer"
# The gateway as `ferry gateway` runs it (ferry.adapters.gateway.app.serve), with its gRPC port.
GATEWAY = [sys.executable, "-m", "ferry", "gateway"]
# The same with the guard switched off, for measurement only: no parse, no checks.
UNGUARDED = [sys.executable, "-c", "import sys; import ferry.adapters.inference.guard as g; "
             "g.parse_infer = g.check_infer = g.check_grpc_infer = lambda *a: None; "
             "from ferry.adapters.cli import main; sys.argv[:1] = ['ferry', 'gateway']; main()"]


def grpc_request(version: str) -> bytes:
    request = service_pb2.ModelInferRequest(model_name="iris", model_version=version)
    request.inputs.add(name="X", datatype="FP32", shape=[1, 4]).contents.fp32_contents.extend(ROW)
    return request.SerializeToString()


@dataclass
class Target:
    """One way to send inferences: ``name`` (direct, gateway, unguarded) over ``protocol`` (http, grpc)."""

    name: str
    protocol: str
    address: str  # a URL for HTTP, host:port for gRPC

    @property
    def key(self) -> str:
        return f"{self.protocol} {self.name}"


async def _drive(send: Callable[[], Awaitable[None]], seconds: float, concurrency: int) -> tuple[float, list[float]]:
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    async def worker() -> None:
        while time.perf_counter() < deadline:
            began = time.perf_counter()
            await send()
            latencies.append(time.perf_counter() - began)

    began = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return len(latencies) / (time.perf_counter() - began), latencies


async def _run_http(url: str, seconds: float, concurrency: int) -> tuple[float, list[float]]:
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency), timeout=timeout) as session:

        async def send() -> None:
            async with session.post(url, data=BODY, headers={"content-type": "application/json"}) as reply:
                await reply.read()
                if reply.status != 200:
                    raise SystemExit(f"{url} answered {reply.status}")

        return await _drive(send, seconds, concurrency)


async def _run_grpc(address: str, version: str, seconds: float, concurrency: int) -> tuple[float, list[float]]:
    request = grpc_request(version)
    async with grpc.aio.insecure_channel(address) as channel:
        call = channel.unary_unary(SERVICE)

        async def send() -> None:
            await call(request, timeout=30)

        return await _drive(send, seconds, concurrency)


def measure(target: Target, seconds: float, concurrency: int) -> tuple[float, list[float]]:
    if target.protocol == "http":
        return asyncio.run(_run_http(target.address, seconds, concurrency))
    version = "1" if target.name == "direct" else ""
    return asyncio.run(_run_grpc(target.address, version, seconds, concurrency))


def _own_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of a process, with its children that are still running if it is Triton (the
    Python backend's stubs). The load generator's children are Triton and the gateway: not counted for it."""
    if pid == os.getpid():
        return _own_cpu(pid)
    children = [int(c) for task in Path(f"/proc/{pid}/task").iterdir() for c in (task / "children").read_text().split()]
    return _own_cpu(pid) + sum(_own_cpu(c) for c in children)


def measure_cpu(target: Target, seconds: float, concurrency: int,
                pids: dict[str, int]) -> tuple[float, dict[str, float]]:
    """Throughput, and the CPU microseconds each process spent per request meanwhile."""
    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    rate, latencies = measure(target, seconds, concurrency)
    return rate, {name: (cpu_seconds(pid) - before[name]) / len(latencies) * 1e6 for name, pid in pids.items()}


def percentile(values: list[float], q: int) -> float:
    return statistics.quantiles(values, n=100)[q - 1] if len(values) > 1 else values[0]


def start_gateway(world: World, command: list[str]) -> tuple[subprocess.Popen, int]:
    port = _free_port_block(2)
    process = subprocess.Popen([*command, "--port", str(port), "--grpc-port", str(port + 1)],
                               env={**os.environ, **world.env()}, stdout=subprocess.DEVNULL)
    for _ in range(300):
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200:
                return process, port
        except httpx.TransportError:
            time.sleep(0.2)
    process.kill()
    raise SystemExit("the gateway did not start")


def py_spy() -> str:
    """py-spy (the `bench` extra), from the project's venv, .venv-bench (beside perf_analyzer) or PATH."""
    for candidate in (Path(sys.executable).parent / "py-spy", ROOT / ".venv-bench" / "bin" / "py-spy"):
        if candidate.is_file():
            return str(candidate)
    found = shutil.which("py-spy")
    if found is None:
        raise SystemExit("py-spy is not installed: pip install 'ferry[bench]' (or py-spy into .venv-bench)")
    return found


def profile(pid: int, seconds: float, load: Callable[[], object], top: int = 25) -> str:
    """Where the process ``pid`` spends its CPU while ``load`` runs: py-spy samples it (native frames too; epoll_wait
    is the event loop waiting); each function's share of the samples, as the innermost frame (self)
    and anywhere on the stack."""
    with tempfile.NamedTemporaryFile(suffix=".txt") as out:
        spy = subprocess.Popen([py_spy(), "record", "--pid", str(pid), "--duration", str(int(seconds)), "--rate",
                                "250", "--native", "--format", "raw", "--output", out.name],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        load()
        _, errors = spy.communicate(timeout=seconds + 60)
        if spy.returncode != 0:
            raise SystemExit(f"py-spy failed (exit {spy.returncode}): {errors.strip()[-500:]}")
        stacks = Path(out.name).read_text().splitlines()
    own: Counter[str] = Counter()
    anywhere: Counter[str] = Counter()
    total = 0
    for line in stacks:
        frames, _, count = line.rpartition(" ")
        names = [_frame(f) for f in frames.split(";") if f]
        total += int(count)
        if names:
            own[names[-1]] += int(count)
        for name in set(names):
            anywhere[name] += int(count)
    rows = [f"{100 * n / total:5.1f}% self {100 * anywhere[name] / total:5.1f}% total  {name}"
            for name, n in own.most_common(top)]
    inclusive = [f"{100 * n / total:5.1f}% total  {name}" for name, n in anywhere.most_common(top)]
    return "\n".join([f"{total} samples; by self time:", *rows, "by total time:", *inclusive])


def _frame(frame: str) -> str:
    """A py-spy raw frame, ``function (file:line)``, as ``function (file)``."""
    name, _, where = frame.partition(" (")
    return f"{name} ({where.rsplit(':', 1)[0].rsplit('/', 1)[-1]})" if where else name


def targets(world: World, gateways: dict[str, int]) -> list[Target]:
    triton = world.settings.triton
    found = [Target("direct", "http", f"{triton.endpoint.url}/v2/models/iris/versions/1/infer"),
             Target("direct", "grpc", triton.grpc.host_port)]
    for name, port in gateways.items():
        found += [Target(name, "http", f"http://127.0.0.1:{port}/v2/models/iris/infer"),
                  Target(name, "grpc", f"127.0.0.1:{port + 1}")]
    return found


@dataclass
class Figures:
    rate: list[float]
    p50: list[float]
    p99: list[float]
    cpu: dict[str, list[float]]

    def median(self, what: str) -> float:
        return statistics.median(getattr(self, what))


def run_rounds(all_targets: list[Target], pids: dict[str, dict[str, int]], args: argparse.Namespace) -> dict:
    figures = {t.key: Figures([], [], [], {p: [] for p in pids[t.name]}) for t in all_targets}
    for target in all_targets:  # warm up every path
        measure(target, 1.0, args.concurrency)
    for i in range(args.rounds):
        for target in all_targets if i % 2 == 0 else list(reversed(all_targets)):
            rate, spent = measure_cpu(target, args.seconds, args.concurrency, pids[target.name])
            _, latencies = measure(target, args.seconds / 2, 1)
            f = figures[target.key]
            f.rate.append(rate)
            f.p50.append(percentile(latencies, 50))
            f.p99.append(percentile(latencies, 99))
            for process, micros in spent.items():
                f.cpu[process].append(micros)
    return figures


def report(figures: dict[str, Figures], names: list[str], concurrency: int) -> None:
    for key, f in figures.items():
        spent = ", ".join(f"{process} {statistics.median(v):.0f}" for process, v in f.cpu.items())
        print(f"{key:16s} {f.median('rate'):8.0f} req/s at concurrency {concurrency}; one at a time p50 "
              f"{f.median('p50') * 1000:.3f} ms, p99 {f.median('p99') * 1000:.3f} ms; CPU us per request: {spent}")
    for protocol in ("http", "grpc"):
        direct = figures[f"{protocol} direct"]
        for name in names:
            through = figures[f"{protocol} {name}"]
            label = protocol if name == "gateway" else f"{protocol} {name}"
            print(f"{label} throughput ratio: {through.median('rate') / direct.median('rate'):.3f}")
            print(f"{label} added latency p50: {(through.median('p50') - direct.median('p50')) * 1000:.3f} ms")
            print(f"{label} added latency p99: {(through.median('p99') - direct.median('p99')) * 1000:.3f} ms")
            print(f"{label} gateway CPU us per request: {statistics.median(through.cpu['gateway']):.0f}")
            print(f"{label} triton CPU us per request: {statistics.median(through.cpu['triton']):.0f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=4.0, help="length of each throughput run")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--guard-off", action="store_true", help="also measure a gateway without the request guard")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="ferry-gateway-bench-") as home:
        world = World(make_settings(Path(home)))
        world.register()
        triton = server.up(world.settings)
        processes: dict[str, subprocess.Popen] = {}
        try:
            assert world.deploy().outcome == "committed"
            ports = {}
            for name, command in (("gateway", GATEWAY), ("unguarded", UNGUARDED))[: 2 if args.guard_off else 1]:
                processes[name], ports[name] = start_gateway(world, command)
            base = {"triton": triton.pid, "load generator": os.getpid()}
            pids = {"direct": base} | {name: {**base, "gateway": p.pid} for name, p in processes.items()}
            figures = run_rounds(targets(world, ports), pids, args)
        finally:
            for process in processes.values():
                process.terminate()
                process.wait(timeout=10)
            server.down(world.settings)
    report(figures, list(processes), args.concurrency)


if __name__ == "__main__":
    main()
