"""How fast the ferry command answers, measured cold: each command in a new process, several runs, the median.

Prints, each with its ratio to ``python startup seconds: X`` (an interpreter that imports nothing, measured in
the same run):

- ``cli help seconds: X``: ``ferry --help`` (target <= 0.3);
- ``cli history seconds: X``: ``ferry history`` over a model with 200 recorded attempts;
- ``cli plugin help seconds: X``: ``mlflow deployments help -t ferry`` (MLflow's command line: mostly MLflow's);
- ``cli status seconds: X``: ``ferry status`` with one committed model, against the Triton this bench starts
  (target <= 0.5);
- ``cli deploy seconds over transaction: X``: ``ferry deploy --alias champion`` against a local ``mlflow server``
  (sqlite backend, artifacts served by the server), a new version each run, the write-back on: the deploy's wall
  time minus the sum of its report's steps (target <= 1.0); the same with the write-back off
  (``FERRY_SERVING_ALIAS=""``); and whether a deploy with the write-back on imported the ``mlflow`` package (it
  should not: ferry can talk to a tracking server over REST alone).

Run: ``.venv/bin/python bench/cli.py [--runs N] [--no-servers]`` (``--no-servers``: the first three only).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ferry.core.config import Settings

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
MODEL = "bench_cli"
SERVED = "iris"
START_TIMEOUT_S = 120.0

# A deploy run under this probe reports, as its last line of stderr, the mlflow modules it imported.
_MLFLOW_PROBE = """
import json, runpy, sys
sys.argv = ["ferry", *json.loads(sys.argv[1])]
try:
    runpy.run_module("ferry", run_name="__main__")
except SystemExit:
    pass
print(json.dumps(sorted(m for m in sys.modules if m.split(".")[0] == "mlflow")), file=sys.stderr)
"""


def timed(argv: list[str], env: dict[str, str]) -> tuple[float, subprocess.CompletedProcess[str]]:
    start = time.perf_counter()
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} exited {done.returncode}: {done.stderr.strip()[-800:]}")
    return seconds, done


def median_seconds(argv: list[str], env: dict[str, str], runs: int) -> float:
    return statistics.median(timed(argv, env)[0] for _ in range(runs))


def history_repository(root: Path) -> Path:
    """A repository with one model directory and 200 history lines, as deploys append them."""
    repository = root / "repository"
    (repository / MODEL).mkdir(parents=True)
    state = repository / ".ferry" / MODEL
    state.mkdir(parents=True)
    lines = [json.dumps({"deploy_id": f"d{i}", "model": MODEL, "kind": "deploy", "target": "champion",
                         "version": i, "outcome": "committed", "who": "bench", "started_at_utc": "20261202T000000",
                         "steps": {"materialize": 0.2, "load": 0.5, "commit": 0.01}}) for i in range(200)]
    (state / "history.jsonl").write_text("\n".join(lines) + "\n")
    return repository


def file_commands(runs: int) -> dict[str, float]:
    """The commands that read files only: help, history, the plugin's help."""
    with tempfile.TemporaryDirectory(prefix="ferry-bench-cli-") as tmp:
        env = {**os.environ, "FERRY_REPOSITORY": str(history_repository(Path(tmp))),
               "MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db"}
        return {
            "python startup seconds": median_seconds([sys.executable, "-c", "pass"], env, runs),
            "cli help seconds": median_seconds([str(BIN / "ferry"), "--help"], env, runs),
            "cli history seconds": median_seconds([str(BIN / "ferry"), "history", MODEL], env, runs),
            "cli plugin help seconds": median_seconds([str(BIN / "mlflow"), "deployments", "help", "-t", "ferry"], env,
                                              runs),
        }


@contextmanager
def mlflow_server(home: Path, backend_uri: str) -> Iterator[str]:
    """``mlflow server`` on ``backend_uri``, serving its artifacts from ``home/artifacts``: its URL."""
    from support.processes import free_port, stop_group, wait_healthy

    port = free_port()
    log = home / "mlflow-server.log"
    with open(log, "ab") as out:
        process = subprocess.Popen(
            [str(BIN / "mlflow"), "server", "--backend-store-uri", backend_uri, "--serve-artifacts",
             "--artifacts-destination", str(home / "artifacts"), "--host", "127.0.0.1", "--port", str(port),
             "--workers", "1"],
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}, stdout=out,
            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_healthy(process, f"{url}/health", log, START_TIMEOUT_S, "mlflow server")
        yield url
    finally:
        stop_group(process, grace_s=10)


def deploy_overheads(env: dict[str, str], tracking_url: str, runs: int) -> list[float]:
    """Each run registers a new version under @champion and deploys it: wall time minus the report's steps."""
    from train_model import train_and_register

    overheads = []
    for _ in range(runs):
        train_and_register(SERVED, "champion", tracking_uri=tracking_url)
        seconds, done = timed([str(BIN / "ferry"), "deploy", SERVED, "--alias", "champion", "--json"], env)
        report = json.loads(done.stdout)
        if report["outcome"] != "committed":
            raise SystemExit(f"the deploy did not commit: {report.get('error')}")
        overheads.append(seconds - sum(report["steps"].values()))
    return overheads


def mlflow_imported(env: dict[str, str], tracking_url: str) -> list[str]:
    """The mlflow modules one more deploy imported."""
    from train_model import train_and_register

    train_and_register(SERVED, "champion", tracking_uri=tracking_url)
    _, probed = timed([sys.executable, "-c", _MLFLOW_PROBE, json.dumps(["deploy", SERVED, "-a", "champion"])], env)
    return list(json.loads(probed.stderr.strip().splitlines()[-1]))


def write_backs_told(settings: Settings) -> tuple[int, int]:
    """How many of the deploys' write-backs told MLflow, of how many ran (writeback.jsonl): a write-back that
    failed quickly would make the figure look better than it is."""
    path = settings.repository / ".ferry" / SERVED / "writeback.jsonl"
    lines = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return sum(1 for line in lines if line.get("told")), len(lines)


def server_commands(runs: int) -> tuple[dict[str, float], list[str], tuple[int, int]]:
    """``ferry deploy`` against a tracking server (a new version each run; the write-back on, then off) and
    ``ferry status`` against Triton."""
    sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "examples")]
    from conftest import make_settings
    from ferry.runtime import server

    home = Path(tempfile.mkdtemp(prefix="ferry-bench-cli-servers-"))
    settings = make_settings(home)
    server.up(settings)
    try:
        with mlflow_server(home, settings.tracking_uri) as tracking_url:
            env = {**os.environ, "FERRY_HOME": str(settings.home), "FERRY_REPOSITORY": str(settings.repository),
                   "FERRY_TRITON_URL": settings.triton.urls, "MLFLOW_TRACKING_URI": tracking_url}
            with_write_back = deploy_overheads(env, tracking_url, runs)
            imported = mlflow_imported(env, tracking_url)
            told = write_backs_told(settings)
            without = deploy_overheads({**env, "FERRY_SERVING_ALIAS": ""}, tracking_url, runs)
            figures = {"cli status seconds": median_seconds([str(BIN / "ferry"), "status"], env, runs),
                       "cli deploy seconds over transaction": statistics.median(with_write_back),
                       "cli deploy seconds over transaction, write-back off": statistics.median(without)}
    finally:
        server.down(settings)
        shutil.rmtree(home, ignore_errors=True)
    return figures, imported, told


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--no-servers", action="store_true", help="only the commands that read files")
    args = parser.parse_args()
    figures = file_commands(args.runs)
    imported: list[str] | None = None
    told = (0, 0)
    if not args.no_servers:
        served, imported, told = server_commands(args.runs)
        figures.update(served)
    base = figures["python startup seconds"]
    for name, seconds in figures.items():
        print(f"{name}: {seconds:.3f}  ({seconds / base:.1f}x python startup, median of {args.runs})")
    if imported is not None:
        print(f"cli deploy imported mlflow: {'no' if not imported else ', '.join(imported[:5])}")
        print(f"cli deploy write-backs that told MLflow: {told[0]} of {told[1]}")


if __name__ == "__main__":
    main()
