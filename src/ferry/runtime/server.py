"""Start, stop and inspect the real ``tritonserver`` shipped in the nvidia-pytriton wheel.

The wheel holds the server binary, the Python backend, one backend stub per Python version and
the server's shared libraries. ferry assembles a backend directory from them, puts this venv's
``bin`` first on PATH (the stub finds the venv's numpy and onnxruntime through it) and the
libraries on LD_LIBRARY_PATH.
"""

from __future__ import annotations

import importlib.util
import json
import os
import secrets
import signal
import subprocess
import sys
import sysconfig
import time
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path

from ferry.config import Settings
from ferry.errors import FerryError
from ferry.triton import API_KEY_HEADER, host_port

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
        raise FerryError("the Triton server is not installed", "pip install nvidia-pytriton==0.7.0 (see pyproject.toml)")
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
            raise FerryError(f"the Triton wheel has no {source}", f"reinstall nvidia-pytriton for Python {python}")
        link = target / name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(source)
    return target.parent


def _ports(settings: Settings) -> tuple[int, int, int]:
    http = settings.triton_http_port
    return http, settings.triton_grpc_port or http + 1, settings.triton_metrics_port or http + 2


def shm_prefix(settings: Settings) -> str:
    return f"ferry{_ports(settings)[0]}_"


def metrics_url(settings: Settings) -> str:
    host = host_port(settings.triton_url).rsplit(":", 1)[0]
    return f"http://{host}:{_ports(settings)[2]}/metrics"


def command(settings: Settings, api_key: str) -> list[str]:
    """The server's command line: every port on the host of FERRY_TRITON_URL (loopback by default),
    and model control (load, unload, repository index) only for requests that carry ``api_key``."""
    http, grpc, metrics = _ports(settings)
    host = host_port(settings.triton_url).rsplit(":", 1)[0]
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
        f"--exit-timeout-secs={EXIT_TIMEOUT_S}",
        "--metrics-config=summary_latencies=true",
        f"--backend-config=python,shm-region-prefix-name={shm_prefix(settings)}",
        f"--http-restricted-api=model-repository:{API_KEY_HEADER}={api_key}",
        f"--grpc-restricted-protocol=model-repository:{API_KEY_HEADER}={api_key}",
    ]


def _api_key(settings: Settings) -> str:
    """FERRY_TRITON_API_KEY, else a key generated once and kept where only this user can read it."""
    if key := settings.model_control_key():
        return key
    key = secrets.token_urlsafe(24)
    fd = os.open(settings.triton_api_key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as file:
        file.write(key + "\n")
    return key


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
        with urllib.request.urlopen(f"http://{host_port(settings.triton_url)}/v2/health/ready", timeout=1) as reply:
            return reply.status == 200
    except OSError:
        return False


def status(settings: Settings) -> ServerStatus:
    pid = _read_pid(settings)
    running = _alive(pid)
    return ServerStatus(
        running=running, ready=_is_ready(settings), pid=pid if running else None, url=settings.triton_url,
        metrics_url=metrics_url(settings), log=str(log_file(settings)), repository=str(settings.repository),
    )


def _log_tail(settings: Settings, lines: int = 15) -> str:
    try:
        return "\n".join(log_file(settings).read_text(errors="replace").splitlines()[-lines:])
    except FileNotFoundError:
        return "(no log)"


def up(settings: Settings, wait_s: float = 60.0) -> ServerStatus:
    """Start the server unless it already runs; return once it is ready."""
    current = status(settings)
    if current.running and current.ready:
        return current
    if _is_ready(settings):
        raise FerryError(f"another server already answers at {settings.triton_url}",
                         "stop it, or point FERRY_TRITON_URL at a free port")
    settings.repository.mkdir(parents=True, exist_ok=True)
    settings.triton_dir.mkdir(parents=True, exist_ok=True)
    clean_shared_memory(settings)
    with open(log_file(settings), "ab") as log:
        process = subprocess.Popen(command(settings, _api_key(settings)), env=environment(), stdout=log,
                                   stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    _pid_file(settings).write_text(json.dumps({"pid": process.pid, "url": settings.triton_url}))
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise FerryError(f"tritonserver exited with code {process.returncode} while starting:\n{_log_tail(settings)}",
                             f"see {log_file(settings)}")
        if _is_ready(settings):
            return status(settings)
        time.sleep(0.1)
    down(settings)
    raise FerryError(f"tritonserver was not ready after {wait_s:g} s:\n{_log_tail(settings)}", f"see {log_file(settings)}")


def down(settings: Settings) -> bool:
    """Stop the server (SIGINT, then SIGKILL after its exit timeout) and free its shared memory."""
    pid = _read_pid(settings)
    stopped = False
    if _alive(pid):
        os.killpg(pid, signal.SIGINT)
        deadline = time.monotonic() + EXIT_TIMEOUT_S + 5
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        if _alive(pid):
            os.killpg(pid, signal.SIGKILL)
        stopped = True
    _kill_group(pid)
    _reap(pid)
    _pid_file(settings).unlink(missing_ok=True)
    clean_shared_memory(settings)
    return stopped


def _kill_group(pid: int | None) -> None:
    """Kill what is left of the server's process group (backend stubs of a killed server)."""
    if pid is None:
        return
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _reap(pid: int | None) -> None:
    """Collect the exit status when the server is our own child (started by `up` in this process)."""
    if pid is None:
        return
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass


def clean_shared_memory(settings: Settings) -> None:
    for region in Path("/dev/shm").glob(f"{shm_prefix(settings)}*"):
        region.unlink(missing_ok=True)
