#!/usr/bin/env bash
# One prepared run on a lent GPU machine: GPU tests, then the hook benchmark on CUDA and CPU.
# Uses the machine's own torch/Lightning (no install): the package is imported from the checkout.
set -uo pipefail
export PYTHONPATH="$PWD:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/gpu_out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, pytorch_lightning as pl; print('torch', torch.__version__, 'lightning', pl.__version__)" | tee -a "$OUT/gpu.txt"
python3 -m pytest tests/test_gpu.py tests/test_functional.py tests/test_nan_policies.py -q -p no:cacheprovider \
    -o addopts="" 2>&1 | tail -25 | tee "$OUT/gpu_tests.txt"
python3 benchmarks/bench_hook.py --device cuda --json "$OUT/bench_cuda_100.json" 2>&1 | grep -v -i "tip\|available\|stopped" | tee "$OUT/bench.txt"
python3 benchmarks/bench_hook.py --device cuda --layers 100 --width 1024 --json "$OUT/bench_cuda_200.json" 2>&1 | grep -v -i "tip\|available\|stopped" | tee -a "$OUT/bench.txt"
