"""Layers streamed in just before they run, from host memory or disk, with the next one's weights
on the way while one computes. Which layers stream, and from where, is the plan's
(plan/offload.py).

    stage.streamer = Streamer.attach(layers, plan.ranks[rank], plan, device, dtype, "model.layers.")  # load_stage

A streamed layer's parameters live on the meta device between uses. A forward pre-hook binds them to
views into one of two device buffers (one when a single layer streams) the moment its weights are
there, and a forward hook unbinds them and hands the buffer to the next layer in line, so while layer
i computes, layer i+1's bytes are moving: a reader thread (a plain thread: os.preadv and torch's
copies let go of the GIL) reads a disk layer's tensors in place from the checkpoint's safetensors
files, never a copy of them, and on CUDA copies host bytes to the device on a side stream, ordered
by events (the buffer's last user has finished before it is overwritten; the layer runs only after
its copy). The order is the stage's: after the last streamed layer comes the first again, for the
next step, so it loads while the resident layers compute. Resident layers never move. Every wait
for the reader is bounded by the run's timeout_s (OffloadError, one line from the runner).

On CPU the "device" is the process itself and the host tier is copied into the buffer all the same:
a stand-in for the host-to-device copy, so that every path but the CUDA stream runs in the tests.
The schedule runs one micro-batch through all of a stage's layers per visit, so a streamed layer
is brought in once per micro-batch step; bringing it in once for every waiting micro-batch would
mean holding the pipe back, which the round-robin schedule (generation.py) does not do.

Not accelerate's hooks: its offload hooks move each weight when the module is called, synchronously,
one tensor at a time (bench/offload.py measures the difference).

Over 300 lines on purpose: one class whose hooks, reader thread and bounded waits share the same
buffer state (free, pending, active slots); split, that state would pass between files.
"""

from __future__ import annotations

import functools
import logging
import os
import queue
import threading
import time
import weakref
from collections import deque
from dataclasses import dataclass

import torch
from torch import nn

from pipeinfer.config import ExpConfig
from pipeinfer.load import LoadError
from pipeinfer.load.weights import pread_into

log = logging.getLogger(__name__)

_TORCH_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}


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

    def converted(self) -> int:
        """Bytes of the largest tensor stored in another dtype than the run's (0: none)."""
        return max((s.nbytes // self.dtype.itemsize * s.stored.itemsize for s in self.sources
                    if s.stored != self.dtype), default=0)


class _Job:
    """What the reader thread does for one layer (run), and when it is done."""

    def __init__(self, layer: _Layer, slot: int | None, run):
        self.layer, self.slot, self.run, self.done, self.error = layer, slot, run, threading.Event(), None


class Streamer:
    """Brings a stage's streamed layers in, in order, one ahead; see the module docstring."""

    def __init__(self, layers: list[_Layer], device: torch.device, stage_layers: range, resident: list[int],
                 timeout_s: float = ExpConfig.timeout_s):
        self.layers, self.device, self.timeout_s = layers, device, timeout_s
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
        self.reading: str | None = None  # the file the reader is in a read of, for the message if it never returns
        # stored bytes awaiting a dtype conversion: host memory, sized once as the plan sizes it (RankPlan.scratch)
        self.scratch = torch.empty(max(layer.converted() for layer in layers), dtype=torch.uint8)
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
               prefix: str, timeout_s: float = ExpConfig.timeout_s) -> "Streamer | None":
        """Stream the stage's host and disk layers (rank_plan.placement), their parameters on meta;
        the host tier is read into (pinned, on CUDA) memory here. prefix: "model.layers.".
        timeout_s bounds every wait for the reader (the run's timeout_s)."""
        streamed = []
        for local, (index, tier) in enumerate(zip(rank_plan.layers, rank_plan.placement)):
            if tier == "device":
                continue
            module, sources, begin = layers[local], [], 0
            for name, p in module.named_parameters():
                key = plan.keys[f"{prefix}{index}.{name}"]
                t = plan.tensors[key]
                if t.dtype not in _TORCH_DTYPES:
                    raise LoadError(f"{key} is stored as {t.dtype}, which offloading cannot convert as it streams: "
                                    f"run without max_cpu_memory, or convert the checkpoint to float16/bfloat16")
                nbytes = p.numel() * dtype.itemsize
                sources.append(_Source(begin, nbytes, t.file, t.offset, _TORCH_DTYPES[t.dtype]))
                begin += nbytes
            streamed.append(_Layer(index, module, tier, sources, dtype))
        if not streamed:
            return None
        self = cls(streamed, device, rank_plan.layers, rank_plan.tier("device"), timeout_s)
        for layer in streamed:
            if layer.tier == "host":
                layer.host = _pinned(layer.nbytes) if self.cuda else torch.empty(layer.nbytes, dtype=torch.uint8)
                job = _Job(layer, None, functools.partial(self._read, layer, layer.host))
                self.jobs.put(job)  # by the reader, so that a read that never returns ends in timeout_s too
                self._wait(job)
                if job.error is not None:
                    raise job.error
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

    def _wait(self, job: _Job) -> None:
        """Until the reader has done job, at most timeout_s: a read that never returns (a stuck network
        filesystem) ends the rank with one line, as a silent peer does (comm.py), instead of holding it
        while its peers give up (SIGTERM only sets a flag, read between steps)."""
        if not job.done.wait(self.timeout_s):
            stuck = f"a read of {self.reading} has not returned" if self.reading else "the reader has not finished"
            raise OffloadError(f"layer {job.layer.index}'s weights did not arrive within timeout_s={self.timeout_s:g} "
                               f"({stuck}): check the filesystem that holds the checkpoint (a stuck network "
                               f"mount?), or raise timeout_s if reads there are this slow")

    def _drain(self) -> None:
        for job in list(self.pending.values()):
            self._wait(job)

    def close(self) -> None:
        """Stop the reader (after the loads in flight) and close the checkpoint files; the buffers go
        with the streamer. For processes that load more than one stage (tests, benchmarks)."""
        try:
            self._drain()
        except OffloadError:  # a read that never returns: its (daemon) thread is left to it
            pass
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
                "stream_buffer_bytes": self.size * len(self.slots), "scratch_bytes": self.scratch.nbytes,
                "weights_wait_s": self.wait_s, "weights_load_s": self.load_s, "weights_moved_bytes": self.moved,
                "weights_read_bytes": self.read, "layer_loads": self.loads}

    # --- the compute side (forward hooks, the main thread) ------------------------------------------

    def _before(self, module: nn.Module, args) -> None:
        layer = self.by_module[id(module)]
        # layers run one at a time: a layer still bound is one whose forward raised (its forward hook
        # never ran); its buffer goes back to the prefetch, or the stage would stream with one from now on
        for index in list(self.active):
            self._release(self.layers[self.order[index]])
        job = self.pending.pop(layer.index, None) or self._resync(layer)
        self._fill()
        t0 = time.perf_counter()
        self._wait(job)
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
            slot = self.free.popleft()
            job = _Job(layer, slot, functools.partial(self._load, layer, slot))
            self.pending[layer.index] = job
            self.jobs.put(job)

    def _resync(self, layer: _Layer) -> _Job:
        """A layer called out of order (a forward that raised half-way, a layer skipped): drop what is
        in flight and start again from this layer."""
        for job in self.pending.values():
            self._wait(job)
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
                job.run()
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
        self.reading = file
        try:
            missing = pread_into(fd, out, offset)
        finally:
            self.reading = None
        if missing:
            raise OffloadError(f"{file} ended {missing} bytes early while streaming an offloaded layer: the "
                               f"checkpoint changed during the run; copy it again and rerun")

