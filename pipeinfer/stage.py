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
from pipeinfer.partition import StagePlan
from pipeinfer.quantization import held_bytes, quantize_weight, replace_linears, stats_keys, stored_weight
from pipeinfer.runtime import saved_dtype

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
        self.streamer = None  # offload.Streamer when the plan streams some of the stage's layers
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
    from pipeinfer.plan import plan_for_run
    from pipeinfer.runtime import read_model_config

    cfg = cfg or ExpConfig(model_path=model_path, pipeline_size=plan.world_size, prompts=["x"])
    if not longest_prompt:
        cfg = dataclasses.replace(cfg, max_new_tokens=0)  # no KV cache planned, as the weights-only split was
    try:
        config = model_config if model_config is not None else read_model_config(model_path, cfg.trust_remote_code)
        the_plan = plan_for_run(cfg, config, longest_prompt, str(dtype).removeprefix("torch."), device.type)
    except ConfigError as e:
        raise LoadError(str(e)) from None
    return load_stage(the_plan, plan.rank, config, device, dtype, offload_folder, cfg.trust_remote_code)


def load_stage(plan, rank: int, model_config, device: torch.device, dtype: torch.dtype, offload_folder: str,
               trust_remote_code: bool = False) -> tuple[Stage, StageInfo]:
    """Build rank `rank`'s Stage as `plan` (a plan.Plan) says, reading only its own tensors.

    From safetensors: the model's skeleton on the meta device (buffers real, built as from_pretrained
    builds them), cut to this stage, then each owned tensor read alone through safetensors' reader
    and converted to `dtype` as it goes; the file is opened per tensor, so its mapped pages are let
    go before the next one: bytes read and peak memory follow the stage, not the checkpoint. A
    pickle checkpoint (allow_pickle) goes through from_pretrained with the plan's device_map.
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
        model = _from_pretrained(plan.model_path, dmap, dtype, offload_folder, trust_remote_code)
    else:
        model = _from_safetensors(plan, dmap, local, config, family, device, dtype, tied, trust_remote_code,
                                  streamed)
    stage = _extract_stage(model, family, stage_plan, config, tied)
    layers = getattr(stage.base, family.layers)
    left = [n for n, p in stage.named_parameters() if p.device.type == "meta"
            and not (n.startswith(f"base.{family.layers}.") and
                     stage_plan.layers[int(n.split(".")[2])] in streamed)]
    if left:
        raise LoadError(f"rank {rank} did not load {len(left)} of its weights ({', '.join(left[:3])}): "
                        f"the family's module layout in pipeinfer/families.py does not match this model")
    for module in stage.base.modules():  # buffers (rotary inv_freq...) follow; the parameters are there already
        for name, buf in module._buffers.items():
            if buf is not None:
                module._buffers[name] = buf.to(device)
    if streamed:
        from pipeinfer.offload import Streamer
        stage.streamer = Streamer.attach(list(layers), mine, plan, device, dtype,
                                         f"{family.base}.{family.layers}.")
    param_bytes = held_bytes(stage)
    log.info("rank %d holds %d bytes of parameters%s", rank, param_bytes,
             f" ({plan.quantization.method}, {plan.quantization.source})" if plan.quantization else "")
    return stage, StageInfo(family.name, plan.num_layers, plan.layer_ranges, dmap, param_bytes, stage_bytes)


def _from_safetensors(plan, dmap: dict[str, str], local: str, config, family: Family, device: torch.device,
                      dtype: torch.dtype, tied: bool, trust: bool, streamed: set[int] = frozenset()) -> nn.Module:
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    from pipeinfer.plan import _placement

    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # floating buffers made in __init__ as from_pretrained(dtype=...) makes them
    try:
        with init_empty_weights():
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust)
    finally:
        torch.set_default_dtype(default)
    model.eval()
    embedding = f"{family.base}.{family.embeddings}.weight"
    heads = [f"{h}.weight" for h in family.heads]
    by_key = plan.keys
    q = plan.quantization
    quantized = {n for n in plan.quantized if _placement(dmap, n) == local}
    if quantized:
        replace_linears(model, quantized, q)  # bitsandbytes modules, on meta, in eval mode
    stats = stats_keys(plan.tensors) if q is not None and q.source == "checkpoint" else {}
    layer_prefix = f"{family.base}.{family.layers}."
    for name, param in list(model.named_parameters()):
        if _placement(dmap, name) != local or (tied and name in heads):
            continue  # another stage's, or a tied head: the embedding, tied below
        if name.startswith(layer_prefix) and int(name[len(layer_prefix):].split(".")[0]) in streamed:
            continue  # streamed in when it runs (offload.py)
        key = by_key.get(name)
        if key is None and tied and name in (embedding, *heads):  # the other copy of a tied pair
            key = next(by_key[n] for n in (embedding, *heads) if n in by_key)
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        if name in quantized and q.source == "checkpoint":
            names = [key, *stats.get(key, ())]
            stored = {k[len(module_name) + 1:]: _read(plan.tensors[k], k, device) for k in names}
            value = stored_weight(module, stored, device)
        elif name in quantized:
            value = quantize_weight(module, _read(plan.tensors[key], key, device, dtype), device)
        else:
            value = nn.Parameter(_read(plan.tensors[key], key, device, dtype), requires_grad=False)
        setattr(module, attr, value)
    if tied:
        head = _head(model, family)
        head.weight = model.get_submodule(f"{family.base}.{family.embeddings}").weight
    return model


# safetensors' dtype names (checkpoint.read_headers admits these) as torch dtypes
_STORED = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
# A tensor converted as it is read, or read for a GPU, passes through a host buffer this size: too
# small to count beside a stage (the plan leaves it out), big enough that reads cost no more.
READ_CHUNK_BYTES = 4 * 2**20


def _read(t, key: str, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Stored tensor `key` (t: its checkpoint.Tensor) on `device`, in `dtype` if given, read from the
    file with plain reads: on CPU in its stored dtype straight into its own memory; converted, or for
    a GPU, READ_CHUNK_BYTES at a time through a host buffer. Not safetensors' reader: it maps the
    file, and the tensor's mapped pages count in the process's resident set beside the copy until
    the tensor is dropped, so a load peaked at the stage plus its largest tensor (a 128k x 4096
    head in bfloat16: 1 GiB more)."""
    stored = _STORED[t.dtype]
    out = torch.empty(t.shape, dtype=dtype or stored, device=device)
    flat = out.view(-1)
    try:
        fd = os.open(t.file, os.O_RDONLY)
    except OSError as e:
        raise LoadError(f"cannot open {t.file} to read {key} ({e.strerror}): keep the checkpoint where the plan "
                        f"read its headers") from None
    try:
        if out.dtype == stored and device.type == "cpu":
            _pread(fd, flat, t.offset, t.file, key)
            return out
        step = max(1, READ_CHUNK_BYTES // stored.itemsize)  # elements per read
        buf = torch.empty(min(step, flat.numel()), dtype=stored)
        for i in range(0, flat.numel(), step):
            part = buf[:min(step, flat.numel() - i)]
            _pread(fd, part, t.offset + i * stored.itemsize, t.file, key)
            flat[i:i + part.numel()].copy_(part)  # converted (and moved) into place
    finally:
        os.close(fd)
    return out


def _pread(fd: int, out: torch.Tensor, offset: int, file: str, key: str) -> None:
    """Fill the contiguous CPU tensor `out` with the file's bytes from `offset` on."""
    if out.numel() == 0:
        return
    view, done = memoryview(out.view(torch.uint8).numpy()).cast("B"), 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got == 0:
            raise LoadError(f"{file} ended {len(view) - done} bytes early while reading {key}: the checkpoint changed "
                            f"after the plan read its headers; copy it again and rerun")
        done += got


def _from_pretrained(model_path: str, dmap: dict[str, str], dtype: torch.dtype, offload_folder: str,
                     trust: bool) -> nn.Module:
    """A pickle checkpoint: it cannot be read per tensor, so transformers copies the other stages'
    modules into the offload folder (a scratch directory there, removed once this stage is built)."""
    from accelerate.hooks import remove_hook_from_module
    from transformers import AutoModelForCausalLM

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
            model_path, local_files_only=True, low_cpu_mem_usage=True, use_safetensors=False,
            dtype=dtype, device_map=dmap, offload_folder=scratch, trust_remote_code=trust)
        model.eval()
        remove_hook_from_module(model, recurse=True)  # owned weights are already on `device`; others are dropped
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    return model


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
