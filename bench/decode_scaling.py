"""Does a decode step cost the same at token 1000 as at token 10? (KV cache on every stage.)

    python bench/decode_scaling.py [--tokens 1024] [--json results/decode_scaling.json]

Runs the runner's own generate() on one stage (pipeline_size 1, one thread) over a
locally built model, with ignore_eos, and reports the mean decode-step time in windows of
generated positions. For contrast it times a forward pass without a cache over the same
context lengths, which is what a runner that recomputes the prefix would pay per token.
With the cache, step time should stay nearly flat: only attention over the cached keys grows.
"""

from __future__ import annotations

import argparse
from collections import deque
import json
import os
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeinfer.run.comm import Comm  # noqa: E402
from pipeinfer.models.tiny import make_model  # noqa: E402
from pipeinfer.run.generation import GenParams, generate  # noqa: E402
from pipeinfer.plan.partition import StagePlan  # noqa: E402
from pipeinfer.run.prompts import Batch, MicroBatches  # noqa: E402
from pipeinfer.run.sampling import SamplingParams  # noqa: E402
from pipeinfer.load.stage import partition_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=1024)
    ap.add_argument("--json", default="results/decode_scaling.json")
    args = ap.parse_args()
    torch.set_num_threads(1)
    shape = dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=8, max_position_embeddings=args.tokens + 64)
    with tempfile.TemporaryDirectory() as tmp:
        path = make_model(os.path.join(tmp, "m"), seed=0, **shape)
        stage, _ = partition_model(path, StagePlan(0, 1, range(0)), torch.device("cpu"), torch.float32,
                                   os.path.join(tmp, "off"))
        prompt = torch.randint(0, 256, (1, 16), generator=torch.Generator().manual_seed(0))
        batch = Batch([0], prompt, torch.ones_like(prompt), [16])
        gp = GenParams(args.tokens, True, (), 0, SamplingParams(), 0)
        comm = Comm(0, 1, torch.device("cpu"), 60)
        work = MicroBatches(deque([0]), [1], lambda _: batch)
        (_, result), = generate(stage, comm, work, gp, shape["hidden_size"], torch.float32)
        steps = [end - start for kind, start, end in comm.timeline.events if kind == "decode"]  # context 16+i+1

        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        model.generation_config.eos_token_id = None  # decode every position, as ignore_eos does
        with torch.inference_mode():  # the timed tokens must be right: a broken cache gives others
            expected = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                                      max_new_tokens=args.tokens)[0, 16:].tolist()
        matches = result.output_ids[0] == expected

        def no_cache(n: int) -> float:
            ids = torch.randint(0, 256, (1, n))
            times = []
            for _ in range(3):
                t = time.perf_counter()
                with torch.inference_mode():
                    model(ids, use_cache=False)
                times.append(time.perf_counter() - t)
            return min(times)

    n = len(steps)
    w = min(64, n // 3)  # window width in steps
    windows = [(0, w), (n // 2 - w // 2, n // 2 + w - w // 2), (n - w, n)]
    rows = []
    for lo, hi in windows:
        ctx = 16 + (lo + hi) // 2
        rows.append({"positions": [16 + lo, 16 + hi], "cached_step_ms": 1e3 * statistics.mean(steps[lo:hi]),
                     "no_cache_step_ms": 1e3 * no_cache(ctx)})
    first, last = rows[0], rows[-1]

    def step_flops(ctx: int) -> float:  # per generated token: projections + MLP + attention over ctx keys
        d, i = shape["hidden_size"], shape["intermediate_size"]
        return shape["num_hidden_layers"] * (2 * (4 * d * d + 3 * d * i) + 4 * ctx * d)

    mid = lambda r: sum(r["positions"]) / 2  # noqa: E731
    result = {"model": shape, "threads": 1, "windows": rows, "decode_steps": len(steps),
              "output_matches_generate": matches,
              "cached_growth": last["cached_step_ms"] / first["cached_step_ms"],
              "attention_flops_growth": step_flops(mid(last)) / step_flops(mid(first)),
              "no_cache_growth": last["no_cache_step_ms"] / first["no_cache_step_ms"]}
    print(f"{'positions':>12} {'cached step ms':>15} {'no-cache step ms':>17}")
    for r in rows:
        print(f"{r['positions'][0]:>5}-{r['positions'][1]:<6} {r['cached_step_ms']:>15.3f} {r['no_cache_step_ms']:>17.3f}")
    print(f"growth from first to last window: cached x{result['cached_growth']:.2f} "
          f"(attention's share of the FLOPs alone predicts x{result['attention_flops_growth']:.2f}), "
          f"no cache x{result['no_cache_growth']:.2f}")
    print(f"the runner's {args.tokens} tokens {'equal' if matches else 'DIFFER FROM'} whole-model generate()'s")
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
