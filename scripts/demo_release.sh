#!/usr/bin/env bash
# A release in one run: an ensemble (iris_pipeline: iris_scale -> iris_score) and its two members deployed as one
# transaction on a real Triton; a second release committed; one whose pipeline fails end to end (each member
# passes alone) rolled back whole; then `ferry rollback` to the first release, its exact members restored.
set -euo pipefail
cd "$(dirname "$0")/.."

root="${FERRY_DEMO_DIR:-$PWD/.ferry-demo-release}"
rm -rf "$root"
export FERRY_HOME="$root" FERRY_REPOSITORY="$root/repository"
export MLFLOW_TRACKING_URI="sqlite:///$root/mlflow.db"
export FERRY_TRITON_URL="http://127.0.0.1:${FERRY_DEMO_PORT:-8200}"

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
quiet() { "$@" 2>&1 | grep -v -e ' INFO ' -e 'Warning' -e 'warnings.warn' || true; }
infer() {  # what the pipeline answers, and which member versions computed it
  python - "$FERRY_TRITON_URL" <<'PY'
import sys, httpx
body = {"inputs": [{"name": "X", "shape": [1, 4], "datatype": "FP32", "data": [5.1, 3.5, 1.4, 0.2]}]}
out = {o["name"]: o["data"] for o in httpx.post(f"{sys.argv[1]}/v2/models/iris_pipeline/infer", json=body,
                                                timeout=10).json()["outputs"]}
print(f"iris_pipeline answers SCORE {out['SCORE'][0]:.3f}, computed by iris_scale v{out['SCALE_VERSION'][0]} "
      f"and iris_score v{out['SCORE_VERSION'][0]}")
PY
}

say "Start Triton"
ferry triton up
trap 'say "Stop Triton"; ferry triton down' EXIT

say "Register a release: iris_scale v1, iris_score v1 and the ensemble iris_pipeline v1, all at @champion"
quiet python examples/release.py --alias champion
say "Deploy it: the members and the ensemble loaded beside nothing, each member smoke-tested, then the pipeline"
ferry deploy iris_pipeline --alias champion
infer

say "A second release (iris_scale doubles the features): committed at one point, the front switched in one load"
quiet python examples/release.py --alias champion --factor 2
ferry deploy iris_pipeline --alias champion
infer
ferry status

say "A release whose members each pass their own smoke, but not the pipeline's: rolled back whole"
quiet python examples/release.py --alias champion --break pipeline
if ferry deploy iris_pipeline --alias champion; then
  echo "a release that fails end to end was committed: this must not happen" >&2
  exit 1
fi
infer

say "Roll back to the first release: its exact members come back with it"
ferry rollback iris_pipeline --to 1
infer
ferry status
ferry history iris_pipeline
