#!/usr/bin/env bash
# Tools of the compose tests: Debian's docker-compose (v1, a Python program that parses and
# validates docker-compose.yml without a Docker engine) and Caddy (the compose proxy, run for
# real in front of `moderation serve` by tests/integration/test_compose_proxy.py).
set -euo pipefail
missing=()
command -v docker-compose >/dev/null 2>&1 || missing+=(docker-compose)
command -v caddy >/dev/null 2>&1 || missing+=(caddy)
if [ "${#missing[@]}" -gt 0 ]; then
  echo "installing ${missing[*]} for the compose tests"
  if [ "$(id -u)" -eq 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi
