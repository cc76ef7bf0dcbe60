"""How much a ferry deploy costs over the work it cannot avoid, and how fast a rollback is.

Prints `overhead ratio: X` (target <= 1.10): a deploy's wall time to its end (its history record written,
its journal gone) over the sum of its irreducible parts measured with bare calls in the same run (artifact
download, Triton load, one inference); then the write-back to MLflow that follows, on its own line, and the
ratio with it.
The bare calls do exactly what the deploy does with Triton: a twin model with its own active version
gets the candidate loaded beside it. Each round runs one deploy and one bare round, in alternating
order, after Triton has finished unloading; the ratio is the median of the rounds' ratios.

Prints `rollback seconds: Y` (target <= 0.25): from the failure being detected (smoke) to the
previous state verified in Triton (rollback restores, pins, verifies and quarantines).

    .venv/bin/python bench/deploy_overhead.py [--rounds 15] [--trees 6000]
    .venv/bin/python bench/deploy_overhead.py --large-mb 200 --rounds 5   (target <= 1.10)
    .venv/bin/python bench/deploy_overhead.py --registry s3 [--large-mb 200] [--rounds 7]   (materialize from S3
        against a bare boto3 download of the same object: bench/s3_download.py, target <= 1.10)
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import mlflow
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "examples"), str(ROOT / "bench")]

from models import large_model  # noqa: E402
from sklearn.datasets import load_iris  # noqa: E402
from train_model import _classifier, _to_onnx  # noqa: E402

from conftest import make_settings  # noqa: E402
from ferry.core.events import RECORDED, WRITE_BACK  # noqa: E402
from ferry.core.fsutil import fsync_tree  # noqa: E402
from ferry.core.model_config import build_config, onnx_signature, to_override_json, with_versions  # noqa: E402
from ferry.core.records import TRANSACTION_STEPS as STEP_NAMES  # noqa: E402
from ferry.core.runner import deploy  # noqa: E402
from ferry.core.steps import Services  # noqa: E402
from ferry.core.triton import Triton  # noqa: E402
from ferry.publish import golden_outputs, log_onnx_model, register_version  # noqa: E402
from ferry.runtime import server  # noqa: E402

MODEL, TWIN = "forest", "forest-bare"
PARTS: list[tuple[float, float, float]] = []
STEP_SUMS: list[list[float]] = []
DIRECT: list[float] = []


def register(model_bytes: bytes, sample: dict, golden: dict, tracking_uri: str, model: str = MODEL) -> tuple[int, str]:
    with mlflow.start_run() as run:
        source = log_onnx_model(model_bytes, sample, golden=golden)
    return register_version(model, source, run.info.run_id, "champion", tracking_uri), run.info.run_id


def settle(ferry: Services, timeout_s: float = 10.0) -> None:
    """Wait until no version is still unloading: a retired stub shutting down competes for the 2 cores."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        states = [v.state for model in (MODEL, TWIN) for v in ferry.triton.versions(model)]
        if "UNLOADING" not in states:
            return
        time.sleep(0.05)


class AttemptClock:
    """A deploy's wall time up to its end (RECORDED: the history record written, the model's journal gone),
    and the write-back to MLflow that follows it."""

    def __init__(self) -> None:
        self.began = time.perf_counter()
        self.recorded = self.ended = self.began
        self.write_back_s = 0.0

    def on_event(self, step: str, status: str, seconds: float, detail: str) -> None:
        if step == RECORDED:
            self.recorded = time.perf_counter()
        elif step == WRITE_BACK and status != "start":
            self.write_back_s = seconds

    def stop(self) -> None:
        self.ended = time.perf_counter()

    @property
    def attempt_s(self) -> float:
        return self.recorded - self.began

    @property
    def total_s(self) -> float:
        return self.ended - self.began


def bare_round(ferry: Services, run_id: str, version: int, active: int, config, workdir: Path,
               sample: dict) -> float:
    """Download, load beside the active version, infer once on the smoke sample: the parts no deploy can skip."""
    t0 = time.perf_counter()
    path = mlflow.artifacts.download_artifacts(artifact_uri=f"runs:/{run_id}/onnx/model.onnx", dst_path=str(workdir))
    download_s = time.perf_counter() - t0
    target = ferry.settings.repository / TWIN / str(version)
    target.mkdir(parents=True)
    shutil.copy(path, target / "model.onnx")
    runner = ferry.settings.repository / MODEL / "1"  # the runner ferry staged, with its bytecode
    shutil.copy2(runner / "model.py", target / "model.py")  # copy2 keeps the mtime the bytecode was made for
    shutil.copytree(runner / "__pycache__", target / "__pycache__")
    fsync_tree(target)  # as durable as ferry's staging, so both loads start from the same page cache state
    t1 = time.perf_counter()
    ferry.triton.load(TWIN, to_override_json(with_versions(config, [active, version])))
    t2 = time.perf_counter()
    ferry.triton.infer(TWIN, version, sample, {"X": "FP32"})
    t3 = time.perf_counter()
    PARTS.append((download_s, t2 - t1, t3 - t2))
    ferry.triton.load(TWIN, to_override_json(with_versions(config, [version])))  # retire, as a commit would
    return download_s + (t3 - t1)


def warm_rollbacks(settings, model_bytes: bytes, sample: dict, golden: dict, rounds: int) -> list[float]:
    """``ferry rollback`` to the previous version while it is kept warm: the front is repointed, nothing loaded."""
    ferry = Services(settings.with_overrides(keep_previous_s=600))
    seconds = []
    for _ in range(rounds):
        register(model_bytes, sample, golden, settings.tracking_uri)
        settle(ferry)
        committed = deploy(ferry, MODEL, alias="champion")
        assert committed.outcome == "committed", committed.error
        previous = committed.current.previous_version
        probe = Triton(ferry.settings.triton.urls, api_key=ferry.settings.model_control_key())
        serving_at: list[float] = []

        def watch(previous: int = previous, probe: Triton = probe, serving_at: list[float] = serving_at) -> None:
            """When the front first serves the previous version (the write-back to MLflow comes after)."""
            deadline = time.perf_counter() + 10
            while time.perf_counter() < deadline and not probe.version_ready(MODEL, previous):
                time.sleep(0.001)
            serving_at.append(time.perf_counter())

        watcher = threading.Thread(target=watch)
        began = time.perf_counter()
        watcher.start()
        report = deploy(ferry, MODEL, version=previous)
        watcher.join()
        seconds.append(serving_at[0] - began)
        assert report.outcome == "committed" and "load" not in report.steps, report.steps
    return seconds


def direct_download_seconds(ferry: Services, run_id: str, workdir: Path) -> float:
    """The same download from the run's own store, as ferry does it (not part of the baseline)."""
    from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
    from mlflow.tracking.artifact_utils import get_artifact_uri

    workdir.mkdir()
    began = time.perf_counter()
    uri = get_artifact_uri(run_id, "onnx", tracking_uri=ferry.settings.tracking_uri)
    get_artifact_repository(uri).download_artifacts("model.onnx", dst_path=str(workdir))
    return time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--trees", type=int, default=6000, help="6000 trees make a 5 MB ONNX model")
    parser.add_argument("--large-mb", type=int, default=0, help="instead, a model of this many MB (no rollbacks)")
    parser.add_argument("--registry", choices=("sqlite", "s3"), default="sqlite",
                        help="s3: materialize from a tracking server's S3 store against a bare boto3 download "
                             "(bench/s3_download.py; --large-mb sets the size, 200 by default)")
    args = parser.parse_args()
    if args.registry == "s3":
        import s3_download

        s3_download.run(args)
        return

    home = Path(tempfile.mkdtemp(prefix="ferry-bench-"))
    settings = make_settings(home)
    mlflow.set_tracking_uri(settings.tracking_uri)
    mlflow.set_experiment("bench")
    server.up(settings)
    try:
        features, labels = load_iris(return_X_y=True)
        features = features.astype(np.float32)
        if args.large_mb:
            model_bytes = large_model(args.large_mb)
            print(f"model: a MatMul over a large initializer, {len(model_bytes) / 1e6:.1f} MB ONNX")
        else:
            model_bytes = _to_onnx(_classifier(args.trees, labels, features), features).SerializeToString()
            print(f"model: random forest of {args.trees} trees, {len(model_bytes) / 1e6:.1f} MB ONNX")
        sample = {"X": features[[0, 60, 120]]}
        golden = golden_outputs(model_bytes, sample)
        wrong = {name: value + 1 for name, value in golden.items()}

        ferry = Services(settings)
        register(model_bytes, sample, golden, settings.tracking_uri)
        assert deploy(ferry, MODEL, alias="champion").outcome == "committed"
        config = build_config(TWIN, onnx_signature(__import__("onnx").load_from_string(model_bytes)), "python")
        twin_active, twin_run = register(model_bytes, sample, golden, settings.tracking_uri, TWIN)
        bare_round(ferry, twin_run, twin_active, 1, config, home / "dl-warm", sample)  # the twin's active version

        deploys, bares, rollbacks, with_write_back, write_backs = [], [], [], [], []
        for i in range(args.rounds):
            for part in ("deploy", "bare") if i % 2 == 0 else ("bare", "deploy"):  # neither always goes first
                if part == "deploy":
                    register(model_bytes, sample, golden, settings.tracking_uri)
                    settle(ferry)
                    clock = AttemptClock()
                    report = deploy(ferry, MODEL, alias="champion", on_event=clock.on_event)
                    clock.stop()
                    deploys.append(clock.attempt_s)
                    with_write_back.append(clock.total_s)
                    write_backs.append(clock.write_back_s)
                    STEP_SUMS.append([report.steps.get(name, 0.0) for name in STEP_NAMES])
                    assert report.outcome == "committed", report.error
                else:
                    twin_version, twin_run = register(model_bytes, sample, golden, settings.tracking_uri, TWIN)
                    settle(ferry)
                    bares.append(bare_round(ferry, twin_run, twin_version, twin_active, config, home / f"dl{i}",
                                           sample))
                    DIRECT.append(direct_download_seconds(ferry, twin_run, home / f"direct{i}"))
                    twin_active = twin_version
        # Rollbacks run apart: a failed candidate's stub shuts down in the background, where it would slow the
        # next round's load.
        for _ in range(0 if args.large_mb else args.rounds):
            register(model_bytes, sample, wrong, settings.tracking_uri)
            settle(ferry)
            failed = deploy(ferry, MODEL, alias="champion")
            assert failed.outcome == "rolled_back" and failed.rollback.verified, failed.error
            rollbacks.append(failed.steps["rollback"])
        deploy_s, bare_s = statistics.median(deploys), statistics.median(bares)
        print(f"deploy wall seconds (median of {args.rounds}): {deploy_s:.3f}   steps of the last: {report.steps}")
        parts = ", ".join(f"{name} {statistics.median(p[i] for p in PARTS):.4f}"
                          for i, name in enumerate(("download", "load", "infer")))
        print(f"bare download + load + infer seconds (median): {bare_s:.3f}  parts (median): {parts}")
        outside = [w - sum(r) for w, r in zip(deploys, STEP_SUMS)]
        print(f"deploy time outside its steps (median): {statistics.median(outside):.4f}")
        deploy_loads = [steps[STEP_NAMES.index("load")] for steps in STEP_SUMS]
        print(f"load seconds (median): in deploys {statistics.median(deploy_loads):.4f}, "
              f"bare {statistics.median(p[1] for p in PARTS):.4f}")
        # Each deploy is paired with the bare round run beside it, so slow drift of the machine cancels out.
        paired = [d / b for d, b in zip(deploys, bares)]
        added_ms = statistics.median((d - b) * 1000 for d, b in zip(deploys, bares))
        print(f"the same download from the run's store, as ferry reads it (median): {statistics.median(DIRECT):.4f}")
        print(f"ferry's added time (median of paired rounds): {added_ms:.1f} ms")
        print(f"overhead ratio: {statistics.median(paired):.3f}")
        print(f"write-back seconds (median): {statistics.median(write_backs):.4f} (after the attempt's record, "
              "the model still held)")
        total = statistics.median(t / b for t, b in zip(with_write_back, bares))
        print(f"overhead ratio with the write-back: {total:.3f}")
        if rollbacks:
            print(f"rollback seconds: {statistics.median(rollbacks):.3f} (median; max {max(rollbacks):.3f})")
        warm = warm_rollbacks(settings, model_bytes, sample, golden, rounds=max(3, min(args.rounds, 7)))
        print(f"warm rollback seconds: {statistics.median(warm):.4f} (median of {len(warm)}; max {max(warm):.4f}; "
              "from the transaction's start to the previous version serving, with FERRY_KEEP_PREVIOUS_S)")
    finally:
        server.down(settings)
        shutil.rmtree(home, ignore_errors=True)


if __name__ == "__main__":
    main()
