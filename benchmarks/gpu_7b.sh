#!/usr/bin/env bash
# Llama-2-7B shapes on a CUDA GPU, random weights, as one script (about 8 minutes; its own python3 and torch):
#   bash benchmarks/gpu_7b.sh [OUTDIR]
# 1. streamed GPTQ int4 g128 of a 2-block checkpoint with 7B's shapes, blocks quantized on the GPU, 128 x 2048
#    calibration tokens: seconds per block and peak GPU memory;
# 2. per-op decode (M = 1) and prefill GEMMs of 7B's linear shapes, bf16 against int4wo-128 and int8wo;
# 3. end-to-end decode of the whole 32-block model, eager and torch.compile'd with CUDA graphs (reduce-overhead).
out=${1:-${OUT:-/tmp/qcal_gpu_7b}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
py=${PYTHON:-python3}
ckpt=${CKPT:-/tmp/qcal_llama2_7b_2blocks}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/device.txt"
[ -d "$ckpt" ] || timeout 240 $py benchmarks/bench_streamed.py make --out "$ckpt" --shape llama2-7b --layers 2 \
  2>&1 | tee "$out/make.log"
rm -rf "$ckpt-gptq"
timeout 300 $py benchmarks/bench_streamed.py run --src "$ckpt" --out "$ckpt-gptq" --scheme gptq-int4-128-actorder \
  --calib-samples 128 --seqlen 2048 --batch-size 8 --device cuda 2>&1 | tee "$out/gptq_7b_cuda.log" | tail -12
timeout 90 $py benchmarks/bench_kernels.py --device cuda --shapes llama2-7b --m 1,16,2048 \
  --schemes int4wo-128,int8wo 2>&1 | tee "$out/kernels_7b_cuda.log"
timeout 420 $py benchmarks/bench_e2e_speed.py --device cuda --llama2-7b 32 --schemes bf16,int4wo-128,int8wo \
  --prefill 512 --decode 64 --rounds 3 --compile --compile-mode reduce-overhead 2>&1 \
  | tee "$out/e2e_7b_cuda.log" | tail -12
