"""Layers streamed in just before they run: where a stage's layers go when they do not all fit its
device (offload_ranks, called by plan.make_plan when max_cpu_memory is set), and the streaming of
those in host memory or on disk, with the next one's weights on the way while one computes.

    stage.streamer = Streamer.attach(layers, plan.ranks[rank], plan, device, dtype, "model.layers.")  # load_stage

A streamed layer's parameters live on the meta device between uses. A forward pre-hook binds them to
views into one of two device buffers (one when a single layer streams) the moment its weights are
there, and a forward hook unbinds them and hands the buffer to the next layer in line, so while layer
i computes, layer i+1's bytes are moving: a reader thread (a plain thread: os.preadv and torch's
copies let go of the GIL) reads a disk layer's tensors in place from the checkpoint's safetensors
files, never a copy of them, and on CUDA copies host bytes to the device on a side stream, ordered
by events (the buffer's last user has finished before it is overwritten; the layer runs only after
its copy). The order is the stage's: after the last streamed layer comes the first again, for the
next step, so it loads while the resident layers compute. Resident layers never move.

On CPU the "device" is the process itself and the host tier is copied into the buffer all the same:
a stand-in for the host-to-device copy, so that every path but the CUDA stream runs in the tests.
The schedule runs one micro-batch through all of a stage's layers per visit, so a streamed layer
is brought in once per micro-batch step; bringing it in once for every waiting micro-batch would
mean holding the pipe back, which the round-robin schedule (generation.py) does not do.

Not accelerate's hooks: its offload hooks move each weight when the module is called, synchronously,
one tensor at a time (bench/offload.py measures the difference).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import queue
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from pipeinfer.config import ConfigError, ExpConfig, human_bytes, per_rank

if TYPE_CHECKING:
    from pipeinfer.plan import RankPlan

log = logging.getLogger(__name__)

_TORCH_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


# --- where: the plan's placement (plan.make_plan calls offload_ranks) -----------------------------------


def offload_ranks(cfg: ExpConfig, ranks: list[RankPlan], budgets: list[int], q, tensors,
                  device_type: str) -> list[RankPlan]:
    """Each rank over its device budget with its layers placed in host memory and on disk (see
    plan.py's docstring); ConfigError when even every layer streamed leaves too little room."""
    if q is not None:
        raise ConfigError(f"quantization={q.method!r} with max_cpu_memory: quantized layers cannot be offloaded "
                          f"yet; quantize (a 4-bit stage is a quarter of 16-bit) or offload, not both")
    if tensors is None:
        raise ConfigError(f"max_cpu_memory streams layers from safetensors files, and {cfg.model_path} holds pickle "
                          f".bin weights: convert them (from_pretrained(dir).save_pretrained(new_dir))")
    cpu = per_rank(cfg.max_cpu_memory, len(ranks))
    over = [r for r in ranks if not r.fits]
    short = [r for r in over if r.budget < _least(r)]
    if short:
        r = short[0]
        lw = r.layer_bytes
        # one max_memory for every rank: the least must hold for the neediest rank, not only this one
        least = max(_least(x) for x in (short if not isinstance(cfg.max_memory, list) else [r]))
        raise ConfigError(f"max_memory[{r.rank}]={r.budget} bytes cannot hold rank {r.rank}'s stage even with all "
                          f"its layers offloaded (layers {r.layers.start}..{r.layers.stop - 1}: weights outside "
                          f"the layers {r.weights - sum(lw)} + KV cache {r.kv_cache} + transient {r.transient} + "
                          f"reserve {r.reserve} + stream buffers {_buffers(lw)} = {_least(r)} bytes): "
                          f"raise it to at least {least} bytes ({human_bytes(least)}), lower batch_size or "
                          f"max_new_tokens, or use a larger pipeline_size")
    return [r if r.fits else _place(r, c, device_type) for r, c in zip(ranks, cpu)]


def _least(r: RankPlan) -> int:
    """The smallest device budget that runs rank r's stage with every layer streamed."""
    lw = r.layer_bytes
    return r.weights - sum(lw) + r.kv_cache + r.transient + r.reserve + _buffers(lw)


def _buffers(lw) -> int:
    """Device bytes of the stream buffers when the layers of sizes lw stream: two of the largest (one)."""
    return min(2, len(lw)) * max(lw)


def _place(r: RankPlan, cpu_budget: int, device_type: str) -> RankPlan:
    """The first layers resident, as many as fit with two stream buffers; then host, then disk."""
    lw = list(r.layer_bytes)
    fixed = r.weights - sum(lw) + r.kv_cache + r.transient + r.reserve

    def stream_for(keep: int) -> int:
        return _buffers(lw[keep:])

    # keeping all but one or two never fits where keeping all did not (their buffers take as much room
    # as they free), so at least three layers stream

    keep = next(k for k in range(len(lw) - 1, -1, -1) if fixed + sum(lw[:k]) + stream_for(k) <= r.budget)
    streamed, stream = lw[keep:], stream_for(keep)
    # disk reads pass through pinned buffers on CUDA (on CPU they land in the stream buffers directly)
    staging = stream if device_type == "cuda" and sum(streamed) > cpu_budget else 0
    if staging > cpu_budget:
        raise ConfigError(f"max_cpu_memory[{r.rank}]={cpu_budget} bytes cannot hold the pinned buffers that rank "
                          f"{r.rank}'s disk reads pass through on CUDA ({staging} bytes: two of its largest streamed "
                          f"layer): raise it to at least {staging} bytes ({human_bytes(staging)})")
    room, placement = cpu_budget - staging, ["device"] * keep
    for b in streamed:
        on_host = placement[-1:] != ["disk"] and b <= room
        placement.append("host" if on_host else "disk")
        room -= b if on_host else 0
    staging = staging if "disk" in placement else 0
    return dataclasses.replace(r, weights=r.weights - sum(streamed), placement=tuple(placement), stream=stream,
                               staging=staging, cpu_budget=cpu_budget)


# --- how: streaming ------------------------------------------------------------------------------


def _pinned(nbytes: int) -> torch.Tensor:
    """Page-locked host memory of exactly nbytes. torch's pinned allocator (pin_memory=True) rounds
    every request up to a power of two (a 605 MiB layer of a 13B in float16 would take 1 GiB), so the
    memory is allocated as usual and registered with CUDA instead; if registering fails, the
    allocator's, rounding and all, with a warning."""
    t = torch.empty(nbytes, dtype=torch.uint8)
    try:
        cudart = torch.cuda.cudart()
        err = cudart.cudaHostRegister(t.data_ptr(), nbytes, 0)
        if int(getattr(err, "value", err)) == 0:
            weakref.finalize(t, cudart.cudaHostUnregister, t.data_ptr())  # before the memory goes back
            return t
        reason = f"cudaHostRegister returned {err}"
    except (AttributeError, RuntimeError, TypeError) as e:
        reason = str(e)
    log.warning("pinning %d bytes through torch's allocator, which rounds them up to a power of two (%s)",
                nbytes, reason)
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)


class OffloadError(RuntimeError):
    """A streamed layer's weights could not be read; the message names the file and the fix."""


@dataclass(frozen=True)
class _Source:
    """One parameter of a streamed layer: where it sits in the layer's packed bytes and in the file."""
    begin: int                 # byte offset in the layer's packed buffer
    nbytes: int                # in the run's dtype
    file: str
    offset: int                # where the stored tensor begins in the file
    stored: torch.dtype        # its dtype in the file


class _Layer:
    def __init__(self, index: int, module: nn.Module, tier: str, sources: list[_Source], dtype: torch.dtype):
        self.index, self.module, self.tier, self.sources, self.dtype = index, module, tier, sources, dtype
        self.params = [(module.get_submodule(n.rpartition(".")[0]), n.rpartition(".")[2], p)
                       for n, p in module.named_parameters()]
        self.nbytes = sum(s.nbytes for s in sources)
        self.host: torch.Tensor | None = None  # the host tier's packed bytes


class _Job:
    def __init__(self, layer: _Layer, slot: int):
        self.layer, self.slot, self.done, self.error = layer, slot, threading.Event(), None


class Streamer:
    """Brings a stage's streamed layers in, in order, one ahead; see the module docstring."""

    def __init__(self, layers: list[_Layer], device: torch.device, stage_layers: range, resident: list[int]):
        self.layers, self.device = layers, device
        self.cuda = device.type == "cuda"
        self.stage_layers, self.resident = stage_layers, resident
        self.size = max(layer.nbytes for layer in layers)
        nslots = min(2, len(layers))
        # allocated once and reused: fresh memory at every load would pay a page fault per 4 KiB each time
        self.slots = [torch.empty(self.size, dtype=torch.uint8, device=device) for _ in range(nslots)]
        # per (layer, slot): its parameters as views into the slot's buffer, built once
        self.views = {(layer.index, k): self._params(layer, slot) for layer in layers
                      for k, slot in enumerate(self.slots)}
        if self.cuda:
            disk = any(layer.tier == "disk" for layer in layers)
            self.staging = [_pinned(self.size) for _ in range(nslots)] \
                if disk else None
            self.stream = torch.cuda.Stream(device)
            self.ready: list = [None] * nslots   # the copy into the slot has finished
            self.freed: list = [None] * nslots   # the slot's last user has finished
            self.copied: list = [None] * nslots  # the copy out of the staging buffer has finished
        self.by_module = {id(layer.module): layer for layer in layers}
        self.order = {layer.index: k for k, layer in enumerate(layers)}
        self.free, self.pending, self.active, self.cursor = deque(range(nslots)), {}, {}, 0
        self.fds: dict[str, int] = {}
        self.scratch = torch.empty(0, dtype=torch.uint8)  # stored bytes awaiting a dtype conversion, reused
        self.reset_stats()
        self.jobs: queue.Queue = queue.Queue()
        threading.Thread(target=self._worker, name="pipeinfer-offload", daemon=True).start()
        for layer in layers:
            layer.module.register_forward_pre_hook(self._before)
            layer.module.register_forward_hook(self._after)

    @staticmethod
    def _params(layer: _Layer, packed: torch.Tensor) -> list[nn.Parameter]:
        """The layer's parameters as views into its packed bytes."""
        return [nn.Parameter(packed[src.begin:src.begin + src.nbytes].view(layer.dtype).view(meta.shape),
                             requires_grad=False) for src, (_, _, meta) in zip(layer.sources, layer.params)]

    @classmethod
    def attach(cls, layers: list[nn.Module], rank_plan, plan, device: torch.device, dtype: torch.dtype,
               prefix: str) -> "Streamer | None":
        """Stream the stage's host and disk layers (rank_plan.placement), their parameters on meta;
        the host tier is read into (pinned, on CUDA) memory here. prefix: "model.layers."."""
        streamed = []
        for local, (index, tier) in enumerate(zip(rank_plan.layers, rank_plan.placement)):
            if tier == "device":
                continue
            module, sources, begin = layers[local], [], 0
            for name, p in module.named_parameters():
                key = plan.keys[f"{prefix}{index}.{name}"]
                t = plan.tensors[key]
                if t.dtype not in _TORCH_DTYPES:
                    from pipeinfer.stage import LoadError
                    raise LoadError(f"{key} is stored as {t.dtype}, which offloading cannot convert as it streams: "
                                    f"run without max_cpu_memory, or convert the checkpoint to float16/bfloat16")
                nbytes = p.numel() * dtype.itemsize
                sources.append(_Source(begin, nbytes, t.file, t.offset, _TORCH_DTYPES[t.dtype]))
                begin += nbytes
            streamed.append(_Layer(index, module, tier, sources, dtype))
        if not streamed:
            return None
        self = cls(streamed, device, rank_plan.layers, rank_plan.tier("device"))
        for layer in streamed:
            if layer.tier == "host":
                layer.host = _pinned(layer.nbytes) if self.cuda else torch.empty(layer.nbytes, dtype=torch.uint8)
                self._read(layer, layer.host)
        self._fill()  # the first layers' loads start now, while the stage warms up
        log.info("rank %d streams %d of its %d layers: %s", rank_plan.rank, len(streamed), len(rank_plan.layers),
                 ", ".join(f"{tier} {rank_plan.tier(tier)} ({rank_plan.tier_bytes(tier)} bytes)"
                           for tier in ("device", "host", "disk") if rank_plan.tier(tier)))
        return self

    def reset_stats(self) -> None:
        """After warm-up: the stage record counts the measured run (loads in flight finish first)."""
        self._drain()
        self.wait_s, self.load_s, self.loads, self.moved, self.read = 0.0, 0.0, 0, 0, 0
        self.copies: list = []  # CUDA: (begin, end) events of each copy to the device
        self.stalls: list = []  # CUDA: (begin, end) events around the compute stream's wait for a copy

    def _drain(self) -> None:
        for job in list(self.pending.values()):
            job.done.wait()

    def close(self) -> None:
        """Stop the reader (after the loads in flight) and close the checkpoint files; the buffers go
        with the streamer. For processes that load more than one stage (tests, benchmarks)."""
        self._drain()
        self.jobs.put(None)
        for fd in self.fds.values():
            os.close(fd)
        self.fds = {}

    @staticmethod
    def _timed(pairs: list, wait: bool) -> tuple[float, list]:
        """CUDA: seconds between the finished (begin, end) event pairs, and the pairs not finished yet."""
        if wait and pairs:
            pairs[-1][1].synchronize()
        done = [p for p in pairs if p[1].query()]
        return sum(b.elapsed_time(e) for b, e in done) / 1e3, [p for p in pairs if not p[1].query()]

    def _count_copies(self, wait: bool) -> None:
        spent, self.copies = self._timed(self.copies, wait)
        self.load_s += spent

    def record(self) -> dict:
        self._drain()  # loads still in flight (the next step's, prefetched) finish first
        self._count_copies(wait=True)
        if self.cuda:  # the GPU's own wait for copies, beside the CPU's wait for the reader
            stalled, self.stalls = self._timed(self.stalls, wait=True)
            self.wait_s += stalled
        tiers = {tier: [x.index for x in self.layers if x.tier == tier] for tier in ("host", "disk")}
        return {"device_layers": self.resident, "host_layers": tiers["host"], "disk_layers": tiers["disk"],
                "host_bytes": sum(x.nbytes for x in self.layers if x.tier == "host"),
                "disk_bytes": sum(x.nbytes for x in self.layers if x.tier == "disk"),
                "stream_buffer_bytes": self.size * len(self.slots),
                "weights_wait_s": self.wait_s, "weights_load_s": self.load_s, "weights_moved_bytes": self.moved,
                "weights_read_bytes": self.read, "layer_loads": self.loads}

    # --- the compute side (forward hooks, the main thread) ------------------------------------------

    def _before(self, module: nn.Module, args) -> None:
        layer = self.by_module[id(module)]
        job = self.pending.pop(layer.index, None) or self._resync(layer)
        t0 = time.perf_counter()
        job.done.wait()
        self.wait_s += time.perf_counter() - t0
        if job.error is not None:
            self.free.append(job.slot)
            raise job.error
        if self.cuda:
            compute = torch.cuda.current_stream(self.device)
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record(compute)
            compute.wait_event(self.ready[job.slot])
            end.record(compute)
            self.stalls.append((begin, end))
            if len(self.stalls) > 256:
                stalled, self.stalls = self._timed(self.stalls, wait=False)
                self.wait_s += stalled
        for (owner, attr, _), param in zip(layer.params, self.views[(layer.index, job.slot)]):
            owner._parameters[attr] = param
        self.active[layer.index] = job.slot

    def _after(self, module: nn.Module, args, output) -> None:
        layer = self.by_module[id(module)]
        self._release(layer)
        self._fill()

    def _release(self, layer: _Layer) -> None:
        slot = self.active.pop(layer.index)
        for owner, attr, meta in layer.params:
            owner._parameters[attr] = meta  # between uses the layer holds nothing
        if self.cuda:
            self.freed[slot] = torch.cuda.Event()
            self.freed[slot].record(torch.cuda.current_stream(self.device))
        self.free.append(slot)

    def _fill(self) -> None:
        """Every free buffer gets the next streamed layer in stage order (cyclic: after the last, the first)."""
        while self.free:
            layer = self.layers[self.cursor]
            self.cursor = (self.cursor + 1) % len(self.layers)
            job = _Job(layer, self.free.popleft())
            self.pending[layer.index] = job
            self.jobs.put(job)

    def _resync(self, layer: _Layer) -> _Job:
        """A layer called out of order (a forward that raised half-way, a layer skipped): drop what is
        in flight and start again from this layer."""
        for index in list(self.active):
            self._release(self.layers[self.order[index]])
        for job in self.pending.values():
            job.done.wait()
            self.free.append(job.slot)
        self.pending.clear()
        self.cursor = self.order[layer.index]
        self._fill()
        return self.pending.pop(layer.index)

    # --- the reader thread ----------------------------------------------------------------------------

    def _worker(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            try:
                self._load(job.layer, job.slot)
            except BaseException as e:  # handed to the compute side, which raises it
                job.error = e if isinstance(e, OffloadError) else OffloadError(f"layer {job.layer.index}: {e}")
            finally:
                job.done.set()

    def _load(self, layer: _Layer, slot: int) -> None:
        """Layer's bytes into slot `slot`. load_s counts the reader's busy time: reads and CPU copies,
        and on CUDA the side stream's copy time (its events' elapsed time, summed in record())."""
        t0 = time.perf_counter()
        if not self.cuda:
            if layer.tier == "disk":
                self._read(layer, self.slots[slot])
            else:
                self.slots[slot][:layer.nbytes].copy_(layer.host)  # the stand-in for the host-to-device copy
            self.load_s += time.perf_counter() - t0
            self.moved += layer.nbytes
            self.loads += 1
            return
        if layer.tier == "disk":
            if self.copied[slot] is not None:
                self.copied[slot].synchronize()  # the staging buffer's last copy to the device is done
            t0 = time.perf_counter()
            src = self.staging[slot]
            self._read(layer, src)
            self.load_s += time.perf_counter() - t0
        else:
            src = layer.host
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            if self.freed[slot] is not None:
                self.stream.wait_event(self.freed[slot])
            begin, done = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record(self.stream)
            self.slots[slot][:layer.nbytes].copy_(src[:layer.nbytes], non_blocking=True)
            done.record(self.stream)
        self.copies.append((begin, done))
        if len(self.copies) > 256:
            self._count_copies(wait=False)
        self.ready[slot] = self.copied[slot] = done
        self.moved += layer.nbytes
        self.loads += 1

    def _read(self, layer: _Layer, dest: torch.Tensor) -> None:
        """The layer's tensors from the checkpoint into dest (CPU bytes), converted to the run's dtype."""
        for src in layer.sources:
            out = dest[src.begin:src.begin + src.nbytes]
            stored = src.nbytes // layer.dtype.itemsize * src.stored.itemsize
            if src.stored == layer.dtype:
                self._pread(src.file, out, src.offset)
            else:  # e.g. a bfloat16 checkpoint run in float16 on a T4: read, then convert into place
                if self.scratch.numel() < stored:
                    self.scratch = torch.empty(stored, dtype=torch.uint8)
                raw = self.scratch[:stored]
                self._pread(src.file, raw, src.offset)
                out.view(layer.dtype).copy_(raw.view(src.stored))
            self.read += stored

    def _fd(self, file: str) -> int:
        fd = self.fds.get(file)
        if fd is None:
            try:
                fd = self.fds[file] = os.open(file, os.O_RDONLY)
            except OSError as e:
                raise OffloadError(f"cannot open {file} to stream offloaded layers ({e.strerror}): keep the checkpoint "
                                   f"where the run started reading it") from None
        return fd

    def _pread(self, file: str, out: torch.Tensor, offset: int) -> None:
        fd = self._fd(file)
        view, done = memoryview(out.numpy()).cast("B"), 0
        while done < len(view):
            got = os.preadv(fd, [view[done:]], offset + done)
            if got == 0:
                raise OffloadError(f"{file} ended {len(view) - done} bytes early while streaming an offloaded layer: "
                                   f"the checkpoint changed during the run; copy it again and rerun")
            done += got

