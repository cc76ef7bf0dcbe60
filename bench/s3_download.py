"""What ferry's materialize costs over a bare download, for a large model on S3 (the "s3" layout).

Starts its own SeaweedFS (tests/support/s3.py) and an `mlflow server` whose artifacts are on it
(--default-artifact-root s3://, sqlite backend: the registry's database plays no part in the download), logs a
~200 MB ONNX model there and registers it. Then, in alternating rounds in the same run:

- ferry: what materialize does for that version against a tracking server: Registry(url) (REST, no mlflow),
  resolve the alias, Registry.artifacts(ref) (the run's s3:// folder, a boto3 client), the listing, and the
  download of model.onnx into a new staging folder, streamed and hashed while written (made durable later,
  with the rest of the version, so not here);
- bare: one boto3 client and ``download_file`` of the same object to a file (boto3's managed transfer).

Prints ``s3 materialize seconds: X``, ``s3 bare download seconds: Y`` (medians) and
``s3 materialize ratio: Z``, the median of the rounds' paired ratios (target <= 1.10).

    .venv/bin/python bench/s3_download.py [--rounds 7] [--mb 200]

``run(args)`` is the whole bench for a caller holding its own argparse Namespace (``rounds``; ``mb`` or
``large_mb`` for the model's size); it returns the figures it printed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from models import large_model  # noqa: E402

from ferry.core.registry import Registry  # noqa: E402
from support.mlflow_server import TrackingServer  # noqa: E402
from support.s3 import S3Server, start_s3  # noqa: E402

MODEL, ALIAS = "s3-large", "champion"
DEFAULT_ROUNDS, DEFAULT_MB = 7, 200


def register_large(tracking: TrackingServer, model_bytes: bytes, workdir: Path) -> tuple[str, str]:
    """Log model.onnx to a run on the server (MLflow's client, its S3 upload) and register it; the bucket and
    key of the object."""
    from mlflow import MlflowClient

    os.environ.update(tracking.client_env())
    client = MlflowClient(tracking_uri=tracking.url, registry_uri=tracking.url)
    experiment = client.create_experiment(f"bench-{os.getpid()}")
    run = client.create_run(experiment)
    folder = workdir / "logged"
    folder.mkdir()
    (folder / "model.onnx").write_bytes(model_bytes)
    client.log_artifact(run.info.run_id, str(folder / "model.onnx"), "onnx")
    client.create_registered_model(MODEL)
    version = client.create_model_version(MODEL, source=f"runs:/{run.info.run_id}/onnx", run_id=run.info.run_id)
    client.set_registered_model_alias(MODEL, ALIAS, version.version)
    root = run.info.artifact_uri.removeprefix("s3://")
    bucket, _, prefix = root.partition("/")
    return bucket, f"{prefix}/onnx/model.onnx"


def ferry_materialize(url: str, staging: Path) -> tuple[float, int]:
    """Materialize's registry part, as `ferry deploy` runs it against a tracking server: seconds, bytes."""
    began = time.perf_counter()
    registry = Registry(url)
    ref = registry.resolve_alias(MODEL, ALIAS)
    artifacts = registry.artifacts(ref)
    size = artifacts.sizes()["model.onnx"]
    staging.mkdir()
    path = artifacts.download("model.onnx", staging)
    artifacts.sha256("model.onnx", path)  # computed while written: no second read
    took = time.perf_counter() - began
    assert path.stat().st_size == size, f"downloaded {path.stat().st_size} bytes, listed {size}"
    return took, size


def bare_download(s3: S3Server, bucket: str, key: str, target: Path) -> float:
    """One boto3 client and its managed download of the object to a file."""
    import boto3

    began = time.perf_counter()
    client = boto3.client("s3", endpoint_url=s3.endpoint, region_name="us-east-1")
    client.download_file(bucket, key, str(target))
    return time.perf_counter() - began


def _rounds(args: Any) -> int:
    return int(getattr(args, "rounds", None) or DEFAULT_ROUNDS)


def _megabytes(args: Any) -> int:
    return int(getattr(args, "mb", None) or getattr(args, "large_mb", None) or DEFAULT_MB)


def measure(tracking: TrackingServer, bucket: str, key: str, rounds: int, workdir: Path) -> dict[str, float]:
    """Alternating rounds (neither path always goes first); round 0 warms both (imports, connections, caches)."""
    taken: dict[str, list[float]] = {"ferry": [], "bare": []}
    for i in range(rounds + 1):
        for part in ("ferry", "bare") if i % 2 == 0 else ("bare", "ferry"):
            target = workdir / f"{part}-{i}"
            if part == "ferry":
                took = ferry_materialize(tracking.url, target)[0]
            else:
                took = bare_download(tracking.s3, bucket, key, target)
            if i:
                taken[part].append(took)
            if target.is_dir():
                shutil.rmtree(target)
            else:
                target.unlink()
    ratios = [f / b for f, b in zip(taken["ferry"], taken["bare"], strict=True)]
    print("rounds (ferry / bare seconds): " + ", ".join(f"{f:.3f}/{b:.3f}" for f, b in zip(taken["ferry"],
                                                                                           taken["bare"])))
    return {"materialize_s": statistics.median(taken["ferry"]), "bare_s": statistics.median(taken["bare"]),
            "ratio": statistics.median(ratios)}


def run(args: Any) -> dict[str, float]:
    """The whole bench: servers up, the model logged and registered, the rounds, the figures printed."""
    rounds, megabytes = _rounds(args), _megabytes(args)
    home = Path(tempfile.mkdtemp(prefix="ferry-bench-s3-"))
    s3 = start_s3(home / "seaweedfs")
    tracking = TrackingServer(home / "mlflow", f"sqlite:///{home / 'mlflow.db'}", s3, "s3")
    saved = dict(os.environ)
    try:
        tracking.start()
        model_bytes = large_model(megabytes)
        print(f"model: a MatMul over a large initializer, {len(model_bytes) / 1e6:.1f} MB ONNX, on SeaweedFS")
        bucket, key = register_large(tracking, model_bytes, home)
        del model_bytes
        figures = measure(tracking, bucket, key, rounds, home)
        print(f"s3 materialize seconds: {figures['materialize_s']:.3f}   (median of {rounds})")
        print(f"s3 bare download seconds: {figures['bare_s']:.3f}   (median of {rounds})")
        print(f"s3 materialize ratio: {figures['ratio']:.3f}   (median of the paired rounds; target <= 1.10)")
        return figures
    finally:
        os.environ.clear()
        os.environ.update(saved)
        tracking.stop()
        s3.stop()
        shutil.rmtree(home, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS, help="measured rounds (after one warm-up)")
    parser.add_argument("--mb", type=int, default=DEFAULT_MB, help="the model's size in MB")
    run(parser.parse_args())


if __name__ == "__main__":
    main()
