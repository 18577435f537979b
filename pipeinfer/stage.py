"""partition_model(): load only this rank's part of a checkpoint and wrap it as one pipeline Stage.

Every rank runs the same Stage.forward: token ids (first stage) or received hidden states (the
others) in; hidden states, or last-position logits on the last stage, out. The model code knows
nothing about ranks: the stage is the family's own base model with its layer list cut to the
stage's layers and the other stages' modules swapped for placeholders (see families.py).
"""

from __future__ import annotations

import inspect
import json
import logging
import os
from dataclasses import dataclass

import torch
from torch import nn

from pipeinfer.families import Family, family_for
from pipeinfer.partition import StagePlan, check_complete, split_layers, stage_device_map

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


_PLACEHOLDERS = {"unused": _Unused, "identity": lambda name: nn.Identity()}


class Stage(nn.Module):
    def __init__(self, base: nn.Module, head: nn.Module | None, plan: StagePlan, config):
        super().__init__()
        self.base, self.head, self.plan, self.config = base, head, plan, config
        params = inspect.signature(base.forward).parameters
        # transformers >= 5.2x names the cache argument `cache`; earlier releases `past_key_values`.
        self._cache_arg = "cache" if "cache" in params else "past_key_values"

    def new_cache(self):
        """A KV cache for this stage's layers only (renumbered 0..n-1), typed per layer as generate() types it."""
        from transformers import DynamicCache

        cache = DynamicCache(config=self.config)
        cache.layers = cache.layers[self.plan.layers.start:self.plan.layers.stop]
        return cache

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


def checkpoint_names(model_path: str) -> list[str]:
    """Parameter names stored in the checkpoint's safetensors files (read from headers only)."""
    from safetensors import safe_open

    index = os.path.join(model_path, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index, encoding="utf-8") as f:
            return sorted(json.load(f)["weight_map"])
    single = os.path.join(model_path, "model.safetensors")
    if os.path.exists(single):
        with safe_open(single, framework="pt") as f:
            return sorted(f.keys())
    if any(n.endswith(".bin") for n in os.listdir(model_path)):
        raise LoadError(f"{model_path} holds only pickle .bin weights, which can run code when loaded: convert them "
                        f"with model.save_pretrained(dir, safe_serialization=True) on a trusted machine")
    raise LoadError(f"no model.safetensors or model.safetensors.index.json in {model_path}: "
                    f"stage the full checkpoint there (config.json and the weight shards)")


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """"auto": float32 on CPU (exact, and fast where there is no bf16 matrix unit); on CUDA bf16
    where the GPU supports it, else float16 (T4-class cards)."""
    if name != "auto":
        return getattr(torch, name)
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def partition_model(model_path: str, plan: StagePlan, device: torch.device, dtype: torch.dtype,
                    offload_folder: str) -> tuple[Stage, StageInfo]:
    """Build this rank's Stage, materialising only its own weights."""
    from accelerate import init_empty_weights
    from accelerate.hooks import remove_hook_from_module
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_path, local_files_only=True)
    family = family_for(config.model_type)
    num_layers = config.num_hidden_layers
    layer_ranges = split_layers(num_layers, plan.pipeline_size)
    plan = StagePlan(plan.rank, plan.pipeline_size, layer_ranges[plan.rank])

    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config)
    base = getattr(skeleton, family.base)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    local = "cpu" if device.type == "cpu" else str(device)
    dmap = stage_device_map([n for n, _ in skeleton.named_children()], [n for n, _ in base.named_children()],
                            num_layers, family, plan, tied, local)
    check_complete(dmap, list(skeleton.state_dict()), "model parameters and buffers")
    stored = checkpoint_names(model_path)
    prefixed = [n if n.startswith((family.base + ".", family.head + ".")) else f"{family.base}.{n}" for n in stored]
    check_complete(dmap, prefixed, "checkpoint tensors")
    del skeleton

    owned = f"layers {plan.layers.start}..{plan.layers.stop - 1}" + \
        (" + embeddings" if plan.is_first else "") + (" + final norm + lm_head" if plan.is_last else "")
    log.info("rank %d owns %s of %d (%s, %s)", plan.rank, owned, num_layers, local, str(dtype).removeprefix("torch."))

    model = AutoModelForCausalLM.from_pretrained(
        model_path, local_files_only=True, low_cpu_mem_usage=True, use_safetensors=True, dtype=dtype,
        device_map=dmap, offload_folder=offload_folder)
    model.eval()
    remove_hook_from_module(model, recurse=True)  # owned weights are already on `device`; others are dropped
    stage = _extract_stage(model, family, plan, config, tied)
    param_bytes = sum(p.numel() * p.element_size() for p in {id(p): p for p in stage.parameters()}.values())
    return stage, StageInfo(family.name, num_layers, layer_ranges, dmap, param_bytes)


def _extract_stage(model: nn.Module, family: Family, plan: StagePlan, config, tied: bool) -> Stage:
    base = getattr(model, family.base)
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
                setattr(base, name, _PLACEHOLDERS[kind](f"{family.base}.{name}"))
    head = getattr(model, family.head) if plan.is_last else None
    if head is not None and tied and head.weight.device.type == "meta":
        raise LoadError(f"lm_head is tied to {family.embeddings} but was not loaded on the last stage")
    return Stage(base, head, plan, config)
