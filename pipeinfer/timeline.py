"""Where each stage's time goes: named spans (prefill, decode, send, recv) with totals and events.

The same spans feed the {"type": "stage"} record (totals), the report's pipeline timeline
(events, in wall-clock seconds so ranks on one machine line up), and NVTX ranges when a profiler
is attached. On CUDA, compute spans synchronise the device at their end, and only they do: that is
where a measurement needs it; everywhere else kernels stay asynchronous.
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import contextmanager

import torch

COMPUTE = ("prefill", "decode")


class Timeline:
    def __init__(self, device: torch.device | None = None, nvtx: bool = False, max_events: int = 20000):
        self.sync = device is not None and device.type == "cuda"
        self.nvtx = nvtx and torch.cuda.is_available()
        self.max_events = max_events
        self.totals: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)
        self.events: list[tuple[str, float, float]] = []
        self.dropped = 0

    @contextmanager
    def span(self, kind: str):
        if self.nvtx:
            torch.cuda.nvtx.range_push(kind)
        t0 = time.time()
        try:
            yield
        finally:
            if self.sync and kind in COMPUTE:
                torch.cuda.synchronize()
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
            "prefill_steps": self.counts["prefill"],
            "decode_steps": self.counts["decode"],
            "events": [[k, round(a, 6), round(b, 6)] for k, a, b in self.events],
            "events_dropped": self.dropped,
        }
