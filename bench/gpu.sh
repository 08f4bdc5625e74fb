#!/usr/bin/env bash
# The GPU checks of the runner, for a session that has a CUDA device (issue 4). From the repo root,
# after ./setup.sh test:
#   bash bench/gpu.sh [WORK_DIR]
# 1. the CUDA tests (pytest -m gpu: runner on cuda vs cpu, expert cache on cuda with mmap and O_DIRECT,
#    dequantization on cuda bit-identical to gguf's, verify --device cuda --io direct with a small budget);
# 2. bench/bench_decode.py --gpu on the slice checkpoint's q4_0-native relayout: H2D GB/s of pinned
#    buffer -> device copies (peak and at one expert record's size), decode tok/s with every expert a
#    miss and with every expert cached, each as a fraction of the PCIe / HBM roofline.
# Without CUDA the tests skip and the bench says so; the script still exits 0.
# If torch is a CPU-only build (torch.version.cuda is None) the script says so: GPU checks need a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}  # the device machine: PY=python3 with k2conv installed (bench/gpu_device.sh)
WORK=${1:-${TMPDIR:-/tmp}/k2conv-bench-gpu}
"$PY" - <<'PYEOF'
import torch
ok = torch.cuda.is_available()
print(f"torch {torch.__version__}, CUDA {torch.version.cuda}, device: {torch.cuda.get_device_name(0) if ok else 'none'}")
if not ok and torch.version.cuda is None:
    print("warning: this torch is a CPU-only build; the GPU tests will skip and the bench will not run")
PYEOF
"$PY" -m pytest -q -m gpu tests/test_expert_cache.py tests/test_infer.py tests/test_infer_dequant.py \
  tests/test_verify_cli.py
"$PY" bench/bench_decode.py --gpu --work "$WORK" --tokens 16 --prompt-len 32
