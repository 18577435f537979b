"""Autoregressive generation through the pipeline: micro-batches in flight, prefill then decode.

Prompts are grouped into micro-batches, each with its own KV cache on every stage. Up to
`in_flight` of them occupy slots at once and every rank visits the occupied slots round-robin,
in the same order: while stage 1 runs micro-batch A, stage 0 already runs B, so with as many
micro-batches in flight as stages no stage waits for another once the pipe is full. One slot with
the whole batch in it is the naive schedule: one micro-batch in flight, S-1 stages idle.

A visit to a slot advances its micro-batch by one step: its prefill, or one decode position. Each
rank can tell the shape of the next frame from its own copy of the slot states (all ranks
tokenize the same prompts), so shapes are never shipped. When the last stage samples a
micro-batch's final token (every sequence at EOS, or max_new_tokens), the stop flag travels with
that token to the first stage, which sends STOP for the slot down the pipe; every rank then
refills the slot with the next queued micro-batch, whose prefill interleaves with the decode
steps of the others, or retires it.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from pipeinfer.comm import ABORT, STOP, Comm
from pipeinfer.prompts import Batch
from pipeinfer.sampling import SamplingParams, checkpoint_processors, prompt_generator, sample
from pipeinfer.stage import Stage


@dataclass(frozen=True)
class GenParams:
    max_new_tokens: int
    ignore_eos: bool
    eos_ids: tuple[int, ...]
    pad_id: int
    sampling: SamplingParams
    seed: int
    # the checkpoint's GenerationConfig when it sets something that changes scores
    # (runtime.score_settings), applied on the last stage as generate() applies it; else None
    score_config: object = None


@dataclass
class BatchResult:
    """On the first stage: each prompt's new tokens and when they arrived (seconds since the
    micro-batch's prefill began), and when that was (seconds since the run began)."""
    output_ids: list[list[int]]
    token_times: list[list[float]]
    start_s: float = 0.0


class Aborted(Exception):
    """A stop was requested (SIGTERM/SIGUSR1); every rank left the schedule at the same frame."""


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) positions that skip left padding, as generate() computes them."""
    return (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)


@dataclass
class _Slot:
    """One micro-batch in flight, as this rank sees it."""
    batch: Batch
    cache: object
    mask: torch.Tensor     # (B, T + step) when padded, else the prompt's (unused)
    pos: torch.Tensor      # (B, T), then (B, 1)
    padded: bool
    gens: list
    finished: torch.Tensor  # (B,) bool, last stage
    step: int = 0
    t0: float = 0.0
    tokens: list = field(default_factory=list)    # first stage: (B,) per step
    arrivals: list = field(default_factory=list)  # first stage: seconds since t0
    local: torch.Tensor | None = None             # pipeline_size 1: tokens sampled by this same rank
    processors: list | None = None                # last stage: per row, transformers' LogitsProcessorList
    history: list | None = None                   # last stage, with processors: per row, (T_i + step,) ids

    def frame_shape(self, hidden_size: int) -> tuple[int, int, int]:
        B, T = self.batch.input_ids.shape
        return (B, T if self.step == 0 else 1, hidden_size)  # (B, T, H)

    def advance(self) -> None:
        if self.padded:  # an unpadded batch runs without a mask (as generate() drops an all-ones one)
            self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], dim=1)
        self.pos = self.pos[:, -1:] + 1
        self.step += 1


def generate(stage: Stage, comm: Comm, batches: list[Batch], in_flight: int, gp: GenParams, hidden_size: int,
             dtype: torch.dtype, abort_requested: Callable[[], bool] = lambda: False
             ) -> Iterator[tuple[Batch, BatchResult]]:
    """Run every micro-batch through this rank's stage. On the first stage, yields each
    micro-batch with its result as soon as it finishes; other stages yield nothing.
    Raises Aborted on every rank when abort_requested() turned true on the first stage."""
    dev = comm.device
    run_t0 = time.perf_counter()
    queue = deque(batches)

    def start(batch: Batch) -> _Slot:
        mask = batch.attention_mask.to(dev)
        gens = [prompt_generator(gp.seed, i, dev) for i in batch.indices] if gp.sampling.do_sample else []
        cache = stage.new_cache(capacity=mask.shape[1] + gp.max_new_tokens)  # room for the whole sequence
        slot = _Slot(batch, cache, mask, position_ids(mask), not bool(mask.all()), gens,
                     torch.zeros(len(batch.indices), dtype=torch.bool, device=dev), t0=time.perf_counter())
        if comm.is_last and gp.score_config is not None:
            # Row by row, without the left padding: what generate() sees for the prompt alone, so
            # that a prompt's tokens do not depend on the others in its micro-batch.
            slot.history = [ids[m.bool()] for ids, m in zip(batch.input_ids.to(dev), mask)]
            slot.processors = [checkpoint_processors(stage.lm, gp.score_config, ids[None], torch.ones_like(ids)[None],
                                                     gp.max_new_tokens, None if gp.ignore_eos else gp.eos_ids)
                               for ids in slot.history]
            if all(p is None for p in slot.processors):
                slot.processors = slot.history = None
        return slot

    slots: list[_Slot | None] = [start(queue.popleft()) for _ in range(min(in_flight, len(queue)))]
    eos = torch.tensor(gp.eos_ids, device=dev)
    try:
        while any(s is not None for s in slots):
            for k, s in enumerate(slots):
                if s is None:
                    continue
                if comm.is_first:
                    if abort_requested():
                        comm.send_control(ABORT, s.frame_shape(hidden_size), dtype)
                        # Take the tokens the last stage still sends for frames already on their way:
                        # one per slot that has stepped, in visit order from this slot on.
                        for j in list(range(k, len(slots))) + list(range(k)):
                            if slots[j] is not None and slots[j].step > 0 and slots[j].local is None:
                                comm.recv_tokens(len(slots[j].batch.indices), None, "draining after a stop request")
                        raise Aborted()
                    if s.step > 0:
                        tokens, stop = comm.recv_tokens(len(s.batch.indices), s.local,
                                                        f"waiting for step {s.step - 1}'s tokens from the last stage")
                        s.tokens.append(tokens.cpu())
                        s.arrivals.append(time.perf_counter() - s.t0)
                        if stop:
                            comm.send_control(STOP, s.frame_shape(hidden_size), dtype)
                            yield s.batch, _result(s, gp, s.t0 - run_t0)
                            s = slots[k] = start(queue.popleft()) if queue else None
                            if s is None:
                                continue
                    x = s.batch.input_ids.to(dev) if s.step == 0 else s.tokens[-1][:, None].to(dev)  # (B, T|1)
                else:
                    x, control = comm.recv_hidden(s.frame_shape(hidden_size), dtype,
                                                  f"waiting for step {s.step}'s hidden states")
                    if control == STOP:
                        comm.send_control(STOP, s.frame_shape(hidden_size), dtype)
                        s = slots[k] = start(queue.popleft()) if queue else None
                        if s is None:
                            continue
                        x, control = comm.recv_hidden(s.frame_shape(hidden_size), dtype,
                                                      "waiting for a new micro-batch's prefill")
                    if control == ABORT:
                        comm.send_control(ABORT, s.frame_shape(hidden_size), dtype)
                        raise Aborted()
                _step(stage, comm, s, x, gp, eos, hidden_size)
                s.advance()
                comm.timeline.step()
    except Aborted:
        comm.drain_sends()
        raise
    # Not in a `finally`: after a PeerFailure, waiting on sends to the failed peer would only
    # delay the exit by another timeout_s each.
    comm.drain_sends()


def _step(stage: Stage, comm: Comm, s: _Slot, x: torch.Tensor, gp: GenParams, eos: torch.Tensor,
          hidden_size: int) -> None:
    """One visit's compute: run the stage, then send hidden states on or, on the last stage, sample."""
    with comm.timeline.span("prefill" if s.step == 0 else "decode"):
        out = stage(x, s.mask if s.padded else None, s.pos, s.cache)
        if comm.is_last:
            if s.processors is not None:
                out = torch.cat([p(h[None], out[i:i + 1]) for i, (p, h) in enumerate(zip(s.processors, s.history))])
            tokens = sample(out, gp.sampling, s.gens)  # (B,)
            if not gp.ignore_eos:
                tokens = tokens.masked_fill(s.finished, gp.pad_id)
                s.finished |= torch.isin(tokens, eos)
            if s.processors is not None:
                s.history = [torch.cat([h, t[None]]) for h, t in zip(s.history, tokens)]
            stop = s.step + 1 >= gp.max_new_tokens or (not gp.ignore_eos and bool(s.finished.all()))
    if comm.is_last:
        s.local = comm.send_tokens(tokens, stop)
    else:
        comm.send_hidden(out, f"sending step {s.step}'s hidden states")


def _result(s: _Slot, gp: GenParams, start_s: float) -> BatchResult:
    """(B, steps) tokens -> each prompt's ids up to and including its first EOS, as generate() returns them."""
    ids, times = [], []
    for row in torch.stack(s.tokens, dim=1).tolist():
        n = len(row)
        if not gp.ignore_eos:
            n = next((i + 1 for i, t in enumerate(row) if t in gp.eos_ids), n)
        ids.append(row[:n])
        times.append(s.arrivals[:n])
    return BatchResult(ids, times, start_s)
