#!/usr/bin/env bash
# A fleet in one run: three real Triton servers on loopback share one model repository (as replicas on
# Kubernetes share an NFS volume). A good version is committed on all three; a broken one is rolled back
# on all three; a replica is killed, restarted serving nothing, and `ferry reconcile` brings it back.
set -euo pipefail
cd "$(dirname "$0")/.."

root="${FERRY_DEMO_DIR:-$PWD/.ferry-demo-fleet}"
base="${FERRY_DEMO_PORT:-8100}"
rm -rf "$root"
export FERRY_REPOSITORY="$root/repository"
export MLFLOW_TRACKING_URI="sqlite:///$root/mlflow.db"
export FERRY_TRITON_API_KEY="demo-fleet-$RANDOM$RANDOM"  # one model-control key for every replica
urls=()
for i in 0 1 2; do urls+=("http://127.0.0.1:$((base + 3 * i))"); done
fleet=$(IFS=,; echo "${urls[*]}")

say() { printf '\n\033[1m== %s\033[0m\n' "$*"; }
quiet() { "$@" 2>&1 | grep -v -e ' INFO ' -e 'Warning' -e 'warnings.warn' || true; }
replica() {  # replica N COMMAND...: a `ferry triton` command on replica N's host
  local n=$1; shift
  FERRY_HOME="$root/replica-$n" FERRY_TRITON_URL="${urls[$n]}" ferry triton "$@"
}
down_all() { say "Stop the replicas"; for i in 0 1 2; do replica "$i" down || true; done; }

say "Start three Triton replicas sharing $FERRY_REPOSITORY"
for i in 0 1 2; do replica "$i" up; done
trap down_all EXIT
export FERRY_HOME="$root" FERRY_TRITON_URL="$fleet"

say "Train iris, register v1, alias @champion -> v1"
quiet python examples/train_model.py --model iris --alias champion

say "Deploy @champion to the fleet: load, ready and smoke on every replica at once, then one commit"
ferry deploy iris --alias champion
ferry status iris

say "Register a broken v2 (trained on shuffled labels) and deploy it: smoke fails, every replica goes back to v1"
quiet python examples/train_model.py --model iris --alias champion --break golden-mismatch
if ferry deploy iris --alias champion; then
  echo "the broken version was committed: this must not happen" >&2
  exit 1
fi
ferry status iris

say "Kill replica 2 (SIGKILL) and start it again: in explicit mode it comes back serving nothing"
kill -9 "$(python -c "import json,sys; print(json.load(open(sys.argv[1]))['pid'])" "$root/replica-2/triton/tritonserver.pid")"
replica 2 up
ferry status iris || echo "(drift on replica ${urls[2]}, as expected)"

say "Reconcile: the restarted replica loads the committed version; the others are left alone"
ferry reconcile
ferry status iris

say "History"
ferry history iris
