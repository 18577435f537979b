"""Autoregressive generation through the pipeline: micro-batches in flight, prefill then decode.

Prompts are grouped into micro-batches, each with its own KV cache on every stage. They occupy
slots whose sizes add up to batch_size (config.micro_batching), and every rank visits the
occupied slots round-robin, in the same order: while stage 1 runs micro-batch A, stage 0 already runs B, so with as many
micro-batches in flight as stages no stage waits for another once the pipe is full. One slot with
the whole batch in it is the naive schedule: one micro-batch in flight, S-1 stages idle.

A visit to a slot advances its micro-batch by one step: its prefill, or one decode position. Each
rank can tell the shape of the next frame from its own copy of the slot states (all ranks
tokenize the same prompts), so shapes are never shipped. When the last stage samples a
micro-batch's final token (every sequence at EOS or a stop, or max_new_tokens), the stop flag
travels with that token, beside each row's stop code (stops.py), to the first stage, which sends
STOP for the slot down the pipe; every rank then refills the slot with the next prompts, as many
as the slot holds, whose prefill interleaves with the decode steps of the others, or retires it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from pipeinfer.run.comm import ABORT, STOP, Comm, pending_bound
from pipeinfer.run.prompts import Batch, MicroBatches
from pipeinfer.run.sampling import (SamplingParams, check_finite, checkpoint_processors,
                                    filter_rows, prompt_generator, row_settings, sample)
from pipeinfer.run.scoring import FIELDS, prompt_logprobs, scored_fields
from pipeinfer.load.stage import Stage
from pipeinfer.run.stops import Stopper, finish


@dataclass(frozen=True)
class GenParams:
    max_new_tokens: int
    ignore_eos: bool
    eos_ids: tuple[int, ...]
    pad_id: int
    sampling: SamplingParams
    seed: int
    # the checkpoint's GenerationConfig if it changes scores (sampling.score_settings), applied as generate() does
    score_config: object = None
    stopper: Stopper | None = None  # decides EOS and stops on the last stage; None: EOS only (tests, benches)
    logprobs: int = 0               # top-k alternatives recorded per new token (0: no log-probabilities)
    prompt_logprobs: bool = False   # score every prompt token in the prefill (scoring.py)
    prompt_chunk: int = 512         # prompt positions whose logits exist at once
    prefill_chunk: int = 0          # rows schedule: a longer prompt prefills this many positions a visit (0: whole)

    @property
    def logprob_width(self) -> int:
        """Floats per row of a step's log-probabilities: the chosen token's, then k ids, k values."""
        return 1 + 2 * self.logprobs if self.logprobs else 0

    def floats(self, step: int, B: int, T: int, score_next: bool = False) -> int:
        """Length of the float message that goes with step `step`'s tokens of a (B, T) micro-batch:
        (B, 1 + 2k) log-probabilities, then after the prefill (B, FIELDS, T - 1) prompt log-probabilities
        and argmaxes (scoring.prompt_logprobs), (B, FIELDS, T) when its prompts name a next token."""
        return B * self.logprob_width + (B * FIELDS * (T - 1 + score_next) if step == 0 and self.prompt_logprobs else 0)


@dataclass
class BatchResult:
    """On the first stage: each prompt's new tokens and when they arrived (seconds since the
    micro-batch's prefill began), and when that was (seconds since the run began)."""
    output_ids: list[list[int]]
    token_times: list[list[float]]
    start_s: float = 0.0
    finish: list[tuple] = field(default_factory=list)  # per prompt: (finish_reason, matched stop or None)
    logprobs: list | None = None  # per prompt, per new token: a (1 + 2k,) row (see GenParams.logprob_width)
    prompt_logprobs: list | None = None  # per prompt: its (T - 1,) row of scoring.prompt_logprobs
    prompt_greedy: list | None = None    # per prompt: (T - 1,) bools, each token the argmax of its position
    prompt_argmax: list | None = None    # per prompt: (T - 1,) (id, log-probability) of each position's argmax


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
    max_new: list[int]      # per row: its max_new_tokens (the prompt's own, else the run's)
    params: SamplingParams | list[SamplingParams]  # the run's, or per row when a prompt sets its own
    step: int = 0
    t0: float = 0.0
    tokens: list = field(default_factory=list)    # first stage: (B,) per step
    codes: list = field(default_factory=list)     # first stage: (B,) stop codes per step
    logprobs: list = field(default_factory=list)  # first stage, with logprobs: (B, 1 + 2k) per step
    prompt_logprobs: torch.Tensor | None = None   # first stage, with prompt_logprobs: (B, FIELDS, T - 1)
    arrivals: list = field(default_factory=list)  # first stage: seconds since t0
    local: torch.Tensor | None = None             # pipeline_size 1: tokens sampled by this same rank
    processors: list | None = None                # last stage: per row, transformers' LogitsProcessorList
    history: list | None = None                   # last stage, for processors or stop strings: per row, (T_i + step,)

    def frame_shape(self, hidden_size: int) -> tuple[int, int, int]:
        B, T = self.batch.input_ids.shape
        return (B, T if self.step == 0 else 1, hidden_size)  # (B, T, H)

    def advance(self) -> None:
        if self.padded:  # an unpadded batch runs without a mask (as generate() drops an all-ones one)
            self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], dim=1)
        self.pos = self.pos[:, -1:] + 1
        self.step += 1


def generate(stage: Stage, comm: Comm, work: MicroBatches, gp: GenParams, hidden_size: int,
             dtype: torch.dtype, abort_requested: Callable[[], bool] = lambda: False
             ) -> Iterator[tuple[Batch, BatchResult]]:
    """Run every micro-batch of `work` through this rank's stage, one slot per work.sizes entry.
    On the first stage, yields each micro-batch with its result as soon as it finishes; other
    stages yield nothing. Raises Aborted on every rank when abort_requested() turned true on the
    first stage."""
    dev = comm.device
    run_t0 = time.perf_counter()
    comm.max_pending = pending_bound(len(work.sizes))  # sends past it have been received: reaped

    def start(batch: Batch) -> _Slot:
        mask = batch.attention_mask.to(dev)
        max_new, params, seeds = row_settings(batch.indices, batch.limits, gp.max_new_tokens, gp.sampling, gp.seed)
        gens = [prompt_generator(*key, dev) for key in seeds] if gp.sampling.do_sample else []
        cache = stage.new_cache(capacity=mask.shape[1] + max(max_new))  # room for the whole sequence
        slot = _Slot(batch, cache, mask, position_ids(mask), not bool(mask.all()), gens,
                     torch.zeros(len(batch.indices), dtype=torch.bool, device=dev), max_new, params,
                     t0=time.perf_counter())
        if comm.is_last:
            # Row by row, without the left padding: what generate() sees for the prompt alone, so
            # that a prompt's tokens do not depend on the others in its micro-batch.
            history = [ids[m.bool()] for ids, m in zip(batch.input_ids.to(dev), mask)]
            if gp.score_config is not None:
                slot.processors = [checkpoint_processors(stage.lm, gp.score_config, ids[None],
                                                         torch.ones_like(ids)[None], n,
                                                         None if gp.ignore_eos else gp.eos_ids)
                                   for ids, n in zip(history, max_new)]
                if all(p is None for p in slot.processors):
                    slot.processors = None
            if slot.processors is not None or any(st.strings for st in batch.stops or ()):
                slot.history = history
        return slot

    def refill(k: int) -> _Slot | None:
        """Slot k's micro-batch is finished: the slot takes the next one, or retires."""
        work.done(slots[k].batch)
        batch = work.take(k)
        slots[k] = None if batch is None else start(batch)
        return slots[k]

    slots: list[_Slot | None] = []
    for k in range(len(work.sizes)):
        batch = work.take(k)
        slots.append(None if batch is None else start(batch))
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
                                comm.recv_tokens(len(slots[j].batch.indices), None, "draining after a stop request",
                                                 gp.floats(slots[j].step - 1, *slots[j].batch.input_ids.shape,
                                                           slots[j].batch.score_next is not None))
                        raise Aborted()
                    if s.step > 0:
                        tokens, codes, stop, floats = comm.recv_tokens(
                            len(s.batch.indices), s.local,
                            f"waiting for step {s.step - 1}'s tokens from the last stage",
                            gp.floats(s.step - 1, *s.batch.input_ids.shape, s.batch.score_next is not None))
                        s.tokens.append(tokens.cpu())
                        s.codes.append(codes.cpu())
                        if floats is not None:
                            _keep_floats(s, floats.cpu().reshape(-1), gp)
                        s.arrivals.append(time.perf_counter() - s.t0)
                        if stop:
                            comm.send_control(STOP, s.frame_shape(hidden_size), dtype)
                            yield s.batch, _result(s, gp, s.t0 - run_t0)
                            s = refill(k)
                            if s is None:
                                continue
                    x = s.batch.input_ids.to(dev) if s.step == 0 else s.tokens[-1][:, None].to(dev)  # (B, T|1)
                else:
                    x, control = comm.recv_hidden(s.frame_shape(hidden_size), dtype,
                                                  f"waiting for step {s.step}'s hidden states")
                    if control == STOP:
                        comm.send_control(STOP, s.frame_shape(hidden_size), dtype)
                        s = refill(k)
                        if s is None:
                            continue
                        x, control = comm.recv_hidden(s.frame_shape(hidden_size), dtype,
                                                      "waiting for a new micro-batch's prefill")
                    if control == ABORT:
                        comm.send_control(ABORT, s.frame_shape(hidden_size), dtype)
                        raise Aborted()
                _step(stage, comm, s, x, gp, eos, dtype)
                work.rows_computed += x.shape[0] * x.shape[1]
                s.advance()
                comm.timeline.step()
    except Aborted:
        comm.drain_sends()
        raise
    # Not in a `finally`: after a PeerFailure, waiting on sends to the failed peer would only
    # delay the exit by another timeout_s each.
    comm.drain_sends()


def _step(stage: Stage, comm: Comm, s: _Slot, x: torch.Tensor, gp: GenParams, eos: torch.Tensor,
          dtype: torch.dtype) -> None:
    """One visit's compute: run the stage, then send hidden states on or, on the last stage, sample."""
    with comm.timeline.span("prefill" if s.step == 0 else "decode"):
        scoring = comm.is_last and s.step == 0 and gp.prompt_logprobs
        out = stage(x, s.mask if s.padded else None, s.pos, s.cache, all_positions=scoring)
        if scoring:  # out: (B, T, H) final hidden states
            nxt = None if s.batch.score_next is None else torch.tensor([t or 0 for t in s.batch.score_next])
            out, prompt_lp = prompt_logprobs(stage.head, out, s.batch.input_ids.to(out.device), gp.prompt_chunk, nxt)
        if comm.is_last:
            check_finite(out, s.step, s.batch.indices, dtype)
            if s.processors is not None:
                out = torch.cat([p(h[None], out[i:i + 1]) for i, (p, h) in enumerate(zip(s.processors, s.history))])
            tokens = sample(out, s.params, s.gens).masked_fill(s.finished, gp.pad_id)  # (B,)
            logprobs = logprob_rows(out, tokens, gp, s.params) if gp.logprobs else None
            if s.history is not None:
                s.history = [torch.cat([h, t[None]]) for h, t in zip(s.history, tokens)]
            if gp.stopper is not None:  # stop strings see the new tokens only, never the prompt (as vLLM)
                generated = None if s.history is None else [h[-(s.step + 1):] for h in s.history]
                codes = gp.stopper.codes(tokens, s.finished, s.batch.stops, generated)
            elif gp.ignore_eos:
                codes = torch.zeros_like(tokens)
            else:
                codes = (torch.isin(tokens, eos) & ~s.finished).long()
            s.finished |= codes != 0
            s.finished |= torch.tensor(s.max_new, device=s.finished.device) <= s.step + 1  # rows at their own limit
            stop = s.step + 1 >= max(s.max_new) or bool(s.finished.all())
            floats = [f.reshape(-1) for f in (logprobs, prompt_lp if scoring else None) if f is not None]
    if comm.is_last:
        s.local = comm.send_tokens(tokens, codes, stop, torch.cat(floats) if floats else None)
    else:
        comm.send_hidden(out, f"sending step {s.step}'s hidden states")


def logprob_rows(scores: torch.Tensor, tokens: torch.Tensor, gp: GenParams,
                 params: SamplingParams | list[SamplingParams] | None = None) -> torch.Tensor:
    """(B, V) scores the sampler chose from -> (B, 1 + 2k): the chosen token's log-probability, then
    the k most likely ids and their log-probabilities. Sampling's filters count, as in the scores
    generate() returns (compute_transition_scores(..., normalize_logits=True)). params: the rows'
    sampling parameters (default: the run's)."""
    if gp.sampling.do_sample:
        scores = filter_rows(scores, gp.sampling if params is None else params)
    logp = torch.log_softmax(scores.float(), dim=-1)  # (B, V)
    top = torch.topk(logp, gp.logprobs, dim=-1)       # (B, k)
    chosen = logp.gather(-1, tokens[:, None])          # (B, 1)
    return torch.cat([chosen.double(), top.indices.double(), top.values.double()], dim=-1)


def _keep_floats(s: _Slot, floats: torch.Tensor, gp: GenParams) -> None:
    """Split a step's float message (GenParams.floats) into the slot's records."""
    B, T = s.batch.input_ids.shape
    n = B * gp.logprob_width
    if n:
        s.logprobs.append(floats[:n].reshape(B, gp.logprob_width))
    if floats.numel() > n:  # the prefill's message: the prompt log-probabilities follow
        s.prompt_logprobs = floats[n:].reshape(B, FIELDS, -1)  # (B, FIELDS, T - 1), or T with next tokens


def _result(s: _Slot, gp: GenParams, start_s: float) -> BatchResult:
    """(B, steps) tokens -> each prompt's ids up to and including the token that ended it (EOS or a
    stop), as generate() returns them, with why it ended."""
    ids, times, finished, logprobs = [], [], [], [] if s.logprobs else None
    codes = torch.stack(s.codes, dim=1).tolist()  # (B, steps)
    for b, row in enumerate(torch.stack(s.tokens, dim=1).tolist()):
        n = min(next((i + 1 for i, c in enumerate(codes[b]) if c), len(row)), s.max_new[b])
        ids.append(row[:n])
        times.append(s.arrivals[:n])
        finished.append(finish(codes[b][n - 1] if n else 0, s.batch.stops[b] if s.batch.stops else None))
        if logprobs is not None:
            logprobs.append([step[b] for step in s.logprobs[:n]])
    prompt_lp = greedy = argmax = None
    if gp.prompt_logprobs:  # (T - 1 = 0: one-token prompts sent no values)
        prompts, nxt = s.batch.input_ids.tolist(), s.batch.score_next or [None] * len(ids)
        fields = [scored_fields(s.prompt_logprobs, b, len(p), p, t) for b, (p, t) in enumerate(zip(prompts, nxt))]
        prompt_lp, greedy, argmax = (list(f) for f in zip(*fields))
    return BatchResult(ids, times, start_s, finished, logprobs, prompt_lp, greedy, argmax)

