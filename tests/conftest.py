"""Fixtures: a real Triton server and a real MLflow (sqlite) per test, and the invariants every scenario must keep."""

from __future__ import annotations

import http.server
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from filelock import FileLock

from ferry.core.config import Settings
from ferry.core.current import read_current, read_history
from ferry.core.model_config import config_digest
from ferry.core.records import DeployReport
from ferry.core.repository import ModelDir
from ferry.core.runner import deploy
from ferry.core.services import Services
from ferry.core.triton import Placement
from ferry.runtime import server

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

from train_model import train_and_register  # noqa: E402

FAKES = Path(__file__).parent / "fakes"

# Each deliberately broken version of examples/train_model.py, the step that catches it, and what it says.
BROKEN_VERSIONS = [
    ("corrupt-bytes", "materialize", "not a valid ONNX model"),
    ("unknown-op", "load", "is not a registered function/op"),
    ("output-shape", "smoke", "output 'probabilities' has shape [3, 4]"),
    ("golden-mismatch", "smoke", "differs from the golden output"),
]


# Tests that take a minute or more (the demos run every command of a story; whole Airflows and MLflow servers).
LONG_TESTS = ("test_demo",)  # each about 25-110 s
# Modules whose servers (PostgreSQL, SeaweedFS, MLflow, Airflow) start once per module and worker: kept whole on
# one worker, so that they start once. Their seconds here, to balance the workers' shares.
LONG_MODULES = {"test_production_mlflow.py": 105, "test_airflow_local.py": 75, "test_release_fleet.py": 130,
                "test_release.py": 100}
LONG_TEST_S = 45


def _long_units(items: list[pytest.Item]) -> list[tuple[float, list[pytest.Item]]]:
    """The long tests as units a worker takes whole (a long module's tests together), with their seconds."""
    modules: dict[str, list[pytest.Item]] = {}
    units: list[tuple[float, list[pytest.Item]]] = []
    for item in items:
        if item.path.name in LONG_MODULES:
            modules.setdefault(item.path.name, []).append(item)
        elif item.name.startswith(LONG_TESTS):
            units.append((LONG_TEST_S, [item]))
    units += [(LONG_MODULES[name], tests) for name, tests in modules.items()]
    return sorted(units, key=lambda unit: -unit[0])


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Each xdist worker's first share of tests starts with its part of the long ones, balanced by their
    seconds: xdist hands out contiguous shares in collection order and steals from their ends, and a long test
    left for the end makes one worker the run's tail."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    units = _long_units(items)
    if workers < 2 or not units:
        return
    loads: list[float] = [0.0] * workers
    heads: list[list[pytest.Item]] = [[] for _ in range(workers)]
    for seconds, tests in units:
        lightest = loads.index(min(loads))
        loads[lightest] += seconds
        heads[lightest] += tests
    long = {id(item) for head in heads for item in head}
    rest = [item for item in items if id(item) not in long]
    ordered: list[pytest.Item] = []
    remaining = len(items)
    for worker in range(workers):
        share = remaining // (workers - worker)  # what xdist's work stealing sends this worker first
        fill = max(0, share - len(heads[worker]))
        ordered += heads[worker] + rest[:fill]
        del rest[:fill]
        remaining -= share
    items[:] = ordered + rest


@pytest.fixture
def not_triton() -> Iterator[str]:
    """A real HTTP server that is not Triton (it answers a POST with a 501 page), where Triton is expected."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def triton_settings(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    """One ferry installation and its Triton for a module whose tests each use a model of their own."""
    settings = make_settings(tmp_path_factory.mktemp("ferry"))
    server.up(settings)
    try:
        yield settings
    finally:
        server.down(settings, grace_s=0)


_GIVEN_PORTS: set[int] = set()  # ports this process handed out: a server may not have bound them yet


def _worker_ports() -> range:
    """This xdist worker's own share of the ports, so that two workers never pick the same port before either
    binds it (a second server would then answer at a test's URL with another key); below the kernel's ephemeral
    ports (32768 on), which free_port() and every outgoing connection take."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw")
    index = int(worker) if worker.isdigit() else 0
    span = 12000 // 8
    start = 20000 + (index % 8) * span
    return range(start, start + span)


def _free_port_block(size: int = 3) -> int:
    """A base port with ``size`` consecutive free ports (Triton's http, grpc and metrics), in this worker's share
    and never handed out before by this process."""
    ports = _worker_ports()
    for _ in range(200):
        base = random.randint(ports.start, ports.stop - size)
        if _GIVEN_PORTS & set(range(base, base + size)):
            continue
        try:
            sockets = []
            for port in range(base, base + size):
                s = socket.socket()
                sockets.append(s)
                s.bind(("127.0.0.1", port))
            _GIVEN_PORTS.update(range(base, base + size))
            return base
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
    raise RuntimeError("no free port block on 127.0.0.1")


def _migrated_mlflow_db(path: Path) -> Path:
    """``path``: a copy of an empty MLflow sqlite database with every migration applied. Migrating a new
    database costs about a second; one is migrated per machine and MLflow version, then copied per test."""
    import mlflow

    template = Path(tempfile.gettempdir()) / f"ferry-tests-mlflow-{mlflow.__version__}.db"
    with FileLock(f"{template}.lock"):
        if not template.exists():
            draft = template.with_suffix(f".{os.getpid()}.db")
            mlflow.MlflowClient(tracking_uri=f"sqlite:///{draft}").search_experiments()
            draft.rename(template)
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(template, path)
    return path


def make_settings(home: Path, **overrides) -> Settings:
    settings = Settings(
        home=home,
        repository=home / "repository",
        tracking_uri=f"sqlite:///{_migrated_mlflow_db(home / 'mlflow.db')}",
        triton_url=f"http://127.0.0.1:{_free_port_block()}",
        load_timeout_s=30.0,
        ready_timeout_s=10.0,
    )
    return settings.with_overrides(**overrides)


@dataclass
class World:
    """One isolated ferry installation: its own repository, MLflow database and Triton server."""

    settings: Settings
    model: str = "iris"

    @property
    def ferry(self) -> Services:
        return Services(self.settings)

    @property
    def model_dir(self) -> ModelDir:
        return ModelDir(self.settings.repository, self.model)

    def register(self, breakage: str = "none", alias: str = "champion", trees: int = 0) -> int:
        return train_and_register(self.model, alias, breakage, trees, self.settings.tracking_uri)

    def deploy(self, alias: str = "champion", **overrides) -> DeployReport:
        ferry = Services(self.settings.with_overrides(**overrides)) if overrides else self.ferry
        return deploy(ferry, self.model, alias=alias)

    def current_bytes(self) -> bytes | None:
        path = self.model_dir.current_path
        return path.read_bytes() if path.exists() else None

    def cli(self, *args: str, program: list[str] | None = None, timeout_s: float = 120,
            **env: str) -> subprocess.CompletedProcess:
        """Run the ferry command line (or ``program``, a fault-injecting stand-in for it) in this world."""
        command = program or [sys.executable, "-m", "ferry"]
        return subprocess.run([*command, *args], env={**os.environ, **self.env(), **env}, capture_output=True,
                              text=True, timeout=timeout_s)

    def env(self) -> dict[str, str]:
        s = self.settings
        return {
            "FERRY_HOME": str(s.home), "FERRY_REPOSITORY": str(s.repository), "MLFLOW_TRACKING_URI": s.tracking_uri,
            "FERRY_TRITON_URL": s.triton.urls, "FERRY_LOAD_TIMEOUT_S": str(s.triton.load_timeout_s),
            **({"FERRY_TRITON_API_KEY": s.triton.api_key} if s.triton.api_key else {}),
            **({"FERRY_PYTHON_RUNNER": str(s.triton.python_runner)} if s.triton.python_runner else {}),
        }


@pytest.fixture
def world(tmp_path: Path):
    settings = make_settings(tmp_path)
    server.up(settings)
    try:
        yield World(settings)
    finally:
        server.down(settings, grace_s=0)  # the repository goes with it: no need to wait for a clean exit


def replica_settings(settings: Settings) -> list[Settings]:
    """One Settings per replica of a fleet world, as `ferry triton up` on each of its hosts would have."""
    return [settings.with_overrides(home=settings.home / f"replica-{i}", triton_url=url)
            for i, url in enumerate(settings.triton.urls.split(","))]


def start_fleet(tmp_path: Path, replicas: int, faulty: int | None = None, **overrides) -> World:
    """A world whose Triton is ``replicas`` real servers on loopback sharing one repository and one key.
    ``faulty``: the replica started with FAKE_FAULTY_REPLICA=1 (see fakes/fake_faulty_replica_runner.py)."""
    urls = ",".join(f"http://127.0.0.1:{_free_port_block()}" for _ in range(replicas))
    settings = make_settings(tmp_path, triton_url=urls, triton_api_key="fleet-key", **overrides)
    for i, replica in enumerate(replica_settings(settings)):
        os.environ["FAKE_FAULTY_REPLICA"] = "1" if i == faulty else "0"
        try:
            server.up(replica)
        finally:
            del os.environ["FAKE_FAULTY_REPLICA"]
    return World(settings)


def stop_fleet(world: World) -> None:
    for replica in replica_settings(world.settings):
        server.down(replica, grace_s=0)


@pytest.fixture
def fleet(request: pytest.FixtureRequest, tmp_path: Path):
    """Real Triton servers sharing one repository: three, or as many as ``indirect`` parametrization says."""
    world = start_fleet(tmp_path, getattr(request, "param", 3))
    try:
        yield world
    finally:
        stop_fleet(world)


def assert_invariants(world: World, attempts: int) -> None:
    """The invariants of docs/design.md, checked against the files and against Triton's repository index."""
    model_dir = world.model_dir
    # 1. current.json parses and names a version whose files exist and that every replica serves.
    current = read_current(model_dir)
    for replica in world.ferry.fleet().replicas:
        assert_replica_invariants(world, replica.placement(world.model), current, replica.url)
    _assert_record_invariants(world, attempts)


def assert_replica_invariants(world: World, where: Placement, current, replica: str) -> None:
    model_dir = world.model_dir
    serving = where.front
    if current is None:
        assert serving == [] and where.store == [], f"nothing is committed but {replica} holds {where}"
        assert not model_dir.config_path.exists(), "a config.pbtxt was left for a model with nothing committed"
    else:
        version_dir = model_dir.version_dir(current.active_version)
        manifest = json.loads((version_dir / "ferry.json").read_text())
        files = list(manifest.get("files") or {}) if manifest.get("flavor") == "triton" else ["model.onnx"]
        # An ensemble (a release's entry) has no files of its own: its members' are checked by the release tests.
        assert (files or manifest.get("members")) and all((version_dir / name).is_file() for name in files), \
            f"the active version's files are missing in {version_dir}"
        assert manifest["sha256"] == current.sha256
        # 2. Production reaches only the committed version: at rest, Triton serves it alone.
        # Clients that name no version reach the front's one version; the store holds no candidate.
        assert serving == [current.active_version], \
            f"current.json says v{current.active_version}, {replica}'s front serves {serving}"
        # An empty store: the model serves under its own name, as an earlier ferry or an adopted tool left it.
        assert where.store in ([current.active_version], []), \
            f"current.json says v{current.active_version}, {replica}'s store holds {where.store}"
        policy = list(model_dir.read_config().version_policy.specific.versions)
        assert policy == [current.active_version], f"config.pbtxt pins {policy}"
        # The config travels with its version: config.pbtxt is the active version's, as current.json records it.
        if manifest.get("config_sha256"):
            pinned = config_digest(model_dir.read_config_text() or "")
            assert pinned == manifest["config_sha256"], "config.pbtxt is not the active version's config"
            assert current.config_sha256 in (None, pinned), "current.json records another config"


def _assert_record_invariants(world: World, attempts: int) -> None:
    model_dir = world.model_dir
    serving = set().union(*(r.ready_versions(world.model) + r.placement(world.model).store
                            for r in world.ferry.fleet().replicas))
    # 3. Failed candidates are quarantined with their reason, never live, never beside the versions.
    history = read_history(model_dir)
    for i, record in enumerate(history):
        if record["outcome"] != "rolled_back":
            continue
        assert record["rollback"]["verified"], f"rollback not verified: {record['rollback']}"
        for folder in map(Path, record["rollback"]["quarantined"]):
            reason = json.loads((folder / "reason.json").read_text())
            assert reason["failed_step"] == record["failed_step"] and reason["error"]
            # A release quarantines what it staged of each member in that member's own quarantine.
            members = {m["model"] for m in record.get("members") or []} | {reason["model"]}
            assert folder.parent in {ModelDir(model_dir.repository, m).quarantine_root for m in members | {world.model}}
        redeployed = any(r["outcome"] == "committed" and r["version"] == record["version"] for r in history[i + 1:])
        if record["version"] is not None and not redeployed:  # a version that failed once may pass later
            assert record["version"] not in serving
    for entry in model_dir.path.iterdir() if model_dir.path.exists() else []:
        if entry.name[:1].isdigit():
            assert entry.name.isdigit(), f"{entry} would be read by Triton as a version"
    for staging in (model_dir.staging_root, model_dir.path / ".staging"):
        assert not staging.exists() or not any(staging.iterdir()), f"a deploy left a staging directory in {staging}"
    assert not (model_dir.path / ".staging").exists(), "staging inside the model directory re-creates its versions"
    # 4. No deploy holds the model's lock or left its journal behind.
    with FileLock(str(model_dir.lock_path), timeout=0):
        pass
    assert not model_dir.journal_path.exists(), f"an unfinished deploy's journal: {model_dir.journal_path.read_text()}"
    # 5. Exactly one history record per attempt.
    assert len(history) == attempts, f"{len(history)} history records for {attempts} attempts"
    assert len({r["deploy_id"] for r in history if r["deploy_id"]}) == len([r for r in history if r["deploy_id"]])
