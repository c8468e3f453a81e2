#!/usr/bin/env bash
# Run one cache server and one compute server on this machine, on fixed ports, until Ctrl-C.
#   deploy/local/run.sh [MODEL] [STORE_DIR]
# then: contiguouskv register --server 127.0.0.1:${CKV_COMPUTE_PORT:-50052} --file doc.txt
set -euo pipefail
MODEL=${1:-qwen2.5-coder-0.5b-instruct}
STORE=${2:-${TMPDIR:-/tmp}/contiguouskv-store}
CACHE_PORT=${CKV_CACHE_PORT:-50051}
COMPUTE_PORT=${CKV_COMPUTE_PORT:-50052}
mkdir -p "$STORE"
contiguouskv serve cache --root "$STORE" --host 127.0.0.1 --port "$CACHE_PORT" &
cache_pid=$!
trap 'kill -TERM $cache_pid 2>/dev/null; wait $cache_pid 2>/dev/null' EXIT
contiguouskv serve compute --model "$MODEL" --cache "127.0.0.1:$CACHE_PORT" --host 127.0.0.1 --port "$COMPUTE_PORT"
