"""The deploy DAG in a real `airflow standalone` on 127.0.0.1, triggered through Airflow's REST API.

Starts Triton and Airflow, registers a good iris v1 and triggers a run (committed), then a broken v2
and triggers again (rolled back, the run failed), shows the task states and `ferry status`, and
stops everything it started.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import httpx
from demo_support import BIN, ROOT, free_port, run, say, wait_for

DAG_ID = "mlflow_to_triton_deploy"






class Airflow:
    def __init__(self, home: Path, port: int) -> None:
        self.home, self.url = home, f"http://127.0.0.1:{port}"
        self.client = httpx.Client(base_url=self.url, timeout=10)

    def login(self) -> None:
        passwords = json.loads((self.home / "simple_auth_manager_passwords.json.generated").read_text())
        reply = self.client.post("/auth/token", json={"username": "admin", "password": passwords["admin"]})
        reply.raise_for_status()
        self.client.headers["Authorization"] = f"Bearer {reply.json()['access_token']}"

    def trigger(self, conf: dict) -> str:
        reply = self.client.post(f"/api/v2/dags/{DAG_ID}/dagRuns", json={"logical_date": None, "conf": conf})
        reply.raise_for_status()
        return reply.json()["dag_run_id"]

    def finished(self, run_id: str) -> str | None:
        state = self.client.get(f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}").json()["state"]
        return state if state in ("success", "failed") else None

    def task_states(self, run_id: str) -> dict[str, str]:
        reply = self.client.get(f"/api/v2/dags/{DAG_ID}/dagRuns/{run_id}/taskInstances").json()
        return {ti["task_id"]: ti["state"] for ti in reply["task_instances"]}


def deploy_through_airflow(airflow: Airflow, label: str) -> str:
    run_id = airflow.trigger({"model": "iris", "alias": "champion"})
    state = wait_for(f"run {run_id}", lambda: airflow.finished(run_id), timeout_s=180)
    print(f"{label}: run {run_id} ended {state.upper()}")
    order = ["snapshot_current", "materialize_repo", "triton_load", "triton_ready", "triton_infer_smoke", "triton_bake",
             "commit_current", "rollback_minimal"]
    for task, task_state in sorted(airflow.task_states(run_id).items(), key=lambda kv: order.index(kv[0])):
        print(f"  {task:<20} {task_state}")
    return state


def main() -> None:
    home = Path(os.environ.setdefault("FERRY_HOME", str(ROOT / ".ferry-demo-airflow")))
    shutil.rmtree(home, ignore_errors=True)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    os.environ.setdefault("FERRY_TRITON_URL", f"http://127.0.0.1:{free_port()}")
    api_port = free_port()
    os.environ.update({
        "PATH": f"{BIN}:{os.environ['PATH']}", "AIRFLOW_HOME": str(home / "airflow"),
        "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"), "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
        "AIRFLOW__CORE__PARALLELISM": "4", "AIRFLOW__API__HOST": "127.0.0.1", "AIRFLOW__API__PORT": str(api_port),
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{api_port}/execution/",
        "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "False",
    })
    say("Start Triton, register iris v1 and point @champion at it")
    run(str(BIN / "ferry"), "triton", "up")
    standalone = None
    try:
        run(sys.executable, str(ROOT / "examples" / "train_model.py"), "--alias", "champion")
        say(f"Start airflow standalone on 127.0.0.1:{api_port} (log: {home / 'airflow-standalone.log'})")
        log = open(home / "airflow-standalone.log", "wb")  # noqa: SIM115 - the server's stdout until the end
        standalone = subprocess.Popen([str(BIN / "airflow"), "standalone"], stdout=log, stderr=subprocess.STDOUT,
                                      start_new_session=True, env=os.environ)
        airflow = Airflow(home / "airflow", api_port)
        wait_for("Airflow health", lambda: airflow.client.get("/api/v2/monitor/health").status_code == 200)
        passwords = home / "airflow" / "simple_auth_manager_passwords.json.generated"
        wait_for("the admin password", passwords.exists)
        airflow.login()
        wait_for(f"DAG {DAG_ID} parsed", lambda: airflow.client.get(f"/api/v2/dags/{DAG_ID}").status_code == 200)

        say("Trigger the DAG through the REST API with alias @champion (v1)")
        first = deploy_through_airflow(airflow, "good v1")
        say("Register a broken v2 (one output column too many), move @champion, trigger again")
        run(sys.executable, str(ROOT / "examples" / "train_model.py"), "--alias", "champion", "--break", "output-shape")
        second = deploy_through_airflow(airflow, "broken v2")
        say("ferry status: v1 still committed and served")
        subprocess.run([str(BIN / "ferry"), "status", "iris"], env=os.environ)
        if (first, second) != ("success", "failed"):
            raise SystemExit(f"unexpected run states: {first}, {second}")
    finally:
        if standalone is not None:
            say("Stop Airflow and Triton")
            os.killpg(standalone.pid, signal.SIGINT)  # SIGTERM would orphan the scheduler and workers
            try:
                standalone.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(standalone.pid, signal.SIGKILL)
        subprocess.run([str(BIN / "ferry"), "triton", "down"], env=os.environ)


if __name__ == "__main__":
    main()
