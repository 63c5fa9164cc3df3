#!/usr/bin/env bash
# The CUDA checks, as one script for a CUDA machine (its own python3 and torch; no install step):
#   bash benchmarks/gpu_check.sh [OUTDIR]
# CUDA tests, then the per-op, crossover and end-to-end speed tables (random weights in SmolLM2-135M's
# shapes: the GGUF file is not needed). Each step has its own time limit; logs go to OUTDIR.
out=${1:-${OUT:-/tmp/qcal_gpu}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
py=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/device.txt"
$py -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)" \
  | tee -a "$out/device.txt"
timeout 200 $py -m pytest -q -p no:cacheprovider tests/test_cuda.py tests/test_kernels.py -k "cuda" 2>&1 \
  | tee "$out/pytest_cuda.log" | tail -25
timeout 60 $py benchmarks/bench_kernels.py --device cuda 2>&1 | tee "$out/bench_kernels_cuda.log"
timeout 90 $py benchmarks/bench_kernels.py --device cuda --crossover --m 1,32,256,512,2048 \
  --schemes int8wo,int4wo-64,8da4w-64 2>&1 | tee "$out/crossover_cuda.log"
timeout 60 $py benchmarks/bench_e2e_speed.py --device cuda --random-weights --rounds 3 --decode 32 2>&1 \
  | tee "$out/e2e_cuda.log"
timeout 240 $py benchmarks/bench_e2e_speed.py --device cuda --random-weights --rounds 3 --decode 32 \
  --schemes bf16,int4wo-64 --compile --compile-mode reduce-overhead 2>&1 | tee "$out/e2e_cuda_compile.log"
