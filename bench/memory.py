"""Does each rank hold only its own stage? Peak resident memory per rank against its parameter bytes.

    python bench/memory.py [--model models/bench-llama-500m] [--json results/memory.json]

Builds (once) a ~500 MB bfloat16 Llama-style model with pipeinfer.tiny_models.make_model, then starts,
at the same time, four real processes:
  - "bare": python + `import torch, transformers, accelerate`, nothing else. transformers imports
    lazily, so this leaves out the code that building any model pulls in (modeling_utils,
    generation, the Llama classes: about 90 MiB);
  - "runtime": the bare imports plus that code (AutoModelForCausalLM, LlamaForCausalLM) and
    pipeinfer: everything a rank holds before it touches a weight. The target is measured from it;
  - rank 0 and rank 1 of a 2-stage pipeline: each plans (pipeinfer.plan) and loads its stage as the
    runner does (stage.load_stage: only its own tensors, converted as they are read), runs one prefill
    forward on a (2, 64) batch, then reports. The checkpoint's pages are dropped from the page cache
    first, so /proc/self/io read_bytes is what each rank read of the checkpoint.
Peak resident memory is the kernel's high-water mark for the process (VmHWM, = ru_maxrss), which
includes file pages of the memory-mapped safetensors once they are touched. The target from issue 3:

    peak(rank) <= (param_bytes(rank) + peak(runtime)) * 1.10

and, with --quantization (default none,int8,nf4), the same pair of ranks again per method, each rank
quantizing its own layers as it loads them (quantization.py), against its planned quantized bytes
(which must equal what it holds) and a runtime that also imports bitsandbytes: target x 1.15. With
--prequantized (default nf4) the pair once more on that checkpoint saved quantized by transformers
(built once beside --model): read_bytes shows each rank reading its own share of the stored file.

No process group is needed: loading is rank-local, so the ranks are started without one.

    python bench/memory.py --check-plan     # planned total against measured peak, three configurations

checks the planner (pipeinfer/plan/make.py) against reality on CPU: each rank of each configuration
loads its stage and runs its share of a whole generation (prefill of every micro-batch slot, decode
to max_new_tokens) alone, in float32; its peak RSS over the runtime baseline is compared with the
plan's total. The baseline is the same worker on a model of the same family with almost no weights
(hidden 32, 2 layers), less that model's own planned total: the interpreter, the imports and what a
first forward allocates once.

    python bench/memory.py --check-scoring   # prompt_logprobs: what it adds to the last stage, planned and measured
    python bench/memory.py --check-runner    # the runner's 2 ranks: peak over the runtime against the plan

--check-runner runs run_distributed_inference.py itself (2 ranks on CPU, a 32k-vocabulary model
and a near-weightless one for the runtime baseline) with 8 and then 120 prompts: each rank's peak
over the runtime against its planned total, and how much the peak grew with the prompts.
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

    if role.startswith("runtime"):
        from transformers import AutoModelForCausalLM, LlamaForCausalLM  # noqa: F401

        import pipeinfer.load.stage  # noqa: F401
    if role == "runtime-bnb":  # what a quantized rank imports besides
        import bitsandbytes  # noqa: F401
    return {"role": role, "peak_rss": peak_rss()}


def read_bytes() -> int:
    """Bytes this process made the kernel read from storage (/proc/self/io read_bytes): with the
    checkpoint's pages dropped from the page cache first (drop_cache), the checkpoint bytes it read."""
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("read_bytes:"))


def drop_cache(path: str) -> None:
    """Evict the file's clean pages from the page cache (POSIX_FADV_DONTNEED; no root needed)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def _plan(model: str, size: int, dtype_name: str, batch_size: int, prompt: int, new_tokens: int,
          quantization: str = "none", **budgets):
    from pipeinfer.config import build_config
    from pipeinfer.plan.make import plan_for_run
    from pipeinfer.plan.model import read_model_config

    # These workers prefill each slot into its own cache, as the micro_batches schedule does; the rows
    # schedule's joiners' own caches are measured by --check-runner (the runner itself) and tests/test_plan.py.
    cfg = build_config(dict(model_path=model, prompts=["x"], pipeline_size=size, batch_size=batch_size,
                            max_new_tokens=new_tokens, quantization=quantization, schedule="micro_batches", **budgets))
    mc = read_model_config(model)
    return cfg, mc, plan_for_run(cfg, mc, prompt, dtype_name, "cpu")


def rank_worker(model: str, rank: int, size: int, dtype_name: str, quantization: str = "none") -> dict:
    import torch

    import accelerate  # noqa: F401
    import transformers  # noqa: F401
    from pipeinfer.run.runtime import steady_host_memory
    from pipeinfer.run.runtime import setup_logging
    from pipeinfer.load.stage import load_stage

    steady_host_memory()  # as the runner does
    setup_logging(rank)
    torch.set_num_threads(1)
    dtype = getattr(torch, dtype_name)
    B, T = PREFILL
    cfg, mc, plan = _plan(model, size, dtype_name, B, T, 1, quantization)
    before, io0 = peak_rss(), read_bytes()
    t0 = time.perf_counter()
    stage, info = load_stage(plan, rank, mc, torch.device("cpu"), dtype, os.path.join(model, f".offload-rank{rank}"))
    load_s = time.perf_counter() - t0
    after_load, io1 = peak_rss(), read_bytes()
    if stage.plan.is_first:
        x = torch.randint(0, 256, (B, T))  # (B, T)
    else:
        x = torch.randn(B, T, stage.config.hidden_size, dtype=dtype)  # (B, T, H)
    pos = torch.arange(T).expand(B, T)
    stage(x, None, pos, stage.new_cache())
    return {"role": f"rank{rank}", "quantization": quantization,
            "layers": [info.layer_ranges[rank].start, info.layer_ranges[rank].stop - 1],
            "param_bytes": info.param_bytes, "planned_weights": plan.ranks[rank].weights,
            "read_bytes": io1 - io0, "peak_rss_before_load": before, "peak_rss_after_load": after_load,
            "peak_rss": peak_rss(), "rss_end": current_rss(), "load_s": round(load_s, 2)}


def plan_worker(model: str, rank: int, size: int, batch_size: int, prompt: int, new_tokens: int,
                max_memory: int = 0, max_cpu_memory: int = -1, score_chunk: int = 0, dtype_name: str = "float32"
                ) -> dict:
    """Load rank `rank`'s stage as planned and run its share of a whole generation, alone: every
    micro-batch slot's prefill of `prompt` tokens, then new_tokens - 1 decode steps (the cache
    filled to capacity, as generate() fills it). Peak RSS and the plan's numbers for comparison.
    max_memory (0: none) and max_cpu_memory (-1: none): budgets, the same for every rank.
    score_chunk (0: none): prompt_logprobs with this prompt_logprobs_chunk, the last stage scoring
    each prefill as generation.py does (scoring.prompt_logprobs)."""
    import torch

    from pipeinfer.run.runtime import steady_host_memory
    from pipeinfer.load.stage import load_stage
    from pipeinfer.run.scoring import prompt_logprobs

    steady_host_memory()  # as the runner does
    torch.set_num_threads(1)
    budgets = {"max_memory": max_memory} if max_memory else {}
    if max_cpu_memory >= 0:
        budgets["max_cpu_memory"] = max_cpu_memory
    if score_chunk:
        budgets.update(prompt_logprobs=True, prompt_logprobs_chunk=score_chunk)
    dtype = getattr(torch, dtype_name)
    cfg, mc, plan = _plan(model, size, dtype_name, batch_size, prompt, new_tokens, **budgets)
    mine = plan.ranks[rank]
    stage, info = load_stage(plan, rank, mc, torch.device("cpu"), dtype, "unused")
    caches = []
    with torch.inference_mode():
        for b in plan.slots:
            cache = stage.new_cache(capacity=prompt + new_tokens)
            for step in range(new_tokens):
                t = prompt if step == 0 else 1
                ids = torch.randint(0, mc.vocab_size, (b, t))  # (B, T)
                x = ids if stage.plan.is_first else torch.randn(b, t, mc.hidden_size, dtype=dtype)  # or (B, T, H)
                start = 0 if step == 0 else prompt + step - 1
                scoring = bool(score_chunk) and step == 0 and stage.plan.is_last
                out = stage(x, None, torch.arange(start, start + t).expand(b, t), cache, all_positions=scoring)
                if scoring:
                    prompt_logprobs(stage.head, out, ids, score_chunk)
                del out
            caches.append(cache)  # every slot stays in flight to the end
    return {"role": f"rank{rank}", "param_bytes": info.param_bytes, "peak_rss": peak_rss(),
            "planned": {"weights": mine.weights, "kv_cache": mine.kv_cache, "transient": mine.transient,
                        "scoring": mine.scoring, "total": mine.total, "stream": mine.stream, "budget": mine.budget,
                        "cpu_budget": mine.cpu_budget, "host": mine.tier_bytes("host"), "disk": mine.tier_bytes("disk"),
                        "placement": {t: mine.tier(t) for t in ("device", "host", "disk")}},
            "offload": stage.streamer.record() if stage.streamer else None}


# (name, family config, pipeline_size, batch_size, prompt tokens, max_new_tokens): two families, pp 1 and 2,
# batch 1 and 8, a long prompt
PLAN_MODELS = {
    "llama": dict(model_type="llama", hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                  num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=2048),
    "gpt2": dict(model_type="gpt2", hidden_size=512, num_hidden_layers=8, num_attention_heads=8,
                 max_position_embeddings=2048),
}
PLAN_CASES = [("llama", 1, 1, 32, 16), ("llama", 2, 8, 512, 32), ("gpt2", 2, 8, 256, 64)]


def check_plan(root: str, cases=PLAN_CASES) -> list[dict]:
    """Each rank of each case: planned total against peak RSS over the runtime baseline."""
    from pipeinfer.models.tiny import make_model

    rows = []
    for name, size, batch, prompt, new in cases:
        conf = PLAN_MODELS[name]
        model = os.path.join(root, f"plan-{name}")
        tiny = os.path.join(root, f"plan-{name}-tiny")
        if not os.path.exists(os.path.join(model, "config.json")):
            make_model(model, seed=0, **conf)
        if not os.path.exists(os.path.join(tiny, "config.json")):
            make_model(tiny, seed=0, **dict(conf, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                            **({"intermediate_size": 64, "num_key_value_heads": 1}
                                               if "intermediate_size" in conf else {})))
        args = [str(v) for v in (size, batch, prompt, new)]
        procs = [spawn("plan", tiny, "0", *args)] + [spawn("plan", model, str(r), *args) for r in range(size)]
        base, *ranks = [collect(p) for p in procs]
        runtime = base["peak_rss"] - base["planned"]["total"]
        for r in ranks:
            measured = r["peak_rss"] - runtime
            rows.append({"case": f"{name} pp{size} batch {batch} prompt {prompt} + {new}", "rank": r["role"],
                         "param_bytes": r["param_bytes"], **{f"planned_{k}": v for k, v in r["planned"].items()},
                         "runtime": runtime, "peak_rss": r["peak_rss"], "measured": measured,
                         "ratio": r["planned"]["total"] / measured})
    return rows


# prompt_logprobs: a 32k vocabulary, so that scoring's (B, chunk, V) logits outweigh the layers' activations
SCORE_MODEL = dict(model_type="llama", hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, vocab_size=32000)
# (pipeline_size, batch_size, prompt tokens, prompt_logprobs_chunk, dtype): several chunks, and one chunk bounded
# by the prompt; float32 and bfloat16 (whose head output is converted to float32 chunk by chunk)
SCORE_CASES = [(1, 8, 512, 128, "float32"), (2, 4, 300, 512, "float32"), (1, 8, 512, 128, "bfloat16")]


def check_scoring(root: str, cases=SCORE_CASES) -> list[dict]:
    """The last stage of each case run with and without prompt_logprobs: the peak RSS it adds,
    measured, against what it adds to the planned total (scoring's peak beyond the layers')."""
    from pipeinfer.models.tiny import make_model

    model = os.path.join(root, "plan-llama-v32k")
    if not os.path.exists(os.path.join(model, "config.json")):
        make_model(model, seed=0, **SCORE_MODEL)
    rows = []
    for size, batch, prompt, chunk, dtype in cases:
        args = [model, str(size - 1), str(size), str(batch), str(prompt), "4", "0", "-1"]
        plain, scored = (collect(spawn("plan", *args, str(c), dtype)) for c in (0, chunk))
        planned = scored["planned"]["total"] - plain["planned"]["total"]
        measured = scored["peak_rss"] - plain["peak_rss"]
        rows.append({"case": f"pp{size} batch {batch} prompt {prompt} chunk {chunk} {dtype}",
                     "rank": scored["role"], "planned_scoring": scored["planned"]["scoring"],
                     "planned_transient": [plain["planned"]["transient"], scored["planned"]["transient"]],
                     "peak_rss": [plain["peak_rss"], scored["peak_rss"]], "planned": planned, "measured": measured,
                     "ratio": planned / measured})
    return rows


# (pipeline_size, batch_size, prompt tokens, max_new_tokens) on PLAN_MODELS["llama"] with 12 layers of 11 MiB
OFFLOAD_CASES = [(1, 1, 32, 16), (2, 2, 32, 16)]


def check_offload(root: str, cases=OFFLOAD_CASES) -> list[dict]:
    """Each rank of each case run twice, every layer resident and then with budgets that leave each
    stage room for half its layers (max_memory = the resident plan's total less half the layer
    bytes and a quarter layer, max_cpu_memory = one and a half layers: one layer in host memory, the
    rest on disk).
    The bound: peak RSS over the runtime baseline within max_memory (which holds the stream
    buffers) plus the host tier's bytes (on CPU, host memory is the same process's), up to the
    plan's own accuracy (10%: the transient estimate, tests/test_plan.py); and the memory saved
    against all-resident, measured, against what the plan says offloading saves."""
    from pipeinfer.models.tiny import make_model

    conf = dict(PLAN_MODELS["llama"], num_hidden_layers=12)
    model, tiny = os.path.join(root, "plan-llama12"), os.path.join(root, "plan-llama-tiny4")
    if not os.path.exists(os.path.join(model, "config.json")):
        make_model(model, seed=0, **conf)
    if not os.path.exists(os.path.join(tiny, "config.json")):
        make_model(tiny, seed=0, **dict(conf, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                                        intermediate_size=64, num_key_value_heads=1))
    rows = []
    for size, batch, prompt, new in cases:
        args = [str(v) for v in (size, batch, prompt, new)]
        # the baseline streams too (its reader thread, its buffers' bookkeeping): 1 layer resident, 1 in
        # host memory, 2 on disk, with almost no weights; planned bytes and host tier subtracted
        probe = collect(spawn("plan", tiny, "0", "1", *args[1:]))
        base = collect(spawn("plan", tiny, "0", "1", *args[1:], str(probe["planned"]["total"] - 1),
                             str(probe["param_bytes"] // 4)))
        assert base["offload"] and base["planned"]["host"] and base["planned"]["disk"], base["planned"]
        runtime = base["peak_rss"] - base["planned"]["total"] - base["planned"]["host"]
        resident = [collect(spawn("plan", model, str(r), *args)) for r in range(size)]
        # one budget for every rank: the tightest stage's
        layer = max(r["param_bytes"] for r in resident) // (12 // size + 1)
        budget = min(r["planned"]["total"] - r["param_bytes"] // 2 for r in resident) + layer // 4
        cpu = 3 * layer // 2
        procs = [spawn("plan", model, str(r), *args, str(budget), str(cpu)) for r in range(size)]
        for res, r in zip(resident, (collect(p) for p in procs)):
            measured = r["peak_rss"] - runtime
            bound = budget + r["planned"]["host"]
            planned_saving = res["planned"]["total"] - r["planned"]["total"] - r["planned"]["host"]
            rows.append({"case": f"llama pp{size} batch {batch} prompt {prompt} + {new}", "rank": r["role"],
                         "max_memory": budget, "max_cpu_memory": cpu, "placement": r["planned"]["placement"],
                         "planned_total": r["planned"]["total"], "host": r["planned"]["host"],
                         "disk": r["planned"]["disk"], "stream": r["planned"]["stream"],
                         "resident_measured": res["peak_rss"] - runtime, "runtime": runtime,
                         "peak_rss": r["peak_rss"], "measured": measured, "bound": bound,
                         "over_bound": measured / bound, "planned_saving": planned_saving,
                         "measured_saving": res["peak_rss"] - r["peak_rss"],
                         "moved": (r["offload"] or {}).get("weights_moved_bytes")})
    return rows


# The runner itself (run_distributed_inference.py), 2 ranks on CPU: a model whose embedding and untied head
# (32k x 512) are most of each stage, and its runtime baseline with almost no weights
RUNNER_MODELS = {
    "v32k": dict(hidden_size=512, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=2, max_position_embeddings=512, vocab_size=32000),
    "tiny": dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, max_position_embeddings=512),
}


def run_ranks(model: str, out: str, prompts: list[str], **over) -> tuple[list[dict], list[dict]]:
    """One real 2-rank run of the runner on CPU: each rank's plan (the run record's) and stage record
    (whose cpu_peak_rss_bytes is the rank's peak RSS, loading included)."""
    import socket

    cfg = dict(model_path=model, pipeline_size=2, prompts=prompts, max_new_tokens=8, batch_size=2, device="cpu",
               output_path=out, resume=False, timeout_s=300, **over)
    with open(out + ".config.json", "w") as f:
        json.dump(cfg, f)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [subprocess.Popen([sys.executable, os.path.join(ROOT, "run_distributed_inference.py"), "--config",
                               out + ".config.json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT, RANK=str(r), WORLD_SIZE="2",
                                       LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)))
             for r in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=900)
        if p.returncode != 0:
            raise SystemExit(f"rank of {out} failed (exit {p.returncode}):\n{err[-3000:]}")
    with open(out) as f:
        records = [json.loads(line) for line in f]
    stages = sorted((r for r in records if r["type"] == "stage"), key=lambda r: r["rank"])
    return next(r for r in records if r["type"] == "run")["plan"]["ranks"], stages


def check_runner(root: str, few: int = 8, many: int = 120) -> list[dict]:
    """What a rank of a real run holds: each rank's peak RSS over the runtime (the same run on the
    tiny model, less its planned total) against its planned total, with `few` prompts; then its
    peak again with `many` prompts (all of one length, so the plan is the same: the peak must be
    too). logprobs=20 makes each prompt record large (~90 KB)."""
    from pipeinfer.models.tiny import make_model

    paths = {}
    for name, conf in RUNNER_MODELS.items():
        paths[name] = os.path.join(root, f"runner-{name}")
        if not os.path.exists(os.path.join(paths[name], "config.json")):
            make_model(paths[name], seed=0, **conf)
    prompts = [f"Prompt {i:03d} asks the pipeline one question" for i in range(many)]
    base_plan, base = run_ranks(paths["tiny"], os.path.join(root, "runner-tiny.jsonl"), prompts[:few], logprobs=20)
    plan, ranks = run_ranks(paths["v32k"], os.path.join(root, "runner-few.jsonl"), prompts[:few], logprobs=20)
    many_plan, more = run_ranks(paths["v32k"], os.path.join(root, "runner-many.jsonl"), prompts, logprobs=20)
    rows = []
    for p0, b, p, r, m, pm in zip(base_plan, base, plan, ranks, more, many_plan):
        runtime = b["cpu_peak_rss_bytes"] - p0["total"]
        measured = r["cpu_peak_rss_bytes"] - runtime
        rows.append({"rank": p["rank"], "planned": p["total"], "planned_many": pm["total"], "runtime": runtime,
                     "peak": r["cpu_peak_rss_bytes"], "measured": measured, "ratio": p["total"] / measured,
                     "peak_many": m["cpu_peak_rss_bytes"], "grown": m["cpu_peak_rss_bytes"] - r["cpu_peak_rss_bytes"]})
    return rows


def save_prequantized(model: str, out: str, method: str, dtype_name: str) -> None:
    """The checkpoint quantized by transformers and saved with save_pretrained, as users get one."""
    import torch
    from transformers import AutoModelForCausalLM

    from pipeinfer.plan.quantization import Quantization

    print(f"building {out} ...", flush=True)
    q = Quantization(method, "load", compute_dtype=dtype_name)
    m = AutoModelForCausalLM.from_pretrained(model, dtype=getattr(torch, dtype_name), device_map="cpu",
                                             quantization_config=q.bnb_config())
    m.save_pretrained(out)


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
    ap.add_argument("--check-plan", action="store_true", help="planned total against measured peak, per rank")
    ap.add_argument("--check-runner", action="store_true",
                    help="the runner's 2 ranks: peak over the runtime against the plan, and with 15x the prompts")
    ap.add_argument("--check-scoring", action="store_true",
                    help="prompt_logprobs: the peak it adds on the last stage against what it adds to the plan")
    ap.add_argument("--check-offload", action="store_true",
                    help="offloaded stages: peak against max_memory + host-tier bytes, per rank")
    ap.add_argument("--quantization", default="none,int8,nf4",
                    help="comma-separated: the ranks load the stage this way, each in its own pair of processes")
    ap.add_argument("--prequantized", default="nf4",
                    help="also the checkpoint saved quantized this way (built once beside --model); '' for none")
    ap.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        role, *rest = args.worker
        if role == "plan":
            rec = plan_worker(rest[0], *(int(v) if v.lstrip("-").isdigit() else v for v in rest[1:]))
        else:
            rec = rank_worker(rest[0], int(role), 2, *rest[1:]) if role.isdigit() else runtime_worker(role)
        print(json.dumps(rec))
        return
    if args.check_runner:
        mib = 2**20
        print("| rank | planned total (MiB) | runtime (MiB) | peak RSS, 8 prompts (MiB) | measured: peak - runtime "
              "(MiB) | planned / measured | peak RSS, 120 prompts (MiB) | grown (MiB) |")
        print("|---|---|---|---|---|---|---|---|")
        for r in check_runner(os.path.dirname(args.model)):
            print(f"| {r['rank']} | {r['planned'] / mib:.1f} | {r['runtime'] / mib:.0f} | {r['peak'] / mib:.1f} | "
                  f"{r['measured'] / mib:.1f} | {r['ratio']:.3f} | {r['peak_many'] / mib:.1f} | "
                  f"{r['grown'] / mib:.1f} |")
        return
    if args.check_scoring:
        mib = 2**20
        print("| case | rank | planned transient without / with (MiB) | scoring's peak (MiB) | peak RSS without / with "
              "(MiB) | added: planned (MiB) | added: measured (MiB) | planned / measured |")
        print("|---|---|---|---|---|---|---|---|")
        for r in check_scoring(os.path.dirname(args.model)):
            print(f"| {r['case']} | {r['rank'][4:]} | {r['planned_transient'][0] / mib:.1f} / "
                  f"{r['planned_transient'][1] / mib:.1f} | {r['planned_scoring'] / mib:.1f} | "
                  f"{r['peak_rss'][0] / mib:.0f} / {r['peak_rss'][1] / mib:.0f} | {r['planned'] / mib:.1f} | "
                  f"{r['measured'] / mib:.1f} | {r['ratio']:.3f} |")
        return
    if args.check_offload:
        mib = 2**20
        print("| case | rank | device / host / disk layers | max_memory | planned total (stream buffers) | host tier | "
              "all resident: peak - runtime | offloaded: peak - runtime | bound: max_memory + host tier | "
              "measured / bound | saved: measured (planned) |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for r in check_offload(os.path.dirname(args.model)):
            p = r["placement"]
            print(f"| {r['case']} | {r['rank'][4:]} | {len(p['device'])} / {len(p['host'])} / {len(p['disk'])} | "
                  f"{r['max_memory'] / mib:.1f} | {r['planned_total'] / mib:.1f} ({r['stream'] / mib:.1f}) | "
                  f"{r['host'] / mib:.1f} | {r['resident_measured'] / mib:.1f} | {r['measured'] / mib:.1f} | "
                  f"{r['bound'] / mib:.1f} | {r['over_bound']:.3f} | {r['measured_saving'] / mib:.1f} "
                  f"({r['planned_saving'] / mib:.1f}) |")
        return
    if args.check_plan:
        mib = 2**20
        print("| case | rank | weights (planned = loaded) | KV cache | transient | planned total | peak RSS | "
              "runtime | measured (peak - runtime) | planned / measured |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for r in check_plan(os.path.dirname(args.model)):
            print(f"| {r['case']} | {r['rank'][4:]} | {r['planned_weights'] / mib:.1f} "
                  f"({'=' if r['planned_weights'] == r['param_bytes'] else '!='}) | "
                  f"{r['planned_kv_cache'] / mib:.1f} | "
                  f"{r['planned_transient'] / mib:.1f} | {r['planned_total'] / mib:.1f} | {r['peak_rss'] / mib:.0f} | "
                  f"{r['runtime'] / mib:.0f} | {r['measured'] / mib:.1f} | {r['ratio']:.3f} |")
        return

    if not os.path.exists(os.path.join(args.model, "config.json")):
        from pipeinfer.models.tiny import make_model

        print(f"building {args.model} ...", flush=True)
        make_model(args.model, seed=0, dtype="bfloat16", **MODEL)
    file_bytes = sum(os.path.getsize(os.path.join(args.model, n)) for n in os.listdir(args.model)
                     if n.endswith(".safetensors"))
    import torch
    import transformers

    methods = [m for m in args.quantization.split(",") if m]
    runs = [(m, args.model, m) for m in methods]
    if args.prequantized:  # the checkpoint saved quantized: the ranks read it as stored
        pre = f"{args.model}-{args.prequantized}"
        if not os.path.exists(os.path.join(pre, "config.json")):
            save_prequantized(args.model, pre, args.prequantized, args.dtype)
        runs.append((f"{args.prequantized} (pre-quantized)", pre, "none"))
    runtimes, ranks = {}, []
    for label, path, method in runs:  # one at a time: two ranks and their runtime baseline side by side
        for n in os.listdir(path):
            if n.endswith(".safetensors"):
                drop_cache(os.path.join(path, n))
        role = "runtime" if label == "none" else "runtime-bnb"
        procs = [spawn(role)] + [spawn(str(r), path, args.dtype, method) for r in (0, 1)]
        runtimes[label], *pair = [collect(p) for p in procs]
        for r in pair:
            r["quantization"] = label
        ranks += pair
    methods = [label for label, _, _ in runs]
    bare = collect(spawn("bare"))

    mib = 2**20
    print(f"checkpoint {args.model}: {file_bytes / mib:.0f} MiB of safetensors; ranks load {args.dtype}; "
          f"torch {torch.__version__}, transformers {transformers.__version__}")
    print(f"bare imports (python + torch + transformers + accelerate): peak {bare['peak_rss'] / mib:.0f} MiB; "
          f"runtime (+ model code and pipeinfer, no weights): peak "
          + ", ".join(f"{runtimes[m]['peak_rss'] / mib:.0f} MiB" + ("" if m == "none" else f" ({m}: + bitsandbytes)")
                      for m in methods))
    print("| quantization | rank | layers | stage params, planned = loaded (MiB) | read from checkpoint (MiB) | "
          "peak RSS (MiB) | target: (params + runtime) x 1.1 (x 1.15 quantized) (MiB) | peak / (params + runtime) "
          "| met |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in ranks:
        base = runtimes[r["quantization"]]["peak_rss"]
        factor = 1.10 if r["quantization"] == "none" else 1.15
        limit = (r["param_bytes"] + base) * factor
        r["target_bytes"], r["ratio"], r["met"] = int(limit), r["peak_rss"] / (r["param_bytes"] + base), \
            r["peak_rss"] <= limit and r["param_bytes"] == r["planned_weights"]
        print(f"| {r['quantization']} | {r['role'][4:]} | {r['layers'][0]}..{r['layers'][1]} | "
              f"{r['param_bytes'] / mib:.1f} {'=' if r['param_bytes'] == r['planned_weights'] else '!='} "
              f"{r['planned_weights'] / mib:.1f} | {r['read_bytes'] / mib:.0f} | {r['peak_rss'] / mib:.0f} | "
              f"{limit / mib:.0f} | {r['ratio']:.3f} | {'yes' if r['met'] else 'NO'} |")
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump({"model": args.model, "checkpoint_bytes": file_bytes, "dtype": args.dtype, "prefill": PREFILL,
                   "torch": torch.__version__, "transformers": transformers.__version__,
                   "bare": bare, "runtime": runtimes, "ranks": ranks}, f, indent=2)
    print(f"-> {args.json}")


if __name__ == "__main__":
    main()
