"""Where each stage's time goes: named spans (prefill, decode, send, recv, and rank 0's write of
each prompt record) with totals and events.

The same spans feed the {"type": "stage"} record (totals), the report's pipeline timeline
(events, in wall-clock seconds so ranks on one machine line up), and NVTX ranges
("stage<r>:<kind>") when Nsight Systems runs the job or the config asks for them. On CUDA, compute
spans synchronise the compute stream (the current one) at their end, and only they do: that is
where a measurement needs it; everywhere else kernels stay asynchronous. Never the whole device
(torch.cuda.synchronize()): that also waits for NCCL's streams, where a send completes only once
the next stage posts its receive, so compute spans would take in downstream waiting, sends would
turn synchronous, and a stuck downstream stage would hang the span with no timeout.

Where no system profiler exists, profile_steps=N traces N generation steps with torch.profiler
into a Chrome/Perfetto JSON per rank (open it in ui.perfetto.dev or chrome://tracing).
"""

from __future__ import annotations

import logging
import os
import time
from collections import defaultdict
from contextlib import contextmanager, nullcontext

import torch

COMPUTE = ("prefill", "decode")
PROFILERS_KEPT: list = []


def profiler_attached() -> bool:
    """Nsight Systems (and Nsight Compute) inject into CUDA through CUDA_INJECTION64_PATH and set
    NSYS_* variables; run.sh sets PIPEINFER_NVTX=1 when it wraps the run in nsys."""
    env = os.environ
    return (env.get("PIPEINFER_NVTX") == "1" or "CUDA_INJECTION64_PATH" in env
            or any(k.startswith("NSYS_") for k in env))


class Timeline:
    def __init__(self, device: torch.device | None = None, nvtx: bool | str = False, rank: int = 0,
                 max_events: int = 20000):
        self.sync = device is not None and device.type == "cuda"
        self.device = device
        wanted = profiler_attached() if nvtx == "auto" else bool(nvtx)
        self.nvtx = wanted and torch.cuda.is_available()
        self.rank = rank
        self.max_events = max_events
        self._profiler = None
        self.totals: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)
        self.events: list[tuple[str, float, float]] = []
        self.dropped = 0

    def trace(self, steps: int, path: str) -> None:
        """Record `steps` generation steps (after one warm-up step) with torch.profiler into `path`."""
        from torch.profiler import ProfilerActivity, profile, schedule

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.sync else [])

        def save(prof) -> None:
            prof.export_chrome_trace(path)
            logging.getLogger(__name__).info("torch.profiler trace of %d steps -> %s", steps, path)

        self._profiler = profile(activities=activities, schedule=schedule(wait=0, warmup=1, active=steps, repeat=1),
                                 on_trace_ready=save, record_shapes=True)
        self._profiler.start()

    def step(self) -> None:
        """Called at the end of every generation step."""
        if self._profiler is not None:
            self._profiler.step()

    def close(self) -> None:
        if self._profiler is not None:
            self._profiler.stop()  # writes the trace if the run ended before the schedule did
            # Never freed: with torch 2.13, destroying the results of a profile that recorded gloo
            # send/recv crashes the process (SIGSEGV in kineto's MemoryTraceLogger destructor).
            # The entry script ends such a process with os._exit once everything is written.
            PROFILERS_KEPT.append(self._profiler)
            self._profiler = None

    def label(self, kind: str):
        """A named range in the torch.profiler trace while one is recording (bench/profile_step.py
        splits a step by these), else nothing."""
        return torch.profiler.record_function(kind) if self._profiler is not None else nullcontext()

    @contextmanager
    def span(self, kind: str):
        if self.nvtx:
            torch.cuda.nvtx.range_push(f"stage{self.rank}:{kind}")
        t0 = time.time()
        try:
            with self.label(kind):
                yield
        finally:
            if self.sync and kind in COMPUTE:
                torch.cuda.current_stream(self.device).synchronize()
            t1 = time.time()
            if self.nvtx:
                torch.cuda.nvtx.range_pop()
            self.totals[kind] += t1 - t0
            self.counts[kind] += 1
            if len(self.events) < self.max_events:
                self.events.append((kind, t0, t1))
            else:
                self.dropped += 1

    def compute_s(self) -> float:
        return sum(self.totals[k] for k in COMPUTE)

    def record(self) -> dict:
        return {
            "compute_s": self.compute_s(),
            "recv_wait_s": self.totals["recv"],
            "send_s": self.totals["send"],
            "write_s": self.totals["write"],  # rank 0: writing (and fsyncing) prompt records
            "prefill_steps": self.counts["prefill"],
            "decode_steps": self.counts["decode"],
            "events": [[k, round(a, 6), round(b, 6)] for k, a, b in self.events],
            "events_dropped": self.dropped,
        }
