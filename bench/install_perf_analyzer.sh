#!/usr/bin/env bash
# Installs NVIDIA's perf_analyzer for bench/perf.py, in its own venv (.venv-bench) so that the project's
# tritonclient pin is untouched. The `perf-analyzer` package on PyPI is an empty placeholder: the binary ships
# in the tritonclient 2.51.0 wheel (installed as bin/perf_analyzer). It needs libb64.so.0d (Debian libb64-0d)
# and libcudart.so.12 (the nvidia-cuda-runtime-cu12 wheel); bench/perf_analyzer puts both on LD_LIBRARY_PATH.
# Idempotent: does nothing once `bench/perf_analyzer --version` runs.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(dirname "$here")"
venv="${FERRY_BENCH_VENV:-$root/.venv-bench}"
python="${PYTHON:-python3}"
TRITONCLIENT=2.51.0
CUDA_RUNTIME=12.9.79

if FERRY_BENCH_VENV="$venv" "$here/perf_analyzer" --version >/dev/null 2>&1; then
    exit 0
fi

if ! ldconfig -p | grep -q 'libb64\.so\.0d'; then
    sudo=""
    [ "$(id -u)" = 0 ] || sudo="sudo"
    export DEBIAN_FRONTEND=noninteractive
    $sudo apt-get install -y --no-install-recommends libb64-0d >/dev/null \
        || { $sudo apt-get update >/dev/null && $sudo apt-get install -y --no-install-recommends libb64-0d >/dev/null; }
fi

[ -x "$venv/bin/pip" ] || "$python" -m venv "$venv"
"$venv/bin/pip" install --quiet --disable-pip-version-check --no-deps \
    "tritonclient==$TRITONCLIENT" "nvidia-cuda-runtime-cu12==$CUDA_RUNTIME"

FERRY_BENCH_VENV="$venv" "$here/perf_analyzer" --version >/dev/null \
    || { echo "perf_analyzer was installed in $venv but does not run: see the error above" >&2; exit 1; }
echo "perf_analyzer installed in $venv (run it as bench/perf_analyzer)"
