"""Quantizing a stage's weights as they are read, or reading them already quantized: bitsandbytes'
own modules and parameters, built as transformers' integration builds them. Which weights, and how
many bytes they hold, is the plan's (plan/quantization.py)."""

from __future__ import annotations

import logging

import torch
from torch import nn

from pipeinfer.plan.quantization import Quantization, out_in

log = logging.getLogger(__name__)


def replace_linears(model: nn.Module, names: set[str], q: Quantization) -> None:
    """Swap the modules owning `names` (weights) for bitsandbytes modules, on the meta device, in eval mode."""
    import bitsandbytes as bnb

    if q.method == "int8":
        # bitsandbytes logs "inputs will be cast ... to float16" at every int8 matmul of a float32 or
        # bfloat16 run: a flood on stderr (and a pipe that fills blocks the rank). Said once here instead.
        logging.getLogger("bitsandbytes.autograd._functions").setLevel(logging.ERROR)
        log.info("int8: bitsandbytes casts each quantized matmul's input to float16 (LLM.int8)")

    for weight in names:
        path = weight.removesuffix(".weight")
        old = model.get_submodule(path)
        out_f, in_f = out_in(old)
        bias = old.bias is not None
        with torch.device("meta"):
            if q.method == "int8":
                new = bnb.nn.Linear8bitLt(in_f, out_f, bias, has_fp16_weights=False, threshold=q.threshold)
            else:
                new = bnb.nn.Linear4bit(in_f, out_f, bias, getattr(torch, q.compute_dtype),
                                        compress_statistics=q.double_quant, quant_type=q.method,
                                        quant_storage=torch.uint8)
        new.source_cls = type(old)
        new.train(False)
        parent, _, attr = path.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, new)


def quantize_weight(module: nn.Module, value: torch.Tensor, device: torch.device) -> nn.Parameter:
    """`value` (the full-precision (out, in) weight, already in the run's dtype) quantized as
    transformers' bitsandbytes integration quantizes it, on `device`."""
    import bitsandbytes as bnb
    from transformers.pytorch_utils import Conv1D

    if issubclass(getattr(module, "source_cls", nn.Linear), Conv1D):
        value = value.T.contiguous()
    if isinstance(module, bnb.nn.Linear8bitLt):
        kwargs = dict(module.weight.__dict__)
        kwargs.pop("SCB", None)
        return bnb.nn.Int8Params(value.to("cpu"), requires_grad=False, **kwargs).to(device)
    return bnb.nn.Params4bit(value.to(device), requires_grad=False, **module.weight.__dict__).to(device)


def stored_weight(module: nn.Module, stored: dict[str, torch.Tensor], device: torch.device) -> nn.Parameter:
    """A weight saved quantized: stored holds "weight" and its statistics ("SCB"; "weight.absmax", ...)."""
    import bitsandbytes as bnb

    weight = stored["weight"]
    if isinstance(module, bnb.nn.Linear8bitLt):
        kwargs = dict(module.weight.__dict__) | {"SCB": stored["SCB"]}
        return bnb.nn.Int8Params(weight, requires_grad=False, **kwargs).to(device)
    stats = {k: v for k, v in stored.items() if k != "weight"}
    return bnb.nn.Params4bit.from_prequantized(data=weight, quantized_stats=stats, requires_grad=False,
                                               device=device, module=module)


def held_bytes(model: nn.Module) -> int:
    """Bytes of parameters a (possibly quantized) module holds, quantization scales included."""
    total = 0
    for p in {id(p): p for p in model.parameters()}.values():
        if p.device.type == "meta":
            continue  # a streamed layer's, between uses (load/streamer.py)
        total += p.numel() * p.element_size()
        scb = getattr(p, "SCB", None)
        if isinstance(scb, torch.Tensor):
            total += scb.numel() * scb.element_size()
        state = getattr(p, "quant_state", None)
        if state is not None:
            total += _state_bytes(state)
    return total


def _state_bytes(state) -> int:
    n = 0
    for name in ("absmax", "code"):
        t = getattr(state, name, None)
        if isinstance(t, torch.Tensor):
            n += t.numel() * t.element_size()
    if getattr(state, "nested", False) and state.state2 is not None:
        n += _state_bytes(state.state2) + 4  # the offset
    return n
