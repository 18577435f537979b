"""What stop strings and log-probabilities cost: tokens/s with `stop` + `logprobs: 5` against neither.

    python bench/instruct_overhead.py [--base-entry PATH] [--rounds 3] [--json results/instruct_overhead.json]

One machine, one run: the runner at pipeline_size 2 on CPU, the demo-sized model (make_model, seed
0), the same prompts, greedy, ignore_eos and a fixed token count, so every configuration makes the
same tokens (checked). The stop strings never match (they are checked every step all the same), so
no prompt ends early. Configurations, interleaved round by round (a shared host drifts), best round
counts:

  off          stop and logprobs off
  stop_lp5     stop: two strings, logprobs: 5
  base         (with --base-entry) another checkout's run_distributed_inference.py, e.g. the commit
               before these features: "off" must be within noise of it
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from throughput import launch, make_prompts, tail  # noqa: E402

from pipeinfer.models.tiny import make_model  # noqa: E402

ENTRY = os.path.join(ROOT, "run_distributed_inference.py")
FEATURES = {"off": {}, "stop_lp5": {"stop": ["<never here>", "###\n###"], "logprobs": 5}}


def run_once(entry: str, cfg: dict, tag: str, work: str) -> dict:
    cfg = dict(cfg, output_path=os.path.join(work, f"{tag}.jsonl"))
    path = os.path.join(work, f"{tag}.config.json")
    with open(path, "w") as f:
        json.dump(cfg, f)
    codes = launch([entry, "--config", path], 2, os.path.join(work, tag), 600)
    if any(codes):
        raise SystemExit(f"{tag}: exit codes {codes}: {tail(os.path.join(work, f'{tag}.rank0.log'))}")
    with open(cfg["output_path"], encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    summary = next(r for r in records if r["type"] == "summary")
    return {"tokens_per_s": summary["new_tokens"] / summary["wall_s"], "new_tokens": summary["new_tokens"],
            "output_ids": [r["output_ids"] for r in sorted((r for r in records if r["type"] == "prompt"),
                                                           key=lambda r: r["prompt_index"])]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base-entry", help="another checkout's run_distributed_inference.py, timed as 'base'")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--tokens", type=int, default=48)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--json", default="results/instruct_overhead.json")
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "pipeinfer-bench-instruct"))
    args = ap.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    model = os.path.join(args.workdir, "tiny-llama")
    if not os.path.exists(os.path.join(model, "config.json")):
        make_model(model)
    base = dict(model_path=model, pipeline_size=2, prompts=make_prompts(args.prompts), max_new_tokens=args.tokens,
                ignore_eos=True, batch_size=args.batch_size, dtype="float32", device="cpu", timeout_s=120,
                offload_folder=os.path.join(args.workdir, "offload"), progress=False, nvtx=False, resume=False)
    configs = {name: (ENTRY, dict(base, **over)) for name, over in FEATURES.items()}
    if args.base_entry:
        configs["base"] = (args.base_entry, base)
    cells: dict[str, list[dict]] = {name: [] for name in configs}
    for r in range(args.rounds):
        order = list(configs.items())
        for name, (entry, cfg) in order if r % 2 == 0 else order[::-1]:  # no configuration always goes first
            cells[name].append(run_once(entry, cfg, f"{name}-{r}", args.workdir))
            print(f"round {r} {name:9s} {cells[name][-1]['tokens_per_s']:8.1f} tok/s", flush=True)
    ids = {name: runs[0]["output_ids"] for name, runs in cells.items()}
    same = all(v == ids["off"] for v in ids.values())
    result = {name: {"best_tokens_per_s": max(c["tokens_per_s"] for c in runs),
                     "rounds_tokens_per_s": [c["tokens_per_s"] for c in runs]} for name, runs in cells.items()}
    result["same_tokens"] = same
    print(f"{'config':9s} {'best tok/s':>10s}  vs off")
    for name in configs:
        best = result[name]["best_tokens_per_s"]
        print(f"{name:9s} {best:10.1f}  {best / result['off']['best_tokens_per_s']:6.3f}")
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(dict(result, prompts=args.prompts, tokens=args.tokens, batch_size=args.batch_size), f, indent=2)
    if not same:
        print("error: the configurations made different tokens", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
