"""Does each rank hold only its own stage? Peak resident memory per rank against its parameter bytes.

    python bench/memory.py [--model models/bench-llama-500m] [--json results/memory.json]

Builds (once) a ~500 MB bfloat16 Llama-style model with pipeinfer.demo.make_model, then starts,
at the same time, four real processes:
  - "bare": python + `import torch, transformers, accelerate`, nothing else. transformers imports
    lazily, so this leaves out the code that building any model pulls in (modeling_utils,
    generation, the Llama classes: about 90 MiB);
  - "runtime": the bare imports plus that code (AutoModelForCausalLM, LlamaForCausalLM) and
    pipeinfer: everything a rank holds before it touches a weight. The target is measured from it;
  - rank 0 and rank 1 of a 2-stage pipeline: each runs partition_model() (the loader the runner
    uses) and one prefill forward of its stage on a (2, 64) batch, then reports.
Peak resident memory is the kernel's high-water mark for the process (VmHWM, = ru_maxrss), which
includes file pages of the memory-mapped safetensors once they are touched. The target from issue 3:

    peak(rank) <= (param_bytes(rank) + peak(runtime)) * 1.10

No process group is needed: loading is rank-local, so the ranks are started without one.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# 22 layers x 11.3 M parameters + embeddings, about 248 M parameters: 497 MB in bfloat16.
MODEL = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=22, num_attention_heads=16,
             num_key_value_heads=4, max_position_embeddings=1024)
PREFILL = (2, 64)  # (B, T) of the forward each rank runs after loading


def _status_bytes(field: str) -> int:
    """A kB field of /proc/self/status, in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def peak_rss() -> int:
    """The process's resident high-water mark in bytes (VmHWM)."""
    return _status_bytes("VmHWM")


def current_rss() -> int:
    return _status_bytes("VmRSS")


def runtime_worker(role: str) -> dict:
    import accelerate  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401

    if role == "runtime":
        from transformers import AutoModelForCausalLM, LlamaForCausalLM  # noqa: F401

        import pipeinfer.stage  # noqa: F401
    return {"role": role, "peak_rss": peak_rss()}


def rank_worker(model: str, rank: int, size: int, dtype_name: str) -> dict:
    import torch

    import accelerate  # noqa: F401
    import transformers  # noqa: F401
    from pipeinfer.partition import StagePlan
    from pipeinfer.runtime import setup_logging
    from pipeinfer.stage import partition_model

    setup_logging(rank)
    torch.set_num_threads(1)
    dtype = getattr(torch, dtype_name)
    before = peak_rss()
    t0 = time.perf_counter()
    stage, info = partition_model(model, StagePlan(rank, size, range(0)), torch.device("cpu"), dtype,
                                  os.path.join(model, f".offload-rank{rank}"))
    load_s = time.perf_counter() - t0
    after_load = peak_rss()
    B, T = PREFILL
    if stage.plan.is_first:
        x = torch.randint(0, 256, (B, T))  # (B, T)
    else:
        x = torch.randn(B, T, stage.config.hidden_size, dtype=dtype)  # (B, T, H)
    pos = torch.arange(T).expand(B, T)
    stage(x, None, pos, stage.new_cache())
    return {"role": f"rank{rank}", "layers": [info.layer_ranges[rank].start, info.layer_ranges[rank].stop - 1],
            "param_bytes": info.param_bytes, "peak_rss_before_load": before, "peak_rss_after_load": after_load,
            "peak_rss": peak_rss(), "rss_end": current_rss(), "load_s": round(load_s, 2)}


def spawn(*args: str) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    return subprocess.Popen([sys.executable, os.path.abspath(__file__), "--worker", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def collect(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate(timeout=900)
    if proc.returncode != 0:
        raise SystemExit(f"worker {proc.args[3:]} failed:\n{err[-3000:]}")
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=os.path.join(ROOT, "models", "bench-llama-500m"))
    ap.add_argument("--dtype", default="bfloat16", help="the dtype the ranks load in (the checkpoint is bf16)")
    ap.add_argument("--json", default=os.path.join(ROOT, "results", "memory.json"))
    ap.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        role, *rest = args.worker
        rec = rank_worker(rest[0], int(role), 2, rest[1]) if role.isdigit() else runtime_worker(role)
        print(json.dumps(rec))
        return

    if not os.path.exists(os.path.join(args.model, "config.json")):
        from pipeinfer.demo import make_model

        print(f"building {args.model} ...", flush=True)
        make_model(args.model, seed=0, dtype="bfloat16", **MODEL)
    file_bytes = sum(os.path.getsize(os.path.join(args.model, n)) for n in os.listdir(args.model)
                     if n.endswith(".safetensors"))
    procs = [spawn("bare"), spawn("runtime"), spawn("0", args.model, args.dtype), spawn("1", args.model, args.dtype)]
    bare, runtime, *ranks = [collect(p) for p in procs]

    import torch
    import transformers

    base = runtime["peak_rss"]
    mib = 2**20
    print(f"checkpoint {args.model}: {file_bytes / mib:.0f} MiB of safetensors; ranks load {args.dtype}; "
          f"torch {torch.__version__}, transformers {transformers.__version__}")
    print(f"bare imports (python + torch + transformers + accelerate): peak {bare['peak_rss'] / mib:.0f} MiB; "
          f"runtime (+ model code and pipeinfer, no weights): peak {base / mib:.0f} MiB")
    print("| rank | layers | stage params (MiB) | peak RSS (MiB) | target: (params + runtime) x 1.1 (MiB) | "
          "peak / (params + runtime) | met |")
    print("|---|---|---|---|---|---|---|")
    for r in ranks:
        limit = (r["param_bytes"] + base) * 1.10
        r["target_bytes"], r["ratio"], r["met"] = int(limit), r["peak_rss"] / (r["param_bytes"] + base), \
            r["peak_rss"] <= limit
        print(f"| {r['role'][4:]} | {r['layers'][0]}..{r['layers'][1]} | {r['param_bytes'] / mib:.0f} | "
              f"{r['peak_rss'] / mib:.0f} | {limit / mib:.0f} | {r['ratio']:.3f} | {'yes' if r['met'] else 'NO'} |")
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"model": args.model, "checkpoint_bytes": file_bytes, "dtype": args.dtype, "prefill": PREFILL,
                   "torch": torch.__version__, "transformers": transformers.__version__,
                   "bare": bare, "runtime": runtime, "ranks": ranks}, f, indent=2)
    print(f"-> {args.json}")


if __name__ == "__main__":
    main()
