"""Where does one prompt's pipeline overhead come from: the machine, the model code, or the wire?

    python bench/stage_handoff.py [--hidden-size 1024] [--steps 150] [--repeats 3]

bench/throughput.py measures the runner at pipeline_size 2 against pipeline_size 1 at batch 1
(its "one prompt" ratio). This script takes the runner's own Stage objects (pipeinfer/load/stage.py,
the same model as throughput.py builds at this --hidden-size) and runs greedy decoding four ways,
one thread each, without torch.distributed:

  whole        the pipeline_size 1 stage, core 0;
  in_process   the two pipeline_size 2 stages one after the other in one process, core 0: what
               splitting the model costs by itself (each stage runs the model's forward once);
  two_cores    the two stages in two processes on cores 0 and 1, the hidden state and the token
               passed through pipes: a two-stage batch-1 pipeline with the cheapest wire there is;
  one_core     the same two processes, both on core 0.

Each way's greedy tokens must equal `whole`'s (the script stops otherwise). What the runner adds
beyond `two_cores` is its generation loop and torch.distributed (gloo).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(1, os.path.dirname(os.path.abspath(__file__)))  # bench/, for throughput.py when imported

from pipeinfer.models.tiny import make_model  # noqa: E402
from pipeinfer.plan.partition import StagePlan  # noqa: E402
from pipeinfer.load.stage import partition_model  # noqa: E402
from throughput import SEED, SHAPE, cpu_shape, model_dir  # noqa: E402

PROMPT_LEN = 16


def _load(path: str, rank: int, world: int, workdir: str):
    stage, _ = partition_model(path, StagePlan(rank, world, range(0)), torch.device("cpu"), torch.float32,
                               os.path.join(workdir, f"offload{rank}"))
    return stage


def _prompt() -> torch.Tensor:
    return torch.randint(3, 259, (1, PROMPT_LEN), generator=torch.Generator().manual_seed(0))


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _send(fd: int, t: torch.Tensor) -> None:
    _write_all(fd, t.contiguous().numpy().tobytes())


def _fork(child) -> int:
    """Fork; the child runs child() and exits (0, or 1 after printing its traceback). Returns the pid."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            child()
            code = 0
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    return pid


def _recv(fd: int, like: torch.Tensor) -> torch.Tensor:
    want = like.numel() * like.element_size()
    chunks, got = [], 0
    while got < want:
        chunk = os.read(fd, want - got)
        if not chunk:
            raise EOFError("the other stage's process is gone")
        chunks.append(chunk)
        got += len(chunk)
    return torch.frombuffer(bytearray(b"".join(chunks)), dtype=like.dtype).view(like.shape)


def whole(path: str, steps: int, workdir: str) -> tuple[float, list[int]]:
    stage = _load(path, 0, 1, workdir)
    cache = stage.new_cache(capacity=PROMPT_LEN + steps + 1)
    token = stage(_prompt(), None, torch.arange(PROMPT_LEN)[None], cache).argmax(-1)  # (1,)
    tokens = [int(token)]
    t0 = time.perf_counter()
    for i in range(steps):
        token = stage(token[:, None], None, torch.tensor([[PROMPT_LEN + i]]), cache).argmax(-1)
        tokens.append(int(token))
    return (time.perf_counter() - t0) / steps * 1e3, tokens


def in_process(path: str, steps: int, workdir: str) -> tuple[float, list[int]]:
    first, last = _load(path, 0, 2, workdir), _load(path, 1, 2, workdir)
    caches = [s.new_cache(capacity=PROMPT_LEN + steps + 1) for s in (first, last)]
    pos = torch.arange(PROMPT_LEN)[None]
    token = last(first(_prompt(), None, pos, caches[0]), None, pos, caches[1]).argmax(-1)
    tokens = [int(token)]
    t0 = time.perf_counter()
    for i in range(steps):
        pos = torch.tensor([[PROMPT_LEN + i]])
        token = last(first(token[:, None], None, pos, caches[0]), None, pos, caches[1]).argmax(-1)
        tokens.append(int(token))
    return (time.perf_counter() - t0) / steps * 1e3, tokens


def taking_turns(path: str, steps: int, workdir: str, cores: tuple[int, int]) -> tuple[float, list[int]]:
    """Stage 0 here, stage 1 in a forked child; hidden states down one pipe, tokens back up another."""
    down_r, down_w = os.pipe()
    up_r, up_w = os.pipe()
    hidden = int(json.load(open(os.path.join(path, "config.json")))["hidden_size"])

    def stage_1() -> None:
        os.close(down_w)  # the unused ends: a reader must see EOF when the other process dies
        os.close(up_r)
        os.sched_setaffinity(0, {cores[1]})
        stage = _load(path, 1, 2, workdir)
        cache = stage.new_cache(capacity=PROMPT_LEN + steps + 1)
        for i in range(steps + 1):
            length = PROMPT_LEN if i == 0 else 1
            x = _recv(down_r, torch.empty(1, length, hidden))
            pos = torch.arange(PROMPT_LEN)[None] if i == 0 else torch.tensor([[PROMPT_LEN + i - 1]])
            _send(up_w, stage(x, None, pos, cache).argmax(-1))

    pid = _fork(stage_1)
    os.close(down_r)
    os.close(up_w)
    os.sched_setaffinity(0, {cores[0]})
    stage = _load(path, 0, 2, workdir)
    cache = stage.new_cache(capacity=PROMPT_LEN + steps + 1)
    like = torch.empty(1, dtype=torch.long)
    _send(down_w, stage(_prompt(), None, torch.arange(PROMPT_LEN)[None], cache))
    token = _recv(up_r, like)
    tokens = [int(token)]
    t0 = time.perf_counter()
    for i in range(steps):
        _send(down_w, stage(token[:, None], None, torch.tensor([[PROMPT_LEN + i]]), cache))
        token = _recv(up_r, like)
        tokens.append(int(token))
    ms = (time.perf_counter() - t0) / steps * 1e3
    for fd in (down_w, up_r):
        os.close(fd)
    _, status = os.waitpid(pid, 0)
    if status != 0:
        raise SystemExit(f"error: the stage-1 process failed (wait status {status})")
    return ms, tokens


def run_isolated(fn, *args) -> tuple[float, list[int]]:
    """Run one way in a fresh child process (its own heap and mappings); returns (ms per token, tokens)."""
    r, w = os.pipe()

    def run() -> None:
        os.close(r)
        os.sched_setaffinity(0, {0})
        _write_all(w, json.dumps(fn(*args)).encode())

    pid = _fork(run)
    os.close(w)
    with os.fdopen(r) as f:
        out = f.read()
    _, status = os.waitpid(pid, 0)
    if status != 0 or not out:
        raise SystemExit(f"error: {fn.__name__} failed (wait status {status})")
    ms, tokens = json.loads(out)
    return ms, tokens


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden-size", type=int, default=1024, help="model width, as throughput.py --hidden-size")
    ap.add_argument("--steps", type=int, default=150, help="decode steps timed per way and round")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved rounds; the median counts")
    ap.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "pipeinfer-bench"))
    ap.add_argument("--json", default="results/stage_handoff.json")
    args = ap.parse_args()
    if not {0, 1} <= os.sched_getaffinity(0):
        raise SystemExit(f"error: needs cores 0 and 1; this process may use {sorted(os.sched_getaffinity(0))}")
    if args.hidden_size % SHAPE["num_attention_heads"]:
        raise SystemExit(f"error: --hidden-size must be a multiple of {SHAPE['num_attention_heads']}")
    torch.set_num_threads(1)
    logging.disable(logging.WARNING)  # accelerate's note about the other stage's (meta) weights
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    shape = cpu_shape(args.hidden_size)
    path = model_dir(args.workdir, shape, "float32")  # throughput.py's model at this width, shared
    if not os.path.exists(os.path.join(path, "config.json")):
        make_model(path, seed=SEED, dtype="float32", **shape)
    if PROMPT_LEN + args.steps + 1 > shape["max_position_embeddings"]:
        raise SystemExit(f"error: --steps must be at most {shape['max_position_embeddings'] - PROMPT_LEN - 1}")
    ways = {"whole": (whole,), "in_process": (in_process,), "two_cores": (taking_turns, (0, 1)),
            "one_core": (taking_turns, (0, 0))}
    rounds: dict[str, list[float]] = {k: [] for k in ways}
    reference = None
    for r in range(args.repeats):
        for name, (fn, *extra) in ways.items():
            ms, tokens = run_isolated(fn, path, args.steps, args.workdir, *extra)
            if reference is None:
                reference = tokens
            elif tokens != reference:
                raise SystemExit(f"error: {name} decoded other tokens than whole (first difference at step "
                                 f"{next(i for i, (a, b) in enumerate(zip(tokens, reference)) if a != b)})")
            rounds[name].append(ms)
        print(f"round {r + 1}: " + "  ".join(f"{k} {v[-1]:.2f}" for k, v in rounds.items()) + "  (ms per token)",
              flush=True)
    med = {k: statistics.median(v) for k, v in rounds.items()}
    print(f"\nms per token, median of {args.repeats} rounds (hidden {args.hidden_size}, {args.steps} greedy steps, "
          f"identical tokens in every way):")
    for k, v in med.items():
        print(f"  {k:11s} {v:8.2f}   whole / {k}: {med['whole'] / v:.3f}")
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json + ".tmp", "w", encoding="utf-8") as f:
        json.dump({"model": dict(shape, path=path), "steps": args.steps, "rounds_ms": rounds, "median_ms": med,
                   "whole_over": {k: med["whole"] / v for k, v in med.items()}}, f, indent=1)
    os.replace(args.json + ".tmp", args.json)
    print(f"-> {args.json}")


if __name__ == "__main__":
    main()
