"""Everything a run needs, read and checked identically on every rank before anyone waits on anyone.

    inputs = read_inputs("exp_config.json", ["pipeline_size=2"])   # ConfigError: exit 2, one line

Config, the checkpoint's config and generation_config, the tokenizer, the prompts (rendered and
tokenized), the device and dtype, and the plan (plan.py: every rank's layers and bytes, every
split and budget rule). A job that cannot run ends here, on every rank alike, before the process
group exists.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from pipeinfer.config import ConfigError, ExpConfig, check_vocab, check_world, load_config, world_from_env
from pipeinfer.models.families import family_for
from pipeinfer.run.generation import GenParams
from pipeinfer.plan.make import Plan, plan_for_run
from pipeinfer.run.prompts import Prompt, check_lengths, load_prompts, load_tokenizer, prepare
from pipeinfer.plan.model import read_model_config
from pipeinfer.run.runtime import pick_device, setup_logging
from pipeinfer.run.sampling import SamplingParams, generation_ids, load_generation_config, score_settings
from pipeinfer.plan.model import saved_dtype
from pipeinfer.run.runtime import resolve_dtype
from pipeinfer.run.stops import Stopper


@dataclass(frozen=True)
class Inputs:
    rank: int
    world_size: int
    cfg: ExpConfig
    model_config: object
    tokenizer: object
    prompts: list[Prompt]
    gen: GenParams
    score_changes: dict  # generation_config.json settings applied as generate() applies them
    device: torch.device
    dtype: torch.dtype
    plan: Plan

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")


def read_inputs(config_path: str, overrides: list[str], prompts_required: bool = True) -> Inputs:
    """Read and check everything; ConfigError (one line, with the fix) for anything wrong.
    prompts_required=False: the engine's callers, whose requests come later (the plan then makes
    room for max_prompt_tokens, prompt_room)."""
    rank, world_size, local_rank = world_from_env()
    setup_logging(rank)
    cfg = load_config(config_path, overrides)
    if prompts_required and cfg.prompts is None and cfg.prompts_file is None:
        raise ConfigError("set one of prompts (a list of strings) or prompts_file (a .jsonl or .txt path): the "
                          "batch runner generates for them")
    check_world(cfg, world_size)
    model_config = read_model_config(cfg.model_path, cfg.trust_remote_code)
    family_for(model_config.model_type)
    check_vocab(cfg, getattr(model_config, "vocab_size", None))
    specs = load_prompts(cfg)
    tokenizer = load_tokenizer(cfg.model_path, cfg.trust_remote_code)
    prompts = prepare(tokenizer, specs, cfg)  # strings and chat messages -> text and token ids
    max_positions = getattr(model_config, "max_position_embeddings", None)
    lengths = check_lengths(prompts, max_positions, cfg.max_new_tokens)
    room = prompt_room(cfg, lengths, max_positions)
    gen_config = load_generation_config(cfg.model_path, model_config)
    score_changes = score_settings(gen_config)
    eos_ids, pad_id = generation_ids(gen_config, model_config, tokenizer)
    # stop strings' matchers are built now: one a tokenizer cannot serve is bad input, not a mid-run error
    stopper = Stopper(tokenizer, () if cfg.ignore_eos else eos_ids).prepare(s for p in prompts for s in p.stops.strings)
    gen = GenParams(cfg.max_new_tokens, cfg.ignore_eos, eos_ids, pad_id,
                    SamplingParams(cfg.do_sample, cfg.temperature, cfg.top_k, cfg.top_p), cfg.seed,
                    gen_config if score_changes else None, stopper,
                    logprobs=cfg.logprobs, prompt_logprobs=cfg.prompt_logprobs, prompt_chunk=cfg.prompt_logprobs_chunk,
                    prefill_chunk=cfg.prefill_chunk_size)
    device = pick_device(cfg.device, local_rank)
    dtype = resolve_dtype(cfg.dtype, device, saved_dtype(model_config))
    # Every rank's layers and bytes, every split and budget rule: a job that does not fit ends here.
    # KV room for the largest max_new_tokens any prompt asks for (its own, else the run's)
    longest_new = max((p.max_new_tokens(cfg.max_new_tokens) for p in prompts), default=cfg.max_new_tokens)
    plan = plan_for_run(dataclasses.replace(cfg, max_new_tokens=longest_new), model_config, room,
                        str(dtype).removeprefix("torch."), device.type)
    return Inputs(rank, world_size, cfg, model_config, tokenizer, prompts, gen, score_changes, device, dtype, plan)


def prompt_room(cfg: ExpConfig, lengths: list[int], max_positions: int | None) -> int:
    """The longest prompt the plan makes room for: max_prompt_tokens, else the longest given prompt,
    else (no prompts: an engine's caller sends requests) the model's positions less max_new_tokens.
    ConfigError when a given prompt is longer than max_prompt_tokens, or no room is left."""
    if cfg.max_prompt_tokens is not None:
        longest = max(lengths, default=0)
        if longest > cfg.max_prompt_tokens:
            i = lengths.index(longest)
            raise ConfigError(f"prompt {i} has {longest} tokens, above max_prompt_tokens={cfg.max_prompt_tokens}: "
                              f"raise max_prompt_tokens or shorten the prompt")
        if max_positions is not None and cfg.max_prompt_tokens + cfg.max_new_tokens > max_positions:
            raise ConfigError(f"max_prompt_tokens={cfg.max_prompt_tokens} + max_new_tokens={cfg.max_new_tokens} "
                              f"exceeds the model's {max_positions} positions: lower one of them")
        return cfg.max_prompt_tokens
    if lengths:
        return max(lengths)
    if max_positions is None or max_positions - cfg.max_new_tokens < 1:
        known = f"the model's {max_positions} positions less max_new_tokens={cfg.max_new_tokens} leave none" \
            if max_positions is not None else "the model's config does not say how many positions it has"
        raise ConfigError(f"no prompts are configured and {known}: set max_prompt_tokens (the longest prompt a "
                          f"request may have)")
    return max_positions - cfg.max_new_tokens
