#!/usr/bin/env bash
# The alert-rule tests run promtool (`promtool test rules`) and the monitoring-stack test runs
# the Prometheus server against the local services; Debian ships both in its `prometheus`
# package. Installed only when missing.
set -euo pipefail
if ! command -v promtool >/dev/null 2>&1 || ! command -v prometheus >/dev/null 2>&1; then
  echo "installing Debian's prometheus (promtool) for the alert-rule tests"
  if [ "$(id -u)" -eq 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends prometheus >/dev/null
fi
