#!/usr/bin/env bash
# Regenerates the Python stubs of proto/contiguouskv/v1/*.proto in place (next to the .proto files,
# importable as contiguouskv.v1), or under OUT_DIR when given. Tools are pinned in pyproject.toml's
# `dev` extra; tests/test_wire_contract.py fails when the committed stubs differ from a fresh run.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-proto}
mkdir -p "$OUT"
python -m grpc_tools.protoc -I proto \
  --python_out="$OUT" --grpc_python_out="$OUT" \
  --mypy_out="$OUT" --mypy_grpc_out="$OUT" \
  proto/contiguouskv/v1/cache.proto proto/contiguouskv/v1/compute.proto
