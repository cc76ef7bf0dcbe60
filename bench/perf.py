"""NVIDIA's perf_analyzer on iris: straight at Triton against through `ferry gateway`, the front's own cost, and
what clients that call Triton directly, naming no version, get while ferry deploys.

1. Throughput and latency. perf_analyzer (binary tensors, `--concurrency-range 1:4:3`, HTTP and gRPC) runs in
   alternating rounds against three targets: the front straight at Triton (`-m iris`, what a direct client with
   no version reaches), the gateway (`-m iris`), and the version store by version (`-m iris.versions.N -x N`,
   what the front pins). Each figure is the median over the rounds:
       perf <protocol> c<1|4> throughput ratio: X       gateway / direct
       perf <protocol> c<1|4> added p50 ms: X           gateway p50 - direct p50 (p99 likewise)
       perf front overhead <protocol> c<1|4> throughput ratio: X   front / store by version
       gateway cpu ratio <protocol>: X                  gateway CPU s per request / Triton CPU s per request
   and, beside them, a bare forwarder (bench/bare_forwarder.py: the gateway's HTTP server and upstream pool, a
   bare grpc.aio pass-through; no guard, routing or metrics) in front of the store, the floor of a Python hop:
       perf bare forwarder <protocol> c<1|4> throughput ratio: X   bare forwarder / store by version
       bare forwarder cpu ratio <protocol>: X           its CPU s per request / Triton CPU s per request
   CPU is read from /proc/<pid>/stat (utime + stime; Triton with its backend stubs) around each gateway run,
   requests from Triton's statistics of the store.
2. Isolation. While ferry deploys a good version, an output-shape break, a golden-mismatch break and a rollback,
   perf_analyzer runs back to back straight at Triton (`-m iris`, HTTP and gRPC), and so do two tritonclient
   loops (HTTP and gRPC, no version) whose every answer is matched against each version's outputs, computed
   beforehand with onnxruntime from the MLflow artifacts:
       perf_analyzer runs straight at Triton during deploys: N, aborted: N
       direct clients answered by an uncommitted version: N     (must be 0)
       direct client requests failed: N

    make perf-analyzer    # once: NVIDIA's perf_analyzer in .venv-bench
    flock /tmp/ferry-real.lock .venv/bin/python bench/perf.py [--rounds 5] [--interval-ms 800]
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import mlflow
import numpy as np
import onnxruntime
import tritonclient.grpc as triton_grpc
import tritonclient.http as triton_http
from mlflow import MlflowClient

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "examples")]

import gateway_overhead  # noqa: E402  (bench/, beside this script)
from train_model import train_and_register  # noqa: E402

from conftest import World, make_settings  # noqa: E402
from ferry.core.current import read_current  # noqa: E402
from ferry.core.front import parse_store_name, store_name  # noqa: E402
from ferry.core.runner import deploy  # noqa: E402
from ferry.runtime import server  # noqa: E402

PERF_ANALYZER = ROOT / "bench" / "perf_analyzer"
MODEL = "iris"
ALIAS = "champion"
SAMPLE = np.array([[5.1, 3.5, 1.4, 0.2], [5.9, 3.0, 4.2, 1.5], [6.9, 3.1, 5.4, 2.1]], dtype=np.float32)
PROTOCOLS = ("http", "grpc")
STATS_ABORT = "failed to find the requested model version"
UNSTABLE = "Failed to obtain stable measurement"
SETTLE_S = 4.0  # between deploys: longer than one perf_analyzer run of the isolation loops
CONCURRENCIES = (1, 4)
# The isolation plan: what each version is (examples/train_model.py), and what its deploy must end in.
PLAN = [("good", "none", 5, "committed"), ("output-shape", "output-shape", 0, "rolled_back"),
        ("golden-mismatch", "golden-mismatch", 0, "rolled_back")]


@dataclass
class Run:
    """One perf_analyzer invocation's figures per concurrency: infer/s and latency quantiles in ms."""

    rate: dict[int, float]
    p50: dict[int, float]
    p99: dict[int, float]


def perf_analyzer(args: list[str], timeout_s: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([str(PERF_ANALYZER), *args], capture_output=True, text=True, timeout=timeout_s)


def perf_args(url: str, protocol: str, model: str, version: str | None, interval_ms: int,
              stability: int = 50, shape: str = "1,4") -> list[str]:
    """Binary tensors, X of ``shape`` (random unless --input-data says); ``stability``: how far (%) its last
    three windows may differ."""
    args = ["-m", model, "-u", url, "-i", protocol, "--shape", f"X:{shape}", "-p", str(interval_ms),
            "--stability-percentage", str(stability), "--max-trials", "8"]
    if version:
        args += ["-x", version]
    if protocol == "http":
        args += ["--input-tensor-format", "binary", "--output-tensor-format", "binary"]
    return args


def measure(url: str, protocol: str, model: str, version: str | None, interval_ms: int, folder: Path) -> Run:
    """perf_analyzer at concurrency 1 then 4; its CSV export read back. A run that found no three windows
    within 50 % of each other (a busy shared machine) is run again accepting any."""
    export = folder / "perf.csv"
    for stability in (50, 100):
        export.unlink(missing_ok=True)
        args = perf_args(url, protocol, model, version, interval_ms, stability)
        done = perf_analyzer([*args, "--concurrency-range", "1:4:3", "-f", str(export)])
        # Unstable at concurrency 4, it still exits 0 with concurrency 1 alone in the export.
        if done.returncode == 0 and export.is_file() and len(export.read_text().splitlines()) == 1 + len(CONCURRENCIES):
            break
    else:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise SystemExit(f"perf_analyzer {' '.join(args)} failed (exit {done.returncode}): {' / '.join(tail)}")
    run = Run({}, {}, {})
    with export.open() as rows:
        for row in csv.DictReader(rows):
            c = int(row["Concurrency"])
            run.rate[c] = float(row["Inferences/Second"])
            run.p50[c], run.p99[c] = float(row["p50 latency"]) / 1000, float(row["p99 latency"]) / 1000
    return run


def _own_cpu(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process and of its running children (Triton's backend stubs)."""
    children = [int(c) for task in Path(f"/proc/{pid}/task").iterdir() for c in (task / "children").read_text().split()]
    return _own_cpu(pid) + sum(_own_cpu(c) for c in children)


def store_requests(world: World) -> int:
    """Successful inferences the version stores have run, every version together (Triton's statistics)."""
    reply = httpx.get(f"{world.settings.triton.endpoint.url}/v2/models/stats", timeout=10)
    reply.raise_for_status()
    return sum(s["inference_stats"]["success"]["count"] for s in reply.json()["model_stats"]
               if (parse_store_name(s["name"]) or ("", 0))[0] == MODEL)


@dataclass
class Target:
    name: str  # direct (the front), gateway, store (by version)
    protocol: str
    url: str
    model: str
    version: str | None = None

    @property
    def key(self) -> str:
        return f"{self.protocol} {self.name}"


@dataclass
class Figures:
    runs: list[Run] = field(default_factory=list)
    cpu_ratio: list[float] = field(default_factory=list)  # gateway CPU / Triton CPU over the same run
    gateway_us: list[float] = field(default_factory=list)  # gateway CPU microseconds per request
    triton_us: list[float] = field(default_factory=list)

    def median(self, what: str, concurrency: int) -> float:
        return statistics.median(getattr(r, what)[concurrency] for r in self.runs)


def throughput_rounds(targets: list[Target], world: World, pids: dict[str, int], args: argparse.Namespace,
                      folder: Path) -> dict[str, Figures]:
    figures = {t.key: Figures() for t in targets}
    for target in targets:  # warm every path once, unmeasured
        measure(target.url, target.protocol, target.model, target.version, 300, folder)
    for i in range(args.rounds):
        for target in targets if i % 2 == 0 else list(reversed(targets)):
            before = {name: cpu_seconds(pid) for name, pid in pids.items()}
            requests_before = store_requests(world)
            run = measure(target.url, target.protocol, target.model, target.version, args.interval_ms, folder)
            requests = max(store_requests(world) - requests_before, 1)
            spent = {name: cpu_seconds(pid) - before[name] for name, pid in pids.items()}
            f = figures[target.key]
            f.runs.append(run)
            if target.name in ("gateway", "bare"):  # the hop's CPU, the gateway's or the bare forwarder's
                f.cpu_ratio.append(spent[target.name] / max(spent["triton"], 1e-9))
                f.gateway_us.append(spent[target.name] / requests * 1e6)
            f.triton_us.append(spent["triton"] / requests * 1e6)
        print(f"round {i + 1}/{args.rounds} measured", file=sys.stderr)
    return figures


def report_throughput(figures: dict[str, Figures]) -> None:
    for key, f in figures.items():
        parts = [f"c{c} {f.median('rate', c):.0f} infer/s p50 {f.median('p50', c):.3f} ms "
                 f"p99 {f.median('p99', c):.3f} ms" for c in CONCURRENCIES]
        print(f"{key:13s} " + "; ".join(parts) + f"; triton CPU us per request {statistics.median(f.triton_us):.0f}"
              + (f", hop {statistics.median(f.gateway_us):.0f}" if f.gateway_us else ""))
    for protocol in PROTOCOLS:
        direct, gateway, store = (figures[f"{protocol} {name}"] for name in ("direct", "gateway", "store"))
        for c in CONCURRENCIES:
            print(f"perf {protocol} c{c} throughput ratio: {gateway.median('rate', c) / direct.median('rate', c):.3f}")
        for c in CONCURRENCIES:
            print(f"perf {protocol} c{c} added p50 ms: {gateway.median('p50', c) - direct.median('p50', c):.3f}")
            print(f"perf {protocol} c{c} added p99 ms: {gateway.median('p99', c) - direct.median('p99', c):.3f}")
        for c in CONCURRENCIES:
            print(f"perf front overhead {protocol} c{c} throughput ratio: "
                  f"{direct.median('rate', c) / store.median('rate', c):.3f}")
            print(f"perf front overhead {protocol} c{c} added p50 ms: "
                  f"{direct.median('p50', c) - store.median('p50', c):.3f}")
    for protocol in PROTOCOLS:
        print(f"gateway cpu ratio {protocol}: {statistics.median(figures[f'{protocol} gateway'].cpu_ratio):.3f}")
    for protocol in PROTOCOLS:  # the floor of a Python hop: bench/bare_forwarder.py, against the store it calls
        bare, store = figures.get(f"{protocol} bare"), figures[f"{protocol} store"]
        if bare is None:
            continue
        for c in CONCURRENCIES:
            print(f"perf bare forwarder {protocol} c{c} throughput ratio: "
                  f"{bare.median('rate', c) / store.median('rate', c):.3f}")
        print(f"bare forwarder cpu ratio {protocol}: {statistics.median(bare.cpu_ratio):.3f}")


def profile_gateway(pid: int, port: int, seconds: float) -> None:
    """Where the gateway's CPU goes under perf_analyzer at concurrency 4, per protocol (py-spy)."""
    for protocol in PROTOCOLS:
        url = f"127.0.0.1:{port + (protocol == 'grpc')}"
        window_ms = int(seconds * 1000 / 3)
        args = [*perf_args(url, protocol, MODEL, None, window_ms, stability=100), "--concurrency-range", "4"]
        found = gateway_overhead.profile(pid, seconds, lambda args=args: perf_analyzer(args))
        print(f"gateway profile {protocol} c4:\n{found}")


# --- isolation -------------------------------------------------------------------------------------------------


def expected_outputs(tracking_uri: str, versions: list[int], folder: Path) -> dict[int, np.ndarray]:
    """Each version's 'probabilities' for SAMPLE, from its model.onnx in MLflow (onnxruntime, as Triton runs it)."""
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)
    found = {}
    for version in versions:
        source = client.get_model_version(MODEL, str(version)).source
        path = mlflow.artifacts.download_artifacts(artifact_uri=f"{source}/model.onnx", tracking_uri=tracking_uri,
                                                   dst_path=str(folder / str(version)))
        session = onnxruntime.InferenceSession(path)
        found[version] = np.asarray(session.run(["probabilities"], {"X": SAMPLE})[0], dtype=np.float32)
    for a in found:
        for b in found:
            if a < b and found[a].shape == found[b].shape and np.allclose(found[a], found[b], atol=1e-5):
                raise SystemExit(f"v{a} and v{b} answer alike: their answers cannot tell them apart; "
                                 "register versions that differ (examples/train_model.py --trees)")
    return found


def version_of(answer: np.ndarray, expected: dict[int, np.ndarray]) -> int | None:
    matches = [v for v, want in expected.items() if want.shape == answer.shape and np.allclose(want, answer, atol=1e-5)]
    return matches[0] if len(matches) == 1 else None


@dataclass
class DirectClients:
    """tritonclient HTTP and gRPC loops straight at Triton, no version named, recording every answer."""

    world: World
    model: str
    answers: list[tuple[str, float, np.ndarray]] = field(default_factory=list)  # protocol, received at, output
    failures: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> list[threading.Thread]:
        threads = [threading.Thread(target=self._loop, args=(p,), daemon=True) for p in PROTOCOLS]
        for thread in threads:
            thread.start()
        return threads

    def _loop(self, protocol: str) -> None:
        # One client per thread: a tritonclient.http client is bound to the thread that made it.
        if protocol == "http":
            client, module = triton_http.InferenceServerClient(self.world.settings.triton.endpoint.host_port,
                                                               network_timeout=10), triton_http
        else:
            client, module = triton_grpc.InferenceServerClient(self.world.settings.triton.grpc.host_port), triton_grpc
        while not self.stop.is_set():
            tensor = module.InferInput("X", list(SAMPLE.shape), "FP32")
            tensor.set_data_from_numpy(SAMPLE)
            try:
                result = client.infer(self.model, [tensor], client_timeout=10) if protocol == "grpc" \
                    else client.infer(self.model, [tensor])
                self.answers.append((protocol, time.time(), result.as_numpy("probabilities")))
            except Exception as error:  # every failure is counted and shown
                self.failures.append(f"{protocol}: {str(error).splitlines()[0][:200]}")
            time.sleep(0.002)


@dataclass
class PerfLoop:
    """perf_analyzer run back to back straight at Triton (-m iris, no version) until stopped, on SAMPLE; every
    answer it exported (--profile-export-file keeps each response's outputs and time) is recorded."""

    url: str
    protocol: str
    model: str
    folder: Path
    began: float = field(default_factory=time.time)
    runs: int = 0
    answers: list[tuple[str, float, np.ndarray]] = field(default_factory=list)
    aborted: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self._loop, daemon=True)
        thread.start()
        return thread

    def _loop(self) -> None:
        data, export = self.folder / f"sample-{self.protocol}.json", self.folder / f"profile-{self.protocol}.json"
        data.write_text(json.dumps({"data": [{"X": {"content": SAMPLE.ravel().tolist(), "shape": [*SAMPLE.shape]}}]}))
        shape = ",".join(map(str, SAMPLE.shape))
        args = [*perf_args(self.url, self.protocol, self.model, None, 500, stability=100, shape=shape),
                "--concurrency-range", "1", "--input-data", str(data), "--profile-export-file", str(export)]
        while not self.stop.is_set():
            export.unlink(missing_ok=True)
            done = perf_analyzer(args)
            self.runs += 1
            if done.returncode != 0:
                said = [line.strip() for line in (done.stdout + done.stderr).splitlines() if line.strip()]
                errors = [line for line in said if "error" in line.lower()] or said[-2:]
                self.aborted.append(f"perf_analyzer {self.protocol} (exit {done.returncode}) at "
                                    f"{time.time() - self.began:.1f} s: "
                                    + " / ".join(errors[:2]))
            if export.is_file():
                self.answers += exported_answers(self.protocol, export)


def exported_answers(protocol: str, export: Path) -> list[tuple[str, float, np.ndarray]]:
    """(protocol, received at, 'probabilities' as [rows, columns]) of each response in a profile export."""
    found = []
    for experiment in json.loads(export.read_text())["experiments"]:
        for request in experiment["requests"]:
            for at, outputs in zip(request["response_timestamps"], request["response_outputs"], strict=False):
                # A response without the output matches no version: it counts as uncommitted.
                values = np.asarray(outputs.get("probabilities", []), dtype=np.float32)
                found.append((protocol, at / 1e9, values.reshape(len(SAMPLE), -1) if values.size else values))
    return found


@contextmanager
def load_during(world: World, model: str, folder: Path) -> Iterator[tuple[DirectClients, list[PerfLoop]]]:
    clients = DirectClients(world, model)
    loops = [PerfLoop(world.settings.triton.endpoint.host_port, "http", model, folder),
             PerfLoop(world.settings.triton.grpc.host_port, "grpc", model, folder)]
    threads = clients.start() + [loop.start() for loop in loops]
    try:
        time.sleep(3)
        yield clients, loops
        time.sleep(3)
    finally:
        clients.stop.set()
        for loop in loops:
            loop.stop.set()
        for thread in threads:
            thread.join(timeout=200)


def commit_moment(world: World, version: int) -> tuple[float, int]:
    return world.model_dir.current_path.stat().st_mtime, version


def run_deploys(world: World, versions: dict[str, int]) -> list[tuple[float, int]]:
    """The plan's deploys, then a rollback as `ferry rollback` does it; when each version was committed."""
    ferry = world.ferry
    committed_at = [(0.0, read_current(world.model_dir).active_version)]
    client = MlflowClient(tracking_uri=world.settings.tracking_uri, registry_uri=world.settings.tracking_uri)
    for name, _, _, outcome in PLAN:
        client.set_registered_model_alias(MODEL, ALIAS, str(versions[name]))
        report = deploy(ferry, MODEL, alias=ALIAS)
        print(f"deploy {name} v{versions[name]}: {report.outcome}", file=sys.stderr)
        if report.outcome != outcome:
            raise SystemExit(f"the {name} deploy ended {report.outcome}, expected {outcome}: {report.error}")
        if outcome == "committed":
            committed_at.append(commit_moment(world, report.version))
        # perf_analyzer runs that span a commit stop without exporting their answers (see isolation()): give
        # the loops time for runs that start after this deploy and end before the next one.
        time.sleep(SETTLE_S)
    previous = read_current(world.model_dir).previous_version
    report = deploy(ferry, MODEL, version=previous)  # what `ferry rollback` runs
    print(f"rollback to v{previous}: {report.outcome}", file=sys.stderr)
    if report.outcome != "committed":
        raise SystemExit(f"the rollback to v{previous} ended {report.outcome}: {report.error}")
    committed_at.append(commit_moment(world, previous))
    return committed_at


def uncommitted_answers(answers: list[tuple[str, float, np.ndarray]], expected: dict[int, np.ndarray],
                        committed_at: list[tuple[float, int]]) -> tuple[list[str], dict[str, int]]:
    """Answers from a version that was not committed when they came back (the one committed before the last
    commit may still answer while the front is repointed, right after current.json is written); an answer that
    matches no version counts as uncommitted."""
    wrong, seen = [], {}
    for protocol, received, answer in answers:
        version = version_of(answer, expected)
        seen[f"v{version}"] = seen.get(f"v{version}", 0) + 1
        moment = max(i for i, (at, _) in enumerate(committed_at) if at <= received)
        allowed = {committed_at[moment][1]} | ({committed_at[moment - 1][1]} if moment else set())
        if version not in allowed:
            wrong.append(f"{protocol} at {received:.3f}: v{version} (committed: v{committed_at[moment][1]})")
    return wrong, seen


def isolation(world: World, versions: dict[str, int], model: str, folder: Path) -> None:
    """``model``: what the direct clients call, naming no version (iris; iris.versions.N shows the check catching
    candidates, as Triton answers unversioned requests to the store from its highest loaded version)."""
    expected = expected_outputs(world.settings.tracking_uri, sorted(versions.values()), folder)
    began = time.time()
    with load_during(world, model, folder) as (clients, loops):
        committed_at = run_deploys(world, versions)
    perf_answers = [a for loop in loops for a in loop.answers]
    perf_wrong, perf_seen = uncommitted_answers(perf_answers, expected, committed_at)
    own_wrong, own_seen = uncommitted_answers(clients.answers, expected, committed_at)
    aborted = [a for loop in loops for a in loop.aborted]
    # perf_analyzer stops at an answer whose shape the config does not allow: no committed version gives one.
    by_shape = [a for a in aborted if "has shape" in a]
    # It reads the version the front's step pins once, at its start, and looks for that version's statistics in
    # every window: a run that spans a commit stops there (no request failed; its report is lost).
    by_stats = [a for a in aborted if STATS_ABORT in a]
    # A run whose windows never settled (a busy machine) reports nothing: no request of it failed either.
    unstable = [a for a in aborted if UNSTABLE in a]
    failed = clients.failures + [a for a in aborted if a not in by_shape + by_stats + unstable]
    commits = ", ".join(f"v{v} at {at - began:.1f} s" for at, v in committed_at[1:])
    print(f"isolation, direct clients calling '{model}' with no version: "
          f"{', '.join(f'{n} v{v}' for n, v in versions.items())}; commits: {commits}")
    print(f"perf_analyzer answers by version: {perf_seen}; tritonclient answers by version: {own_seen}")
    for line in aborted[:5] + perf_wrong[:5] + own_wrong[:5] + clients.failures[:5]:
        print(f"  {line}")
    print(f"perf_analyzer runs straight at Triton during deploys: {sum(loop.runs for loop in loops)}, "
          f"stopped by an answer: {len(by_shape)}, stopped at a commit by their statistics: {len(by_stats)}, "
          f"unstable: {len(unstable)}, stopped by anything else: {len(failed) - len(clients.failures)}; "
          f"answers checked (exported by the runs "
          f"that finished): {len(perf_answers)}, from an uncommitted version: {len(perf_wrong) + len(by_shape)}")
    print(f"tritonclient answers checked: {len(clients.answers)}, from an uncommitted version: {len(own_wrong)}")
    print(f"direct clients answered by an uncommitted version: {len(perf_wrong) + len(by_shape) + len(own_wrong)}")
    print(f"direct client requests failed: {len(failed)}")


# --- the world -------------------------------------------------------------------------------------------------


def start_gateway(world: World) -> tuple[subprocess.Popen, int]:
    """`ferry gateway` on free ports, HTTP and gRPC, as bench/gateway_overhead.py starts it."""
    return gateway_overhead.start_gateway(world, [sys.executable, "-m", "ferry", "gateway"])


def start_bare_forwarder(world: World) -> tuple[subprocess.Popen, int]:
    """bench/bare_forwarder.py in front of the same Triton: the floor of a Python hop, measured beside the gateway."""
    settings = world.settings
    return gateway_overhead.start_gateway(world, [sys.executable, str(Path(__file__).parent / "bare_forwarder.py"),
                                                  "--triton", settings.triton.endpoint.host_port,
                                                  "--triton-grpc", settings.triton.grpc.host_port])


def register_all(world: World) -> dict[str, int]:
    """v1 (committed first), then the plan's versions, registered without moving the alias."""
    uri = world.settings.tracking_uri
    versions = {"first": train_and_register(MODEL, ALIAS, "none", 0, uri)}
    for name, breakage, trees, _ in PLAN:
        versions[name] = train_and_register(MODEL, None, breakage, trees, uri)
    return versions


def targets(world: World, gateway_port: int, version: int, bare_port: int | None) -> list[Target]:
    triton, grpc_port = world.settings.triton.endpoint.host_port, world.settings.triton.grpc.host_port
    found = []
    for protocol, direct in (("http", triton), ("grpc", grpc_port)):
        gateway = f"127.0.0.1:{gateway_port + (protocol == 'grpc')}"
        found += [Target("direct", protocol, direct, MODEL), Target("gateway", protocol, gateway, MODEL),
                  Target("store", protocol, direct, store_name(MODEL, version), str(version))]
        if bare_port is not None:  # the bare forwarder passes the store's path on as it came
            found.append(Target("bare", protocol, f"127.0.0.1:{bare_port + (protocol == 'grpc')}",
                                store_name(MODEL, version), str(version)))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--interval-ms", type=int, default=800, help="perf_analyzer's measurement window")
    parser.add_argument("--skip-isolation", action="store_true", help="measure throughput only")
    parser.add_argument("--skip-throughput", action="store_true", help="run the isolation check only")
    parser.add_argument("--skip-bare", action="store_true",
                        help="do not measure the bare forwarder (bench/bare_forwarder.py) beside the gateway")
    parser.add_argument("--profile", type=float, default=0, metavar="SECONDS",
                        help="py-spy the gateway for SECONDS under perf_analyzer at concurrency 4, per protocol")
    parser.add_argument("--direct-model", default=MODEL, help="the name the isolation check's direct clients call "
                        f"(default {MODEL}; {store_name(MODEL, 2)} shows the check catching candidate v2)")
    args = parser.parse_args()
    if perf_analyzer(["--version"], timeout_s=30).returncode != 0:
        raise SystemExit(f"{PERF_ANALYZER} does not run: install it with `make perf-analyzer`")

    with tempfile.TemporaryDirectory(prefix="ferry-perf-") as home:
        folder = Path(home)
        world = World(make_settings(folder / "ferry"))
        versions = register_all(world)
        triton = server.up(world.settings)
        hops: list[subprocess.Popen] = []
        try:
            assert world.deploy().outcome == "committed"
            gateway, port = start_gateway(world)
            hops.append(gateway)
            pids = {"triton": triton.pid, "gateway": gateway.pid}
            if args.profile:
                profile_gateway(gateway.pid, port, args.profile)
            if not args.skip_throughput:
                bare_port = None
                if not args.skip_bare:
                    bare, bare_port = start_bare_forwarder(world)
                    hops.append(bare)
                    pids["bare"] = bare.pid
                found = targets(world, port, versions["first"], bare_port)
                report_throughput(throughput_rounds(found, world, pids, args, folder))
            if not args.skip_isolation:
                isolation(world, versions, args.direct_model, folder)
        finally:
            for hop in hops:
                hop.terminate()
                hop.wait(timeout=10)
            server.down(world.settings)


if __name__ == "__main__":
    main()
