#!/usr/bin/env bash
# The whole test suite on a fresh machine: installs into .venv, then runs pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/bootstrap.sh
. .venv/bin/activate
python -m pytest "$@"
