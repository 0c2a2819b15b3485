#!/usr/bin/env bash
# Trainer speed on one GPU, as one short script (about 5 minutes on an H100/H200, most of it compiling):
#   1. MFU of the ~350M model (preset 350m) in bf16, compiled per block, FlashAttention-backed SDPA, AR and DLM
#      (target >= 50% on H100/H200), with ours vs transformers' Llama at a 110m shape, eager and compiled;
#   2. the DLM/AR step cost at seq 256 and 2048 with the attention share explained.
# JSON results under OUT; the summary lines on stdout.
#
#   benchmarks/bench_gpu.sh [OUT]        (default OUT: /tmp/bench-gpu)
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-/tmp/bench-gpu}
PY=${PY:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'bench_gpu.sh: no CUDA device')"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv,noheader || true
start=$(date +%s)
# 110m shape (12 x 768, vocab 32768) at seq 2048, batch 8: ours vs Llama, then the 350m MFU (batch 8 x 2048).
"$PY" benchmarks/bench_model.py --device cuda --dtype bf16 --n-layer 12 --d-model 768 --n-head 12 --d-ff 2048 \
  --vocab 32768 --seq-len 2048 --batch 8 --rounds 10 --warmup 3 --mfu-preset 350m --mfu-seq-len 2048 \
  --mfu-batch 8 --mfu-rounds 10 --out "$OUT/bench_model.json" | tail -n 4
"$PY" benchmarks/bench_dlm_ar.py --device cuda --dtype bf16 --compile --n-layer 12 --d-model 768 --n-head 12 \
  --d-ff 2048 --vocab 32768 --tokens 16384 --rounds 10 --warmup 3 --out "$OUT/bench_dlm_ar.json" | tail -n 2
echo "bench_gpu.sh: $(( $(date +%s) - start )) s; results in $OUT"
