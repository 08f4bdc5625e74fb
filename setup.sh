#!/usr/bin/env bash
# Create .venv and install k2conv into it (idempotent).
#   ./setup.sh        runtime + runner (torch, CPU build)
#   ./setup.sh test   also the test oracles (transformers, compressed-tensors, llama-cpp-python)
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch first and pinned: a plain `torch` requirement would pull a multi-GB CUDA build.
.venv/bin/python -m pip install -q "torch==2.13.0"
extras="runner"
[ "${1:-}" = "test" ] && extras="runner,test"
CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-2} .venv/bin/python -m pip install -q -e ".[$extras]"
