"""A checkpoint's safetensors headers: every tensor's name, dtype and shape, never its data.

    tensors = read_headers(model_path)   # {name: Tensor(file, dtype, shape)}, milliseconds at any size

What planning (plan.py) and loading (stage.load_stage) know of the checkpoint before touching a weight,
and check_checkpoint(): the plan's check that every weight a rank needs is stored, in the right shape.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

from pipeinfer.config import ConfigError, first_line
from pipeinfer.models.families import Family
from pipeinfer.plan.partition import check_complete, missing_weights

_ST_DTYPES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1,
              "F8_E4M3": 1, "F8_E5M2": 1}


@dataclass(frozen=True)
class Tensor:
    """One tensor as a safetensors header describes it."""
    file: str
    dtype: str   # safetensors' name: "BF16", "F32", ...
    shape: tuple[int, ...]
    offset: int = 0  # where its bytes begin in the file (offload.py reads them in place from there)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * _ST_DTYPES[self.dtype]


# --- the plan ---------------------------------------------------------------------------------------


def read_headers(model_path: str, allow_pickle: bool = False) -> dict[str, Tensor] | None:
    """Every tensor of the checkpoint's safetensors files, from their headers only (no tensor data
    is read, so this takes milliseconds even for a checkpoint larger than memory).

    None for a pickle (.bin) checkpoint when allow_pickle is set: its names cannot be read without
    unpickling it. Every shard is opened (its header only), so a missing or truncated one fails here.
    """
    index = os.path.join(model_path, "model.safetensors.index.json")
    if os.path.exists(index):
        try:
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
        except (OSError, ValueError, KeyError) as e:
            raise ConfigError(f"{index} is not a safetensors index ({e}): copy it again from the source") from None
        out: dict[str, Tensor] = {}
        for shard in sorted(set(weight_map.values())):
            out.update(_read_shard(os.path.join(model_path, shard)))
        return out
    single = os.path.join(model_path, "model.safetensors")
    if os.path.exists(single):
        return _read_shard(single)
    if os.path.isdir(model_path) and any(n.endswith(".bin") for n in os.listdir(model_path)):
        if allow_pickle:
            return None
        raise ConfigError(f"{model_path} holds only pickle .bin weights, which can run code when loaded: convert "
                          f"them on a trusted machine (AutoModelForCausalLM.from_pretrained(dir).save_pretrained("
                          f"new_dir), which writes safetensors), or set allow_pickle=true if you trust the files")
    raise ConfigError(f"no model.safetensors or model.safetensors.index.json in {model_path}: "
                      f"stage the full checkpoint there (config.json and the weight shards)")


def _read_shard(path: str) -> dict[str, Tensor]:
    """One safetensors file's header: 8 bytes of length, then JSON. The data it describes must cover
    the file exactly, so a truncated copy fails here, on every rank."""
    if not os.path.exists(path):
        raise ConfigError(f"checkpoint shard {path} is missing (listed in model.safetensors.index.json): "
                          f"copy the complete checkpoint directory again")
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                raise ValueError("shorter than a header")
            n = int.from_bytes(head, "little")
            if n > 100 * 2**20:
                raise ValueError(f"header length {n} is implausible")
            header = json.loads(f.read(n))
        size = os.path.getsize(path)
        end, out = 0, {}
        for name, info in header.items():
            if name == "__metadata__":
                continue
            begin, stop = info["data_offsets"]
            shape = tuple(int(d) for d in info["shape"])
            if stop - begin != math.prod(shape) * _ST_DTYPES[info["dtype"]]:
                raise ValueError(f"{name}: offsets do not match its shape and dtype")
            end = max(end, stop)
            out[name] = Tensor(path, info["dtype"], shape, 8 + n + begin)
        if 8 + n + end != size:
            raise ValueError(f"the header describes {8 + n + end} bytes but the file has {size}")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"checkpoint shard {path} is corrupt ({first_line(e, 120)}): "
                          f"copy it again from the source (compare sha256sum with the original)") from None
    return out


def checkpoint_keys(stored: list[str], top: list[str], family: Family) -> dict[str, str]:
    """{model's parameter name: checkpoint tensor name}: checkpoints saved from the base model omit
    its root ("h.0..." for "transformer.h.0..."), and older releases may name the head differently."""
    head = next(n for n in family.heads if n in top)
    keys = {}
    for name in stored:
        first, _, rest = name.partition(".")
        if first in family.heads:
            keys[f"{head}.{rest}"] = name
        elif first in top:
            keys[name] = name
        else:
            keys[f"{family.root}.{name}"] = name
    return keys


def check_checkpoint(path: str, m, keys: dict[str, str], tensors: dict[str, Tensor], ranks, local: str,
                     sizes) -> None:
    """Every parameter each rank owns has a stored tensor of the model's shape (m: model.ModelShape,
    ranks: layout.RankPlan, sizes: layout.Sizes); ConfigError naming the tensor and the fix."""
    have = set(keys)
    fam = m.family
    tied_pair = {f"{fam.base}.{fam.embeddings}.weight"} | {f"{h}.weight" for h in fam.heads if h in m.top}
    if m.tied and have & tied_pair:
        have |= tied_pair  # either copy serves both: they are one tensor once loaded
    for r in ranks:
        try:
            check_complete(r.device_map, list(m.params) + m.buffers, "model parameters and buffers")
            check_complete(r.device_map, list(keys), "checkpoint tensors")
        except ValueError as e:
            raise ConfigError(str(e)) from None
        absent = missing_weights(r.device_map, list(m.params), have, local)
        if absent:
            shown = ", ".join(absent[:3]) + (f" and {len(absent) - 3} more" if len(absent) > 3 else "")
            raise ConfigError(f"the checkpoint in {path} has no tensor for {len(absent)} weights rank {r.rank} "
                              f"needs ({shown}); transformers would fill them with random values: copy the "
                              f"complete checkpoint, saved for this model's type and size")
    for name, shape in m.params.items():
        key = keys.get(name)
        if key is not None and name in sizes.stored:  # stored quantized: 8-bit values, or two 4-bit per byte
            want = math.prod(shape) if sizes.q.bits == 8 else -(-math.prod(shape) // 2)
            if math.prod(tensors[key].shape) != want:
                raise ConfigError(f"checkpoint tensor {key} holds {math.prod(tensors[key].shape)} quantized values "
                                  f"but {path}/config.json makes {name} {list(shape)}: the weights were saved for "
                                  f"another model size")
        elif key is not None and tensors[key].shape != shape:
            raise ConfigError(f"checkpoint tensor {key} has shape {list(tensors[key].shape)} but {path}/config.json "
                              f"makes {name} {list(shape)}: the weights were saved for another model size")
