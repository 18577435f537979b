"""Where a stage's layers go when they do not all fit its device (max_cpu_memory set): the first
layers resident, as many as fit beside everything else and the stream buffers; the layers after
them streamed in as they run (load/streamer.py), from host memory up to max_cpu_memory, the rest
read in place from the checkpoint on disk. make.make_plan calls offload_ranks.
"""

from __future__ import annotations

import dataclasses

from pipeinfer.config import ConfigError, ExpConfig, human_bytes, per_rank
from pipeinfer.plan.layout import RankPlan

# the run's dtype as safetensors names it in a header
_STORED = {"float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16"}


def offload_ranks(cfg: ExpConfig, ranks: list[RankPlan], budgets: list[int], q, tensors,
                  device_type: str, keys: dict[str, str] | None, dtype: str, prefix: str) -> list[RankPlan]:
    """Each rank over its device budget with its layers placed in host memory and on disk (see
    make.py's docstring); ConfigError when even every layer streamed leaves too little room.
    keys: parameter name -> checkpoint tensor name; dtype: the run's; prefix: the layers' names
    ("model.layers."): which layers' tensors the streamer converts as it reads them."""
    if q is not None:
        raise ConfigError(f"quantization={q.method!r} with max_cpu_memory: quantized layers cannot be offloaded "
                          f"yet; quantize (a 4-bit stage is a quarter of 16-bit) or offload, not both")
    if tensors is None:
        raise ConfigError(f"max_cpu_memory streams layers from safetensors files, and {cfg.model_path} holds pickle "
                          f".bin weights: convert them (from_pretrained(dir).save_pretrained(new_dir))")
    cpu = per_rank(cfg.max_cpu_memory, len(ranks))
    over = [r for r in ranks if not r.fits]
    short = [r for r in over if r.budget < least_budget(r)]
    if short:
        r = short[0]
        lw = r.layer_bytes
        # one max_memory for every rank: the least must hold for the neediest rank, not only this one
        least = max(least_budget(x) for x in (short if not isinstance(cfg.max_memory, list) else [r]))
        raise ConfigError(f"max_memory[{r.rank}]={r.budget} bytes cannot hold rank {r.rank}'s stage even with all "
                          f"its layers offloaded (layers {r.layers.start}..{r.layers.stop - 1}: weights outside "
                          f"the layers {r.weights - sum(lw)} + KV cache {r.kv_cache} + transient {r.transient} + "
                          f"reserve {r.reserve} + stream buffers {_buffers(lw)} = {least_budget(r)} bytes): "
                          f"raise it to at least {least} bytes ({human_bytes(least)}), lower batch_size or "
                          f"max_new_tokens, or use a larger pipeline_size")
    return [r if r.fits else _place(r, c, device_type, _converted(r, keys, tensors, dtype, prefix))
            for r, c in zip(ranks, cpu)]


def _converted(r: RankPlan, keys: dict[str, str], tensors, dtype: str, prefix: str) -> tuple[int, ...]:
    """Per layer of rank r's stage: bytes of its largest tensor stored in another dtype than the
    run's (0: none), which the streamer reads into its scratch buffer and converts from there."""
    run = _STORED[dtype]
    largest = dict.fromkeys(r.layers, 0)
    for name, key in keys.items():
        if name.startswith(prefix) and tensors[key].dtype != run:
            i = int(name[len(prefix):].split(".")[0])
            if i in largest:
                largest[i] = max(largest[i], tensors[key].nbytes)
    return tuple(largest.values())


def least_budget(r: RankPlan) -> int:
    """The smallest device budget that runs rank r's stage with every layer streamed."""
    lw = r.layer_bytes
    return r.weights - sum(lw) + r.kv_cache + r.transient + r.reserve + _buffers(lw)


def _buffers(lw) -> int:
    """Device bytes of the stream buffers when the layers of sizes lw stream: two of the largest (one)."""
    return min(2, len(lw)) * max(lw)


def _place(r: RankPlan, cpu_budget: int, device_type: str, converted: tuple[int, ...]) -> RankPlan:
    """The first layers resident, as many as fit with two stream buffers; then host, then disk.
    Host memory holds, before the host tier, the buffers the reader passes bytes through: the CUDA
    staging and the scratch a tensor stored in another dtype is read into (converted: per layer)."""
    lw = list(r.layer_bytes)
    fixed = r.weights - sum(lw) + r.kv_cache + r.transient + r.reserve

    def stream_for(keep: int) -> int:
        return _buffers(lw[keep:])

    # keeping all but one or two never fits where keeping all did not (their buffers take as much room
    # as they free), so at least three layers stream

    keep = next(k for k in range(len(lw) - 1, -1, -1) if fixed + sum(lw[:k]) + stream_for(k) <= r.budget)
    streamed, stream = lw[keep:], stream_for(keep)
    # host memory on CUDA as on CPU (allocated once, held for the run; see Streamer._read)
    scratch = max(converted[keep:])
    # disk reads pass through pinned buffers on CUDA (on CPU they land in the stream buffers directly)
    staging = stream if device_type == "cuda" and sum(streamed) > cpu_budget - scratch else 0
    if staging + scratch > cpu_budget:
        held = ([f"the pinned buffers that rank {r.rank}'s disk reads pass through on CUDA ({staging} bytes: two of "
                 f"its largest streamed layer)"] if staging else []) + \
               ([f"the buffer that a tensor stored in another dtype is read into before it is converted to the "
                 f"run's ({scratch} bytes: rank {r.rank}'s largest streamed such tensor; run in the checkpoint's "
                 f"dtype to need none)"] if scratch else [])
        need = staging + scratch
        raise ConfigError(f"max_cpu_memory[{r.rank}]={cpu_budget} bytes cannot hold {' and '.join(held)}: raise it "
                          f"to at least {need} bytes ({human_bytes(need)})")
    room, placement = cpu_budget - staging - scratch, ["device"] * keep
    for b in streamed:
        on_host = placement[-1:] != ["disk"] and b <= room
        placement.append("host" if on_host else "disk")
        room -= b if on_host else 0
    staging = staging if "disk" in placement else 0
    return dataclasses.replace(r, weights=r.weights - sum(streamed), placement=tuple(placement), stream=stream,
                               staging=staging, scratch=scratch, cpu_budget=cpu_budget)
