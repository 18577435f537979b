#!/usr/bin/env bash
# The GPU check, as one command for a lent GPU machine (python3 with CUDA torch and transformers,
# no network):
#
#     bash bench/gpu_check.sh [OUTDIR]        # OUTDIR defaults to $OUT (the device tool's), else results/
#
# 1. software check (seconds; on a machine without a GPU it stops here with one line, exit 2);
# 2. smoke cell: the runner at pipeline_size 1 and 2, batch 2, 4 tokens, against generate(); the
#    first failure or difference stops the check (exit 1), before minutes go into the benchmark;
# 3. float16 cell (the T4 path, forced): the runner's non-finite logits check is on, as always;
#    agreement with generate() in float16 is recorded in float16.json;
# 3b. compiled cell: the runner at pipeline_size 1 with compile=false, true, then "cudagraphs" (load/compiled.py), float32,
#    batch 1 and 8, against generate() (a difference fails the cell); the stage records hold the compile time;
# 3c. continuous cell (bench/continuous.py, quick form): the rows schedule against micro_batches on 32
#    prompts of long-tailed lengths, pipeline_size 1 and 2, batch 8; the schedules' greedy tokens must agree
#    (--before none: this copy of the tree may have no git history), and the rows schedule with each visit's
#    prefills in forwards of their own against packed into the decode forward (load/packed.py, the CUDA path of
#    packed prefill: --compile false, since a compiled stage runs its prefills apart), and at pipeline_size 2 each
#    joiner's prefill whole in the visit that admits it against spread over both micro-batches' visits
#    (spread_prefill; run/rows.py: on a GPU a short prompt's prefill costs little beside a decode visit, so
#    whether spreading it pays is what this cell measures); then its stall workload at
#    pipeline_size 1: 440-token prompts joining rows that decode, whole prefill against prefill_chunk_size 64;
# 4. the benchmark (bench/throughput.py --device cuda; compile "auto", which is on for CUDA): generate()
#    against the runner at pipeline_size 1 and 2 (both ranks on the one GPU: gloo through host memory), batch 1/2/8/32
#    over 32 prompts x 32 new tokens, with the weight bandwidth at batch 1 against a measured copy.
# 5. offload cell (bench/offload.py --device cuda --quick): the runner with half its layers streamed
#    from pinned host memory (side CUDA stream) and from disk, against accelerate's CPU offload and the
#    all-resident runner, and the streaming rate against a measured pinned host-to-device copy.
# 6. quantized cell, when bitsandbytes is installed: the runner at pipeline_size 2 with int8 and nf4
#    in float16 against generate() on the whole model quantized the same way (bench/quantization.py).
# The models (0.96B parameters, TinyLlama's shape) are made on the GPU, not on the CPU first.
# Everything is cut to finish within 9 minutes (DEADLINE_S); each JSON is rewritten after every
# cell, so a cut run still returns what it measured. Exit status: the first failing step's.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-results}}
DEADLINE_S=${DEADLINE_S:-530}
work=/tmp/pipeinfer-bench-gpu
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
mkdir -p "$out"
command -v taskset >/dev/null || { echo "error: taskset (util-linux) is missing: the benchmark pins ranks with it"; exit 2; }
python3 - <<'PY' 2>&1 | tee "$out/gpu.txt" || exit 2
import importlib.util, sys
missing = [m for m in ("torch", "transformers", "accelerate", "safetensors", "tokenizers", "tqdm", "packaging")
           if importlib.util.find_spec(m) is None]
if missing:
    sys.exit(f"error: missing Python packages {missing}: carry them as wheels (see the device README)")
import accelerate, torch, transformers
from packaging.version import Version
if Version(transformers.__version__) < Version("4.57.1"):
    sys.exit(f"error: transformers {transformers.__version__} < 4.57.1 (requirements.txt): carry a newer wheel")
if Version(torch.__version__.split("+")[0]) < Version("2.4"):
    sys.exit(f"error: torch {torch.__version__} < 2.4 (requirements.txt): carry a newer wheel")
if not torch.cuda.is_available():
    sys.exit(f"error: torch {torch.__version__} sees no GPU: run this on the GPU machine (a CPU run stops here)")
sys.path.insert(0, ".")
from pipeinfer.run.runtime import native_bf16, resolve_dtype
dev = torch.device("cuda", 0)
p = torch.cuda.get_device_properties(dev)
print("torch", torch.__version__, "cuda", torch.version.cuda, "transformers", transformers.__version__,
      "accelerate", accelerate.__version__)
print("gpu", p.name, f"{p.total_memory / 2**30:.1f} GiB", f"{p.multi_processor_count} SMs",
      "capability %d.%d" % torch.cuda.get_device_capability(dev),
      "bf16" if native_bf16(dev) else "no native bf16", "auto dtype", resolve_dtype("auto", dev))
PY
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.memory,clocks.max.sm --format=csv \
    >> "$out/gpu.txt" 2>&1

bench() {  # bench NAME SECONDS ARGS...: one throughput.py run, cut after SECONDS, its log in OUTDIR
    local name=$1 limit=$2; shift 2
    (( limit > 0 )) || { echo "skipped $name: no time left"; return 124; }
    echo "+ [$name, ${limit}s] python3 bench/throughput.py --device cuda $*"
    timeout "$limit" python3 bench/throughput.py --device cuda --rounds 1 --wait-quiet 0 --retries 0 \
        --workdir "$work" --json "$out/$name.json" "$@" 2>&1 | grep --line-buffered -v "it/s]" | tee "$out/$name.log"
}
bench smoke 120 --only pp1,pp2_naive --batch-sizes 2 --prompts 4 --tokens 4 --fail-fast --cell-timeout 60 \
    || { echo "error: the smoke cell failed (see $out/smoke.log): the benchmark would not count"; exit 1; }
bench float16 $(( DEADLINE_S - SECONDS < 100 ? DEADLINE_S - SECONDS : 100 )) --dtype float16 --only pp1 \
    --batch-sizes 8 --prompts 8 --tokens 16 --cell-timeout 60
f16=$?
crc=0
for c in false true cudagraphs; do  # compile off, on, on with CUDA graphs: tokens/s side by side, outputs against generate()
    bench compiled_$c 60 --only pp1 --dtype float32 --batch-sizes 1,8 --prompts 8 --tokens 32 --compile $c \
        --fail-fast --cell-timeout 50 || crc=$?
done
echo "+ python3 bench/continuous.py --device cuda --prompts 32 --batch-sizes 8 --before none --compile false"
# SIGINT, not SIGTERM, at the cut: the script's own cleanup then stops the cell's rank processes
timeout -s INT 150 python3 bench/continuous.py --device cuda --prompts 32 --batch-sizes 8 --before none --compile false \
    --workdir "$work/continuous" --json "$out/continuous_gpu.json" 2>&1 | grep --line-buffered -v "it/s]" \
    | tee "$out/continuous_gpu.log"
brc=${PIPESTATUS[0]}
echo "+ python3 bench/continuous.py --device cuda --workload stall --pipeline-sizes 1 --compile false"
timeout -s INT 60 python3 bench/continuous.py --device cuda --workload stall --pipeline-sizes 1 --compile false \
    --workdir "$work/continuous" --json "$out/stall_gpu.json" 2>&1 | grep --line-buffered -v "it/s]" \
    | tee "$out/stall_gpu.log"
src=${PIPESTATUS[0]}
brc=$(( brc ? brc : src ))
QUANT_S=${QUANT_S:-90}  # kept back for the quantized cell
OFFLOAD_S=${OFFLOAD_S:-120}  # and for the offload cell
bench throughput_gpu $(( DEADLINE_S - SECONDS - QUANT_S - OFFLOAD_S )) --prompts 32 --tokens 32 --cell-timeout 120
rc=$?
echo "+ python3 bench/offload.py --device cuda --quick"
timeout $(( DEADLINE_S - SECONDS - QUANT_S > 10 ? DEADLINE_S - SECONDS - QUANT_S : 10 )) python3 bench/offload.py \
    --device cuda --quick --workdir "$work" --json "$out/offload_gpu.json" 2>&1 | grep --line-buffered -v "it/s]" \
    | tee "$out/offload_gpu.log"
orc=${PIPESTATUS[0]}
qrc=0
if python3 -c "import bitsandbytes" 2>/dev/null; then
    echo "+ python3 bench/quantization.py --equivalence cuda"
    timeout $(( DEADLINE_S - SECONDS > 10 ? DEADLINE_S - SECONDS : 10 )) python3 bench/quantization.py \
        --equivalence cuda --json "$out/quantization_gpu.json" 2>&1 | tee "$out/quantization_gpu.log"
    qrc=${PIPESTATUS[0]}
else
    echo "skipped the quantized cell: bitsandbytes is not installed (carry its wheel)" | tee "$out/quantization_gpu.log"
fi
echo "done in ${SECONDS}s: float16 cell exit $f16, compiled cell exit $crc, continuous cell exit $brc, benchmark exit $rc, offload cell exit $orc, quantized cell exit $qrc"
exit $(( rc ? rc : (f16 ? f16 : (crc ? crc : (brc ? brc : (orc ? orc : qrc)))) ))
