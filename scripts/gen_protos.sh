#!/usr/bin/env bash
# Regenerates the Python stubs of proto/contiguouskv/v1/*.proto in place (next to the .proto files,
# importable as contiguouskv.v1). Tools are pinned in pyproject.toml's `dev` extra.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m grpc_tools.protoc -I proto \
  --python_out=proto --grpc_python_out=proto \
  --mypy_out=proto --mypy_grpc_out=proto \
  proto/contiguouskv/v1/cache.proto proto/contiguouskv/v1/compute.proto
