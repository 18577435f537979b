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
from dataclasses import dataclass

import torch
from torch import nn

from pipeinfer.config import ExpConfig
from pipeinfer.load import LoadError
from pipeinfer.load.compiled import compile_stage
from pipeinfer.models.families import Family, family_for
from pipeinfer.plan.partition import StagePlan
from pipeinfer.load.quantize import held_bytes
from pipeinfer.load.streamer import Streamer
from pipeinfer.load.weights import from_pretrained, from_safetensors
from pipeinfer.plan.model import read_model_config, saved_dtype

log = logging.getLogger(__name__)


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
        self.streamer = None  # offload.Streamer when the plan streams some of the stage's layers
        self.compiled = None  # compiled.Compiled when compile is on (compiled.py)
        params = inspect.signature(base.forward).parameters
        # transformers >= 5.2x names the cache argument `cache`; earlier releases `past_key_values`.
        self._cache_arg = "cache" if "cache" in params else "past_key_values"

    def new_cache(self, capacity: int = 0):
        """A KV cache for this stage's layers only (renumbered 0..n-1), typed per layer as generate()
        types it, except that full-attention layers append in place into room for `capacity`
        positions (kvcache.py); sliding-window and other special layers stay as they are."""
        from transformers import DynamicCache
        from transformers.cache_utils import DynamicLayer

        from pipeinfer.load.kvcache import PreallocatedLayer

        cache = DynamicCache(config=self.config)
        cache.layers = [PreallocatedLayer(capacity) if type(layer) is DynamicLayer else layer
                        for layer in cache.layers[self.plan.layers.start:self.plan.layers.stop]]
        return cache

    def warm_up(self, hidden_size: int, dtype: torch.dtype, device: torch.device, rows: tuple[int, ...] = ()) -> None:
        """One prefill and one decode step on dummy inputs, this stage alone (no communication), so
        that one-time costs (kernel selection, allocator growth) stay out of the measured run. With
        compile on, also a decode step at each slot size in `rows`, which traces and compiles it."""
        sizes = [1] + ([r for r in dict.fromkeys(rows) if r != 1] if self.compiled is not None else [])
        for b in sizes:
            cache = self.new_cache()
            for step, length in enumerate((4, 1)):
                if self.plan.is_first:
                    x = torch.zeros(b, length, dtype=torch.long, device=device)  # (B, T)
                else:
                    x = torch.zeros(b, length, hidden_size, dtype=dtype, device=device)  # (B, T, H)
                pos = torch.arange(step * 4, step * 4 + length, device=device)[None].expand(b, length)
                if length == 1 and self.compiled is not None:
                    self.compiled.timed(lambda: self(x, None, pos, cache))
                else:
                    self(x, None, pos, cache)
        if self.streamer is not None:
            self.streamer.reset_stats()

    @torch.inference_mode()
    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None, position_ids: torch.Tensor,
                cache, all_positions: bool = False) -> torch.Tensor:
        """x: (B, T) token ids on the first stage, else (B, T, H) hidden states.

        Returns (B, T, H) hidden states, or (B, V) float32 logits of the last position on the last
        stage; there, all_positions returns the (B, T, H) final hidden states instead (scoring.py).
        """
        inputs = {"input_ids": x} if self.plan.is_first else {"inputs_embeds": x}
        out = self.base(**inputs, attention_mask=attention_mask, position_ids=position_ids,
                        use_cache=True, **{self._cache_arg: cache})
        hidden = out.last_hidden_state
        if self.head is None or all_positions:
            return hidden
        return self.head(hidden[:, -1, :]).float()


@dataclass(frozen=True)
class StageInfo:
    family: str
    num_layers: int
    layer_ranges: list[range]
    device_map: dict[str, str]
    param_bytes: int
    stage_bytes: list[int]  # per rank, planned: parameters + KV cache (what layer_split="auto" balances)


def partition_model(model_path: str, plan: StagePlan, device: torch.device, dtype: torch.dtype,
                    offload_folder: str, *, cfg=None, longest_prompt: int = 0,
                    model_config=None) -> tuple[Stage, StageInfo]:
    """Plan (plan.make_plan) and load this rank's Stage in one call: for tests and benchmarks that
    have no plan of their own. The runner plans before its process group and calls load_stage().

    cfg (an ExpConfig) supplies layer_split, max_memory, batch_size, max_new_tokens, allow_pickle and
    trust_remote_code; without it the defaults hold. longest_prompt (tokens) sizes the KV cache the
    plan counts; 0 plans none (weights only). Planning errors come as LoadError here.
    """
    import dataclasses

    from pipeinfer.config import ConfigError, ExpConfig
    from pipeinfer.plan.make import plan_for_run

    cfg = cfg or ExpConfig(model_path=model_path, pipeline_size=plan.world_size, prompts=["x"])
    if not longest_prompt:
        cfg = dataclasses.replace(cfg, max_new_tokens=0)  # no KV cache planned, as the weights-only split was
    try:
        config = model_config if model_config is not None else read_model_config(model_path, cfg.trust_remote_code)
        the_plan = plan_for_run(cfg, config, longest_prompt, str(dtype).removeprefix("torch."), device.type)
    except ConfigError as e:
        raise LoadError(str(e)) from None
    return load_stage(the_plan, plan.rank, config, device, dtype, offload_folder, cfg.trust_remote_code,
                      cfg.timeout_s, cfg.compile)


def load_stage(plan, rank: int, model_config, device: torch.device, dtype: torch.dtype, offload_folder: str,
               trust_remote_code: bool = False, timeout_s: float = ExpConfig.timeout_s,
               compile: bool | str = False) -> tuple[Stage, StageInfo]:
    """Build rank `rank`'s Stage as `plan` (a plan.Plan) says, reading only its own tensors.

    From safetensors: the model's skeleton on the meta device (buffers real, built as from_pretrained
    builds them), cut to this stage, then each owned tensor read alone through safetensors' reader
    and converted to `dtype` as it goes; the file is opened per tensor, so its mapped pages are let
    go before the next one: bytes read and peak memory follow the stage, not the checkpoint. A
    pickle checkpoint (allow_pickle) goes through from_pretrained with the plan's device_map.
    timeout_s (the run's) bounds an offloaded stage's every wait for its weights (load/streamer.py).
    compile (the config's): compile the decode step's norms and MLPs (load/compiled.py).
    """
    config = model_config
    family = family_for(config.model_type)
    saved = saved_dtype(config)
    if dtype == torch.float16 and saved == "bfloat16":
        log.warning("running a bfloat16 checkpoint in float16 (this GPU has no bf16): activations beyond "
                    "float16's range (65504) overflow to inf; set dtype=float32 if outputs turn to NaN")
    stage_plan = plan.stage(rank)
    mine = plan.ranks[rank]
    tied = bool(getattr(config, "tie_word_embeddings", False))
    local = "cpu" if device.type == "cpu" else str(device)
    dmap = {k: (local if v != "disk" else v) for k, v in mine.device_map.items()}
    owned = f"layers {stage_plan.layers.start}..{stage_plan.layers.stop - 1}" + \
        (" + embeddings" if stage_plan.is_first else "") + (" + final norm + lm_head" if stage_plan.is_last else "")
    stage_bytes = [r.weights + r.kv_cache for r in plan.ranks]
    log.info("rank %d owns %s of %d (%s, %s): %d bytes of weights + %d of KV cache planned (layer_split=%s, "
             "all ranks: %s)", rank, owned, plan.num_layers, local, str(dtype).removeprefix("torch."),
             mine.weights, mine.kv_cache, json.dumps(plan.layer_split), stage_bytes)
    streamed = set(mine.layers) - set(mine.tier("device"))
    if plan.tensors is None:
        model = from_pretrained(plan.model_path, dmap, dtype, offload_folder, trust_remote_code)
    else:
        model = from_safetensors(plan, dmap, local, config, family, device, dtype, tied, trust_remote_code,
                                  streamed)
    stage = _extract_stage(model, family, stage_plan, config, tied)
    layers = getattr(stage.base, family.layers)
    left = [n for n, p in stage.named_parameters() if p.device.type == "meta"
            and not (n.startswith(f"base.{family.layers}.") and
                     stage_plan.layers[int(n.split(".")[2])] in streamed)]
    if left:
        raise LoadError(f"rank {rank} did not load {len(left)} of its weights ({', '.join(left[:3])}): "
                        f"the family's module layout in pipeinfer/models/families.py does not match this model")
    for module in stage.base.modules():  # buffers (rotary inv_freq...) follow; the parameters are there already
        for name, buf in module._buffers.items():
            if buf is not None:
                module._buffers[name] = buf.to(device)
    if streamed:
        stage.streamer = Streamer.attach(list(layers), mine, plan, device, dtype, f"{family.base}.{family.layers}.",
                                         timeout_s)
    why_not = "offloaded layers stream in per step" if streamed else \
        ("quantized layers" if plan.quantization else None)
    most_rows = max(getattr(plan, "slots", None) or [64])  # a slot's rows: the row counts compile traces
    stage.compiled = compile_stage(stage, layers, compile, device, why_not, most_rows)
    param_bytes = held_bytes(stage)
    log.info("rank %d holds %d bytes of parameters%s", rank, param_bytes,
             f" ({plan.quantization.method}, {plan.quantization.source})" if plan.quantization else "")
    return stage, StageInfo(family.name, plan.num_layers, plan.layer_ranges, dmap, param_bytes, stage_bytes)


def _head(model: nn.Module, family: Family) -> nn.Module:
    return next(getattr(model, n) for n in family.heads if hasattr(model, n))


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
