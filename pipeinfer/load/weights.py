"""Reading a stage's own weights and nothing else: from safetensors one tensor at a time, each
converted to the run's dtype (or quantized) as it is read; a pickle checkpoint through
from_pretrained with the plan's device_map."""

from __future__ import annotations

import os
import shutil
import tempfile

import torch
from torch import nn

from pipeinfer.load import LoadError
from pipeinfer.load.quantize import quantize_weight, replace_linears, stored_weight
from pipeinfer.models.families import Family
from pipeinfer.plan.layout import placement
from pipeinfer.plan.quantization import stats_keys


def from_safetensors(plan, dmap: dict[str, str], local: str, config, family: Family, device: torch.device,
                      dtype: torch.dtype, tied: bool, trust: bool, streamed: set[int] = frozenset()) -> nn.Module:
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

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
    quantized = {n for n in plan.quantized if placement(dmap, n) == local}
    if quantized:
        replace_linears(model, quantized, q)  # bitsandbytes modules, on meta, in eval mode
    stats = stats_keys(plan.tensors) if q is not None and q.source == "checkpoint" else {}
    layer_prefix = f"{family.base}.{family.layers}."
    for name, param in list(model.named_parameters()):
        if placement(dmap, name) != local or (tied and name in heads):
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
            stored = {k[len(module_name) + 1:]: read_tensor(plan.tensors[k], k, device) for k in names}
            value = stored_weight(module, stored, device)
        elif name in quantized:
            value = quantize_weight(module, read_tensor(plan.tensors[key], key, device, dtype), device)
        else:
            value = nn.Parameter(read_tensor(plan.tensors[key], key, device, dtype), requires_grad=False)
        setattr(module, attr, value)
    if tied:
        head = next(getattr(model, n) for n in family.heads if hasattr(model, n))
        head.weight = model.get_submodule(f"{family.base}.{family.embeddings}").weight
    return model


# safetensors' dtype names (checkpoint.read_headers admits these) as torch dtypes
_STORED = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
# A tensor converted as it is read, or read for a GPU, passes through a host buffer this size: too
# small to count beside a stage (the plan leaves it out), big enough that reads cost no more.
READ_CHUNK_BYTES = 4 * 2**20


def read_tensor(t, key: str, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
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
    missing = pread_into(fd, out, offset)
    if missing:
        raise LoadError(f"{file} ended {missing} bytes early while reading {key}: the checkpoint changed after the "
                        f"plan read its headers; copy it again and rerun")


def pread_into(fd: int, out: torch.Tensor, offset: int) -> int:
    """Fill the contiguous CPU tensor `out` with the file's bytes from `offset` on, with plain reads
    (no mapping); returns how many bytes the file ended short of that (0: all read)."""
    view, done = memoryview(out.view(torch.uint8).numpy()).cast("B"), 0
    while done < len(view):
        got = os.preadv(fd, [view[done:]], offset + done)
        if got == 0:
            break
        done += got
    return len(view) - done


def from_pretrained(model_path: str, dmap: dict[str, str], dtype: torch.dtype, offload_folder: str,
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
