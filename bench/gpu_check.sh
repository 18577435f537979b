#!/usr/bin/env bash
# The GPU half of the throughput benchmark, as one command for a lent GPU machine (an H100 or
# H200 here: python3 with CUDA torch and transformers, no network):
#
#     bash bench/gpu_check.sh [OUTDIR]        # OUTDIR defaults to $OUT (the device tool's), else results/
#
# It checks the software first (a failure costs seconds, not minutes), records the card, then runs
# bench/throughput.py --device cuda: generate() on the GPU against the runner at pipeline_size 1,
# and pipeline_size 2 with both ranks on the one GPU (gloo through host memory: NCCL cannot pair
# two ranks on one device), batch 1/2/8/32 over 32 prompts x 32 new tokens, one round, with the
# weight bandwidth achieved at batch 1. 20 rank processes load the 0.96B model; the whole run is
# expected to take 5-8 minutes (not yet timed on a GPU) and is cut at 9. throughput_gpu.json is
# rewritten after every cell, so a cut run still returns what it measured. Its exit status is the
# benchmark's (124 when cut).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-results}}
mkdir -p "$out"
command -v taskset >/dev/null || { echo "error: taskset (util-linux) is missing: the benchmark pins ranks with it"; exit 2; }
python3 - <<'PY' 2>&1 | tee "$out/gpu.txt" || exit 2
import importlib.util, sys
missing = [m for m in ("torch", "transformers", "accelerate", "safetensors", "tokenizers", "tqdm")
           if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"error: missing Python packages {missing}: carry them as wheels (see the device README)")
import accelerate, torch, transformers
from packaging.version import Version
print("torch", torch.__version__, "cuda", torch.version.cuda, "transformers", transformers.__version__,
      "accelerate", accelerate.__version__)
if Version(transformers.__version__) < Version("4.57.1"):
    sys.exit(f"error: transformers {transformers.__version__} < 4.57.1 (requirements.txt): carry a newer wheel")
if not torch.cuda.is_available():
    sys.exit("error: torch sees no GPU")
p = torch.cuda.get_device_properties(0)
print("gpu", p.name, f"{p.total_memory / 2**30:.1f} GiB", f"{p.multi_processor_count} SMs",
      "bf16" if torch.cuda.is_bf16_supported() else "no bf16")
PY
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.memory,clocks.max.sm --format=csv \
    >> "$out/gpu.txt" 2>&1
PYTHONUNBUFFERED=1 timeout 540 python3 bench/throughput.py --device cuda --prompts 32 --tokens 32 --rounds 1 \
    --wait-quiet 0 --retries 0 --cell-timeout 150 --workdir /tmp/pipeinfer-bench-gpu \
    --json "$out/throughput_gpu.json" 2>&1 | grep --line-buffered -v "it/s]" | tee "$out/throughput_gpu.log"
