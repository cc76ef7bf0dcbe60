"""Start, stop and inspect the real ``tritonserver`` shipped in the nvidia-pytriton wheel.

The wheel holds the server binary, the Python backend, one backend stub per Python version and
the server's shared libraries. ferry assembles a backend directory from them, puts this venv's
``bin`` first on PATH (the stub finds the venv's numpy and onnxruntime through it) and the
libraries on LD_LIBRARY_PATH.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import sysconfig
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

from ferry.core.config import Settings
from ferry.core.errors import FerryError, InvalidInput, Unavailable
from ferry.core.triton import API_KEY_HEADER

EXIT_TIMEOUT_S = 5


@dataclass
class ServerStatus:
    running: bool
    ready: bool
    pid: int | None
    url: str
    metrics_url: str
    log: str
    repository: str

    def as_dict(self) -> dict:
        return asdict(self)


def _wheel_root() -> Path:
    spec = importlib.util.find_spec("pytriton")
    if spec is None or not spec.submodule_search_locations:
        raise InvalidInput("the local Triton server is not installed (the nvidia-pytriton wheel ships it)",
                           "pip install 'ferry[local-triton]', or point FERRY_TRITON_URL at your own Triton")
    return Path(next(iter(spec.submodule_search_locations))) / "tritonserver"


def _backend_dir(settings: Settings) -> Path:
    """backends/python/ with the wheel's Python backend and the stub built for this Python."""
    wheel = _wheel_root()
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    sources = {
        "libtriton_python.so": wheel / "backends" / "python" / "libtriton_python.so",
        "triton_python_backend_utils.py": wheel / "backends" / "python" / "triton_python_backend_utils.py",
        "triton_python_backend_stub": wheel / "python_backend_stubs" / python / "triton_python_backend_stub",
    }
    target = settings.triton_dir / "backends" / "python"
    target.mkdir(parents=True, exist_ok=True)
    for name, source in sources.items():
        if not source.exists():
            raise InvalidInput(f"the Triton wheel has no {source}", f"reinstall nvidia-pytriton for Python {python}")
        link = target / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(source)
    return target.parent


def _ports(settings: Settings) -> tuple[int, int, int]:
    http = settings.triton.endpoint.port
    return http, settings.triton.grpc.port, int(settings.triton.metrics_url.rsplit(":", 1)[1].split("/")[0])


def shm_prefix(settings: Settings) -> str:
    return f"ferry{_ports(settings)[0]}_"


def command(settings: Settings, api_key: str) -> list[str]:
    """The server's command line: every port on the host of FERRY_TRITON_URL (loopback by default),
    and model control (load, unload, repository index) only for requests that carry ``api_key``."""
    http, grpc, metrics = _ports(settings)
    host = settings.triton.endpoint.host
    return [
        str(_wheel_root() / "bin" / "tritonserver"),
        f"--model-repository={settings.repository.resolve()}",
        "--model-control-mode=explicit",
        f"--backend-directory={_backend_dir(settings)}",
        f"--http-address={host}", f"--http-port={http}",
        f"--grpc-address={host}", f"--grpc-port={grpc}",
        f"--metrics-address={host}", f"--metrics-port={metrics}",
        "--allow-gpu-metrics=false",
        "--disable-auto-complete-config",
        # Ready means "answers": with strict readiness, a server stays unready once any model was unloaded
        # (UNAVAILABLE counts as not ready), and ferry checks each model version's readiness itself.
        "--strict-readiness=false",
        f"--exit-timeout-secs={EXIT_TIMEOUT_S}",
        "--metrics-config=summary_latencies=true",
        f"--backend-config=python,shm-region-prefix-name={shm_prefix(settings)}",
        f"--http-restricted-api=model-repository:{API_KEY_HEADER}={api_key}",
        f"--grpc-restricted-protocol=model-repository:{API_KEY_HEADER}={api_key}",
    ]


def _api_key(settings: Settings) -> str:
    """FERRY_TRITON_API_KEY, else the repository's key (``<repository>/.ferry/triton-api-key``, 0600), made by
    the first `ferry triton up` on the repository: replicas that share a repository share the key, and so
    does every controller that deploys to them."""
    if settings.triton.api_key:
        return settings.triton.api_key
    try:
        return settings.triton_api_key_file.read_text().strip()
    except FileNotFoundError:
        pass
    legacy = settings.triton_dir / "api-key"  # kept by a `ferry triton up` of before: its server may still run
    key = legacy.read_text().strip() if legacy.is_file() else secrets.token_urlsafe(24)
    return _publish_key(settings.triton_api_key_file, key)


def _publish_key(path: Path, key: str) -> str:
    """Make ``key`` the one at ``path`` unless another `ferry triton up` got there first; the key at ``path``.

    The file appears whole (a hard link of a complete file), and only the first link succeeds, so replicas
    started at the same moment on a shared repository still agree."""
    path.parent.mkdir(parents=True, exist_ok=True)
    draft = path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "w") as file:
            file.write(key + "\n")
            file.flush()
            os.fsync(file.fileno())
        with contextlib.suppress(FileExistsError):
            os.link(draft, path)
    finally:
        draft.unlink(missing_ok=True)
    return path.read_text().strip()


def environment() -> dict[str, str]:
    env = dict(os.environ)
    libs = _wheel_root().parent.parent / "nvidia_pytriton.libs"
    paths = [sysconfig.get_config_var("LIBDIR"), str(libs), env.get("LD_LIBRARY_PATH", "")]
    env["LD_LIBRARY_PATH"] = ":".join(p for p in paths if p)
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
    return env


def _pid_file(settings: Settings) -> Path:
    return settings.triton_dir / "tritonserver.pid"


def log_file(settings: Settings) -> Path:
    return settings.triton_dir / "tritonserver.log"


def _alive(pid: int | None) -> bool:
    if pid is None:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not yet reaped) still answers kill(0).
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


def _read_pid(settings: Settings) -> int | None:
    try:
        return int(json.loads(_pid_file(settings).read_text())["pid"])
    except (FileNotFoundError, ValueError, KeyError):
        return None


def _is_ready(settings: Settings) -> bool:
    try:
        with urllib.request.urlopen(f"{settings.triton.endpoint.url}/v2/health/ready", timeout=1) as reply:
            return reply.status == 200
    except OSError:
        return False


def status(settings: Settings) -> ServerStatus:
    pid = _read_pid(settings)
    running = _alive(pid)
    return ServerStatus(
        running=running, ready=_is_ready(settings), pid=pid if running else None, url=settings.triton.endpoint.url,
        metrics_url=settings.triton.metrics_url, log=str(log_file(settings)), repository=str(settings.repository),
    )


def _log_reason(settings: Settings) -> str:
    """The line of the server's log that says why it stopped (Triton prints its whole config table first)."""
    try:
        lines = log_file(settings).read_text(errors="replace").splitlines()
    except FileNotFoundError:
        return "(no log)"
    errors = [line for line in lines if line.startswith("E") or "error" in line.lower() or "failed" in line.lower()]
    return (errors or lines or ["(empty log)"])[-1].strip()


def _port_in_use(host: str, port: int) -> bool:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return True
    return False


def _check_ports(settings: Settings) -> None:
    """Every port the server needs must be free: Triton reports ready on HTTP, then dies on a taken metrics port."""
    for name, port in zip(("HTTP", "gRPC", "metrics"), _ports(settings), strict=False):
        if _port_in_use(settings.triton.endpoint.host, port):
            raise InvalidInput(f"port {port} on {settings.triton.endpoint.host} ({name}, for Triton) is in use",
                               "stop what listens there, or point FERRY_TRITON_URL (and FERRY_TRITON_GRPC_PORT, "
                               "FERRY_TRITON_METRICS_PORT) at free ports")


def up(settings: Settings, wait_s: float = 60.0) -> ServerStatus:
    """Start the server unless it already runs; return once it is ready."""
    current = status(settings)
    if current.running and current.ready:
        return current
    if _is_ready(settings):
        raise InvalidInput(f"another server already answers at {settings.triton.endpoint.url}",
                           "stop it, or point FERRY_TRITON_URL at a free port")
    _check_ports(settings)
    settings.repository.mkdir(parents=True, exist_ok=True)
    settings.triton_dir.mkdir(parents=True, exist_ok=True)
    clean_shared_memory(settings)
    with open(log_file(settings), "ab") as log:
        process = subprocess.Popen(command(settings, _api_key(settings)), env=environment(), stdout=log,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    _pid_file(settings).write_text(json.dumps({"pid": process.pid, "url": settings.triton.endpoint.url}))
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise FerryError(f"tritonserver exited with code {process.returncode} while starting: "
                             f"{_log_reason(settings)}", f"see {log_file(settings)}")
        if _is_ready(settings):
            return status(settings)
        time.sleep(0.1)
    down(settings)
    raise Unavailable(f"tritonserver was not ready after {wait_s:g} s: {_log_reason(settings)}",
                      f"see {log_file(settings)}")


def down(settings: Settings, grace_s: float = EXIT_TIMEOUT_S + 5) -> bool:
    """Stop the server (SIGINT, then SIGKILL after ``grace_s``) and free its shared memory.

    With models loaded, Triton takes its whole exit timeout to stop; ``grace_s=0`` kills it at once
    (what a crash would do), for callers that throw the server away with its repository.
    """
    pid = _read_pid(settings)
    stopped = False
    if pid is not None and _alive(pid):
        os.killpg(pid, signal.SIGINT if grace_s > 0 else signal.SIGKILL)
        deadline = time.monotonic() + grace_s
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _alive(pid):
            os.killpg(pid, signal.SIGKILL)
        stopped = True
    _kill_group(pid)
    _reap(pid)
    _pid_file(settings).unlink(missing_ok=True)
    clean_shared_memory(settings)
    if stopped:
        _wait_ports_free(settings)
    return stopped


def _wait_ports_free(settings: Settings, timeout_s: float = 5.0) -> None:
    """Until the stopped server's ports can be bound again (a killed server's sockets close a moment after it
    is reaped), so that `ferry triton down` then `up` does not find its own ports taken."""
    deadline = time.monotonic() + timeout_s
    while any(_port_in_use(settings.triton.endpoint.host, port) for port in _ports(settings)):
        if time.monotonic() > deadline:
            return  # up() then says which port is taken, and by what hint
        time.sleep(0.05)


def _kill_group(pid: int | None) -> None:
    """Kill what is left of the server's process group (backend stubs of a killed server)."""
    if pid is None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signal.SIGKILL)


def _reap(pid: int | None) -> None:
    """Collect the exit status when the server is our own child (started by `up` in this process)."""
    if pid is None:
        return
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


def clean_shared_memory(settings: Settings) -> None:
    for region in Path("/dev/shm").glob(f"{shm_prefix(settings)}*"):
        region.unlink(missing_ok=True)
