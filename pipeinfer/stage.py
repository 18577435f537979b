"""partition_model(): load only this rank's part of a checkpoint and wrap it as one pipeline Stage.

Every rank runs the same Stage.forward: token ids (first stage) or received hidden states (the
others) in; hidden states, or last-position logits on the last stage, out. The model code knows
nothing about ranks: the stage is the family's own base model with its layer list cut to the
stage's layers and the other stages' modules swapped for placeholders (see families.py).
"""

from __future__ import annotations

import copy
import inspect
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass

import torch
from torch import nn

from pipeinfer.families import Family, family_for
from pipeinfer.partition import (StageCosts, StagePlan, check_complete, missing_weights, plan_split,
                                 stage_device_map)

log = logging.getLogger(__name__)


class LoadError(RuntimeError):
    """The checkpoint cannot be loaded as configured; the message says why and how to fix it."""


class _Unused(nn.Module):
    """Stands in for a module another stage owns; calling it is a bug in the family table."""

    def __init__(self, name: str):
        super().__init__()
        self.name = name

    def forward(self, *args, **kwargs):
        raise RuntimeError(f"{self.name} belongs to another pipeline stage and must not run here")


class _Zeros(nn.Module):
    """Learned position embeddings on a non-first stage: `hidden + pos` must leave hidden unchanged."""

    def forward(self, *args, **kwargs) -> torch.Tensor:
        return torch.zeros(())  # 0-dim: broadcasts, and never changes the other operand's dtype or device


_PLACEHOLDERS = {"unused": _Unused, "identity": lambda name: nn.Identity(), "zeros": lambda name: _Zeros()}


def _get(model: nn.Module, path: str) -> nn.Module:
    for part in path.split("."):
        model = getattr(model, part)
    return model


class Stage(nn.Module):
    def __init__(self, base: nn.Module, head: nn.Module | None, plan: StagePlan, config, lm: nn.Module | None = None):
        super().__init__()
        self.base, self.head, self.plan, self.config = base, head, plan, config
        # The whole causal LM this stage was cut from (last stage only), for transformers' logits
        # processors (sampling.checkpoint_processors). Kept out of the module tree: its modules are
        # this stage's own plus placeholders.
        self.__dict__["lm"] = lm
        params = inspect.signature(base.forward).parameters
        # transformers >= 5.2x names the cache argument `cache`; earlier releases `past_key_values`.
        self._cache_arg = "cache" if "cache" in params else "past_key_values"

    def new_cache(self, capacity: int = 0):
        """A KV cache for this stage's layers only (renumbered 0..n-1), typed per layer as generate()
        types it, except that full-attention layers append in place into room for `capacity`
        positions (kvcache.py); sliding-window and other special layers stay as they are."""
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        from pipeinfer.kvcache import PreallocatedLayer

        cache = DynamicCache(config=self.config)
        cache.layers = [PreallocatedLayer(capacity) if type(layer) is DynamicLayer else layer
                        for layer in cache.layers[self.plan.layers.start:self.plan.layers.stop]]
        return cache

    def warm_up(self, hidden_size: int, dtype: torch.dtype, device: torch.device) -> None:
        """One prefill and one decode step on dummy inputs, this stage alone (no communication), so
        that one-time costs (kernel selection, allocator growth) stay out of the measured run."""
        cache = self.new_cache()
        for step, length in enumerate((4, 1)):
            if self.plan.is_first:
                x = torch.zeros(1, length, dtype=torch.long, device=device)  # (1, T)
            else:
                x = torch.zeros(1, length, hidden_size, dtype=dtype, device=device)  # (1, T, H)
            pos = torch.arange(step * 4, step * 4 + length, device=device)[None]
            self(x, None, pos, cache)

    @torch.inference_mode()
    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None, position_ids: torch.Tensor,
                cache) -> torch.Tensor:
        """x: (B, T) token ids on the first stage, else (B, T, H) hidden states.

        Returns (B, T, H) hidden states, or (B, V) float32 logits of the last position on the last stage.
        """
        inputs = {"input_ids": x} if self.plan.is_first else {"inputs_embeds": x}
        out = self.base(**inputs, attention_mask=attention_mask, position_ids=position_ids,
                        use_cache=True, **{self._cache_arg: cache})
        hidden = out.last_hidden_state
        if self.head is None:
            return hidden
        return self.head(hidden[:, -1, :]).float()


@dataclass(frozen=True)
class StageInfo:
    family: str
    num_layers: int
    layer_ranges: list[range]
    device_map: dict[str, str]
    param_bytes: int
    stage_bytes: list[int]  # per rank, planned: parameters + KV-cache headroom (what layer_split="auto" balances)


def checkpoint_names(model_path: str, allow_pickle: bool = False) -> list[str] | None:
    """Parameter names stored in the checkpoint's safetensors files (read from headers only).

    None for a pickle (.bin) checkpoint when allow_pickle is set: its names cannot be read without
    unpickling it, so the device_map is checked against the model's own names only.
    Every shard is opened (its header only), so a missing or truncated one fails here, on every rank.
    """
    index = os.path.join(model_path, "model.safetensors.index.json")
    if os.path.exists(index):
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (OSError, ValueError, KeyError) as e:
            raise LoadError(f"{index} is not a safetensors index ({e}): copy it again from the source") from None
        for shard in sorted(set(weight_map.values())):
            _check_shard(os.path.join(model_path, shard))
        return sorted(weight_map)
    single = os.path.join(model_path, "model.safetensors")
    if os.path.exists(single):
        return sorted(_check_shard(single))
    if any(n.endswith(".bin") for n in os.listdir(model_path)):
        if allow_pickle:
            return None
        raise LoadError(f"{model_path} holds only pickle .bin weights, which can run code when loaded: convert them "
                        f"on a trusted machine (AutoModelForCausalLM.from_pretrained(dir).save_pretrained(new_dir), "
                        f"which writes safetensors), or set allow_pickle=true if you trust the files")
    raise LoadError(f"no model.safetensors or model.safetensors.index.json in {model_path}: "
                    f"stage the full checkpoint there (config.json and the weight shards)")


def _check_shard(path: str) -> list[str]:
    """The tensor names in one safetensors file, reading only its header; LoadError if it is
    missing or not a whole safetensors file (a truncated copy fails here, on every rank)."""
    from safetensors import safe_open

    if not os.path.exists(path):
        raise LoadError(f"checkpoint shard {path} is missing (listed in model.safetensors.index.json): "
                        f"copy the complete checkpoint directory again")
    try:  # safe_open checks the header and that the data it describes covers the whole file
        with safe_open(path, framework="pt") as f:
            names = list(f.keys())
    except Exception as e:  # safetensors raises its own error type (SafetensorError), not exported
        raise LoadError(f"checkpoint shard {path} is corrupt ({str(e).splitlines()[0][:120]}): "
                        f"copy it again from the source (compare sha256sum with the original)") from None
    return names


def resolve_dtype(name: str, device: torch.device, saved: str | None = None) -> torch.dtype:
    """"auto": on CUDA bf16 where the GPU supports it, else float16 (T4-class cards);
    partition_model() warns when float16 meets a checkpoint saved in bfloat16 (values beyond
    float16's range, 65504, overflow to inf). On CPU the checkpoint's own dtype when it is float32
    or bfloat16, else float32: loading in another dtype makes transformers read and convert every
    tensor of the checkpoint, other stages' too, where the saved dtype maps only this stage's."""
    if name != "auto":
        return getattr(torch, name)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if saved == "bfloat16" else torch.float32


def saved_dtype(model_config) -> str | None:
    """The dtype the checkpoint was saved in, per its config.json (`dtype`, or `torch_dtype` before 4.56)."""
    saved = getattr(model_config, "dtype", None) or getattr(model_config, "torch_dtype", None)
    return str(saved).removeprefix("torch.") if saved is not None else None


def stage_costs(skeleton: nn.Module, family: Family, config, dtype: torch.dtype, kv_tokens: int) -> StageCosts:
    """Bytes per part of the model in `dtype`, from the meta skeleton (numel x element size).

    Each layer also carries the KV cache of `kv_tokens` tokens (batch x (prompt + new tokens)).
    A tied lm_head is the embedding's weight: counted on the first stage and again on the last.
    """
    def nbytes(module: nn.Module | None) -> int:
        return 0 if module is None else sum(p.numel() for p in module.parameters()) * dtype.itemsize

    base = _get(skeleton, family.base)
    heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    kv = 2 * kv_tokens * heads * head_dim * dtype.itemsize  # keys and values, per layer
    return StageCosts(layers=[nbytes(layer) + kv for layer in getattr(base, family.layers)],
                      first=sum(nbytes(getattr(base, n, None)) for n in family.first),
                      last=sum(nbytes(getattr(base, n, None)) for n in family.last) + nbytes(_head(skeleton, family)))


def partition_model(model_path: str, plan: StagePlan, device: torch.device, dtype: torch.dtype,
                    offload_folder: str, *, cfg=None, longest_prompt: int = 0,
                    model_config=None) -> tuple[Stage, StageInfo]:
    """Build this rank's Stage, materialising only its own weights.

    cfg (an ExpConfig) supplies layer_split, max_memory, allow_pickle and trust_remote_code; without it
    the defaults hold (even split, safetensors only, no custom code). longest_prompt (tokens) sizes
    the KV-cache headroom the split plans for: batch_size x (longest_prompt + max_new_tokens) per layer.
    model_config: the checkpoint's config when the caller has read it already (else it is read here).
    """
    from accelerate import init_empty_weights
    from accelerate.hooks import remove_hook_from_module
    from transformers import AutoModelForCausalLM

    from pipeinfer.config import parse_bytes
    from pipeinfer.runtime import read_model_config

    trust = bool(cfg and cfg.trust_remote_code)
    allow_pickle = bool(cfg and cfg.allow_pickle)
    config = model_config if model_config is not None else read_model_config(model_path, trust_remote_code=trust)
    family = family_for(config.model_type)
    num_layers = config.num_hidden_layers
    saved = saved_dtype(config)
    if dtype == torch.float16 and saved == "bfloat16":
        log.warning("running a bfloat16 checkpoint in float16 (this GPU has no bf16): activations beyond "
                    "float16's range (65504) overflow to inf; set dtype=float32 if outputs turn to NaN")
    if saved is not None and saved != str(dtype).removeprefix("torch."):
        # Measured in bench/memory.py: the converted load peaks with every checkpoint page resident.
        log.info("converting the %s checkpoint to %s while loading: transformers reads every tensor to convert "
                 "it, other stages' too (then drops them); set dtype=%s to read only this stage's", saved,
                 str(dtype).removeprefix("torch."), saved)

    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config, trust_remote_code=trust)
    kv_tokens = cfg.batch_size * (longest_prompt + cfg.max_new_tokens) if cfg and longest_prompt else 0
    costs = stage_costs(skeleton, family, config, dtype, kv_tokens)
    budgets = [parse_bytes(b) for b in cfg.max_memory] if cfg and cfg.max_memory is not None else None
    try:
        layer_ranges = plan_split(num_layers, plan.pipeline_size, cfg.layer_split if cfg else "even", costs, budgets)
    except ValueError as e:
        raise LoadError(str(e)) from None
    plan = StagePlan(plan.rank, plan.pipeline_size, layer_ranges[plan.rank])

    base = _get(skeleton, family.base)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    local = "cpu" if device.type == "cpu" else str(device)
    top = [n for n, _ in skeleton.named_children()]
    dmap = stage_device_map(top, [n for n, _ in base.named_children()], num_layers, family, plan, tied, local)
    stored = checkpoint_names(model_path, allow_pickle)
    keys = None if stored is None else _checkpoint_keys(stored, top, family)  # as the model names them
    try:
        check_complete(dmap, list(skeleton.state_dict()), "model parameters and buffers")
        if keys is not None:
            check_complete(dmap, keys, "checkpoint tensors")
    except ValueError as e:
        raise LoadError(str(e)) from None
    if keys is not None:
        have = set(keys)
        tied_pair = {f"{family.base}.{family.embeddings}.weight"} | {f"{h}.weight" for h in family.heads if h in top}
        if tied and have & tied_pair:
            have |= tied_pair  # either copy serves both: transformers ties them after loading
        absent = missing_weights(dmap, [n for n, _ in skeleton.named_parameters()], have, local)
        if absent:
            shown = ", ".join(absent[:3]) + (f" and {len(absent) - 3} more" if len(absent) > 3 else "")
            raise LoadError(f"the checkpoint in {model_path} has no tensor for {len(absent)} weights rank {plan.rank} "
                            f"needs ({shown}); transformers would fill them with random values: copy the complete "
                            f"checkpoint, saved for this model's type and size")
    del skeleton

    owned = f"layers {plan.layers.start}..{plan.layers.stop - 1}" + \
        (" + embeddings" if plan.is_first else "") + (" + final norm + lm_head" if plan.is_last else "")
    stage_bytes = costs.stage_bytes(layer_ranges)
    log.info("rank %d owns %s of %d (%s, %s): %d bytes of weights + KV-cache headroom (layer_split=%s, "
             "all ranks: %s)", plan.rank, owned, num_layers, local, str(dtype).removeprefix("torch."),
             stage_bytes[plan.rank], json.dumps(cfg.layer_split if cfg else "even"), stage_bytes)

    # The "disk" entries are the other stages' modules, dropped once loaded. From safetensors nothing
    # is written for them; a pickle checkpoint cannot be read lazily, so transformers copies them
    # into the offload folder: a scratch directory there, removed once this stage is built.
    scratch = None
    if "disk" in dmap.values():
        try:
            os.makedirs(offload_folder, exist_ok=True)
            scratch = tempfile.mkdtemp(prefix="loading-", dir=offload_folder)
        except OSError as e:
            raise LoadError(f"offload_folder={os.path.dirname(offload_folder)!r} cannot be used ({e.strerror}): "
                            f"point offload_folder at a writable directory") from None
    try:
        model = AutoModelForCausalLM.from_pretrained(
            model_path, local_files_only=True, low_cpu_mem_usage=True, use_safetensors=stored is not None,
            dtype=dtype, device_map=dmap, offload_folder=scratch, trust_remote_code=trust)
        model.eval()
        remove_hook_from_module(model, recurse=True)  # owned weights are already on `device`; others are dropped
        stage = _extract_stage(model, family, plan, config, tied)
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    param_bytes = sum(p.numel() * p.element_size() for p in {id(p): p for p in stage.parameters()}.values())
    log.info("rank %d holds %d bytes of parameters", plan.rank, param_bytes)
    return stage, StageInfo(family.name, num_layers, layer_ranges, dmap, param_bytes, stage_bytes)


def _head(model: nn.Module, family: Family) -> nn.Module:
    return next(getattr(model, n) for n in family.heads if hasattr(model, n))


def _checkpoint_keys(stored: list[str], top: list[str], family: Family) -> list[str]:
    """Checkpoint tensor names as the model names them: checkpoints saved from the base model omit
    its root ("h.0..." for "transformer.h.0..."), and older releases may name the head differently."""
    head = next(n for n in family.heads if n in top)
    keys = []
    for name in stored:
        first, _, rest = name.partition(".")
        if first in family.heads:
            keys.append(f"{head}.{rest}")
        elif first in top:
            keys.append(name)
        else:
            keys.append(f"{family.root}.{name}")
    return keys


def _extract_stage(model: nn.Module, family: Family, plan: StagePlan, config, tied: bool) -> Stage:
    base = _get(model, family.base)
    layers = getattr(base, family.layers)
    kept = nn.ModuleList(layers[i] for i in plan.layers)
    for local_idx, layer in enumerate(kept):
        for module in layer.modules():  # the stage's KV cache holds only its own layers
            if isinstance(getattr(module, "layer_idx", None), int):
                module.layer_idx = local_idx
    setattr(base, family.layers, kept)
    for owned, parts in ((plan.is_first, family.first), (plan.is_last, family.last)):
        if not owned:
            for name, kind in parts.items():
                if getattr(base, name, None) is not None:  # a module this config leaves out stays None
                    setattr(base, name, _PLACEHOLDERS[kind](f"{family.base}.{name}"))
    if family.input_scale and not plan.is_first:  # see families.py: the factor becomes exactly 1.0
        base.config = copy.copy(base.config)
        base.config.hidden_size = 1
    head = _head(model, family) if plan.is_last else None
    if head is not None and tied and head.weight.device.type == "meta":
        raise LoadError(f"lm_head is tied to {family.embeddings} but was not loaded on the last stage")
    return Stage(base, head, plan, config, lm=model if plan.is_last else None)
