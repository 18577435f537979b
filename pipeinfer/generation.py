"""Autoregressive generation through the pipeline: prefill, then one token per decode step.

Every rank runs generate_batch() with the same arguments; only what a stage receives and sends
differs (comm.py). Each stage keeps a KV cache of its own layers, so a decode step feeds one new
position per sequence and nothing already processed is recomputed.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from pipeinfer.comm import ABORT, CONTINUE, STOP, Comm
from pipeinfer.prompts import Batch
from pipeinfer.sampling import SamplingParams, prompt_generator, sample
from pipeinfer.stage import Stage


@dataclass(frozen=True)
class GenParams:
    max_new_tokens: int
    ignore_eos: bool
    eos_ids: tuple[int, ...]
    pad_id: int
    sampling: SamplingParams
    seed: int


@dataclass
class BatchResult:
    """On the first stage: each prompt's new tokens and when they arrived (seconds since start).
    On every stage: `aborted` when a stop was requested (SIGTERM/SIGUSR1) and the batch was dropped."""
    output_ids: list[list[int]]
    token_times: list[list[float]]
    aborted: bool = False


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) positions that skip left padding, as generate() computes them."""
    return (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)


def generate_batch(stage: Stage, comm: Comm, batch: Batch, gp: GenParams, hidden_size: int,
                   dtype: torch.dtype, abort_requested=lambda: False) -> BatchResult:
    """Run one batch to completion on this rank's stage.

    abort_requested() is polled by the first stage at each step boundary; when it is true the
    first stage sends ABORT down the pipe and every rank returns an aborted result at that step.
    """
    dev = comm.device
    B, T = batch.input_ids.shape
    mask = batch.attention_mask.to(dev)  # (B, T), grows by one column per step
    pos = position_ids(mask)             # (B, T), then (B, 1) per decode step
    padded = not bool(mask.all())        # like generate(), drop an all-ones mask
    eos = torch.tensor(gp.eos_ids, device=dev)
    cache = stage.new_cache()
    gens = [prompt_generator(gp.seed, i, dev) for i in batch.indices] if gp.sampling.do_sample else []
    finished = torch.zeros(B, dtype=torch.bool, device=dev)
    x = batch.input_ids.to(dev) if comm.is_first else None
    steps: list[torch.Tensor] = []
    arrivals: list[float] = []
    t0 = time.perf_counter()
    step = 0
    while True:
        shape = (B, T if step == 0 else 1, hidden_size)  # (B, T, H)
        if comm.is_first and abort_requested():
            comm.send_control(ABORT, shape, dtype)
            return BatchResult([], [], aborted=True)
        if not comm.is_first:
            x, control = comm.recv_hidden(shape, dtype, f"waiting for step {step}'s hidden states")
            if control != CONTINUE:
                comm.send_control(control, shape, dtype)
                if control == ABORT:
                    return BatchResult([], [], aborted=True)
                break
        with comm.timeline.span("prefill" if step == 0 else "decode"):
            out = stage(x, mask if padded else None, pos, cache)
            if comm.is_last:
                tokens = sample(out, gp.sampling, gens)  # (B,)
                if not gp.ignore_eos:
                    tokens = tokens.masked_fill(finished, gp.pad_id)
                    finished |= torch.isin(tokens, eos)
                stop = step + 1 >= gp.max_new_tokens or (not gp.ignore_eos and bool(finished.all()))
        local = None
        if comm.is_last:
            local = comm.send_tokens(tokens, stop)
        else:
            comm.send_hidden(out, f"sending step {step}'s hidden states")
        if comm.is_first:
            tokens, stop = comm.recv_tokens(B, local, f"waiting for step {step}'s tokens from the last stage")
            steps.append(tokens.cpu())
            arrivals.append(time.perf_counter() - t0)
            if stop:
                comm.send_control(STOP, (B, 1, hidden_size), dtype)
                break
            x = tokens[:, None]  # (B, 1)
        comm.timeline.step()
        mask = torch.cat([mask, mask.new_ones(B, 1)], dim=1)
        pos = pos[:, -1:] + 1
        step += 1
    if not comm.is_first:
        return BatchResult([], [])
    return _per_prompt(torch.stack(steps, dim=1), arrivals, gp)


def _per_prompt(tokens: torch.Tensor, arrivals: list[float], gp: GenParams) -> BatchResult:
    """(B, steps) tokens -> each prompt's ids up to and including its first EOS, as generate() returns them."""
    ids, times = [], []
    for row in tokens.tolist():
        n = len(row)
        if not gp.ignore_eos:
            n = next((i + 1 for i, t in enumerate(row) if t in gp.eos_ids), n)
        ids.append(row[:n])
        times.append(arrivals[:n])
    return BatchResult(ids, times)
