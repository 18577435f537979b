#!/usr/bin/env bash
# The GPU half of the throughput benchmark, as one command for a lent GPU machine (an H100 or
# H200 here; it has python3 with CUDA torch and transformers, and no network):
#
#     bash bench/gpu_check.sh [OUTDIR]        # OUTDIR defaults to $OUT (the device tool's), else results/
#
# It records the card, then runs bench/throughput.py --device cuda: generate() on the GPU against
# the runner at pipeline_size 1, and pipeline_size 2 with both ranks on the one GPU (gloo through
# host memory: NCCL cannot pair two ranks on one device), batch 1/2/8/32, one round, with the
# weight bandwidth achieved at batch 1. Budget: about 6-8 minutes on an H100, most of it model
# loads (15 rank processes) and the 0.9B model's creation. Its exit status is the benchmark's.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-results}}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.memory,clocks.max.sm --format=csv \
    | tee "$out/gpu.txt"
python3 -c "import torch, transformers, accelerate; print('torch', torch.__version__, 'cuda', torch.version.cuda,
'transformers', transformers.__version__, 'accelerate', accelerate.__version__)" | tee -a "$out/gpu.txt"
PYTHONUNBUFFERED=1 python3 bench/throughput.py --device cuda --prompts 16 --tokens 64 --rounds 1 \
    --wait-quiet 2 --retries 0 --workdir /tmp/pipeinfer-bench-gpu --json "$out/throughput_gpu.json" 2>&1 \
    | grep -v "it/s]" | tee "$out/throughput_gpu.log"
