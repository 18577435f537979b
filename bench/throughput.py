"""Generated tokens per second, side by side: generate(), transformers' PP mode, and this runner.

    python bench/throughput.py [--quick] [--device cuda] [--json results/throughput.json]

One machine, one run, one locally built model (make_model, seed 0, cached under --workdir:
float32 and 26M parameters on CPU, bf16 (fp16 without bf16) and 0.96B parameters on CUDA), the
same prompts (deterministic, 8 to 64 tokens), greedy decoding and a fixed token count. For each
total batch size (prompts in flight at once) it times:

  generate     transformers generate() in this process, one thread, pinned to core 0, prompts in
               left-padded batches, timed around generate() only after a warm-up
  tf_pp2       transformers' own pipeline parallelism, DistributedConfig(pp_size=2): 2 rank
               processes over gloo, one thread and one core each, generate() on every rank
  pp1          the runner, pipeline_size 1, one rank process on core 0
  pp2_naive    the runner, pipeline_size 2, micro_batch_size = batch_size: one micro-batch in flight
  pp2_sched    the runner, pipeline_size 2, micro_batch_size = "auto": the schedule

The cells run in --rounds rounds (default 2), each round every configuration at one batch size
before the next batch size, so a drift in machine speed (shared hosts drift 5-8% over minutes)
touches every configuration alike; each cell reports its best round.
With --device cuda the ranks share the one GPU (pipeline_size 2 then talks through gloo in host
memory: NCCL cannot pair two ranks on one device), tf_pp2 is skipped (its ranks would need NCCL
on one device), and the batch-1 rows give the weight bandwidth achieved: weight bytes per
generated token / time per token, against a device-to-device copy's measured bandwidth.

The runner's tokens/s is its JSONL summary's new_tokens / wall_s (generation only, model load
excluded). A fixed token count means no stop at EOS: the runner runs with ignore_eos (a sampled
EOS is kept and decoding goes on), and generate() with the model's generation_config.eos_token_id
cleared, which does the same. (min_new_tokens would instead forbid EOS and so change the tokens
wherever EOS is the argmax.) Every configuration's greedy output_ids are compared with
generate()'s at the same batch size. Each mismatch is printed and recorded; a runner mismatch makes
the script exit 1. transformers' PP mode gets left-padded rows wrong in 5.24: its mismatches are
reported, with the cause, but do not fail the run. Results and the targets: docs/throughput.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENTRY = os.path.join(ROOT, "run_distributed_inference.py")
sys.path.insert(0, ROOT)

from pipeinfer.models.tiny import make_model  # noqa: E402
from pipeinfer.run.prompts import load_tokenizer, make_batches, text_prompts  # noqa: E402
from pipeinfer.run.runtime import resolve_dtype  # noqa: E402

# 26M parameters (104 MB in float32, far beyond the caches): a batch-1 decode step takes ~9 ms on
# one thread here, so per-step Python and communication overheads are measured against real work.
SHAPE = dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
             num_key_value_heads=8, max_position_embeddings=512)
# On CUDA: TinyLlama's shape (22 layers, GQA 32/4) with the byte tokenizer's 259-token vocabulary:
# 0.96B parameters, 1.9 GB in bf16, so that reading the weights, not launching kernels, should
# bound a batch-1 step as far as eager PyTorch allows.
GPU_SHAPE = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                 num_key_value_heads=4, max_position_embeddings=512)
SEED = 0


def cpu_shape(hidden_size: int) -> dict:
    """SHAPE at another width, the MLP widened in proportion (1408 = 2.75 x 512)."""
    return dict(SHAPE, hidden_size=hidden_size, intermediate_size=round(2.75 * hidden_size))


def model_dir(workdir: str, shape: dict, dtype: str) -> str:
    """Where the benchmark model of this shape lives (built once, reused by later runs)."""
    return os.path.join(workdir, "model-" + "-".join(str(v) for v in shape.values()) + f"-s{SEED}-{dtype}")


NOISY = 0.15  # cores used by other processes during a cell above which the cell is flagged
RUNNER = ("pp1", "pp2_naive", "pp2_sched")
CONFIGS = ("generate", "tf_pp2") + RUNNER
# Seen with transformers 5.24; the benchmark still times tf_pp2, but flags its wrong tokens.
TF_PP_PADDING = ("transformers' PP mode decodes left-padded rows wrongly: on rank 1 the DynamicCache's layer 0 is a "
                 "PipelineIdentityLayer that never stores keys, so cache.get_seq_length() stays 0 and the decode "
                 "attention mask is built as if there were no past; unpadded rows are unaffected")
TEXT = ("Pipeline parallel inference splits the decoder layers of a model across ranks; hidden states "
        "stream from stage to stage while every stage keeps its own KV cache. ")


def make_prompts(n: int) -> list[str]:
    """n ASCII prompts of 8..64 bytes (= tokens for the byte tokenizer), cut from a fixed text."""
    text = TEXT * 4
    return [text[(11 * i) % len(TEXT):][:8 + (23 * i) % 57] for i in range(n)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(rank: int, world: int, port: int) -> dict:
    return dict(os.environ, RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                MASTER_PORT=str(port), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONPATH=ROOT)


def launch(argv: list[str], world: int, log_prefix: str, timeout: float, cores: str | None = None) -> list[int]:
    """Start `world` rank processes, rank r pinned to core r (or all to `cores`, a taskset list);
    return their exit codes (-9 for a rank killed after `timeout` seconds: a hung rank costs one
    cell, not the whole run)."""
    port, procs = free_port(), []
    for r in range(world):
        with open(f"{log_prefix}.rank{r}.log", "w") as log:
            procs.append(subprocess.Popen(["taskset", "-c", cores or str(r % os.cpu_count()), sys.executable, *argv],
                                          cwd=ROOT, env=rank_env(r, world, port), stdout=log,
                                          stderr=subprocess.STDOUT))
    deadline = time.monotonic() + timeout
    try:
        for p in procs:
            try:
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                break
        return [p.returncode if p.returncode is not None else -9 for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def failed_ranks(codes: list[int], work: str, tag: str) -> str:
    """One line naming every rank of a launch that exited non-zero, with the tail of its log ("" if none)."""
    return " | ".join(f"rank {r} exit {c}: {tail(os.path.join(work, f'{tag}.rank{r}.log'))}"
                      for r, c in enumerate(codes) if c)


def launch_runner(cfg: dict, world: int, work: str, tag: str, timeout: float, entry: str = ENTRY) -> str:
    """Write cfg as <tag>.config.json and run the batch runner (`entry`: this checkout's, or another
    commit's) on `world` ranks: failed_ranks' line."""
    path = os.path.join(work, f"{tag}.config.json")
    with open(path, "w") as f:
        json.dump(cfg, f)
    return failed_ranks(launch([entry, "--config", path], world, os.path.join(work, tag), timeout), work, tag)


def cpu_busy_s() -> float:
    """Seconds of CPU time all cores spent busy since boot (/proc/stat, USER_HZ = 100)."""
    with open("/proc/stat") as f:
        user, nice, system, idle, iowait, irq, softirq, steal = map(int, f.readline().split()[1:9])
    return (user + nice + system + irq + softirq + steal) / 100


def own_cpu_s() -> float:
    """CPU seconds of this process and its finished children."""
    import resource
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def wait_quiet(max_wait_s: float, limit: float = 0.2) -> float:
    """Wait (at most max_wait_s) until other processes use under `limit` cores; returns that load."""
    deadline = time.monotonic() + max_wait_s
    while True:
        b0, t0 = cpu_busy_s(), time.monotonic()
        time.sleep(0.5)
        load = (cpu_busy_s() - b0) / (time.monotonic() - t0)
        if load < limit or time.monotonic() > deadline:
            return load


class Contention:
    """Cores' worth of CPU that other processes used while a cell ran (all busy time minus ours)."""

    def __enter__(self):
        self.busy, self.own, self.t = cpu_busy_s(), own_cpu_s(), time.monotonic()
        return self

    def __exit__(self, *exc):
        wall = time.monotonic() - self.t
        self.others_cores = max(0.0, (cpu_busy_s() - self.busy) - (own_cpu_s() - self.own)) / wall


def measure(fn, wait_s: float, retries: int):
    """fn() after waiting for a quiet CPU; rerun up to `retries` times while other processes used more
    than NOISY cores meanwhile. Returns (the least disturbed result, its contention facts)."""
    best = None
    for attempt in range(1, retries + 2):
        quiet = wait_quiet(wait_s)
        with Contention() as c:
            result = fn()
        if best is None or c.others_cores < best[1]["others_cores"]:
            best = (result, {"others_cores_before": quiet, "others_cores": c.others_cores, "attempt": attempt})
        if c.others_cores <= NOISY or "error" in result:
            break
    return best


def tail(path: str, n: int = 6) -> str:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            lines = [ln.rstrip() for ln in f if ln.strip() and "it/s]" not in ln]
        return "\n".join(lines[-n:])
    except OSError:
        return ""


# -- transformers generate(), in this process or on every rank of its PP mode -------------------

def generation_config(max_new_tokens: int, tokenizer):
    from transformers import GenerationConfig
    return GenerationConfig(do_sample=False, max_new_tokens=max_new_tokens, eos_token_id=None,
                            pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_generate(model, tokenizer, prompts: list[str], batch_size: int, max_new_tokens: int,
                  device: torch.device = torch.device("cpu")) -> dict:
    """Left-padded batches of batch_size through model.generate(); the clock runs around generate only."""
    batches = make_batches(text_prompts(tokenizer, prompts), list(range(len(prompts))), batch_size,
                           tokenizer.pad_token_id)
    # The model's own generation_config has eos_token_id; a passed config only overrides what it sets,
    # so None there would fall back to it and generate() would stop at EOS. Clear it at the source.
    model.generation_config.eos_token_id = None
    with torch.inference_mode():
        model.generate(batches[0].input_ids.to(device), attention_mask=batches[0].attention_mask.to(device),
                       generation_config=generation_config(4, tokenizer))  # warm-up
        gc = generation_config(max_new_tokens, tokenizer)
        outputs, wall_s = {}, 0.0
        for b in batches:
            ids, mask = b.input_ids.to(device), b.attention_mask.to(device)
            sync(device)
            t = time.perf_counter()
            out = model.generate(ids, attention_mask=mask, generation_config=gc)  # (B, T + N)
            sync(device)
            wall_s += time.perf_counter() - t
            for i, row in zip(b.indices, out[:, b.input_ids.shape[1]:].tolist()):
                outputs[i] = row
    new_tokens = sum(len(r) for r in outputs.values())
    return {"tokens_per_s": new_tokens / wall_s, "new_tokens": new_tokens, "wall_s": wall_s, "output_ids": outputs}


def step_times(model, device: torch.device, batch_sizes=(1, 2, 4, 8, 16, 32), context: int = 32,
               steps: int = 8) -> dict:
    """Median ms of one whole-model decode step (cache of `context` positions) per batch size."""
    import inspect

    from transformers import DynamicCache
    key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"  # 5.x renamed it
    result = {}
    with torch.inference_mode():
        for b in batch_sizes:
            cache = DynamicCache(config=model.config)
            ids = torch.randint(0, 256, (b, context), generator=torch.Generator().manual_seed(b)).to(device)
            model(ids, use_cache=True, **{key: cache})
            times, tok = [], ids[:, -1:]
            for _ in range(steps):
                sync(device)
                t = time.perf_counter()
                model(tok, use_cache=True, **{key: cache})
                sync(device)
                times.append(time.perf_counter() - t)
            result[b] = 1e3 * statistics.median(times)
    return result


def copy_bandwidth(device: torch.device, nbytes: int = 1 << 30, repeats: int = 5) -> float:
    """Bytes/s a large copy on `device` moves, counting bytes read and written (best of `repeats`)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t = time.perf_counter()
        dst.copy_(src)
        sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * nbytes / best


def tf_pp_worker(spec_path: str) -> int:
    """One rank of transformers' PP mode (started by launch()); rank 0 writes the timings."""
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM
    from transformers.distributed import DistributedConfig

    with open(spec_path) as f:
        spec = json.load(f)
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    try:
        model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=getattr(torch, spec["dtype"]),
                                                     local_files_only=True,
                                                     distributed_config=DistributedConfig(pp_size=2)).eval()
        tokenizer = load_tokenizer(spec["model"])
        results = {}
        for b in spec["batch_sizes"]:
            dist.barrier()
            results[b] = time_generate(model, tokenizer, spec["rows"][str(b)], b, spec["max_new_tokens"])
        if dist.get_rank() == 0:
            with open(spec["out"], "w") as f:
                json.dump(results, f)
        dist.barrier()
    finally:
        dist.destroy_process_group()
    return 0


def run_tf_pp(model_path: str, prompts: list[str] | dict[int, list[str]], batch_sizes: list[int], tokens: int,
              work: str, timeout: float, dtype: str = "float32") -> dict:
    """transformers' PP mode on 2 ranks, every batch size in one launch. prompts: the same list at
    every batch size, or a list per batch size (bench/peers.py: its one prompt in every row)."""
    rows = prompts if isinstance(prompts, dict) else {b: prompts for b in batch_sizes}
    spec = dict(model=model_path, dtype=dtype, rows={str(b): rows[b] for b in batch_sizes}, batch_sizes=batch_sizes,
                max_new_tokens=tokens, out=os.path.join(work, "tf_pp2.json"))
    spec_path = os.path.join(work, "tf_pp2.spec.json")
    with open(spec_path, "w") as f:
        json.dump(spec, f)
    if os.path.exists(spec["out"]):
        os.remove(spec["out"])  # an earlier attempt's
    codes = launch([os.path.abspath(__file__), "--tf-pp-worker", spec_path], 2, os.path.join(work, "tf_pp2"), timeout)
    if any(codes) or not os.path.exists(spec["out"]):
        return {"error": failed_ranks(codes, work, "tf_pp2") or "no results written"}
    with open(spec["out"]) as f:
        got = json.load(f)
    return {int(b): dict(r, output_ids={int(i): ids for i, ids in r["output_ids"].items()}) for b, r in got.items()}


# -- this runner ---------------------------------------------------------------------------------

def runner_config(model_path: str, prompts: list[str], tokens: int, work: str, device: str = "cpu",
                  dtype: str = "float32", compile_: bool | str = "auto") -> dict:
    return dict(model_path=model_path, prompts=prompts, max_new_tokens=tokens, ignore_eos=True, dtype=dtype,
                device=device, do_sample=False, offload_folder=os.path.join(work, "offload"), timeout_s=60,
                progress=False, nvtx=False, compile=compile_)


def run_runner(base: dict, name: str, batch_size: int, micro: int | str | None, work: str, timeout: float) -> dict:
    world = 1 if name == "pp1" else 2
    tag, k = f"{name}-b{batch_size}", 1
    while os.path.exists(os.path.join(work, f"{tag}-{k}.config.json")):  # a fresh output_path per run: no resume
        k += 1
    tag = f"{tag}-{k}"
    cfg = dict(base, pipeline_size=world, batch_size=batch_size, output_path=os.path.join(work, f"{tag}.jsonl"))
    if micro is not None:
        cfg["micro_batch_size"] = micro
    if error := launch_runner(cfg, world, work, tag, timeout):
        return {"error": error}
    with open(cfg["output_path"], encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    summary = next(r for r in records if r["type"] == "summary")
    stages = [{k: v for k, v in r.items() if isinstance(v, (int, float, str)) or k == "compile"} for r in records
              if r["type"] == "stage"]
    return {"tokens_per_s": summary["new_tokens"] / summary["wall_s"], "new_tokens": summary["new_tokens"],
            "wall_s": summary["wall_s"], "micro_batch_size": micro, "stages": stages,
            "output_ids": {r["prompt_index"]: r["output_ids"] for r in records if r["type"] == "prompt"}}


# -- report --------------------------------------------------------------------------------------

def machine(device: torch.device) -> dict:
    model = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    import transformers
    gpu = {"gpu": torch.cuda.get_device_name(device), "cuda": torch.version.cuda} if device.type == "cuda" else {}
    return {"hostname": socket.gethostname(), "nproc": os.cpu_count(), "cpu": model, **gpu,
            "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "loadavg_start": os.getloadavg(), "git": git_state()}


def git_state() -> dict:
    """The commit measured, and whether the runner's files differ from it (the numbers belong to that tree)."""
    def run(*a: str) -> str:
        try:
            return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        except OSError:  # no git on this machine (a bare GPU image): the numbers go unattributed
            return ""
    return {"commit": run("rev-parse", "HEAD") or None,
            "modified": run("status", "--short", "--", "pipeinfer", "run_distributed_inference.py").splitlines()}


def best(cells: list[dict]) -> dict:
    """A cell's reported run: the fastest of its rounds (an error only if every round failed)."""
    ok = [c for c in cells if "error" not in c]
    return max(ok, key=lambda c: c["tokens_per_s"]) if ok else cells[-1]


def _cell(results: dict, name: str, b: int) -> dict:
    cell = results.get(name, {}).get(b)
    return cell if isinstance(cell, dict) else {}


def tps(results: dict, name: str, b: int) -> float | None:
    return _cell(results, name, b).get("tokens_per_s")


def busy(results: dict, name: str, b: int) -> float:
    return _cell(results, name, b).get("others_cores", 0.0)


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def targets(results: dict, batch_sizes: list[int], step_ms: dict) -> list[dict]:
    best_pp2 = lambda b: max(filter(None, [tps(results, "pp2_naive", b), tps(results, "pp2_sched", b)]),  # noqa: E731
                             default=None)
    rows = []
    for b in batch_sizes:
        rows.append({"target": f"runner pp1 / generate(), batch {b}", "ratio": ratio(tps(results, "pp1", b),
                     tps(results, "generate", b)), "min": 1.0})
    if 1 in batch_sizes:
        rows.append({"target": "one prompt: runner pp2 (best) / pp1, batch 1", "ratio": ratio(best_pp2(1),
                     tps(results, "pp1", 1)), "min": 0.97})
    for b in batch_sizes:
        if b >= 2:
            # Two micro-batches of b/2 overlapped perfectly vs one of b: each stage does 2 steps of b/2
            # in the time the naive pipe does one step of b on one stage then the other.
            bound = step_ms[b] / step_ms[b // 2] if b in step_ms and b // 2 in step_ms else None
            rows.append({"target": f"pp2 schedule / pp2 naive, batch {b}", "ratio": ratio(
                tps(results, "pp2_sched", b), tps(results, "pp2_naive", b)), "min": 1.8 if b == 2 else None,
                "bound": bound})
    if 1 in batch_sizes and 2 in batch_sizes:  # the other reading: two prompts in flight vs one at a time
        rows.append({"target": "pp2 schedule batch 2 / pp2 naive batch 1", "ratio": ratio(
            tps(results, "pp2_sched", 2), tps(results, "pp2_naive", 1)), "min": None})
    for b in batch_sizes:
        rows.append({"target": f"runner pp2 (best) / transformers PP mode, batch {b}",
                     "ratio": ratio(best_pp2(b), tps(results, "tf_pp2", b)), "min": 1.15 if b >= 8 else 1.0})
    for r in rows:
        r["met"] = None if r["ratio"] is None or r["min"] is None else r["ratio"] >= r["min"]
    return rows


def check_outputs(runs: dict, batch_sizes: list[int]) -> tuple[int, list[str]]:
    """Every run of every configuration against generate()'s outputs at the same batch size."""
    compared, bad = 0, []
    for b in batch_sizes:
        ref = next((c["output_ids"] for c in runs["generate"][b] if "output_ids" in c), None)
        if ref is None:
            continue
        for name in CONFIGS[1:]:
            for cell in runs.get(name, {}).get(b, []):
                if "output_ids" not in cell:
                    continue
                for i, ids in ref.items():
                    compared += 1
                    got = cell["output_ids"].get(i)
                    if got != ids:
                        at = next((k for k, (x, y) in enumerate(zip(got or [], ids)) if x != y),
                                  min(len(got or []), len(ids)))
                        bad.append(f"{name} batch {b} prompt {i} (round {cell['round']}): differs from generate() "
                                   f"at new token {at}")
    return compared, bad


def weight_bandwidth(results: dict, param_bytes: int, copy_gb_s: float) -> dict:
    """Batch 1: every generated token reads every weight once, so param_bytes x tokens/s is the
    weight bandwidth achieved (the embedding, of which a step reads one row, counted whole)."""
    rows = {}
    for name in CONFIGS:
        t = tps(results, name, 1)
        if t:
            gb_s = param_bytes * t / 1e9
            rows[name] = {"gb_s": gb_s, "of_copy": gb_s / copy_gb_s}
    return rows


def print_table(results: dict, batch_sizes: list[int]) -> None:
    print(f"\ntokens/s (higher is better); {CONFIGS[0]} = transformers generate(), tf_pp2 = DistributedConfig(pp_size=2)")
    print(f"{'batch':>5} " + " ".join(f"{c:>10}" for c in CONFIGS))
    for b in batch_sizes:
        cells = [(tps(results, c, b), busy(results, c, b)) for c in CONFIGS]
        print(f"{b:>5} " + " ".join(f"{v:>9.1f}{'*' if o > NOISY else ' '}" if v else f"{'-':>10}" for v, o in cells))
    if any(busy(results, c, b) > NOISY for c in CONFIGS for b in batch_sizes):
        print(f"* other processes used more than {NOISY} of a core while this cell ran: its number is suspect")
    for c in CONFIGS:
        for b in batch_sizes:
            if "error" in _cell(results, c, b):
                print(f"{c} batch {b}: not measured: {_cell(results, c, b)['error']}")


def save_partial(path: str, info: dict, runs: dict) -> None:
    """Every round's tokens/s so far, so that a run cut short (a device lease ending) leaves its
    measurements behind; the finished run overwrites this with the whole result."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".partial", "w") as f:
        json.dump(dict(info, complete=False, rounds={n: {b: [c.get("tokens_per_s", c.get("error")) for c in cells]
                                                         for b, cells in r.items()} for n, r in runs.items()}), f)
    os.replace(path + ".partial", path)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="8 prompts, 8 new tokens, batch sizes 1, 2, 8, one round")
    ap.add_argument("--json", default="results/throughput.json")
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument("--prompts", type=int, default=32, help="prompts per run (the same at every batch size)")
    ap.add_argument("--tokens", type=int, default=64, help="new tokens per prompt (EOS does not stop)")
    ap.add_argument("--batch-sizes", default="1,2,8,32")
    ap.add_argument("--rounds", type=int, default=2, help="times every cell runs, interleaved; the best counts")
    ap.add_argument("--only", default=",".join(CONFIGS), help="comma-separated subset of " + ",".join(CONFIGS))
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "pipeinfer-bench"),
                    help="model cache and per-run files (logs, configs, JSONL)")
    ap.add_argument("--wait-quiet", type=float, default=20, metavar="S",
                    help="before each cell, wait up to S seconds for other processes to leave the CPU idle")
    ap.add_argument("--retries", type=int, default=2,
                    help="rerun a cell up to this many times while other processes disturbed it")
    ap.add_argument("--cell-timeout", type=float, default=900, metavar="S",
                    help="kill a cell's rank processes after S seconds (the cell is then reported as failed)")
    ap.add_argument("--hidden-size", type=int, default=SHAPE["hidden_size"], metavar="H",
                    help="on CPU, the model's width (MLP width 2.75 H, 8 heads, 8 layers): a wider model shows how "
                         "the per-token costs of a stage boundary weigh against more weights")
    ap.add_argument("--dtype", choices=("auto", "float16", "bfloat16", "float32"), default="auto",
                    help="on CUDA: the model's dtype (auto: the runner's own choice, bf16 from compute capability "
                         "8.0, else float16); on CPU float32 always")
    ap.add_argument("--fail-fast", action="store_true",
                    help="exit 1 at the first cell that fails or differs from generate() (the GPU check's smoke cell)")
    ap.add_argument("--compile", choices=("auto", "true", "false", "cudagraphs"), default="auto",
                    help="the runner's compile setting (load/compiled.py)")
    ap.add_argument("--tf-pp-worker", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.tf_pp_worker:
        return tf_pp_worker(args.tf_pp_worker)
    if args.quick:
        args.prompts, args.tokens, args.batch_sizes, args.rounds = 8, 8, "1,2,8", 1
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    only = set(args.only.split(",")) | {"generate"}  # generate() is the reference for the output check
    device = torch.device(args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            print("error: --device cuda but torch sees no GPU", file=sys.stderr)
            return 2
        only.discard("tf_pp2")  # its two ranks would need NCCL on one GPU
        if args.hidden_size != SHAPE["hidden_size"]:
            print("error: --hidden-size sets the CPU model's width; on CUDA the model is TinyLlama's shape",
                  file=sys.stderr)
            return 2
        shape = GPU_SHAPE
        dtype = str(resolve_dtype(args.dtype, device)).removeprefix("torch.")
    else:
        if args.hidden_size % SHAPE["num_attention_heads"]:
            print(f"error: --hidden-size must be a multiple of {SHAPE['num_attention_heads']}", file=sys.stderr)
            return 2
        shape, dtype = cpu_shape(args.hidden_size), "float32"

    model_path = model_dir(args.workdir, shape, dtype)
    if not os.path.exists(os.path.join(model_path, "config.json")):
        make_model(model_path, seed=SEED, dtype=dtype, device=args.device, **shape)  # on the GPU: seconds, not minutes
    work = os.path.join(args.workdir, "runs")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    prompts = make_prompts(args.prompts)
    info = {"machine": machine(device), "model": dict(shape, seed=SEED, dtype=dtype, path=model_path),
            "workload": {"prompts": len(prompts), "prompt_tokens": [len(p) for p in prompts],
                         "max_new_tokens": args.tokens, "batch_sizes": batch_sizes, "greedy": True,
                         "threads_per_rank": 1, "rounds": args.rounds, "device": args.device}}

    # generate(), in this process: one thread, core 0 (also on CUDA, where the CPU launches kernels).
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype), local_files_only=True)
    model = model.to(device).eval()
    info["model"]["param_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
    tokenizer = load_tokenizer(model_path)

    def pinned(fn):
        affinity, threads = os.sched_getaffinity(0), torch.get_num_threads()
        os.sched_setaffinity(0, {0})
        torch.set_num_threads(1)
        try:
            return fn()
        finally:
            torch.set_num_threads(threads)
            os.sched_setaffinity(0, affinity)

    base = runner_config(model_path, prompts, args.tokens, work, args.device, dtype,
                         {"true": True, "false": False}.get(args.compile, args.compile))

    def cell_fn(name: str, b: int):
        if name == "generate":
            return lambda: pinned(lambda: time_generate(model, tokenizer, prompts, b, args.tokens, device))
        if name == "tf_pp2":
            def tf_pp2() -> dict:
                got = run_tf_pp(model_path, prompts, [b], args.tokens, work, args.cell_timeout)
                return got.get(b) or {"error": got.get("error", "no result")}
            return tf_pp2
        micro = None if name == "pp1" else (b if name == "pp2_naive" else "auto")
        return lambda: run_runner(base, name, b, micro, work, args.cell_timeout)

    # Every cell in every round, a batch size's configurations one after the other.
    runs: dict = {name: {b: [] for b in batch_sizes} for name in CONFIGS if name in only}
    for rnd in range(1, args.rounds + 1):
        for b in batch_sizes:
            for name in runs:
                cell, facts = measure(cell_fn(name, b), args.wait_quiet, args.retries)
                cell = dict(cell, **facts, round=rnd)
                runs[name][b].append(cell)
                save_partial(args.json, info, runs)
                print(f"round {rnd} {name:<10} batch {b:>2}: " + (
                    f"{cell['tokens_per_s']:8.1f} tokens/s  (others used {facts['others_cores']:.2f} cores)"
                    if "error" not in cell else f"FAILED: {cell['error']}"), flush=True)
                if args.fail_fast:
                    bad = check_outputs({"generate": runs["generate"], name: {b: [cell]}}, [b])[1]
                    if "error" in cell or bad:
                        print(f"error: {name} batch {b} " + (f"failed: {cell['error']}" if "error" in cell
                                                            else f"differs from generate(): {bad[0]}"), file=sys.stderr)
                        return 1
    results = {name: {b: best(cells) for b, cells in per_b.items()} for name, per_b in runs.items()}

    info["decode_step_ms"] = pinned(lambda: step_times(model, device))
    print("whole-model decode step, 1 thread (ms): " +
          ", ".join(f"batch {b}: {ms:.2f}" for b, ms in info["decode_step_ms"].items()), flush=True)
    info["copy_bandwidth_gb_s"] = copy_bandwidth(device) / 1e9

    compared, mismatches = check_outputs(runs, batch_sizes)
    info["machine"]["loadavg_end"] = os.getloadavg()
    rows = targets(results, batch_sizes, info["decode_step_ms"])
    print_table(results, batch_sizes)
    print("\nratios (target):")
    for r in rows:
        verdict = {True: "met", False: "NOT MET", None: ""}[r["met"]]
        shown = f"{r['ratio']:.3f}" if r["ratio"] is not None else "-"
        bound = f"  (bound with perfect overlap: step(b)/step(b/2) = {r['bound']:.2f})" if r.get("bound") else ""
        print(f"  {r['target']:<55} {shown:>7}  " + (f">= {r['min']:.2f} {verdict}" if r["min"] else "(no target)")
              + bound)
    info["weight_bandwidth"] = weight_bandwidth(results, info["model"]["param_bytes"], info["copy_bandwidth_gb_s"])
    print(f"\nweight bandwidth at batch 1 (weight bytes per token / time per token), against a "
          f"{info['copy_bandwidth_gb_s']:.1f} GB/s copy on {args.device}:")
    for name, row in info["weight_bandwidth"].items():
        print(f"  {name:<10} {row['gb_s']:8.1f} GB/s  {row['of_copy']:.1%} of the copy's")
    print(f"\noutput check: {compared} prompt outputs compared with generate() at the same batch size, "
          f"{len(mismatches)} mismatches")
    # On a GPU in bf16 the schedule's micro-batches have other shapes (and padding) than generate()'s
    # batch, so other kernels may round differently and a greedy token can flip; shown, not fatal.
    shape_dependent = (lambda m: m.startswith("pp2_sched ")) if device.type == "cuda" else (lambda m: False)
    for m in mismatches:
        if shape_dependent(m):
            print(f"DIFFERS (micro-batch shapes, {dtype} on CUDA): {m}", file=sys.stderr)
        elif not m.startswith("tf_pp2 "):
            print(f"MISMATCH: {m}", file=sys.stderr)
    for b in batch_sizes:
        n = sum(m.startswith(f"tf_pp2 batch {b} ") for m in mismatches)
        if n:
            print(f"MISMATCH: tf_pp2 batch {b}: {n} of {len(prompts) * len(runs['tf_pp2'][b])} prompt outputs "
                  f"({len(prompts)} prompts x rounds) differ from generate() (each listed in the JSON)", file=sys.stderr)
    if any(m.startswith("tf_pp2 ") for m in mismatches):
        print(f"note: {TF_PP_PADDING}", file=sys.stderr)
    print(f"load average at start {info['machine']['loadavg_start'][0]:.2f}, end {info['machine']['loadavg_end'][0]:.2f} "
          f"(on {info['machine']['nproc']} cores: above ~0.5 + the ranks running, someone else shares the CPU)")

    def strip(cell):  # the JSON keeps timings, not the ids
        return {k: v for k, v in cell.items() if k != "output_ids"} if isinstance(cell, dict) else cell
    out = dict(info, complete=True, results={n: {b: strip(c) for b, c in r.items()} for n, r in results.items()},
               rounds={n: {b: [c.get("tokens_per_s") for c in cells] for b, cells in r.items()} for n, r in runs.items()},
               ratios=rows, output_check={"compared": compared, "mismatches": mismatches,
                                          "tf_pp2_note": TF_PP_PADDING if any(m.startswith("tf_pp2 ") for m in mismatches)
                                          else None})
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(out, f, indent=2)
    print(f"-> {args.json}")
    return 1 if any(not m.startswith("tf_pp2 ") and not shape_dependent(m) for m in mismatches) else 0


if __name__ == "__main__":
    sys.exit(main())
