"""How fast the ferry command answers, measured cold: each command in a new process, several runs, the median.

Prints ``cli help seconds: X`` (``ferry --help``; target <= 0.3), ``cli history seconds: X`` (``ferry history``
over a model with 200 recorded attempts), ``cli plugin help seconds: X`` (``mlflow deployments help -t ferry``)
and, as the baseline measured in the same run, ``python startup seconds: X`` (an interpreter that imports nothing)
with each command's ratio to it. Run: ``.venv/bin/python bench/cli.py [--runs N]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent
MODEL = "bench_cli"


def median_seconds(argv: list[str], env: dict[str, str], runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=120)
        times.append(time.perf_counter() - start)
        if done.returncode != 0:
            raise SystemExit(f"{' '.join(argv)} exited {done.returncode}: {done.stderr.strip()[-500:]}")
    return statistics.median(times)


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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=7)
    runs = parser.parse_args().runs
    with tempfile.TemporaryDirectory(prefix="ferry-bench-cli-") as tmp:
        env = {**os.environ, "FERRY_REPOSITORY": str(history_repository(Path(tmp))),
               "MLFLOW_TRACKING_URI": f"sqlite:///{tmp}/mlflow.db"}
        figures = {
            "python startup": median_seconds([sys.executable, "-c", "pass"], env, runs),
            "cli help": median_seconds([str(BIN / "ferry"), "--help"], env, runs),
            "cli history": median_seconds([str(BIN / "ferry"), "history", MODEL], env, runs),
            "cli plugin help": median_seconds([str(BIN / "mlflow"), "deployments", "help", "-t", "ferry"], env, runs),
        }
    base = figures["python startup"]
    for name, seconds in figures.items():
        print(f"{name} seconds: {seconds:.3f}  ({seconds / base:.1f}x python startup, median of {runs})")


if __name__ == "__main__":
    main()
