#!/usr/bin/env bash
# The compose test validates docker-compose.yml with Debian's docker-compose (v1, a Python
# program that parses and checks the file without a Docker engine).
set -euo pipefail
if ! command -v docker-compose >/dev/null 2>&1; then
  echo "installing Debian's docker-compose for the compose file test"
  if [ "$(id -u)" -eq 0 ]; then SUDO=""; else SUDO="sudo"; fi
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq docker-compose >/dev/null
fi
