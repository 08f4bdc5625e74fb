#!/usr/bin/env bash
# bench/gpu.sh on the lent GPU machine (python3 there holds CUDA torch, numpy, numba, safetensors, click,
# tqdm; nothing can be fetched). Wheels built/downloaded here travel in .whl (git-ignored):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 ... -d .whl gguf zstandard crc32c
#   .venv/bin/pip wheel --no-deps --no-build-isolation -w .whl .
# then, through the device tool, with carry [".whl"]:  bash bench/gpu_device.sh
# PYTHONSAFEPATH keeps the repo root off sys.path, so `import k2conv` is the installed wheel (whose
# k2conv.convert etc. map the root's stage folders) in this process and every subprocess.
set -uo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site PYTHONSAFEPATH=1 PYTHONUNBUFFERED=1 PY=python3
nvidia-smi --query-gpu=name,pcie.link.gen.current,pcie.link.width.current,memory.total --format=csv || true
nproc; df -h /tmp | tail -1
LOG=${OUT:-/tmp}/gpu.log
timeout "${GPU_TIMEOUT:-500}" bash bench/gpu.sh /tmp/k2conv-bench-gpu 2>&1 | tee "$LOG"
