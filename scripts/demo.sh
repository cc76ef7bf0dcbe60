#!/usr/bin/env bash
# The story of ferry in one run: a good version is committed, a broken one is caught,
# rolled back and quarantined, and production never stops serving the good one.
set -euo pipefail
cd "$(dirname "$0")/.."

export FERRY_HOME="${FERRY_HOME:-$PWD/.ferry-demo}"
export FERRY_TRITON_URL="${FERRY_TRITON_URL:-http://127.0.0.1:8000}"
unset MLFLOW_TRACKING_URI  # the embedded default: sqlite under $FERRY_HOME
rm -rf "$FERRY_HOME"

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
quiet() { "$@" 2>&1 | grep -v -e ' INFO ' -e 'Warning' -e 'warnings.warn' || true; }

say "Start the real Triton server (explicit model control, loopback)"
ferry triton up
trap 'say "Stop Triton"; ferry triton down' EXIT

say "Train iris, log it to MLflow as ONNX with its golden outputs, register v1, alias @champion -> v1"
quiet python examples/train_model.py --model iris --alias champion

say "Deploy @champion: materialize, load beside the active version, ready, smoke, commit"
ferry deploy iris --alias champion

say "Register a broken v2 (its output has one column too many) and move @champion to it"
quiet python examples/train_model.py --model iris --alias champion --break output-shape

say "Deploy @champion again: smoke catches it, the deploy rolls back and quarantines v2"
if ferry deploy iris --alias champion; then
  echo "the broken version was committed: this must not happen" >&2
  exit 1
fi

say "Status: v1 is still committed and is what Triton serves"
ferry status iris

say "History: one record per attempt"
ferry history iris

say "Summary"
ferry history iris --json | python scripts/demo_summary.py
