"""Rank 0's engine loop during an evaluation, on a thread of its own, as the server runs it.

The harness spends minutes between its calls on a large suite (loading and tokenizing tasks before
the first request, metrics and bootstrap after the last). If the engine ran only inside each call,
the other ranks would hear nothing meanwhile and their bounded waits (timeout_s) would run out.
Engine.results(wait=True) sends them a keep-alive header while no request runs; the calls submit
their prompts and take their results from here as each finishes.
"""

from __future__ import annotations

import threading
from typing import Iterator

from pipeinfer.engine import Engine


class EngineLoop:
    def __init__(self, engine: Engine):
        self.engine = engine
        self.finished: dict[int, tuple[int, object]] = {}  # request index -> (its row, its BatchResult)
        self.error: BaseException | None = None             # what ended the loop (a dead peer, say)
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._run, name="pipeinfer-engine", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            for batch, result in self.engine.results(wait=True):
                with self.cond:
                    for b, i in enumerate(batch.indices):
                        self.finished[i] = (b, result)
                    self.cond.notify_all()
            raise RuntimeError("the engine was closed while requests were waiting for results")  # to a take()
        except BaseException as e:  # noqa: BLE001 -- handed to the caller waiting for results
            with self.cond:
                self.error = e
                self.cond.notify_all()

    def take(self, indices: set[int]) -> Iterator[tuple[int, int, object]]:
        """(index, row, result) for each of `indices` as it finishes; the loop's error, raised."""
        left = set(indices)
        while left:
            with self.cond:
                while self.error is None and not left & self.finished.keys():
                    self.cond.wait()
                if self.error is not None:
                    raise self.error
                ready = [(i, *self.finished.pop(i)) for i in left & self.finished.keys()]
            left -= {i for i, _, _ in ready}
            yield from ready

    def stop(self, timeout_s: float) -> bool:
        """No more requests: end the other ranks' work and wait for the loop (True when it ended)."""
        if self.error is None:
            self.engine.close()
        self.thread.join(timeout_s)
        return not self.thread.is_alive()
