"""Rank 0's bridge between the asyncio server and the engine: one thread runs
engine.results(wait=True) and hands each token and each finished prompt to the request's asyncio
queue (loop.call_soon_threadsafe); request handlers submit() from the event loop.

Events on a request's queue, each tagged with the choice (prompt) it belongs to:
  ("token", choice, token id, log-probability row or None)   as the first rank receives it
  ("done", choice, responses.Done)
  ("error", choice, message)     the engine failed (a dead or stuck peer): the server is ending
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import threading
import time
from dataclasses import dataclass, field

from pipeinfer.config import first_line
from pipeinfer.serve.protocol import ApiError
from pipeinfer.serve.responses import Done

log = logging.getLogger(__name__)

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
TPOT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)


@dataclass
class Open:
    """A prompt submitted and not yet finished."""
    index: int
    choice: int
    queue: asyncio.Queue
    t0: float
    last: float = 0.0
    tokens: int = 0


@dataclass
class Histogram:
    buckets: tuple
    counts: list = field(default_factory=list)
    total: float = 0.0
    n: int = 0

    def observe(self, v: float) -> None:
        if not self.counts:
            self.counts = [0] * len(self.buckets)
        i = bisect.bisect_left(self.buckets, v)
        if i < len(self.counts):
            self.counts[i] += 1
        self.total += v
        self.n += 1

    def lines(self, name: str) -> list[str]:
        out, acc = [f"# TYPE {name} histogram"], 0
        for b, c in zip(self.buckets, self.counts or [0] * len(self.buckets)):
            acc += c
            out.append(f'{name}_bucket{{le="{b:g}"}} {acc}')
        out += [f'{name}_bucket{{le="+Inf"}} {self.n}', f"{name}_sum {self.total:.6f}", f"{name}_count {self.n}"]
        return out


class Driver:
    def __init__(self, engine, max_queued: int):
        self.engine, self.max_queued = engine, max_queued
        self.open: dict[int, Open] = {}
        self.lock = threading.Lock()
        self.next_index = 0
        self.failure: str | None = None
        self.draining = False
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread: threading.Thread | None = None
        self.ttft, self.tpot = Histogram(TTFT_BUCKETS), Histogram(TPOT_BUCKETS)
        self.finished: dict[str, int] = {}
        self.prompt_tokens = self.generated = 0
        engine.on_token = self._token

    def start(self, loop: asyncio.AbstractEventLoop, on_failure) -> None:
        self.loop, self.on_failure = loop, on_failure
        self.thread = threading.Thread(target=self._run, name="engine", daemon=True)
        self.thread.start()

    # -- the event loop's side --------------------------------------------------------------------

    def submit(self, prompts: list, queue: asyncio.Queue) -> list[Open]:
        """Queue a request's prompts; ApiError 503 while ending, 429 when the queue is full."""
        if self.draining:
            raise ApiError(503, "the server is shutting down (SIGTERM): send the request to another server")
        if self.engine.waiting + len(prompts) > self.max_queued:
            raise ApiError(429, f"{self.engine.waiting} requests are waiting, the server's max_queued_requests is "
                                f"{self.max_queued}: retry later")
        opens = []
        with self.lock:  # with _run's failure: a request is either in its snapshot or refused here
            if self.failure is not None:
                raise ApiError(503, f"the pipeline failed ({self.failure}): the server is ending")
            for c, _ in enumerate(prompts):
                opens.append(Open(self.next_index, c, queue, time.perf_counter()))
                self.open[self.next_index] = opens[-1]
                self.next_index += 1
        for o, p in zip(opens, prompts):
            self.engine.submit(p, index=o.index)
            self.prompt_tokens += len(p.ids)
        return opens

    def cancel(self, opens: list[Open]) -> None:
        """The client went away: queued prompts are dropped, running rows end at their next visit."""
        for o in opens:
            if o.index in self.open and self.engine.cancel(o.index):
                self.open.pop(o.index, None)

    @property
    def healthy(self) -> bool:
        return self.failure is None and self.thread is not None and self.thread.is_alive()

    def metrics(self) -> str:
        waiting = self.engine.waiting
        lines = ["# TYPE pipeinfer_requests_running gauge", f"pipeinfer_requests_running {max(len(self.open) - waiting, 0)}",
                 "# TYPE pipeinfer_requests_waiting gauge", f"pipeinfer_requests_waiting {waiting}",
                 "# TYPE pipeinfer_rows_in_flight_max gauge", f"pipeinfer_rows_in_flight_max {self.engine.max_in_flight}",
                 "# TYPE pipeinfer_kv_positions_max gauge",  # a slot's KV cache at its longest; the plan's capacity bounds it
                 f"pipeinfer_kv_positions_max {self.engine.kv_positions_max}",
                 "# TYPE pipeinfer_prompt_tokens_total counter", f"pipeinfer_prompt_tokens_total {self.prompt_tokens}",
                 "# TYPE pipeinfer_generation_tokens_total counter", f"pipeinfer_generation_tokens_total {self.generated}",
                 "# TYPE pipeinfer_requests_finished_total counter"]
        lines += [f'pipeinfer_requests_finished_total{{finish_reason="{k}"}} {v}' for k, v in sorted(self.finished.items())]
        lines += self.ttft.lines("pipeinfer_time_to_first_token_seconds")
        lines += self.tpot.lines("pipeinfer_time_per_output_token_seconds")
        totals = self.engine.comm.timeline.totals  # the first rank's own; the others' are in their stage records
        lines.append("# TYPE pipeinfer_stage_seconds_total counter")
        for kind in ("prefill", "decode", "send", "recv"):
            lines.append(f'pipeinfer_stage_seconds_total{{rank="0",kind="{kind}"}} {totals[kind]:.6f}')
        return "\n".join(lines) + "\n"

    # -- the engine thread ------------------------------------------------------------------------

    def _post(self, o: Open, *event) -> None:
        self.loop.call_soon_threadsafe(o.queue.put_nowait, (event[0], o.choice, *event[1:]))

    def _token(self, index: int, token: int, row) -> None:
        o = self.open.get(index)
        if o is None:
            return
        now = time.perf_counter()
        (self.ttft.observe(now - o.t0) if o.tokens == 0 else self.tpot.observe(now - o.last))
        o.last, o.tokens = now, o.tokens + 1
        self._post(o, "token", token, row)

    def _run(self) -> None:
        try:
            for batch, result in self.engine.results(wait=True):
                for b, i in enumerate(batch.indices):
                    o = self.open.pop(i, None)
                    reason = result.finish[b][0]
                    self.finished[reason] = self.finished.get(reason, 0) + 1
                    self.generated += len(result.output_ids[b])
                    if o is not None:
                        self._post(o, "done", Done(result.output_ids[b], result.finish[b],
                                                   result.logprobs[b] if result.logprobs is not None else None,
                                                   result.prompt_logprobs[b] if result.prompt_logprobs else None,
                                                   result.prompt_argmax[b] if result.prompt_argmax else None))
        except Exception as e:  # PeerFailure, NonFiniteLogits...: every open request ends with it
            with self.lock:
                self.failure = first_line(e, 300)
                failed = list(self.open.values())
            log.error("rank 0: %s", self.failure)
            for o in failed:
                self._post(o, "error", self.failure)
            self.loop.call_soon_threadsafe(self.on_failure)
