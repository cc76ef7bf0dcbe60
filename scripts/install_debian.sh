#!/usr/bin/env bash
# Installs the Debian packages the tests start for real, when missing: prometheus (prometheus and promtool:
# promtool checks ops/prometheus, a real Prometheus runs on a loopback port) and postgresql (initdb, pg_ctl and
# postgres under /usr/lib/postgresql/<major>/bin: tests/support/postgres.py runs a cluster of its own per session).
set -euo pipefail
missing=()
command -v prometheus >/dev/null && command -v promtool >/dev/null || missing+=(prometheus)
ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || missing+=(postgresql)
[ "${#missing[@]}" = 0 ] && exit 0
sudo=""
[ "$(id -u)" = 0 ] || sudo="sudo"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get install -y --no-install-recommends "${missing[@]}" >/dev/null \
    || { $sudo apt-get update >/dev/null && $sudo apt-get install -y --no-install-recommends "${missing[@]}" >/dev/null; }
command -v promtool >/dev/null
ls /usr/lib/postgresql/*/bin/initdb >/dev/null
