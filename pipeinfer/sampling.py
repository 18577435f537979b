"""Choosing the next token from last-position logits: a pure function of logits and generators.

Each prompt has its own torch.Generator seeded from (seed, prompt_index), so a prompt's sampled
tokens do not depend on pipeline_size, on batch_size, or on which prompts ran before it.
Filtering follows transformers' order: temperature, then top-k, then top-p.
"""

from __future__ import annotations

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
