"""Choosing the next token from last-position logits: a pure function of logits and generators;
and the checkpoint's generation_config.json, read as generate() reads it.

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
from dataclasses import dataclass, replace

import torch

from pipeinfer.config import ConfigError
from pipeinfer.run.prompts import NO_LIMITS, SAMPLING_KEYS


@dataclass(frozen=True)
class SamplingParams:
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0


def row_settings(indices: list[int], limits: list | None, max_new_tokens: int, run: SamplingParams, seed: int
                 ) -> tuple[list[int], SamplingParams | list[SamplingParams], list[tuple[int, int]]]:
    """Per row of a micro-batch (prompt `indices`, their prompts.Limits or None when none has any):
    its max_new_tokens, its sampling parameters (`run` itself when no row sets its own) and its
    generator's (seed, index) key for prompt_generator."""
    limits = limits or [NO_LIMITS] * len(indices)
    max_new = [max_new_tokens if lim.max_new_tokens is None else lim.max_new_tokens for lim in limits]
    params = run if all(lim == NO_LIMITS for lim in limits) else [
        replace(run, **{k: getattr(lim, k) for k in SAMPLING_KEYS if getattr(lim, k) is not None}) for lim in limits]
    seeds = [(seed, i) if lim.seed is None else (lim.seed, 0) for i, lim in zip(indices, limits)]
    return max_new, params, seeds


def prompt_generator(seed: int, prompt_index: int, device: torch.device) -> torch.Generator:
    """A prompt with its own seed passes prompt_index 0: its tokens then depend on that seed alone."""
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


class NonFiniteLogits(RuntimeError):
    """The model's logits hold inf or NaN: its activations overflowed in this dtype (float16, usually)."""


def check_finite(logits: torch.Tensor, step: int, indices: list[int], dtype: torch.dtype) -> None:
    """(B, V) logits straight from the model, before any processor (which may set -inf on purpose).

    On CUDA, sampling from inf/NaN logits trips a device-side assert in multinomial that kills the
    CUDA context with an unreadable error; greedy argmax would silently pick garbage. One reduction
    per step, on the last stage only: of each row's sum (a NaN or inf anywhere makes it non-finite),
    which costs a sixtieth of a full (B, V) isfinite mask at batch 32 here; the mask only when a sum
    is not finite (an overflowing sum of finite logits passes there)."""
    if bool(torch.isfinite(logits.sum(dim=-1)).all()) or bool(torch.isfinite(logits).all()):
        return
    row = int((~torch.isfinite(logits)).any(dim=-1).nonzero()[0, 0])
    name = str(dtype).removeprefix("torch.")
    raise NonFiniteLogits(f"step {step}: the logits for prompt {indices[row]} are not finite (inf or NaN): the "
                          f"model's activations overflowed in {name}; set dtype=\"float32\", or run on a GPU with "
                          f"bfloat16 (compute capability 8.0 or later: A100, H100, L4, RTX 30xx)")


def filter_rows(logits: torch.Tensor, p: SamplingParams | list[SamplingParams]) -> torch.Tensor:
    """filter_logits with one SamplingParams for every row, or a list of them, one per row (prompts
    with their own temperature, top_k or top_p)."""
    if isinstance(p, SamplingParams):
        return filter_logits(logits, p)
    if all(q == p[0] for q in p):
        return filter_logits(logits, p[0])
    return torch.cat([filter_logits(logits[i:i + 1], q) for i, q in enumerate(p)])


def sample(logits: torch.Tensor, p: SamplingParams | list[SamplingParams], generators: list[torch.Generator]
           ) -> torch.Tensor:
    """(B, V) logits -> (B,) token ids. Greedy is argmax, as generate(do_sample=False) is. p: one
    SamplingParams for every row, or one per row (do_sample is the run's, the same in every row)."""
    if not (p if isinstance(p, SamplingParams) else p[0]).do_sample:
        return logits.argmax(dim=-1)
    probs = filter_rows(logits, p).softmax(dim=-1)
    return torch.cat([torch.multinomial(probs[i], 1, generator=g) for i, g in enumerate(generators)])


def checkpoint_processors(model, gen, input_ids: torch.Tensor, attention_mask: torch.Tensor, max_new_tokens: int,
                          eos_ids: tuple[int, ...] | None):
    """transformers' logits processors as generate() builds them from the checkpoint's generation
    config `gen` (see score_settings below) for this (B, T) prompt batch (the runner passes one
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


def load_generation_config(model_path: str, model_config):
    """The checkpoint's generation_config.json as generate() reads it, else one derived from config.json."""
    from transformers import GenerationConfig

    try:
        return GenerationConfig.from_pretrained(model_path, local_files_only=True)
    except OSError:
        return GenerationConfig.from_model_config(model_config)


# generation_config.json settings that change which token generate() picks, even greedy, with their
# neutral values (transformers 5 defaults them to None, 4.57 to these): the last stage applies them
# with transformers' own logits processors (sampling.checkpoint_processors).
SCORE_SETTINGS = {"repetition_penalty": 1.0, "encoder_repetition_penalty": 1.0, "no_repeat_ngram_size": 0,
                  "encoder_no_repeat_ngram_size": 0, "bad_words_ids": None, "min_length": 0, "min_new_tokens": 0,
                  "forced_bos_token_id": None, "forced_eos_token_id": None, "remove_invalid_values": False,
                  "exponential_decay_length_penalty": None, "suppress_tokens": None, "begin_suppress_tokens": None,
                  "sequence_bias": None}


def score_settings(gen) -> dict:
    """The SCORE_SETTINGS this generation config sets to other than their neutral values.
    ConfigError for settings no pipeline stage can apply (they run the model again per step)."""
    for name, neutral in (("guidance_scale", 1.0), ("watermarking_config", None)):
        if getattr(gen, name, None) not in (None, neutral):
            raise ConfigError(f"the checkpoint's generation_config.json sets {name}={getattr(gen, name)!r}, which this "
                              f"runner cannot apply (it needs extra model passes per step): remove it there")
    return {k: getattr(gen, k) for k, neutral in SCORE_SETTINGS.items()
            if getattr(gen, k, None) not in (None, neutral, [], {})}


def generation_ids(gen, model_config, tokenizer) -> tuple[tuple[int, ...], int]:
    """(eos ids, pad id) as generate() would use them: generation_config.json first, then config.json."""
    eos = gen.eos_token_id if gen.eos_token_id is not None else model_config.eos_token_id
    eos = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
    pad = gen.pad_token_id if gen.pad_token_id is not None else tokenizer.pad_token_id
    if pad is None:
        pad = eos[0] if eos else 0
    return eos, int(pad)
