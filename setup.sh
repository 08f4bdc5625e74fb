#!/usr/bin/env bash
# Create .venv and install k2conv into it (idempotent).
#   ./setup.sh        runtime + runner (torch, CPU build)
#   ./setup.sh test   also the test oracles (transformers, compressed-tensors, llama-cpp-python,
#                     and llama.cpp's own source tree from the llama-cpp-python sdist)
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
if [ "${1:-}" = "test" ] && [ ! -f .venv/llama.cpp-src/convert_hf_to_gguf.py ]; then
  # llama.cpp's converter is an oracle for the mmproj writer; take it from the same release.
  tmp=$(mktemp -d)
  .venv/bin/python -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==0.3.36" -d "$tmp"
  tar -xzf "$tmp"/llama_cpp_python-*.tar.gz -C "$tmp"
  rm -rf .venv/llama.cpp-src
  mv "$tmp"/llama_cpp_python-*/vendor/llama.cpp .venv/llama.cpp-src
  rm -rf "$tmp"
fi
# Compile the numba quantizers once here (cached in quant/__pycache__), not in the first run.
.venv/bin/python -c "import k2conv.quant.kquants"
