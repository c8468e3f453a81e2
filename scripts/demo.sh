#!/usr/bin/env bash
# The main job on a fresh machine: installs into .venv, then runs `contiguouskv demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
. .venv/bin/activate
contiguouskv demo "$@"
