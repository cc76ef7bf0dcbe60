"""Register a release: an ensemble (the entry model) and its two members, each a Triton model directory.

    python examples/release.py --alias champion
    python examples/release.py --alias champion --factor 2
    python examples/release.py --alias champion --break pipeline

The pipeline ``iris_pipeline`` sends the iris features X through ``iris_scale`` (Z = X * factor) and then
``iris_score`` (SCORE = Z @ weights). Every answer carries the version of each member that computed it
(SCALE_VERSION, SCORE_VERSION), so a client can count mixed answers. The ensemble's steps pin no version
(model_version -1): the deploy takes each member's version under the alias it deploys the pipeline by, and
fixes them in the pipeline version's manifest. Each call registers a new version of all three models.

The --break options register a release that fails in a different place:
  member-load   iris_score's initialize() raises (its params.json has no weights)   -> load of the member
  member-smoke  iris_score's golden outputs are not what it computes                -> smoke of the member
  pipeline      iris_scale doubles the features: each member passes its own smoke,
                the pipeline's golden output (one factor) does not match           -> smoke of the pipeline
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

import mlflow
import numpy as np
from sklearn.datasets import load_iris
from train_model import use_experiment

from ferry.publish import log_triton_model, register_version

BREAKS = ("none", "member-load", "member-smoke", "pipeline")
HERE = Path(__file__).resolve().parent / "release"
WEIGHTS = [0.5, -0.25, 1.0, 2.0]


def pipeline_config(scale: str, score: str) -> str:
    """The ensemble: X -> scale -> Z -> score -> SCORE, with each member's version passed out."""
    step = ('  {{ model_name: "{name}" model_version: -1\n    input_map {{ key: "{inp}" value: "{src}" }}\n'
            '    output_map {{ key: "{out}" value: "{dst}" }}\n    output_map {{ key: "VERSION" value: "{ver}" }} }}')
    return (
        'platform: "ensemble"\nmax_batch_size: 0\n'
        'input [ { name: "X" data_type: TYPE_FP32 dims: [ -1, 4 ] } ]\n'
        'output [\n  { name: "SCORE" data_type: TYPE_FP32 dims: [ -1, 1 ] },\n'
        '  { name: "SCALE_VERSION" data_type: TYPE_INT32 dims: [ 1 ] },\n'
        '  { name: "SCORE_VERSION" data_type: TYPE_INT32 dims: [ 1 ] }\n]\n'
        'ensemble_scheduling { step [\n'
        + step.format(name=scale, inp="X", src="X", out="Z", dst="z", ver="SCALE_VERSION") + ",\n"
        + step.format(name=score, inp="Z", src="z", out="SCORE", dst="SCORE", ver="SCORE_VERSION")
        + "\n] }\n"
    )


def _member_dir(parent: Path, name: str, template: str, params: dict) -> Path:
    folder = parent / name
    shutil.copytree(HERE / template, folder)
    (folder / "1" / "params.json").write_text(json.dumps(params))
    return folder


def register_release(prefix: str = "iris", alias: str = "champion", breakage: str = "none", factor: float = 1.0,
                     tracking_uri: str | None = None, experiment: str = "ferry-examples") -> dict[str, int]:
    """Log and register a version of the pipeline and of both members; their names and version numbers."""
    if breakage not in BREAKS:
        raise ValueError(f"unknown break {breakage!r}: one of {', '.join(BREAKS)}")
    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    use_experiment(experiment)
    names = {"scale": f"{prefix}_scale", "score": f"{prefix}_score", "pipeline": f"{prefix}_pipeline"}
    sample = load_iris(return_X_y=True)[0][[0, 60, 120]].astype(np.float32)
    used = 2.0 * factor if breakage == "pipeline" else factor
    scaled = (sample * np.float32(used)).astype(np.float32)
    weights = np.asarray(WEIGHTS, dtype=np.float32).reshape(4, 1)
    score = (scaled @ weights).astype(np.float32)
    expected = ((sample * np.float32(factor)).astype(np.float32) @ weights).astype(np.float32)
    versions = {}
    with tempfile.TemporaryDirectory() as tmp:
        parent = Path(tmp)
        members = {
            "scale": (_member_dir(parent, names["scale"], "scale", {"factor": used}), {"X": sample}, {"Z": scaled}),
            "score": (_member_dir(parent, names["score"], "score",
                                  {} if breakage == "member-load" else {"weights": WEIGHTS}),
                      {"Z": scaled}, {"SCORE": score + 1 if breakage == "member-smoke" else score}),
        }
        entry = parent / names["pipeline"]
        (entry / "1").mkdir(parents=True)  # an ensemble's version folder is empty
        (entry / "config.pbtxt").write_text(pipeline_config(names["scale"], names["score"]))
        members["pipeline"] = (entry, {"X": sample}, {"SCORE": expected})
        for role, (folder, inputs, golden) in members.items():  # the members first: the alias names them then
            with mlflow.start_run(run_name=f"{names[role]} ({breakage})") as run:
                mlflow.log_params({"role": role, "break": breakage, "factor": factor})
                source = log_triton_model(folder, inputs, golden=golden, extra={"break": breakage})
            versions[names[role]] = register_version(names[role], source, run.info.run_id, alias,
                                                     tracking_uri=mlflow.get_tracking_uri())
    return versions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prefix", default="iris", help="the models are <prefix>_pipeline, _scale and _score")
    parser.add_argument("--alias", default="champion")
    parser.add_argument("--factor", type=float, default=1.0, help="what iris_scale multiplies the features by")
    parser.add_argument("--break", dest="breakage", choices=BREAKS, default="none")
    parser.add_argument("--tracking-uri", default=None,
                        help="MLflow's tracking URI (default: ferry's, from MLFLOW_TRACKING_URI or FERRY_HOME)")
    args = parser.parse_args()
    from ferry.core.config import load_settings

    tracking_uri = args.tracking_uri or load_settings().tracking_uri
    versions = register_release(args.prefix, args.alias, args.breakage, args.factor, tracking_uri)
    shown = ", ".join(f"{name} v{version}" for name, version in versions.items())
    print(f"registered {shown} ({args.breakage}) and pointed @{args.alias} at each")


if __name__ == "__main__":
    main()
