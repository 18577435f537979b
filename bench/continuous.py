"""Row-level refill against whole-micro-batch refill, on long-tailed per-prompt lengths.

    python bench/continuous.py [--smoke] [--json results/continuous.json] [--device cuda]
                               [--pipeline-sizes 2] [--batch-sizes 8,32] [--repeat 2] [--workload eos]
                               [--before REV|none] [--compile auto|true|false|cudagraphs] [--prompt-scale 4]
                               [--vllm-python /work/venv-vllm/bin/python]

Two workloads with the same prompts and the same total of new tokens (ignore_eos, so every prompt
makes exactly its max_new_tokens):
  varied   per-prompt max_new_tokens from a geometric distribution clipped to [lo, hi] (4..256)
  equal    every prompt the mean of the varied ones (the remainder spread one token apiece)
each run with schedule "rows" (a finished prompt's row refills at once: run/rows.py) and
"micro_batches" (a slot refills when its longest row ends: run/generation.py), at pipeline_size
1 and 2 and batch_size 8 and 32, through the batch runner (run_distributed_inference.py), one
thread per rank. Reported per cell: useful tokens/s (the summary's new_tokens / wall_s), and the
positions every stage computed per useful token (the stage records' rows_computed / new_tokens),
and the same beyond the prompts' own positions ((rows_computed - prompt tokens) / new_tokens: about
1.0 is no wasted row; padding, finished rows still computed and idle rows add to it). The ratios
the issue asks for: rows varied / rows equal (target >= 0.85) and rows varied / micro_batches
varied (target >= 1.8). The issue measures that last one against "today's schedule on the commit
before the change": --before (default bc56911, the last commit before row-level refill) runs the
varied workload once more on that commit's batch runner (git archive), and the report adds rows
varied / before. The rows schedule runs the varied workload once more with packed_prefill false
(each visit's prefills in forwards of their own, not in its decode's: load/packed.py), reported as
packed / separate, and where there are several micro-batches with spread_prefill false (each
joiner's prefill whole in the visit that admits it, not spread over the micro-batches' visits),
reported as spread / whole (neither with --smoke). Every cell's output ids are compared with the
rows schedule's on the same workload (greedy: any difference is a bug; exit 1).
--prompt-scale N: each geometric prompt N times over (8..64 tokens become 8N..64N; the byte
tokenizer makes one token a byte).
--compile: the runner's `compile` for every cell (its default "auto" compiles CUDA stages, which
then run their prefills apart; bench/gpu_check.sh passes false to measure packing on a GPU).
--workload eos (or both): the demo instruct checkpoint (float32) answers --eos-prompts chat requests
until EOS (at most --eos-max-new tokens); "equal" is the same requests with the rows schedule's
total spread evenly (ignore_eos). A near-tie may flip a token between the schedules' batch shapes
there, so differences are counted and printed, not an error.
--repeat N: the cells of a pair round-robin N times, each reporting its best run (and all runs).
--vllm-python PY: each cell's requests also run on vLLM's CPU build (bench/vllm_peer.py; its own
environment: ../shared/notes/vllm-cpu.md), at the lengths the rows schedule made (ignore_eos) and
at the equal ones, max_num_seqs = batch_size: what the field's engine makes of the same queue.
Every cell also prints the ratios a step count gives (every step costing the same, first come first
served: what the queue's drain alone leaves; step_ratios()).
--smoke: a tiny model, few prompts, 4..16 tokens, pp 1 and 2 at batch 4 (tests/test_bench_smoke.py).
"""

from __future__ import annotations

import argparse
import heapq
import json
import os
import random
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

from throughput import SHAPE, launch_runner, make_prompts  # noqa: E402
from vllm_peer import run_vllm, vllm_problem  # noqa: E402

from pipeinfer.models.tiny import make_model  # noqa: E402

# The commit before row-level refill (ce033ae): micro-batches that keep their slot until their longest
# row ends, with per-prompt max_new_tokens already (976da4d): "today's schedule" of issue #23.
BEFORE, BEFORE_WHAT = "bc56911", "the engine, before row-level refill"
COMMON: dict = {}  # config keys every cell runs with (--compile)

SMOKE_SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=4, max_position_embeddings=512)


def lengths(n: int, lo: int, hi: int, seed: int = 0) -> tuple[list[int], list[int]]:
    """(varied, equal): n geometric lengths in [lo, hi] with mean about (hi - lo) / 8 + lo, and n
    equal lengths with the same sum."""
    rng = random.Random(seed)
    p = 8 / (hi - lo)
    varied = []
    for _ in range(n):
        k = lo
        while k < hi and rng.random() > p:
            k += 1
        varied.append(k)
    total = sum(varied)
    equal = [total // n + (1 if i < total % n else 0) for i in range(n)]
    return varied, equal


def run_cell(model: str, work: str, prompts: list, max_new: list[int], schedule: str, pp: int, batch: int,
             device: str, timeout: float, ignore_eos: bool = True, name: str = "", dtype: str = "auto",
             equal: bool = False, entry: str | None = None, extra: dict | None = None) -> dict:
    """One run of the batch runner; prompts are texts or chat messages (lists of {role, content}).
    entry: another commit's run_distributed_inference.py (the commit before the rows schedule, which
    has no `schedule` key and always runs micro-batches), in place of this checkout's."""
    tag = f"{name}{'before' if entry else schedule}-pp{pp}-b{batch}-{'e' if equal else 'v'}"
    pfile = os.path.join(work, f"{tag}.jsonl")
    with open(pfile, "w") as f:
        f.writelines(json.dumps({"messages" if isinstance(p, list) else "prompt": p, "max_new_tokens": n}) + "\n"
                     for p, n in zip(prompts, max_new))
    cfg = dict(model_path=model, pipeline_size=pp, prompts_file=pfile, max_new_tokens=max(max_new), batch_size=batch,
               schedule=schedule, ignore_eos=ignore_eos, device=device, dtype=dtype,
               output_path=os.path.join(work, f"{tag}.out.jsonl"),
               offload_folder=os.path.join(work, "offload"), timeout_s=600, progress=False)
    cfg.update(COMMON)
    cfg.update(extra or {})
    if entry:
        del cfg["schedule"]
    if os.path.exists(cfg["output_path"]):  # a fresh run, never a resume of an earlier one in this workdir
        os.remove(cfg["output_path"])
    if error := launch_runner(cfg, pp, work, tag, timeout, *([entry] if entry else [])):
        return {"error": error}
    with open(cfg["output_path"], encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    summary = next(r for r in records if r["type"] == "summary")
    stages = [r for r in records if r["type"] == "stage"]
    useful = summary["new_tokens"]
    got = {"tokens_per_s": useful / summary["wall_s"], "new_tokens": useful, "wall_s": summary["wall_s"],
           "max_prompts_in_flight": max(s["max_prompts_in_flight"] for s in stages),
           "output_ids": {r["prompt_index"]: r["output_ids"] for r in records if r["type"] == "prompt"},
           "prompt_records": [r for r in records if r["type"] == "prompt"],
           "steady_tokens_per_s": steady_rate([r for r in records if r["type"] == "prompt"]),
           "prefill_chunks": max(s.get("prefill_chunks", 0) for s in stages)}
    if all("rows_computed" in s for s in stages):  # the commit before the change did not count them
        rows = max(s["rows_computed"] for s in stages)
        prompt_tokens = sum(r["prompt_tokens"] for r in records if r["type"] == "prompt")
        got["rows_per_useful_token"] = rows / useful
        # beyond each prompt's own positions once: decode rows, padding, idle rows
        got["extra_rows_per_useful_token"] = (rows - prompt_tokens) / useful
    return got


def vllm_cell(python: str, model: str, prompts: list, varied: list[int], equal: list[int], pp: int, batch: int,
              work: str, tag: str, repeat: int) -> dict:
    """The same requests on vLLM's CPU build (bench/vllm_peer.py) with max_num_seqs = batch_size and
    pipeline_parallel_size = pp, its prefix cache off (the runner has none): the varied lengths (the
    rows schedule's own, every request made exactly that long with ignore_eos) against the equal ones,
    after a warm-up round of the varied (vLLM compiles its model at the first call), the best of
    `repeat` rounds each. What vLLM's own continuous batching makes of the same queue."""
    from pipeinfer.run.chat import encode, render
    from pipeinfer.run.prompts import load_tokenizer

    tok = load_tokenizer(model)
    ids = [encode(tok, p, rendered=False) if isinstance(p, str) else
           encode(tok, render(tok, p, None, None, f"prompt {i}"), rendered=True) for i, p in enumerate(prompts)]
    calls = [dict(name="varied", prompts=ids, max_tokens=varied, timed=False)]
    for _ in range(repeat):
        calls += [dict(name="varied", prompts=ids, max_tokens=varied), dict(name="equal", prompts=ids, max_tokens=equal)]
    spec = dict(model=model, dtype="float32", stages=pp, max_model_len=512, calls=calls,
                llm=dict(max_num_seqs=batch, enable_prefix_caching=False))
    got = run_vllm(python, spec, work, f"{tag}vllm-pp{pp}-b{batch}", 3600)
    if "error" in got:
        return got
    for name, want in (("varied", varied), ("equal", equal)):
        made = [[len(o) for o in r["output_ids"]] for r in got[name]]
        if any(m != want for m in made):
            return {"error": f"vLLM's {name} run made other lengths than asked (ignore_eos)"}
    runs = {k: [r["tokens_per_s"] for r in got[k]] for k in ("varied", "equal")}
    return {"varied_tokens_per_s": max(runs["varied"]), "equal_tokens_per_s": max(runs["equal"]),
            "varied_over_equal": max(runs["varied"]) / max(runs["equal"]), "runs_tokens_per_s": runs}


def step_ratios(lengths: list[int], equal: list[int], batch: int, slots: int = 1) -> dict:
    """The ratios if every step cost the same whatever its rows (a model, not a measurement: on this
    CPU a step is mostly one pass over the weights, so its cost grows slowly with its rows). The
    steps first-come-first-served row refill of `batch` rows takes on these lengths, one token a row
    a step, against the equal lengths' and against the micro_batches schedule: `slots` micro-batches
    of batch / slots consecutive prompts each (config.micro_batching), each keeping its rows until
    its longest ends, the next taking the slot that frees first. Where the varied run takes more
    steps than the equal one, the drain of the queue costs them, whatever the engine: no scheduler
    that keeps the prompts' order takes fewer steps."""
    def fcfs(ls: list[int], servers: int) -> int:  # the step the last of ls ends, started in order
        free = [0] * servers
        for n in ls:
            heapq.heappush(free, heapq.heappop(free) + n)
        return max(free)

    size = -(-batch // slots)
    micro = fcfs([max(lengths[i:i + size]) for i in range(0, len(lengths), size)], slots)
    rows = fcfs(lengths, batch)
    return {"varied_over_equal": fcfs(equal, batch) / rows, "rows_over_micro_batches": micro / rows}


def steady_rate(prompts: list[dict]) -> float | None:
    """Useful tokens/s until the last prompt started (the queue ran dry then): the steady state a
    server with a stream of requests sees, without the drain at the end of a finite queue, when the
    last long answers run with fewer rows than the slots hold. From the prompt records' start
    times and their tokens' arrival times (start_s + ttft_s + the gaps after)."""
    cut = max(p["start_s"] for p in prompts)
    if cut <= 0:
        return None
    n = 0
    for p in prompts:
        t = p["start_s"] + (p["ttft_s"] or 0.0)
        for gap in [0.0] + p["itl_s"]:
            t += gap
            n += t <= cut
    return n / cut


def checkout(rev: str, work: str) -> str:
    """The batch runner of commit `rev` of this repository, unpacked under work (git archive): its entry
    script's path. Raises SystemExit with one line if git cannot give it."""
    dest = os.path.join(work, f"before-{rev}")
    if not os.path.exists(os.path.join(dest, "run_distributed_inference.py")):
        os.makedirs(dest, exist_ok=True)
        try:
            archive = subprocess.run(["git", "-C", ROOT, "archive", "--format=tar", rev], capture_output=True,
                                     check=True).stdout
            subprocess.run(["tar", "-x", "-C", dest], input=archive, check=True)
        except (OSError, subprocess.CalledProcessError) as e:
            detail = getattr(e, "stderr", b"") or b""
            raise SystemExit(f"error: cannot unpack commit {rev!r} of {ROOT} for the before cell "
                             f"({detail.decode(errors='replace').strip() or e}): pass --before none to skip it")
    return os.path.join(dest, "run_distributed_inference.py")


TOPICS = ["the moon", "bread", "a river", "music", "a computer", "the ocean", "winter", "a library", "trains", "bees",
          "a volcano", "chess"]
ASKS = ["Answer with one word: is {t} usually bigger than a cat?", "Give a one-sentence definition of {t}.",
        "List five facts about {t}.", "Write a short story about {t}.",
        "Explain to a ten-year-old, in detail and step by step, everything about {t}."]


def eos_prompts(n: int) -> list[list[dict]]:
    """n chat requests whose answers an instruct model ends at EOS after a word to a few hundred tokens."""
    return [[{"role": "user", "content": ASKS[i % len(ASKS)].format(t=TOPICS[(i // len(ASKS)) % len(TOPICS)])}]
            for i in range(n)]


def stall(model: str, work: str, pps: list[int], device: str, chunk: int, smoke: bool, bad: list[str]) -> list[dict]:
    """Long prompts joining rows that decode: 8 short prompts (8..64 tokens) whose own max_new_tokens
    end at different times, then long ones (440 tokens; 40 in --smoke) that take the freed rows,
    at batch 8, prefill_chunk_size `chunk` against 0 (each long prompt's prefill whole in one visit).
    Reported: the short prompts' longest and 99th-percentile gap between two tokens (what a long
    prefill stalls), the long prompts' time to first token (what chunking costs them), tokens/s.
    Greedy tokens must agree (float32)."""
    short = make_prompts(8)
    long_n, short_new, long_new = (40, [24, 28, 32, 36, 40, 44, 48, 52], 4) if smoke else \
        (440, [40, 60, 80, 100, 120, 140, 160, 180], 8)
    text = "".join(make_prompts(40))
    longs = [text[7 * i:][:long_n] for i in range(6)]
    prompts, max_new = short + longs, short_new + [long_new] * len(longs)
    cells = []
    for pp in pps:
        row = {"workload": "stall", "pipeline_size": pp, "batch_size": 8, "chunk": chunk}
        for name, c in (("whole", 0), ("chunked", chunk)):
            got = run_cell(model, work, prompts, max_new, "rows", pp, 8, device, 3600, True, f"stall{c}-", "float32",
                           extra={"prefill_chunk_size": c})
            if "error" in got:
                bad.append(f"stall {name} pp{pp}: {got['error']}")
                break
            recs = got.pop("prompt_records")
            gaps = sorted(g for r in recs if r["prompt_index"] < len(short) for g in r["itl_s"])
            got.update(itl_max_ms=1000 * gaps[-1], itl_p99_ms=1000 * gaps[int(0.99 * (len(gaps) - 1))],
                       long_ttft_ms=1000 * max(r["ttft_s"] for r in recs if r["prompt_index"] >= len(short)))
            row[name] = got
        else:
            a, b = row["whole"].pop("output_ids"), row["chunked"].pop("output_ids")
            if a != b:
                bad.append(f"stall pp{pp}: chunked and whole prefill give different greedy tokens")
            w, c = row["whole"], row["chunked"]
            print(f"stall pp{pp} b 8: short prompts' longest / p99 gap between tokens {w['itl_max_ms']:.0f} / "
                  f"{w['itl_p99_ms']:.0f} ms whole, {c['itl_max_ms']:.0f} / {c['itl_p99_ms']:.0f} ms in chunks of "
                  f"{chunk} ({c['prefill_chunks']} chunks); long prompts' slowest first token "
                  f"{w['long_ttft_ms']:.0f} / {c['long_ttft_ms']:.0f} ms; tokens/s {w['tokens_per_s']:.1f} / "
                  f"{c['tokens_per_s']:.1f}", flush=True)
        cells.append(row)
    return cells


def report(row: dict, tag: str, bad: list[str], lengths: list[int] | None, repeat: int) -> None:
    """The pair's ratios, printed; greedy tokens must agree between the schedules (float32: a difference
    is a bug on the geometric workload; on the eos one a near-tie may flip, so it is counted and printed)."""
    pp, batch = row["pipeline_size"], row["batch_size"]
    a, b = row["micro_varied"]["output_ids"], row["rows_varied"]["output_ids"]
    differ = sum(a[i] != b[i] for i in b)
    row["prompts_differing"] = differ
    if differ and lengths is not None:
        bad.append(f"{tag}pp{pp} b{batch}: the schedules' greedy tokens differ in {differ} prompts")
    if lengths is not None:
        assert all(len(b[i]) == m for i, m in enumerate(lengths))
    row["varied_over_equal"] = row["rows_varied"]["tokens_per_s"] / row["rows_equal"]["tokens_per_s"]
    row["rows_over_micro_batches"] = row["rows_varied"]["tokens_per_s"] / row["micro_varied"]["tokens_per_s"]
    cells = ("rows_varied", "rows_equal", "micro_varied") + tuple(
        k for k in ("separate_varied", "whole_varied", "before_varied") if k in row)
    before = ""
    for k, ratio, what in (("separate_varied", "packed_over_separate", "prefills in their own forwards"),
                           ("whole_varied", "spread_over_whole", "each prefill whole in one visit")):
        if k not in row:
            continue
        differ_k = sum(row[k]["output_ids"][i] != b[i] for i in b)
        if differ_k and lengths is not None:
            bad.append(f"{tag}pp{pp} b{batch}: {what}: other greedy tokens in {differ_k} prompts")
        row[ratio] = row["rows_varied"]["tokens_per_s"] / row[k]["tokens_per_s"]
        before += (f"; {what} {row[k]['tokens_per_s']:.1f} tok/s, {ratio.replace('_over_', '/')} {row[ratio]:.2f}"
                   + (f" ({differ_k} prompts differ)" if differ_k else ""))
    if "before_varied" in row:
        differ_before = sum(row["before_varied"]["output_ids"][i] != b[i] for i in b)
        row["prompts_differing_before"] = differ_before
        if differ_before and lengths is not None:
            bad.append(f"{tag}pp{pp} b{batch}: the commit before's greedy tokens differ from the rows schedule's "
                       f"in {differ_before} prompts")
        row["rows_over_before"] = row["rows_varied"]["tokens_per_s"] / row["before_varied"]["tokens_per_s"]
        before += (f"; the commit before {row['before_varied']['tokens_per_s']:.1f} tok/s, rows/before "
                  f"{row['rows_over_before']:.2f}" + (f" ({differ_before} prompts differ)" if differ_before else ""))
    steps = row["if_steps_cost_alike"]
    before += (f"; if every step cost the same: varied/equal {steps['varied_over_equal']:.2f}, rows/micro_batches "
               f"{steps['rows_over_micro_batches']:.2f}")
    if "vllm" in row and "error" not in row["vllm"]:
        v = row["vllm"]
        before += (f"; vLLM on the same lengths: varied {v['varied_tokens_per_s']:.1f} tok/s, equal "
                   f"{v['equal_tokens_per_s']:.1f}, varied/equal {v['varied_over_equal']:.2f}")
    for k in cells:
        row[k].pop("output_ids")
        row[k].pop("prompt_records")
    if repeat > 1:
        print(f"{tag}pp{pp} b{batch:>2}: runs (tok/s) " + "; ".join(
            f"{k} " + " ".join(f"{v:.1f}" for v in row[k]["runs_tokens_per_s"]) for k in cells), flush=True)
    print(f"{tag}pp{pp} b{batch:>2}: rows varied {row['rows_varied']['tokens_per_s']:8.1f} tok/s "
          f"({row['rows_varied']['extra_rows_per_useful_token']:.2f} extra rows/token), equal "
          f"{row['rows_equal']['tokens_per_s']:8.1f} ({row['rows_equal']['extra_rows_per_useful_token']:.2f}), "
          f"micro_batches varied {row['micro_varied']['tokens_per_s']:8.1f} "
          f"({row['micro_varied']['extra_rows_per_useful_token']:.2f}); varied/equal "
          f"{row['varied_over_equal']:.2f}, rows/micro_batches {row['rows_over_micro_batches']:.2f}"
          + (f"; {differ} prompts' tokens differ between the schedules" if differ else "") + before, flush=True)


def finish(path: str | None, result: dict, bad: list[str]) -> int:
    """Write the result as JSON (when asked), print each error, and the exit code."""
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            json.dump(result, f, indent=1)
    for b in bad:
        print("error:", b, file=sys.stderr)
    return 1 if bad else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny model, few short prompts: seconds, for the tests")
    ap.add_argument("--prompts", type=int, default=None, help="prompts per workload (default 96; smoke 8)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--pipeline-sizes", default=None, help="comma-separated (default 1,2)")
    ap.add_argument("--batch-sizes", default=None, help="comma-separated (default 8,32; smoke 4)")
    ap.add_argument("--repeat", type=int, default=1,
                    help="run the cells of a (pipeline, batch) pair round-robin this many times; each cell "
                         "reports its best tokens/s (the least disturbed by a shared host) and the spread")
    ap.add_argument("--workload", choices=("geometric", "eos", "both", "stall"), default="geometric",
                    help="geometric: the tiny model, lengths drawn, ignore_eos; eos: the demo instruct checkpoint "
                         "(float32) answering chat requests until EOS (at most --eos-max-new), against the same total "
                         "in equal lengths; both; stall: long prompts joining rows that decode, their prefill whole "
                         "against in chunks of --chunk (the others' longest gap between tokens)")
    ap.add_argument("--prompt-scale", type=int, default=1, help="geometric: each prompt this many times over")
    ap.add_argument("--chunk", type=int, default=64, help="--workload stall: prefill_chunk_size (default 64)")
    ap.add_argument("--compile", choices=("auto", "true", "false", "cudagraphs"), default=None,
                    help="the runner's `compile` for every cell (default: its own, \"auto\": on for CUDA, where a "
                         "compiled stage runs its prefills apart; false runs them packed into the decode forward)")
    ap.add_argument("--eos-model", default=os.path.join(ROOT, "models", "smollm2-135m-instruct"))
    ap.add_argument("--eos-prompts", type=int, default=40)
    ap.add_argument("--eos-max-new", type=int, default=256)
    ap.add_argument("--before", default=None,
                    help="also run the varied workload on this commit's batch runner (git archive of this "
                         f"repository), the schedule before row-level refill: default {BEFORE} ({BEFORE_WHAT}); "
                         "'none' skips it (the default with --smoke)")
    ap.add_argument("--vllm-python", default=None,
                    help="also run each cell's requests, at the rows schedule's own lengths, on vLLM's CPU build with "
                         "this interpreter (../shared/notes/vllm-cpu.md): its varied / equal on the same queue")
    args = ap.parse_args()
    smoke = args.smoke
    vllm_python = None
    if args.vllm_python:
        if args.device != "cpu":
            print(f"error: --vllm-python runs vLLM's CPU build, beside the runner on the CPU: drop it with --device "
                  f"{args.device}", file=sys.stderr)
            return 2
        if skip := vllm_problem(args.vllm_python):
            print(f"error: {skip}: pass an interpreter with vLLM's CPU build (../shared/notes/vllm-cpu.md)",
                  file=sys.stderr)
            return 2
        vllm_python = args.vllm_python
    if args.compile is not None:
        COMMON["compile"] = {"true": True, "false": False}.get(args.compile, args.compile)
    n = args.prompts or (8 if smoke else 96)
    if args.prompt_scale < 1:
        print(f"error: --prompt-scale {args.prompt_scale}: give an integer >= 1 (each prompt that many times over)",
              file=sys.stderr)
        return 2
    lo, hi = (4, 16) if smoke else (4, 256)
    pps, batches = [1, 2], ([4] if smoke else [8, 32])
    if args.pipeline_sizes:
        pps = [int(v) for v in args.pipeline_sizes.split(",")]
    if args.batch_sizes:
        batches = [int(v) for v in args.batch_sizes.split(",")]
    work = args.workdir or tempfile.mkdtemp(prefix="continuous-")
    os.makedirs(work, exist_ok=True)
    model = os.path.join(work, "model")
    if not os.path.exists(os.path.join(model, "config.json")):
        make_model(model, seed=0, **(SMOKE_SHAPE if smoke else SHAPE))
    prompts = [" ".join([p] * args.prompt_scale) for p in make_prompts(n)]
    varied, equal = lengths(n, lo, hi)
    workloads = [("geometric", model, prompts, varied, True, "auto")]
    if args.workload in ("eos", "both"):
        if not os.path.exists(os.path.join(args.eos_model, "config.json")):
            print(f"error: no model at {args.eos_model}: run `make demo` (it fetches the demo checkpoint) or pass "
                  f"--eos-model", file=sys.stderr)
            return 2
        asks = eos_prompts(args.eos_prompts)
        workloads.append(("eos", args.eos_model, asks, [args.eos_max_new] * len(asks), False, "float32"))
    if args.workload == "eos":
        workloads = workloads[1:]
    if args.workload == "stall":
        bad: list[str] = []
        cells = stall(model, work, pps, args.device, args.chunk if not smoke else 8, smoke, bad)
        return finish(args.json, {"workload": "stall", "device": args.device, "smoke": smoke, "cells": cells,
                                  "errors": bad}, bad)
    before = args.before or ("none" if smoke else BEFORE)
    entry = None if before == "none" else checkout(before, work)
    kinds = [("rows_varied", "rows", None, None), ("rows_equal", "rows", None, None),
             ("micro_varied", "micro_batches", None, None)]
    if not smoke:  # the rows schedule with each visit's prefills in forwards of their own (load/packed.py),
        # and with each joiner's prefill whole in one visit (several micro-batches only: run/rows.py)
        kinds.append(("separate_varied", "rows", None, {"packed_prefill": False}))
        kinds.append(("whole_varied", "rows", None, {"spread_prefill": False}))
    if entry:
        kinds.append(("before_varied", "micro_batches", entry, None))
    cells, bad = [], []
    for wname, wmodel, wprompts, wvaried, wignore, wdtype in workloads:
        tag = "" if wname == "geometric" else f"{wname}-"
        for pp in pps:
            for batch in batches:
                row = {"workload": wname, "pipeline_size": pp, "batch_size": batch}
                cells.append(row)
                cell_kinds = [kind for kind in kinds if kind[0] != "whole_varied" or min(pp, batch) > 1]
                wequal = None  # eos: the rows schedule's first run decides the total to spread equally
                for _ in range(args.repeat):
                    for name, schedule, cell_entry, extra in cell_kinds:
                        if name == "rows_equal":
                            if wequal is None:
                                if "rows_varied" not in row or "error" in row["rows_varied"]:
                                    continue  # eos: no total to spread
                                total = row["rows_varied"]["new_tokens"]
                                wequal = [total // len(wprompts) + (1 if i < total % len(wprompts) else 0)
                                          for i in range(len(wprompts))] if not wignore else equal
                            max_new, ignore_eos = wequal, True
                        else:
                            max_new, ignore_eos = wvaried, wignore
                        got = run_cell(wmodel, work, wprompts, max_new, schedule, pp, batch, args.device, 3600,
                                       ignore_eos, tag + (name.split("_")[0] + "-" if extra else ""), wdtype,
                                       name == "rows_equal",
                                       cell_entry, extra)
                        if "error" in got:
                            bad.append(f"{tag}{name} pp{pp} b{batch}: {got['error']}")
                            row[name] = got
                        elif "error" not in row.get(name, {}):
                            runs = row.get(name, {}).get("runs_tokens_per_s", []) + [got["tokens_per_s"]]
                            if name in row and row[name]["output_ids"] != got["output_ids"]:
                                bad.append(f"{tag}{name} pp{pp} b{batch}: a repeat's greedy tokens differ")
                            if name not in row or got["tokens_per_s"] > row[name]["tokens_per_s"]:
                                row[name] = got
                            row[name]["runs_tokens_per_s"] = runs
                if all(k in row and "error" not in row[k] for k, _, _, _ in cell_kinds):
                    ids = row["rows_varied"]["output_ids"]
                    made = [len(ids[i]) for i in range(len(wprompts))]  # eos: where each answer ended
                    row["if_steps_cost_alike"] = step_ratios(made, wequal, batch, min(pp, batch))
                    if vllm_python:
                        row["vllm"] = vllm_cell(vllm_python, wmodel, wprompts, made, wequal, pp, batch, work, tag,
                                                args.repeat)
                        if "error" in row["vllm"]:
                            bad.append(f"{tag}vLLM pp{pp} b{batch}: {row['vllm']['error']}")
                    report(row, tag, bad, wvaried if wignore else None, args.repeat)
    result = {"prompts": n, "prompt_scale": args.prompt_scale, "before": before,
              "eos_prompts": args.eos_prompts if args.workload != "geometric" else 0,
              "max_new_tokens": [lo, hi], "total_new_tokens": sum(varied), "device": args.device,
              "smoke": smoke, "cells": cells, "errors": bad}
    return finish(args.json, result, bad)


if __name__ == "__main__":
    sys.exit(main())
