"""Airflow 3 as production runs it, on loopback: metadata on PostgreSQL, the LocalExecutor, and the scheduler,
the API server and the DAG processor as three processes of their own (not ``airflow standalone``).

Each task runs in a process of its own (the executor's worker forks a supervisor, which forks the task), so
the tasks of a run share nothing but the journal, the lock and Airflow's database. The environment given to
``start_airflow`` reaches every task: the LocalExecutor's workers are the scheduler's children.

Runs are triggered and watched through the REST API (v2) as an operator's script would, with a token from
the simple auth manager (one user, ``admin``, whose password this module writes before the API server starts).
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from support.processes import free_port, stop_group, wait_healthy

BIN = Path(sys.executable).parent
ROOT = Path(__file__).resolve().parents[2]
DAG_ID = "mlflow_to_triton_deploy"
MIGRATE_TIMEOUT_S = 120.0
START_TIMEOUT_S = 120.0
REQUEST_TIMEOUT_S = 30.0
FINISHED = ("success", "failed")
COMPONENTS = {  # the three processes, each with the arguments production would give it
    "api-server": lambda port: ["api-server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
    "scheduler": lambda port: ["scheduler", "--skip-serve-logs"],  # task logs are read from files here
    "dag-processor": lambda port: ["dag-processor"],
}


def airflow_env(home: Path, database_url: str, api_port: int, ferry_env: dict[str, str]) -> dict[str, str]:
    """Airflow's configuration, all in variables (no airflow.cfg is read), and ferry's settings for its tasks."""
    api = f"http://127.0.0.1:{api_port}"
    env = {name: value for name, value in os.environ.items() if not name.startswith("AIRFLOW")}
    env.update(ferry_env)
    env.update({
        "PATH": f"{BIN}:{env.get('PATH', '')}", "AIRFLOW_HOME": str(home),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": database_url,
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor", "AIRFLOW__CORE__PARALLELISM": "4",
        "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"), "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{api}/execution/",
        "AIRFLOW__API__HOST": "127.0.0.1", "AIRFLOW__API__PORT": str(api_port), "AIRFLOW__API__WORKERS": "1",
        "AIRFLOW__API__BASE_URL": api,
        # One secret for every process: the scheduler signs the tasks' tokens, the API server checks them.
        "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_urlsafe(32),
        "AIRFLOW__API__SECRET_KEY": secrets.token_urlsafe(32),
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(home / "passwords.json"),
        # Ports of their own, should anything still serve logs: another Airflow on the host may hold 8793/8794.
        "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(free_port()),
        "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(free_port()),
        "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
        # A task's supervisor wakes at least this often: at the default 5 s, it sometimes notices its task's
        # exit only then, and the worker slot stays taken for those seconds (measured: 1 task in 4).
        "AIRFLOW__WORKERS__MIN_HEARTBEAT_INTERVAL": "1",
        "AIRFLOW__SCHEDULER__SCHEDULER_IDLE_SLEEP_TIME": "0.25",  # a task is queued sooner after its upstream ends
    })
    return env


@dataclass
class LocalAirflow:
    """The three Airflow processes on ``database_url``, their logs under ``home``."""

    home: Path
    database_url: str
    ferry_env: dict[str, str]
    api_port: int = field(default_factory=free_port)
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict, repr=False)
    client: httpx.Client | None = field(default=None, repr=False)
    env: dict[str, str] = field(default_factory=dict, repr=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.api_port}"

    def start(self) -> LocalAirflow:
        self.home.mkdir(parents=True, exist_ok=True)
        password = secrets.token_urlsafe(16)
        (self.home / "passwords.json").write_text(json.dumps({"admin": password}) + "\n")
        self.env = airflow_env(self.home, self.database_url, self.api_port, self.ferry_env)
        self._migrate()
        try:
            for component, arguments in COMPONENTS.items():
                self._spawn(component, arguments(self.api_port))
            wait_healthy(self.processes["api-server"], f"{self.url}/api/v2/monitor/health",
                         self.log("api-server"), START_TIMEOUT_S, "airflow api-server")
            self.client = httpx.Client(base_url=self.url, timeout=REQUEST_TIMEOUT_S)
            self._login(password)
            wait_for(f"DAG {DAG_ID} parsed by the dag-processor (log: {self.log('dag-processor')})",
                     self._dag_parsed, START_TIMEOUT_S)
        except BaseException:
            self.stop()
            raise
        return self

    def _dag_parsed(self) -> bool | None:
        self.check_alive()
        assert self.client is not None
        return True if self.client.get(f"/api/v2/dags/{DAG_ID}").status_code == 200 else None

    def check_alive(self) -> None:
        """RuntimeError with the end of its log if a component has exited: nothing would run any more."""
        for component, process in self.processes.items():
            if process.poll() is not None:
                raise RuntimeError(f"airflow {component} exited with code {process.returncode}: "
                                   f"{self.log(component).read_text(errors='replace')[-2000:]}")

    def log(self, component: str) -> Path:
        return self.home / f"{component}.log"

    def _migrate(self) -> None:
        done = subprocess.run([str(BIN / "airflow"), "db", "migrate"], env=self.env, capture_output=True, text=True,
                              timeout=MIGRATE_TIMEOUT_S, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"airflow db migrate failed (exit {done.returncode}): {done.stderr[-2000:]}")

    def _spawn(self, component: str, arguments: list[str]) -> None:
        with open(self.log(component), "ab") as log:
            self.processes[component] = subprocess.Popen(
                [str(BIN / "airflow"), *arguments], env=self.env, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True)

    def _login(self, password: str) -> None:
        assert self.client is not None
        reply = self.client.post("/auth/token", json={"username": "admin", "password": password})
        reply.raise_for_status()
        self.client.headers["Authorization"] = f"Bearer {reply.json()['access_token']}"

    def stop(self) -> None:
        """Each component's process group: the scheduler's holds the executor's workers and their tasks."""
        with ThreadPoolExecutor(len(COMPONENTS)) as pool:  # at once: each may take seconds to end its work
            list(pool.map(lambda process: stop_group(process, grace_s=10), self.processes.values()))
        if self.client is not None:
            self.client.close()

    # ------------------------------------------------------------ runs, through the REST API

    def api(self, method: str, path: str, **kwargs: Any) -> Any:
        assert self.client is not None, "start() first"
        reply = self.client.request(method, f"/api/v2{path}", **kwargs)
        if reply.status_code >= 400:
            raise RuntimeError(f"{method} /api/v2{path} answered {reply.status_code}: {reply.text[:500]}")
        return reply.json()

    def trigger(self, conf: dict[str, Any]) -> str:
        run = self.api("POST", f"/dags/{DAG_ID}/dagRuns", json={"logical_date": None, "conf": conf})
        return str(run["dag_run_id"])

    def run_state(self, run_id: str) -> str:
        return str(self.api("GET", f"/dags/{DAG_ID}/dagRuns/{run_id}")["state"])

    def wait_finished(self, run_id: str, timeout_s: float = 120.0) -> str:
        def finished() -> str | None:
            self.check_alive()
            return state if (state := self.run_state(run_id)) in FINISHED else None

        return wait_for(f"run {run_id} to end", finished, timeout_s)

    def mark_failed(self, run_id: str) -> None:
        """What an operator does with a run whose worker was lost: its unfinished tasks will not run."""
        self.api("PATCH", f"/dags/{DAG_ID}/dagRuns/{run_id}", json={"state": "failed"})

    def task_instances(self, run_id: str) -> dict[str, dict[str, Any]]:
        reply = self.api("GET", f"/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances")
        return {ti["task_id"]: ti for ti in reply["task_instances"]}

    def task_states(self, run_id: str) -> dict[str, str | None]:
        return {task: ti["state"] for task, ti in self.task_instances(run_id).items()}

    def task_log(self, run_id: str, task_id: str, try_number: int) -> str:
        """A try's log as the API server serves it (the lines' events, joined)."""
        reply = self.api("GET", f"/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances/{task_id}/logs/{try_number}",
                         params={"full_content": "true"}, headers={"Accept": "application/json"})
        content = reply.get("content", [])
        if isinstance(content, str):
            return content
        return "\n".join(str(line.get("event", line)) if isinstance(line, dict) else str(line) for line in content)


def wait_for(what: str, probe: Callable[[], Any], timeout_s: float, every_s: float = 0.2) -> Any:
    """The first answer of ``probe`` that is not None; TimeoutError naming ``what`` when time runs out.
    A probe's read that timed out (the API server of a loaded machine) counts as no answer yet."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            answer = probe()
        except httpx.TimeoutException:
            answer = None
        if answer is not None:
            return answer
        time.sleep(every_s)
    raise TimeoutError(f"waited {timeout_s:g} s for {what}")


def task_process(ti_id: str) -> int | None:
    """The pid of the process running task instance ``ti_id``: the task runner titles itself
    ``airflow worker -- <ti id>`` (its supervisor keeps the executor's title)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            title = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        if title == f"airflow worker -- {ti_id}":
            return int(entry.name)
    return None


def kill_task(ti_id: str) -> int:
    """SIGKILL the process running task instance ``ti_id``; its pid."""
    pid = task_process(ti_id)
    if pid is None:
        raise RuntimeError(f"no process runs task instance {ti_id}")
    os.kill(pid, signal.SIGKILL)
    return pid


def start_airflow(home: Path, postgres: Any, ferry_env: dict[str, str]) -> LocalAirflow:
    """Airflow on a new database of ``postgres`` (a ``support.postgres.PostgresServer``), its tasks given
    ``ferry_env``."""
    dbname = f"airflow_{secrets.token_hex(4)}"  # unique: one session PostgreSQL may serve several Airflows
    postgres.create_database(dbname)
    return LocalAirflow(home, postgres.url(dbname), ferry_env).start()
