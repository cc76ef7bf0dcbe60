#!/usr/bin/env bash
# Installs Debian's prometheus package (prometheus and promtool) when they are missing: the tests run
# promtool on ops/prometheus and start a real Prometheus on a loopback port of their own.
set -euo pipefail
if command -v prometheus >/dev/null && command -v promtool >/dev/null; then
    exit 0
fi
sudo=""
[ "$(id -u)" = 0 ] || sudo="sudo"
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get install -y --no-install-recommends prometheus >/dev/null \
    || { $sudo apt-get update >/dev/null && $sudo apt-get install -y --no-install-recommends prometheus >/dev/null; }
command -v promtool >/dev/null
