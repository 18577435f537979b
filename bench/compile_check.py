"""compile=true on the demo model: its compile time cold and cached, and where its tokens leave eager's.

    python bench/compile_check.py [--model models/smollm2-135m-instruct] [--dtype bfloat16] [--tokens 64]

Runs the runner (pipeline_size 1, one core, the demo config's prompts, greedy, ignore_eos) three
times: compile=false; compile=true with an empty inductor cache (a fresh TORCHINDUCTOR_CACHE_DIR);
compile=true again with that cache (what a rerun finds). Prints each compiled run's compile time
(the stage record's compile_s: the warm-up steps that trace and compile) and, per prompt, how many
tokens the compiled run generates before its first token that differs from eager's (in float32 the
two are equal: tests/test_compile.py; in bfloat16 the fused kernels round differently).
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

from throughput import ENTRY, launch, tail  # noqa: E402


def run(model: str, prompts: list, dtype: str, tokens: int, compile_: bool, work: str, tag: str, env: dict) -> list:
    cfg = dict(model_path=model, prompts=prompts, pipeline_size=1, batch_size=len(prompts), dtype=dtype,
               max_new_tokens=tokens, ignore_eos=True, compile=compile_, progress=False, nvtx=False, resume=False,
               output_path=os.path.join(work, f"{tag}.jsonl"), offload_folder=os.path.join(work, "offload"))
    path = os.path.join(work, f"{tag}.config.json")
    with open(path, "w") as f:
        json.dump(cfg, f)
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        codes = launch([ENTRY, "--config", path], 1, os.path.join(work, tag), 1800)
    finally:
        for k, v in old.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    if any(codes):
        sys.exit(f"error: the {tag} run failed: {tail(os.path.join(work, f'{tag}.rank0.log'))}")
    with open(cfg["output_path"], encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def first_difference(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=os.path.join(ROOT, "models", "smollm2-135m-instruct"))
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--json")
    args = ap.parse_args()
    if not os.path.isdir(args.model):
        print(f"error: no model at {args.model}: run `make demo` or pass --model", file=sys.stderr)
        return 2
    with open(os.path.join(ROOT, "exp_config.json")) as f:
        prompts = json.load(f)["prompts"]
    work = tempfile.mkdtemp(prefix="pipeinfer-compile-")
    cache = {"TORCHINDUCTOR_CACHE_DIR": os.path.join(work, "inductor-cache")}
    runs = {"eager": run(args.model, prompts, args.dtype, args.tokens, False, work, "eager", {}),
            "compiled_cold": run(args.model, prompts, args.dtype, args.tokens, True, work, "cold", cache),
            "compiled_cached": run(args.model, prompts, args.dtype, args.tokens, True, work, "cached", cache)}
    out = {"dtype": args.dtype, "tokens": args.tokens}
    for name, records in runs.items():
        stage = next(r for r in records if r["type"] == "stage")
        summary = next(r for r in records if r["type"] == "summary")
        out[name] = {"compile": stage.get("compile"), "tokens_per_s": summary["tokens_per_s"],
                     "output_ids": [r["output_ids"] for r in sorted((r for r in records if r["type"] == "prompt"),
                                                                    key=lambda r: r["prompt_index"])]}
    eager = out["eager"]["output_ids"]
    out["first_difference"] = [first_difference(a, b) for a, b in zip(eager, out["compiled_cold"]["output_ids"])]
    print(f"compile_s cold: {out['compiled_cold']['compile']['compile_s']}, "
          f"cached: {out['compiled_cached']['compile']['compile_s']} ({cache['TORCHINDUCTOR_CACHE_DIR']})")
    print(f"{args.dtype}: tokens before the first difference from eager, per prompt (of {args.tokens}): "
          f"{out['first_difference']}")
    print("tokens/s (batch of all prompts, one core): " +
          ", ".join(f"{k} {out[k]['tokens_per_s']:.1f}" for k in runs))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
