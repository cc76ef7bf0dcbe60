"""What the gateway costs: the same load straight to Triton and through `ferry gateway`, in one run.

Prints `throughput ratio: X` (gateway / direct, at --concurrency; target >= 0.85) and the latency the
gateway adds, p50 and p99, one request at a time (target p50 <= 1 ms). Rounds alternate direct and
gateway so that machine noise hits both alike; each figure is the median over the rounds. The load
generator (aiohttp, one process), Triton and the gateway share this machine's cores, so the CPU time
each spends per request (also printed) is what bounds the ratio: (Triton + load generator) /
(Triton + load generator + gateway) once the cores are busy.

    .venv/bin/python bench/gateway_overhead.py [--rounds 5] [--seconds 4] [--concurrency 8]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "examples")]

from conftest import World, _free_port_block, make_settings  # noqa: E402
from ferry.runtime import server  # noqa: E402

BODY = {"inputs": [{"name": "X", "shape": [1, 4], "datatype": "FP32", "data": [5.1, 3.5, 1.4, 0.2]}]}


async def _run(url: str, seconds: float, concurrency: int) -> tuple[float, list[float]]:
    """Requests per second and each request's latency, ``concurrency`` requests in flight for ``seconds``."""
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:

        async def worker() -> None:
            while time.perf_counter() < deadline:
                began = time.perf_counter()
                async with session.post(url, json=BODY) as reply:
                    await reply.read()
                    if reply.status != 200:
                        raise SystemExit(f"{url} answered {reply.status}")
                latencies.append(time.perf_counter() - began)

        began = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return len(latencies) / (time.perf_counter() - began), latencies


def measure(url: str, seconds: float, concurrency: int) -> tuple[float, list[float]]:
    return asyncio.run(_run(url, seconds, concurrency))


def cpu_seconds(pid: int) -> float:
    """User and system CPU time of a process and its children that are still running (Triton's stubs)."""
    def own(p: int) -> float:
        fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    children = [int(c) for task in Path(f"/proc/{pid}/task").iterdir() for c in (task / "children").read_text().split()]
    return own(pid) + sum(own(c) for c in children)


def measure_cpu(url: str, seconds: float, concurrency: int, pids: dict[str, int]) -> tuple[float, dict[str, float]]:
    """Throughput, and the CPU microseconds each process spent per request meanwhile."""
    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    rate, latencies = measure(url, seconds, concurrency)
    return rate, {name: (cpu_seconds(pid) - before[name]) / len(latencies) * 1e6 for name, pid in pids.items()}


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100)[q - 1] if len(values) > 1 else values[0]


def start_gateway(world: World) -> tuple[subprocess.Popen, str]:
    port = _free_port_block(1)
    process = subprocess.Popen([sys.executable, "-m", "ferry", "gateway", "--port", str(port)],
                               env={**os.environ, **world.env()}, stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            if httpx.get(f"{url}/healthz", timeout=1).status_code == 200:
                return process, url
        except httpx.TransportError:
            time.sleep(0.2)
    process.kill()
    raise SystemExit("the gateway did not start")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=4.0, help="length of each throughput run")
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="ferry-gateway-bench-") as home:
        world = World(make_settings(Path(home)))
        world.register()
        triton = server.up(world.settings)
        gateway = None
        try:
            assert world.deploy().outcome == "committed"
            gateway, gateway_url = start_gateway(world)
            urls = {"direct": f"{world.settings.triton_url}/v2/models/iris/versions/1/infer",
                    "gateway": f"{gateway_url}/v2/models/iris/infer"}
            for url in urls.values():  # warm up both paths
                measure(url, 1.0, args.concurrency)
            pids = {"triton": triton.pid, "gateway": gateway.pid, "load generator": os.getpid()}
            throughput = {name: [] for name in urls}
            p50 = {name: [] for name in urls}
            p99 = {name: [] for name in urls}
            cpu = {name: {process: [] for process in pids} for name in urls}
            for i in range(args.rounds):
                for name in (("direct", "gateway") if i % 2 == 0 else ("gateway", "direct")):
                    rate, spent = measure_cpu(urls[name], args.seconds, args.concurrency, pids)
                    _, latencies = measure(urls[name], args.seconds / 2, 1)
                    throughput[name].append(rate)
                    p50[name].append(percentile(latencies, 50))
                    p99[name].append(percentile(latencies, 99))
                    for process, micros in spent.items():
                        cpu[name][process].append(micros)
        finally:
            if gateway is not None:
                gateway.terminate()
                gateway.wait(timeout=10)
            server.down(world.settings)

    median = {name: {k: statistics.median(v[name]) for k, v in
                     (("rate", throughput), ("p50", p50), ("p99", p99))} for name in urls}
    for name, figures in median.items():
        spent = ", ".join(f"{process} {statistics.median(v):.0f}" for process, v in cpu[name].items())
        print(f"{name:8s} {figures['rate']:8.0f} req/s at concurrency {args.concurrency}; "
              f"one at a time p50 {figures['p50'] * 1000:.3f} ms, p99 {figures['p99'] * 1000:.3f} ms; "
              f"CPU us per request: {spent}")
    print(f"throughput ratio: {median['gateway']['rate'] / median['direct']['rate']:.3f}")
    print(f"added latency p50: {(median['gateway']['p50'] - median['direct']['p50']) * 1000:.3f} ms")
    print(f"added latency p99: {(median['gateway']['p99'] - median['direct']['p99']) * 1000:.3f} ms")


if __name__ == "__main__":
    main()
