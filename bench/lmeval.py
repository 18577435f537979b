"""Requests per second of each lm-eval request type on the demo model: through the engine (the
pipeinfer model of pipeinfer/evaluate/) and through lm-eval's own hf backend, side by side in one run.

    python bench/lmeval.py [--model models/smollm2-135m-instruct] [--requests 64] [--repeat 3]
    torchrun --nproc-per-node=2 bench/lmeval.py --pipeline-size 2     # the engine split in two

Every rank starts the engine; rank 0 times model.loglikelihood / loglikelihood_rolling /
generate_until on the same requests for both backends (float32, CPU, batch_size --batch-size for
both: the engine's rows, hf's batches), the other ranks serve their stage. The requests are made
here, deterministic: multiple-choice style pairs (4 continuations per context, as hellaswag has),
documents of ~600 tokens, and greedy generations of up to 32 tokens that stop at a blank line.
Prints the median requests/s of --repeat runs per type (interleaved), its spread, and the ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

WORDS = ("the model splits its layers across nodes and every stage runs its own part of each request while "
         "the next stage waits for hidden states from the previous one so that a large network fits").split()


def text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words))


def requests(n: int):
    from lm_eval.api.instance import Instance

    rng = random.Random(0)
    ll = []
    for i in range(n // 4):  # 4 continuations of each context, as a multiple-choice task asks
        context = text(rng, 60) + "."
        ll += [Instance("loglikelihood", {}, (context, " " + text(rng, 3 + k)), 4 * i + k, ("bench", i, 1))
               for k in range(4)]
    rolling = [Instance("loglikelihood_rolling", {}, (text(rng, 500),), i, ("bench", i, 1)) for i in range(n // 4)]
    gen = [Instance("generate_until", {}, (text(rng, 40), {"until": ["\n\n"], "max_gen_toks": 32, "do_sample": False}),
                    i, ("bench", i, 1)) for i in range(n // 4)]
    return {"loglikelihood": ll, "loglikelihood_rolling": rolling, "generate_until": gen}


def timed(models: dict, kind: str, reqs, repeat: int) -> dict[str, list[float]]:
    """Requests/s of each model, the repeats interleaved (A B A B ...): on a shared machine a burst
    of load then falls on both, not on one."""
    rates = {name: [] for name in models}
    for _ in range(repeat):
        for name, lm in models.items():
            t0 = time.perf_counter()
            getattr(lm, kind)(reqs, disable_tqdm=True)
            rates[name].append(len(reqs) / (time.perf_counter() - t0))
    return rates


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="models/smollm2-135m-instruct")
    ap.add_argument("--pipeline-size", type=int, default=int(os.environ.get("WORLD_SIZE", "1")))
    ap.add_argument("--requests", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    from pipeinfer.engine import Engine
    from pipeinfer.evaluate import lm as plm
    from pipeinfer.evaluate.settings import EvalSettings

    cfg = dict(model_path=args.model, pipeline_size=args.pipeline_size, dtype="float32", batch_size=args.batch_size,
               output_path="results/bench-lmeval.jsonl", timeout_s=600)
    path = os.path.join(tempfile.mkdtemp(prefix="bench-lmeval-"), "config.json")
    with open(path, "w") as f:
        json.dump(cfg, f)
    settings = EvalSettings.read({"config": path})
    with Engine.start(settings.config, settings.overrides) as engine:
        if not engine.is_first:
            engine.serve()
            return 0
        from lm_eval.models.huggingface import HFLM

        plm.use_engine(engine, settings)
        ours = plm.PipeinferLM(config=path)
        hf = HFLM(pretrained=args.model, dtype="float32", device="cpu", batch_size=args.batch_size)
        print(f"{args.model}: pipeline_size {args.pipeline_size}, batch_size {args.batch_size}, float32, "
              f"{os.cpu_count()} CPUs, median of {args.repeat} (spread min-max)")
        print(f"{'request type':24} {'n':>4} {'pipeinfer req/s':>22} {'hf req/s':>22} {'ratio':>6}")
        for kind, reqs in requests(args.requests).items():
            got = timed({"pipeinfer": ours, "hf": hf}, kind, reqs, args.repeat)
            med = {k: statistics.median(v) for k, v in got.items()}
            cell = {k: f"{med[k]:.2f} ({min(v):.2f}-{max(v):.2f})" for k, v in got.items()}
            print(f"{kind:24} {len(reqs):4d} {cell['pipeinfer']:>22} {cell['hf']:>22} "
                  f"{med['pipeinfer'] / med['hf']:6.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
