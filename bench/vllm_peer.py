"""vLLM's CPU build as a peer to measure against: one LLM, a list of generate() calls, each timed.

run_vllm() (this project's interpreter) writes a spec and starts this file with vLLM's own
interpreter (an environment of its own: ../shared/notes/vllm-cpu.md), which runs worker(spec):

    {"model", "dtype", "stages" (1, or 2: pipeline_parallel_size=2 over the mp executor, one core
     a stage), "max_model_len", "llm": more LLM() keyword arguments (max_num_seqs, ...),
     "calls": [{"name", "prompts": [a text, or a list of token ids], "max_tokens": [n a prompt],
                "timed": false for a warm-up (the first call of a shape compiles)}]}

Greedy, ignore_eos: every request makes exactly its max_tokens. The result, by call name: a list
of {tokens_per_s, new_tokens, wall_s, output_ids}, one per timed call of that name.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time


def worker(spec_path: str) -> int:
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    with open(spec_path) as f:
        spec = json.load(f)
    kw = dict(pipeline_parallel_size=2, distributed_executor_backend="mp") if spec["stages"] == 2 else {}
    llm = LLM(model=spec["model"], dtype=spec["dtype"], max_model_len=spec["max_model_len"], seed=0,
              **kw, **spec.get("llm", {}))
    results: dict = {}
    for call in spec["calls"]:
        prompts = [TokensPrompt(prompt_token_ids=p) if isinstance(p, list) else p for p in call["prompts"]]
        params = [SamplingParams(max_tokens=n, temperature=0, ignore_eos=True) for n in call["max_tokens"]]
        t = time.perf_counter()
        out = llm.generate(prompts, params, use_tqdm=False)
        wall = time.perf_counter() - t
        if call.get("timed", True):
            new = sum(len(o.outputs[0].token_ids) for o in out)
            results.setdefault(call["name"], []).append(
                {"tokens_per_s": new / wall, "new_tokens": new, "wall_s": wall,
                 "output_ids": [list(o.outputs[0].token_ids) for o in out]})
    with open(spec["out"], "w") as f:
        json.dump(results, f)
    return 0


if __name__ == "__main__" and len(sys.argv) == 3 and sys.argv[1] == "--worker":
    sys.exit(worker(sys.argv[2]))  # vLLM's environment has nothing of this project's


def run_vllm(python: str, spec: dict, work: str, name: str, timeout: float) -> dict:
    """Run spec's calls on vLLM (cores 0, or 0 and 1 for two stages): the results by call name, or {"error": line}."""
    from throughput import tail

    spec = dict(spec, out=os.path.join(work, f"{name}.json"))
    path = os.path.join(work, f"{name}.spec.json")
    with open(path, "w") as f:
        json.dump(spec, f)
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE="1", VLLM_CPU_OMP_THREADS_BIND="0" if spec["stages"] == 1 else "0|1",
               OMP_NUM_THREADS="1", PYTHONPATH="")
    log = os.path.join(work, f"{name}.log")
    try:
        with open(log, "w") as f:
            rc = subprocess.run([python, os.path.abspath(__file__), "--worker", path], stdout=f,
                                stderr=subprocess.STDOUT, env=env, timeout=timeout, cwd=work).returncode
    except subprocess.TimeoutExpired:
        return {"error": f"vLLM ran past {timeout:g}s: {tail(log)}"}
    if rc or not os.path.exists(spec["out"]):
        return {"error": f"vLLM exit {rc}: {tail(log)}"}
    with open(spec["out"]) as f:
        return json.load(f)


def vllm_problem(python: str | None) -> str | None:
    """Why the vLLM cells are skipped, or None when the interpreter imports vllm."""
    if not python:
        return "no --vllm-python given"
    try:
        res = subprocess.run([python, "-c", "import vllm, sys; print(vllm.__version__)"], capture_output=True,
                             text=True, timeout=300, env=dict(os.environ, PYTHONPATH=""))
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"{python} does not run: {e}"
    if res.returncode == 0:
        return None
    said = (res.stderr.strip().splitlines() or [f"exit {res.returncode}"])[-1]
    return f"{python} cannot import vllm ({said})"
