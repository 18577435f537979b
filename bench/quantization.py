"""What quantization costs and what it buys: token agreement with the unquantized model on a real
trained checkpoint, and how large a model fits on two 16 GB GPUs with each method.

    python bench/quantization.py [--model models/smollm2-135m-instruct] [--json results/quantization.json]

1. Agreement (measured). The runner itself, 2 ranks over gloo on CPU in float32, runs the same chat
   prompts greedily with quantization none, int8, nf4 and fp4 (each rank quantizing its own layers as
   it loads them). For each method against none: the prompts whose whole output is identical, and
   the share of generated tokens before the first divergence (after it, the texts go their own ways,
   so later positions say little). The planned weight bytes per rank come from the run record.
   The checkpoint is SmolLM2-135M-Instruct (make demo fetches and converts it).
3. With --equivalence (bench/gpu_check.sh runs it on a lent GPU): a random Llama made on the device,
   the runner at pipeline_size 2 (both ranks on the one GPU) with int8 and nf4 in float16, one prompt
   at a time, against generate() on the whole model loaded with the same BitsAndBytesConfig; tokens
   equal or not (on CPU, `--equivalence cpu`: equal for both, 8 of 8 prompts).
2. Fit (computed by the plan, no weights). For Llama-2-shaped configs (7B, 13B, 34B-like, 70B) in
   float16 on 16 GiB devices (CUDA context reserved, batch 1, 512 prompt + 256 new tokens): the
   weight bytes with each method and the smallest pipeline_size that fits.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

METHODS = ("none", "int8", "nf4", "fp4")
QUESTIONS = [
    "What is the capital of France?", "Name three primary colors.", "What is 2+2?",
    "Explain in one sentence what a CPU does.", "Write a haiku about the sea.", "What is photosynthesis?",
    "Give me a synonym for happy.", "How many days are in a leap year?", "What does DNA stand for?",
    "Translate 'good morning' into Spanish.", "Who wrote Romeo and Juliet?", "What is the boiling point of water?",
    "Suggest a name for a pet cat.", "Why is the sky blue?", "List two uses of a paperclip.",
    "What is the largest planet in our solar system?",
]
# Llama-2 shapes (the 34B-like one is Llama-2's layout at CodeLlama-34B's size), vocabulary 32000.
SHAPES = {
    "7B": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=32),
    "13B": dict(hidden_size=5120, intermediate_size=13824, num_hidden_layers=40, num_attention_heads=40,
                num_key_value_heads=40),
    "34B": dict(hidden_size=8192, intermediate_size=22016, num_hidden_layers=48, num_attention_heads=64,
                num_key_value_heads=8),
    "70B": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                num_key_value_heads=8),
}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(model: str, method: str, out_dir: str, new_tokens: int, batch: int, **over) -> list[dict]:
    """The runner, 2 ranks over gloo; returns its JSONL records."""
    out = os.path.join(out_dir, f"{method}.jsonl")
    cfg = dict(model_path=model, pipeline_size=2, prompts=[[{"role": "user", "content": q}] for q in QUESTIONS],
               max_new_tokens=new_tokens, batch_size=batch, dtype="float32", quantization=method,
               output_path=out, resume=False, timeout_s=600, progress=False)
    cfg.update(over)
    path = os.path.join(out_dir, f"{method}.json")
    with open(path, "w") as f:
        json.dump(cfg, f)
    port = _port()
    procs = [subprocess.Popen([sys.executable, os.path.join(ROOT, "run_distributed_inference.py"), "--config", path],
                              env=dict(os.environ, RANK=str(r), WORLD_SIZE="2", LOCAL_RANK=str(r),
                                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1"),
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for r in range(2)]
    errs = [p.communicate(timeout=1800)[1] for p in procs]
    if any(p.returncode for p in procs):
        raise SystemExit(f"{method}: a rank failed:\n" + "\n".join(e[-2000:] for e in errs))
    with open(out, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def agreement(base: list[list[int]], other: list[list[int]]) -> dict:
    same = sum(a == b for a, b in zip(base, other))
    prefix = 0
    for a, b in zip(base, other):
        n = 0
        while n < min(len(a), len(b)) and a[n] == b[n]:
            n += 1
        prefix += n
    return {"identical_outputs": same, "prompts": len(base),
            "tokens_before_divergence": prefix, "tokens": sum(len(a) for a in base)}


def equivalence(device: str, out_dir: str, new_tokens: int = 16) -> list[dict]:
    """The runner (pp2, float16) against whole-model generate() quantized the same way, on `device`."""
    import time

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeinfer.plan.quantization import Quantization
    from pipeinfer.models.tiny import make_model

    model = make_model(os.path.join(out_dir, "llama"), seed=0, device=device, hidden_size=512,
                       intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=2)
    prompts = QUESTIONS[:8]
    tok = AutoTokenizer.from_pretrained(model)
    rows = []
    for method in ("int8", "nf4"):
        q = Quantization(method, "load", compute_dtype="float16")
        ref = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float16, quantization_config=q.bnb_config(),
                                                   device_map={"": device})
        want = []
        for p in prompts:
            enc = tok(p, return_tensors="pt").to(device)
            ids = ref.generate(**enc, do_sample=False, max_new_tokens=new_tokens, pad_token_id=tok.pad_token_id)
            want.append(ids[0, enc["input_ids"].shape[1]:].tolist())
        del ref
        t0 = time.perf_counter()
        # one prompt at a time, as generate() runs each: in float16 a padded batch can flip a greedy token
        records = run(model, method, out_dir, new_tokens, 1, prompts=prompts, dtype="float16", device=device)
        got = [p["output_ids"] for p in sorted((r for r in records if r["type"] == "prompt"),
                                                key=lambda r: r["prompt_index"])]
        rows.append({"method": method, "equal": got == want, "prompts_equal": sum(a == b for a, b in zip(got, want)),
                     "prompts": len(prompts), "wall_s": round(time.perf_counter() - t0, 1),
                     "weights_per_rank": [r["weights"] for r in records[0]["plan"]["ranks"]]})
        print(f"{method}: runner pp2 on {device} float16 {'EQUALS' if got == want else 'DIFFERS FROM'} generate() "
              f"({rows[-1]['prompts_equal']}/{len(prompts)} prompts equal)", flush=True)
    return rows


def fit_table() -> list[dict]:
    """Weight bytes and the smallest pipeline_size on 16 GiB float16 GPUs, per shape and method."""
    from transformers import LlamaConfig

    from pipeinfer.config import build_config, micro_batching
    from pipeinfer.plan.fit import smallest_pipeline
    from pipeinfer.plan.layout import CUDA_CONTEXT_BYTES, layout
    from pipeinfer.plan.make import plan_sizes
    from pipeinfer.plan.model import model_shape
    from pipeinfer.plan.quantization import Quantization

    budget, prompt, new = 16 * 2**30, 512, 256
    rows = []
    for name, shape in SHAPES.items():
        m = model_shape(LlamaConfig(vocab_size=32000, max_position_embeddings=4096, **shape))
        for method in METHODS:
            q = None if method == "none" else Quantization(method, "load", compute_dtype="float16")
            sizes = plan_sizes(m, q, "float16", None, None)
            cfg = build_config(dict(model_path="-", prompts=["x"], pipeline_size=1, max_new_tokens=new,
                                    layer_split="auto"))
            _, ranks = layout(m, 1, "auto", sizes, micro_batching(cfg), prompt, prompt + new, None,
                               CUDA_CONTEXT_BYTES, "cuda")
            fewest = smallest_pipeline(cfg, m, sizes, micro_batching(cfg), prompt, prompt + new, budget,
                                       CUDA_CONTEXT_BYTES, "cuda")
            rows.append({"model": name, "method": method, "weights": ranks[0].weights, "smallest_pipeline": fewest})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=os.path.join(ROOT, "models", "smollm2-135m-instruct"))
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--json", default=os.path.join(ROOT, "results", "quantization.json"))
    ap.add_argument("--fit-only", action="store_true", help="only the fit table (no checkpoint needed)")
    ap.add_argument("--equivalence", metavar="DEVICE", help="only the runner against generate() on DEVICE (cuda)")
    args = ap.parse_args()
    if args.equivalence:
        with tempfile.TemporaryDirectory() as tmp:
            rows = equivalence(args.equivalence, tmp)
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump({"equivalence": rows}, f, indent=1)
        raise SystemExit(0 if all(r["equal"] for r in rows) else 1)

    gib = 2**30
    fits = fit_table()
    print("| model (float16, Llama-2 shape) | method | weights (GiB) | smallest pipeline_size on 16 GiB GPUs |")
    print("|---|---|---|---|")
    for r in fits:
        print(f"| {r['model']} | {r['method']} | {r['weights'] / gib:.1f} | {r['smallest_pipeline']} |")
    result = {"fit": fits}
    if not args.fit_only:
        if not os.path.exists(os.path.join(args.model, "config.json")):
            raise SystemExit(f"no checkpoint at {args.model}: make demo (or python -m pipeinfer.models.pretrained "
                             f"--out {args.model}) fetches and converts it")
        import torch
        import transformers
        from importlib.metadata import version

        outputs, rows = {}, []
        with tempfile.TemporaryDirectory() as tmp:
            for method in METHODS:
                records = run(args.model, method, tmp, args.new_tokens, args.batch_size)
                prompts = sorted((r for r in records if r["type"] == "prompt"), key=lambda r: r["prompt_index"])
                outputs[method] = [p["output_ids"] for p in prompts]
                summary = next(r for r in records if r["type"] == "summary")
                plan = records[0]["plan"]
                rows.append({"method": method, "weights_per_rank": [r["weights"] for r in plan["ranks"]],
                             "tokens_per_s": summary.get("tokens_per_s"),
                             **agreement(outputs["none"], outputs[method])})
        print(f"\n{os.path.basename(args.model)}, 2 ranks on CPU, float32, {len(QUESTIONS)} chat prompts x "
              f"{args.new_tokens} new tokens, greedy; torch {torch.__version__}, transformers "
              f"{transformers.__version__}, bitsandbytes {version('bitsandbytes')}")
        print("| quantization | weights per rank (MiB) | outputs identical to none | generated tokens before the "
              "first divergence |")
        print("|---|---|---|---|")
        for r in rows:
            print(f"| {r['method']} | {' + '.join(f'{w / 2**20:.1f}' for w in r['weights_per_rank'])} | "
                  f"{r['identical_outputs']}/{r['prompts']} | {r['tokens_before_divergence']}/{r['tokens']} "
                  f"({r['tokens_before_divergence'] / r['tokens']:.0%}) |")
        result.update(model=args.model, agreement=rows, outputs=outputs, torch=torch.__version__,
                      transformers=transformers.__version__, bitsandbytes=version("bitsandbytes"))
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(result, f, indent=1)
    print(f"-> {args.json}")


if __name__ == "__main__":
    main()
