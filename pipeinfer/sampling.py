"""Choosing the next token from last-position logits: a pure function of logits and generators.

Each prompt has its own torch.Generator seeded from (seed, prompt_index), so a prompt's sampled
tokens do not depend on pipeline_size, on batch_size, or on which prompts ran before it.
Filtering follows transformers' order: temperature, then top-k, then top-p. Before it, the last
stage applies what the checkpoint's generation_config.json sets that changes scores (a repetition
penalty, n-gram blocking, suppressed tokens...) with transformers' own logits processors, built
as generate() builds them, so that greedy output stays generate()'s.
"""

from __future__ import annotations

import copy
import hashlib
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0


def prompt_generator(seed: int, prompt_index: int, device: torch.device) -> torch.Generator:
    digest = hashlib.sha256(f"{seed}:{prompt_index}".encode()).digest()
    return torch.Generator(device=device).manual_seed(int.from_bytes(digest[:8], "little") >> 1)


def filter_logits(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """(B, V) float logits -> the same with filtered-out tokens at -inf."""
    logits = logits / p.temperature
    if 0 < p.top_k < logits.shape[-1]:
        kth = torch.topk(logits, p.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=False)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cum <= 1 - p.top_p
        drop[:, -1] = False  # always keep the most likely token
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return logits


def sample(logits: torch.Tensor, p: SamplingParams, generators: list[torch.Generator]) -> torch.Tensor:
    """(B, V) logits -> (B,) token ids. Greedy is argmax, as generate(do_sample=False) is."""
    if not p.do_sample:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits, p).softmax(dim=-1)
    return torch.cat([torch.multinomial(probs[i], 1, generator=g) for i, g in enumerate(generators)])


def checkpoint_processors(model, gen, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
                          eos_ids: tuple[int, ...] | None):
    """transformers' logits processors as generate() builds them from the checkpoint's generation
    config `gen` (see runtime.score_settings) for this (B, T) prompt batch (the runner passes one
    unpadded prompt at a time); None when that config sets nothing that changes scores.

    eos_ids None: EOS does not stop (ignore_eos), as generate() with no EOS id. `model` is the
    loaded causal LM (the processors read its config). Sampling's own temperature, top-k and top-p
    are not among them: the runner's config sets those (filter_logits)."""
    gen = copy.deepcopy(gen)
    gen.do_sample, gen.num_beams = False, 1
    gen.max_new_tokens, gen.max_length = max_new_tokens, input_ids.shape[1] + max_new_tokens
    gen.eos_token_id = list(eos_ids) if eos_ids else None
    # transformers' own preparation (private, the same signature from 4.57 to 5.2x; CI runs both ends)
    model._prepare_special_tokens(gen, True, device=input_ids.device)
    processors = model._get_logits_processor(generation_config=gen, input_ids_seq_length=input_ids.shape[1],
                                             encoder_input_ids=input_ids, device=input_ids.device,
                                             model_kwargs={"attention_mask": attention_mask})
    return processors if len(processors) else None
