"""Where one decode step goes, per stage: torch.profiler through the runner's profile_steps.

    python bench/profile_step.py [--smoke] [--model models/smollm2-135m-instruct] [--dtype bfloat16]
                                 [--batch-sizes 1,8,32] [--pipeline-sizes 1,2] [--compile false,true]
                                 [--json results/profile_step.json]

For every (compile, pipeline_size, batch size) cell the runner runs the demo checkpoint (the same
prompt in every row, ignore_eos, greedy) with profile_steps set so that the trace holds every
slot's first visit (the prefill, left out) and --steps decode visits after it; ranks are pinned one
core each (bench/throughput.py's launch). Each rank's Chrome trace is split per decode visit into:

  matmul      the layers' and the head's linear layers (aten::linear/matmul/mm/addmm/bmm, outermost)
  attention   aten::scaled_dot_product_attention (outermost)
  layers      the rest of the stage's forward: norms, activations, rotary, cache writes, masks
  schedule    the visit's Python outside the forward, sampling and messages (rows.py's bookkeeping)
  sampling    the last stage's sampling, stop checks and token message (rows.py _sample, less its send)
  messages    send and receive, receive including the wait for the other stage (the pipeline bubble)

as milliseconds per visit (a visit decodes one position of every row of one slot; with one slot,
batch_size rows). The profiler adds its own cost per operator, so "layers" and "schedule" read
high: compare cells with each other, and tokens/s with bench/peers.py. --smoke: a tiny model,
batch 2, three steps, to keep the script running in CI (tests/test_bench_smoke.py).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

from throughput import launch_runner  # noqa: E402

COLUMNS = ("matmul", "attention", "layers", "schedule", "sampling", "messages")
MATMUL = {"aten::linear", "aten::matmul", "aten::mm", "aten::addmm", "aten::bmm"}
ATTENTION = {"aten::scaled_dot_product_attention"}
PROMPT = "Explain in two sentences why pipeline parallel inference needs micro-batches to keep every stage busy."


def outermost(events: list[dict]) -> list[dict]:
    """The events not inside another of the same list (one thread's events nest, never overlap)."""
    kept, end = [], -1.0
    for e in sorted(events, key=lambda e: (e["ts"], -e["dur"])):
        if e["ts"] >= end:
            kept.append(e)
            end = e["ts"] + e["dur"]
    return kept


def inside(events: list[dict], windows: list[dict]) -> list[dict]:
    return [e for e in events if any(w["ts"] <= e["ts"] and e["ts"] + e["dur"] <= w["ts"] + w["dur"] for w in windows)]


def split_trace(path: str) -> list[dict]:
    """Per decode visit in one rank's trace: milliseconds per column and in all."""
    with open(path, encoding="utf-8") as f:
        events = [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X" and "dur" in e]
    steps = [e for e in events if e["name"].startswith("ProfilerStep#")]
    if not steps:
        return []
    tid = steps[0]["tid"]
    events = [e for e in events if e["tid"] == tid]
    out = []
    for step in steps:
        mine = inside(events, [step])
        named = {k: [e for e in mine if e["name"] == k] for k in ("decode", "prefill", "send", "recv", "sample")}
        if not named["decode"] or named["prefill"]:
            continue  # a prefill (join) visit, or the warm-up
        forward = named["decode"]
        matmul = sum(e["dur"] for e in outermost(inside([e for e in mine if e["name"] in MATMUL], forward)))
        attention = sum(e["dur"] for e in outermost(inside([e for e in mine if e["name"] in ATTENTION], forward)))
        compute = sum(e["dur"] for e in forward)
        messages = sum(e["dur"] for e in named["send"] + named["recv"])
        sampled_sends = inside(named["send"], named["sample"])
        sampling = sum(e["dur"] for e in named["sample"]) - sum(e["dur"] for e in sampled_sends)
        row = {"matmul": matmul, "attention": attention, "layers": compute - matmul - attention,
               "sampling": sampling, "messages": messages,
               "schedule": step["dur"] - compute - messages - sampling, "step": step["dur"]}
        out.append({k: v / 1000 for k, v in row.items()})
    return out


def mean_row(rows: list[dict]) -> dict:
    return {k: sum(r[k] for r in rows) / len(rows) for k in rows[0]} if rows else {}


def run_cell(model: str, dtype: str, compile_: bool, world: int, batch: int, steps: int, work: str,
             timeout: float) -> dict:
    from pipeinfer.config import build_config, micro_batching

    tag = f"c{int(compile_)}-pp{world}-b{batch}"
    cfg = dict(model_path=model, prompts=[PROMPT] * batch, pipeline_size=world, batch_size=batch, dtype=dtype,
               ignore_eos=True, do_sample=False, compile=compile_, progress=False, nvtx=False, timeout_s=300,
               output_path=os.path.join(work, f"{tag}.jsonl"), offload_folder=os.path.join(work, "offload"),
               resume=False)
    slots = len(micro_batching(build_config(cfg)))
    cfg["profile_steps"] = slots * (steps + 1)  # every slot's prefill, then `steps` decode visits per slot
    cfg["max_new_tokens"] = steps + 4           # ...and a few more so that the trace ends before the run
    if error := launch_runner(cfg, world, work, tag, timeout):
        return {"error": error}
    stages = []
    for r in range(world):
        rows = split_trace(f"{cfg['output_path']}.rank{r}.trace.json")
        stages.append({"rank": r, "visits": len(rows), **mean_row(rows)})
    return {"slots": slots, "rows_per_visit": batch // slots, "stages": stages}


def print_table(cells: dict) -> None:
    print("\nms per decode visit (one position of every row of one slot), per stage; profiler on")
    print("| compile | stages | batch | rows/visit | stage | " + " | ".join(COLUMNS) + " | step |")
    print("|---|---|---|---|---|" + "---|" * (len(COLUMNS) + 1))
    for key, cell in cells.items():
        c, w, b = key.split("/")
        if "error" in cell:
            print(f"| {c} | {w} | {b} | | | error: {cell['error'][:120]} |")
            continue
        for s in cell["stages"]:
            if not s["visits"]:
                print(f"| {c} | {w} | {b} | {cell['rows_per_visit']} | {s['rank']} | no decode visit in the trace |")
                continue
            print(f"| {c} | {w} | {b} | {cell['rows_per_visit']} | {s['rank']} | "
                  + " | ".join(f"{s[k]:.2f}" for k in COLUMNS) + f" | {s['step']:.2f} |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=os.path.join(ROOT, "models", "smollm2-135m-instruct"))
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--batch-sizes", default="1,8,32")
    ap.add_argument("--pipeline-sizes", default="1,2")
    ap.add_argument("--compile", default="false,true", help="compile settings to profile, e.g. false,true")
    ap.add_argument("--steps", type=int, default=8, help="decode visits per slot in the trace")
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--smoke", action="store_true", help="a tiny model, batch 2, 3 steps: for CI")
    ap.add_argument("--json")
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="pipeinfer-profile-")
    if args.smoke:
        from pipeinfer.models.tiny import make_model
        args.model = make_model(os.path.join(work, "tiny"), seed=0, hidden_size=64, intermediate_size=128,
                                num_hidden_layers=4, num_attention_heads=4, max_position_embeddings=256)
        args.dtype, args.batch_sizes, args.steps = "float32", "2", 3
    if not os.path.isdir(args.model):
        print(f"error: no model at {args.model}: run `make demo` (it fetches the demo checkpoint) or pass --model",
              file=sys.stderr)
        return 2
    cells = {}
    for c in [s.strip().lower() == "true" for s in args.compile.split(",")]:
        for w in map(int, args.pipeline_sizes.split(",")):
            for b in map(int, args.batch_sizes.split(",")):
                cells[f"{'on' if c else 'off'}/{w}/{b}"] = cell = run_cell(args.model, args.dtype, c, w, b, args.steps,
                                                                           work, args.timeout)
                print(f"compile {c} pp {w} batch {b}: {json.dumps(cell)[:300]}", file=sys.stderr)
    print_table(cells)
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "dtype": args.dtype, "cells": cells}, f, indent=1)
    return 1 if any("error" in c for c in cells.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
