"""Which layers and modules each pipeline stage owns: pure functions, no model loading here.

    layer ranges = split_layers(num_layers, pipeline_size)
    device_map   = stage_device_map(modules, family, layers=ranges[rank], ...)

The device_map is derived from the layer ranges, never computed twice, and is *complete*: every
module of the model goes either to this rank's device or to "disk" (an offload index into the
checkpoint's own safetensors files, so nothing is read or copied). check_complete() verifies that
against every parameter and buffer name before from_pretrained runs, which is what rules out
"model.layers.0.self_attn.q_proj.weight doesn't have any device set".
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeinfer.families import Family


def split_layers(num_layers: int, pipeline_size: int) -> list[range]:
    """Split layers 0..num_layers-1 into pipeline_size contiguous ranges, evenly by count.

    Remainder rule: each stage gets num_layers // pipeline_size layers, and the r = num_layers %
    pipeline_size left over go one each to the r stages just before the last, walking backwards.
    The last stage, which also runs the final norm, the lm_head and sampling, never gets an extra
    layer; with two stages the extra one lands on the first. E.g. 7 layers on 3 stages -> 2, 3, 2;
    10 on 4 -> 2, 3, 3, 2; 5 on 2 -> 3, 2.
    """
    if pipeline_size < 1:
        raise ValueError(f"pipeline_size={pipeline_size} must be >= 1")
    if pipeline_size > num_layers:
        raise ValueError(f"pipeline_size={pipeline_size} > num_layers={num_layers}: every stage needs a layer")
    counts = [num_layers // pipeline_size] * pipeline_size
    for i in range(2, num_layers % pipeline_size + 2):
        counts[-i] += 1
    ranges, start = [], 0
    for n in counts:
        ranges.append(range(start, start + n))
        start += n
    return ranges


@dataclass(frozen=True)
class StagePlan:
    """What one rank owns. `layers` are global layer indices."""
    rank: int
    pipeline_size: int
    layers: range

    @property
    def is_first(self) -> bool:
        return self.rank == 0

    @property
    def is_last(self) -> bool:
        return self.rank == self.pipeline_size - 1


def stage_device_map(top_modules: list[str], base_modules: list[str], num_layers: int, family: Family,
                     plan: StagePlan, tied: bool, device: str) -> dict[str, str]:
    """Map every module to `device` (owned by this stage) or "disk" (owned by another).

    top_modules: child names of the *ForCausalLM; base_modules: child names of its base model.
    Modules the family does not name (rotary embeddings, dropout) are shared by every stage.
    With tied embeddings the last stage also keeps the input embeddings: they are its lm_head.
    """
    def place(owned: bool) -> str:
        return device if owned else "disk"

    dmap: dict[str, str] = {}
    for child in top_modules:
        if child == family.base:
            continue
        dmap[child] = place(plan.is_last) if child == family.head else device
    for child in base_modules:
        key = f"{family.base}.{child}"
        if child == family.layers:
            for i in range(num_layers):
                dmap[f"{key}.{i}"] = place(i in plan.layers)
        elif child in family.first:
            keeps_tied_head = tied and plan.is_last and child == family.embeddings
            dmap[key] = place(plan.is_first or keeps_tied_head)
        elif child in family.last:
            dmap[key] = place(plan.is_last)
        else:
            dmap[key] = device
    return dmap


def check_complete(device_map: dict[str, str], names: list[str], what: str) -> None:
    """Raise if any parameter/buffer name has no device_map entry that is it or a prefix of it."""
    missing = [n for n in names if not any(n == k or n.startswith(k + ".") for k in device_map)]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ValueError(f"device_map does not place {len(missing)} {what} ({shown}): "
                         f"the model family's module layout in pipeinfer/families.py does not match this checkpoint")
