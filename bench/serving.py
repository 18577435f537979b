"""The server measured as servers are: Poisson arrivals at several request rates from a real HTTP
client, beside the batch runner's tokens/s on the same prompts.

    python bench/serving.py [--smoke] [--json results/serving.json] [--model models/smollm2-135m-instruct]

For each pipeline_size (1 and 2) it starts `python -m pipeinfer.serve` (rank r pinned to core r, as
bench/throughput.py pins the runner's), and for each rate sends --requests streamed completions
(the official `openai` AsyncOpenAI client over loopback) with exponential gaps between sends (a
Poisson process, seeded); rate "inf" sends them all at once: the saturating rate. Every request
asks for exactly --max-tokens tokens (ignore_eos). Reported per rate: output tokens/s (all tokens
/ first send to last token), time to first token and time per output token (p50, p90, p99). Then
the batch runner (run_distributed_inference.py) on the same prompts, batch_size and max_new_tokens:
its tokens/s, and the server's at the saturating rate over it (target: >= 0.85). The server's
greedy texts at that rate are compared with the runner's (a difference is a bug: exit 1).
--smoke: a tiny random model, 8 requests, rates 8 and inf, pipeline_size 2 (tests/test_bench_smoke.py).
Before the rates, one request warms the server up (its first round allocates the KV caches).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

from throughput import free_port, make_prompts, rank_env, run_runner, runner_config, tail  # noqa: E402

SERVE = [sys.executable, "-m", "pipeinfer.serve"]
SMOKE_SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=4, max_position_embeddings=512)


def start_server(cfg: dict, work: str, tag: str, timeout: float = 300) -> tuple[list, str]:
    path = os.path.join(work, f"{tag}.serve.json")
    with open(path, "w") as f:
        json.dump(cfg, f)
    rdv, port, world = free_port(), free_port(), cfg["pipeline_size"]
    procs = []
    for r in range(world):
        log = open(os.path.join(work, f"{tag}.serve.rank{r}.log"), "w")
        procs.append(subprocess.Popen(["taskset", "-c", str(r % os.cpu_count()), *SERVE, "--config", path, "--port",
                                       str(port)], cwd=ROOT, env=rank_env(r, world, rdv), stdout=log,
                                      stderr=subprocess.STDOUT))
    url, end = f"http://127.0.0.1:{port}", time.monotonic() + timeout
    while time.monotonic() < end:
        if any(p.poll() is not None for p in procs):
            stop_server(procs)
            raise RuntimeError(f"{tag}: a server rank exited: {tail(os.path.join(work, f'{tag}.serve.rank0.log'))}")
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as r:
                if r.status == 200:
                    return procs, url
        except OSError:
            time.sleep(0.2)
    stop_server(procs)
    raise RuntimeError(f"{tag}: the server was not healthy within {timeout:g} s")


def stop_server(procs: list) -> list[int]:
    procs[0].send_signal(signal.SIGTERM)  # drains, then ends the work on every rank
    codes = []
    for p in procs:
        try:
            codes.append(p.wait(timeout=60))
        except subprocess.TimeoutExpired:
            p.kill()
            codes.append(-9)
    return codes


async def one(client, model: str, prompt: str, max_tokens: int, delay: float, t0: float) -> dict:
    await asyncio.sleep(max(0.0, t0 + delay - time.perf_counter()))
    sent = time.perf_counter()
    first = last = None
    text, tokens = [], 0
    stream = await client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                             stream=True, stream_options={"include_usage": True})
    async for chunk in stream:
        now = time.perf_counter()
        if chunk.choices:
            first = first or now
            last = now
            text.append(chunk.choices[0].text)
        if chunk.usage is not None:
            tokens = chunk.usage.completion_tokens
    return {"sent": sent, "ttft": first - sent, "end": last, "tokens": tokens, "text": "".join(text),
            "tpot": (last - first) / (tokens - 1) if tokens > 1 else None}


def percentiles(values: list[float]) -> dict:
    values = sorted(v for v in values if v is not None)
    if not values:
        return {}
    q = statistics.quantiles(values, n=100, method="inclusive") if len(values) > 1 else values * 99
    return {"p50": q[49], "p90": q[89], "p99": q[98]}


async def run_rate(url: str, model: str, prompts: list[str], max_tokens: int, rate: float, seed: int) -> dict:
    import openai

    rng, t, delays = random.Random(seed), 0.0, []
    for _ in prompts:
        delays.append(t)
        t += rng.expovariate(rate) if rate != float("inf") else 0.0
    async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=600) as client:
        t0 = time.perf_counter()
        done = await asyncio.gather(*(one(client, model, p, max_tokens, d, t0) for p, d in zip(prompts, delays)))
    span = max(d["end"] for d in done) - min(d["sent"] for d in done)
    total = sum(d["tokens"] for d in done)
    return {"rate": rate if rate != float("inf") else "inf", "requests": len(done), "tokens": total,
            "tokens_per_s": total / span, "ttft_s": percentiles([d["ttft"] for d in done]),
            "tpot_s": percentiles([d["tpot"] for d in done]), "texts": [d["text"] for d in done]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=os.path.join(ROOT, "models", "smollm2-135m-instruct"))
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--rates", default="1,2,4,inf", help="requests per second, comma-separated ('inf': all at once)")
    ap.add_argument("--pipeline-sizes", default="1,2")
    ap.add_argument("--repeats", type=int, default=1, help="runs of the saturating rate and of the runner")
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="bench-serving-")
    if args.smoke:
        from pipeinfer.models.tiny import make_model

        args.model = make_model(os.path.join(work, "tiny"), seed=0, **SMOKE_SHAPE)
        args.requests, args.max_tokens, args.batch_size, args.rates, args.pipeline_sizes = 8, 8, 4, "8,inf", "2"
    if not os.path.isdir(args.model):
        print(f"error: --model {args.model} not found: `make demo` fetches the demo model", file=sys.stderr)
        return 2
    rates = [float(r) for r in args.rates.split(",")]
    prompts = make_prompts(args.requests)
    model = os.path.basename(args.model.rstrip("/"))
    base = runner_config(args.model, prompts, args.max_tokens, work)
    results, bad = {"model": args.model, "requests": args.requests, "max_tokens": args.max_tokens,
                    "batch_size": args.batch_size, "cpus": os.cpu_count(), "cells": []}, 0
    for pp in [int(p) for p in args.pipeline_sizes.split(",")]:
        cfg = dict(base, pipeline_size=pp, batch_size=args.batch_size, max_queued_requests=max(args.requests, 1),
                   output_path=os.path.join(work, f"unused-pp{pp}.jsonl"))
        procs, url = start_server(cfg, work, f"pp{pp}")
        try:
            asyncio.run(run_rate(url, model, prompts[:1], args.max_tokens, float("inf"), seed=0))  # warm-up
            cells = [asyncio.run(run_rate(url, model, prompts, args.max_tokens, r, seed=pp)) for r in rates]
            cells += [asyncio.run(run_rate(url, model, prompts, args.max_tokens, float("inf"), seed=pp))
                      for _ in range(args.repeats - 1)]
        finally:
            codes = stop_server(procs)
        runs = [run_runner(cfg, f"pp{pp}", args.batch_size, None, work, 600) for _ in range(args.repeats)]
        if any("error" in r for r in runs) or any(codes):
            print(f"pp{pp}: {[r.get('error') for r in runs]} server exits {codes}", file=sys.stderr)
            return 1
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(args.model, local_files_only=True)
        want = [tok.decode(runs[0]["output_ids"][i], skip_special_tokens=True) for i in range(len(prompts))]
        saturated = [c for c in cells if c["rate"] == "inf"]
        mismatched = sum(t != w for c in saturated for t, w in zip(c["texts"], want))
        bad += mismatched
        runner_tps = [r["tokens_per_s"] for r in runs]
        server_tps = [c["tokens_per_s"] for c in saturated]
        for c in cells:
            c.pop("texts")
        results["cells"].append({"pipeline_size": pp, "rates": cells, "runner_tokens_per_s": runner_tps,
                                 "server_over_runner": statistics.median(server_tps) / statistics.median(runner_tps),
                                 "texts_equal_runner": mismatched == 0})
        print(f"pipeline_size {pp}: batch runner {', '.join(f'{v:.1f}' for v in runner_tps)} tokens/s; "
              f"server at the saturating rate / runner = {results['cells'][-1]['server_over_runner']:.2f}; "
              f"texts {'equal' if not mismatched else f'DIFFER in {mismatched}'}")
        print(f"  {'rate/s':>7} {'tok/s':>7} {'TTFT p50':>9} {'p90':>7} {'p99':>7} {'TPOT p50':>9} {'p90':>7} {'p99':>7}")
        for c in cells:
            t, p = c["ttft_s"], c["tpot_s"]
            print(f"  {c['rate']!s:>7} {c['tokens_per_s']:7.1f} {t['p50']:9.3f} {t['p90']:7.3f} {t['p99']:7.3f} "
                  f"{p.get('p50', 0):9.4f} {p.get('p90', 0):7.4f} {p.get('p99', 0):7.4f}")
    if args.json:
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
