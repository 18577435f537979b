"""The engine: one object on every rank that runs requests through the pipeline; the first rank
takes requests and hands back results as they finish, the other ranks serve their stage.

    from pipeinfer.engine import Engine

    with Engine.start("exp_config.json") as engine:              # every rank (torchrun, srun)
        if engine.is_first:
            for rec in engine.generate(["Hello", "The capital of France is"]):
                print(rec["prompt_index"], rec["output"])        # in completion order
        else:
            engine.serve()                                        # until the first rank is done

The batch runner (run_distributed_inference.py), an HTTP server or an evaluation backend are
callers: submit() at any time (from any thread), results() yields each finished micro-batch;
a request submitted while others run joins at the next slot that frees (generation.py's
schedule). results(wait=True) keeps waiting for requests until close(). on_token (a callback)
sees each token as it arrives and cancel(index) ends a request early (rows schedule).

Only the first rank knows the requests. Each micro-batch a slot takes is announced down the pipe
in a small header (comm.send_bytes: the prompts' ids, stops and limits, as JSON), just before its
prefill frame, and every stage forwards it on; so is the start of each round of the schedule, the
end of the work, and while idle a keep-alive (every timeout_s / 4: no rank's bounded wait runs out
on a quiet server, and a dead peer is found without a request). Every rank thus takes the same micro-batches in the same order, as
generation.generate() requires, without ever being told a tensor's shape per step. With
schedule "rows" (the default) run/rows.py runs the rounds instead, with a header per visit.

Over 300 lines: the API, its two schedules' rounds and the announced work queue belong together.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import logging
import threading
from collections import deque
from contextlib import contextmanager
from typing import Callable, Iterable, Iterator

from pipeinfer.config import ConfigError, micro_batching
from pipeinfer.load.stage import LoadError, load_stage
from pipeinfer.plan.model import plain_rows
from pipeinfer.record.metrics import batch_records, reset_peak_memory
from pipeinfer.run import procgroup
from pipeinfer.run.comm import Comm, PipelineProtocolError
from pipeinfer.run.generation import Aborted, BatchResult, generate
from pipeinfer.run.inputs import Inputs, read_inputs
from pipeinfer.run.rows import RowSchedule
from pipeinfer.run.prompts import Batch, Limits, MicroBatches, Prompt, PromptSpec, check_lengths, make_batch, prepare
from pipeinfer.run.stops import Stops

log = logging.getLogger(__name__)


class StartError(RuntimeError):
    """A rank could not start (its own problem, or another rank's): one line, exit 2."""


class Engine:
    def __init__(self, inputs: Inputs, comm: Comm, stage, info=None,
                 abort_requested: Callable[[], bool] = lambda: False):
        self.inputs, self.comm, self.stage, self.info = inputs, comm, stage, info
        self.abort_requested = abort_requested
        self.sizes = micro_batching(inputs.cfg)
        self.prompts: dict[int, Prompt] = {}  # every request by index (on other ranks: the rows heard)
        self.max_in_flight = 0                # the most prompts in flight at once
        self._queue: deque = deque()          # first rank: indices not yet taken
        self._wake = threading.Condition()
        self.rows_computed = 0                # positions run through this stage (rows schedule)
        self.kv_positions_max = 0             # the most positions a slot's KV cache held (rows schedule)
        self.rows_moved = 0                   # rows moved between slots once the queue ran dry (rows schedule)
        self.prefill_chunks = 0               # prefill chunks of prompts longer than prefill_chunk_size (rows schedule)
        self.packed_visits = 0                # visits whose prefills ran in their decode's forward (rows schedule)
        cfg = inputs.cfg
        self.rows = cfg.schedule == "rows" and plain_rows(inputs.model_config)
        if cfg.schedule == "rows" and not self.rows:
            log.warning("schedule=\"rows\": the %s family's KV cache has sliding-window or other special layers: "
                        "using the micro_batches schedule", inputs.model_config.model_type)
        self._next = 0
        self._closed = self._ended = self._waiting = False
        # first rank: called with (request index, token id, its log-probability row or None) as each
        # token arrives (rows schedule; the micro_batches schedule hands tokens back at the end only)
        self.on_token: Callable[[int, int, object], None] | None = None
        self._cancelled: set[int] = set()  # running requests to end at their row's next visit
        # while idle, a header this often keeps the other ranks' bounded waits from running out,
        # and finds a dead peer (its send fails)
        self.keepalive_s = inputs.cfg.timeout_s / 4

    @property
    def is_first(self) -> bool:
        return self.comm.is_first

    @property
    def max_prompt_tokens(self) -> int:
        """The longest prompt a request may have: the plan made room for it (config max_prompt_tokens)."""
        return self.inputs.plan.longest_prompt

    @property
    def max_new_tokens(self) -> int:
        """The most tokens a request may ask for: the plan's KV room beyond the longest prompt."""
        return self.inputs.plan.capacity - self.inputs.plan.longest_prompt

    # -- starting ------------------------------------------------------------------------------

    @classmethod
    def load(cls, inputs: Inputs, comm: Comm, problem: str | None = None,
             abort_requested: Callable[[], bool] = lambda: False) -> "Engine":
        """Every rank loads its stage, and all agree that all did before anyone goes on. problem: a
        failure this rank found before (the batch runner's results-file checks). StartError on
        every rank when any rank failed."""
        cfg = inputs.cfg
        ok = comm.all_ok(problem is None)
        stage = info = None
        if ok:
            try:
                stage, info = load_stage(inputs.plan, inputs.rank, inputs.model_config, inputs.device, inputs.dtype,
                                         f"{cfg.offload_folder}/rank{inputs.rank}", cfg.trust_remote_code,
                                         cfg.timeout_s, cfg.compile)
            except LoadError as e:
                problem = str(e)
            ok = comm.all_ok(problem is None, f"agreeing that every rank loaded its stage (a rank that loads for longer "
                                              f"than timeout_s={cfg.timeout_s:g} also ends here: raise timeout_s)")
        if not ok:
            raise StartError(problem or "another rank failed its checks (see its message)")
        return cls(inputs, comm, stage, info, abort_requested)

    def warm_up(self) -> None:
        """One forward and one message per link, off the clock; then memory peaks count from here."""
        self.stage.warm_up(self.inputs.model_config.hidden_size, self.inputs.dtype, self.inputs.device,
                           tuple(range(1, max(self.sizes) + 1)))  # compile on: a decode step per row count
                           # a slot may hold (rows leave and join it) traces it before the clock starts
        self.comm.warm_up_links(self.inputs.dtype)  # NCCL builds a pair's communicator at its first message
        reset_peak_memory(self.inputs.device)

    @classmethod
    @contextmanager
    def start(cls, config_path: str, overrides: Iterable[str] = (),
              abort_requested: Callable[[], bool] = lambda: False) -> Iterator["Engine"]:
        """Read the config (ConfigError: bad input), join the ranks, load and warm up every stage;
        on leaving, end the work on every rank and leave the process group."""
        inputs = read_inputs(config_path, list(overrides), prompts_required=False)
        comm = procgroup.init(inputs.rank, inputs.world_size, inputs.device, inputs.cfg.timeout_s,
                              inputs.cfg.master_port, cls._timeline(inputs), inputs.cfg.comm_backend)
        clean = False
        try:
            engine = cls.load(inputs, comm, abort_requested=abort_requested)
            engine.warm_up()
            yield engine
            engine.close()
            clean = True
        finally:
            procgroup.shutdown(clean)

    @staticmethod
    def _timeline(inputs: Inputs):
        from pipeinfer.record.timeline import Timeline

        return Timeline(inputs.device, inputs.cfg.nvtx, inputs.rank)

    # -- the first rank: requests in, results out ------------------------------------------------

    def submit(self, request: str | list | PromptSpec | Prompt, index: int | None = None) -> int:
        """Queue a request (a prompt string, chat messages, a PromptSpec with its own stops and
        limits, or an already prepared Prompt); returns its index, which its records carry and
        which keys its sampling seed. ConfigError (nothing queued) for a request that cannot run."""
        if not self.is_first:
            raise RuntimeError("submit() on the first rank only; the other ranks run serve()")
        if self._closed:
            raise RuntimeError("the engine is closed")
        index = self._next if index is None else index
        if index in self.prompts:
            raise ValueError(f"request index {index} was submitted before: give each request its own")
        prompt = request if isinstance(request, Prompt) else self.prepare(request)
        self._check_room(prompt)
        self.prompts[index] = prompt
        self._next = max(self._next, index + 1)
        with self._wake:
            self._queue.append(index)
            self._wake.notify_all()
        return index

    def cancel(self, index: int) -> bool:
        """End a request early (a client that went away). A queued one is forgotten at once, with no
        result (True); a running one's row is freed at its next visit and results() yields what it
        made, with finish_reason "abort" (rows schedule; the micro_batches schedule runs it to its end)."""
        with self._wake:
            if index in self._queue:
                self._queue.remove(index)
                self.prompts.pop(index, None)
                return True
            if index in self.prompts and self.rows:  # the micro_batches schedule runs it to its end
                self._cancelled.add(index)
            return False

    @property
    def waiting(self) -> int:
        """Requests submitted and not yet taken into a row."""
        return len(self._queue)

    def prepare(self, request) -> Prompt:
        """A request as submit() would queue it (rendered, tokenized, its limits checked);
        ConfigError for one that cannot run."""
        spec = request if isinstance(request, PromptSpec) else PromptSpec(request)
        Limits.read(dataclasses.asdict(spec.limits), "request")  # each value by the config's own rule
        inputs = self.inputs
        prompt = prepare(inputs.tokenizer, [spec], inputs.cfg)[0]
        check_lengths([prompt], getattr(inputs.model_config, "max_position_embeddings", None),
                      inputs.cfg.max_new_tokens)
        if inputs.gen.stopper is not None:  # a stop string the tokenizer cannot match: refused here
            inputs.gen.stopper.prepare(prompt.stops.strings)
        return prompt

    def _check_room(self, prompt: Prompt) -> None:
        """Past the plan, a row's KV cache and the prefill's activations would outgrow what every rank
        budgeted (ConfigError)."""
        inputs = self.inputs
        if len(prompt.ids) > self.max_prompt_tokens:
            raise ConfigError(f"the request's prompt has {len(prompt.ids)} tokens, above the {self.max_prompt_tokens} "
                              f"the plan makes room for: shorten it, or raise max_prompt_tokens in the config")
        # A row holds its prompt and its new tokens: a short prompt may ask for more than the config's
        # max_new_tokens (an evaluation scores prompts of max_prompt_tokens and generates after short ones).
        new, room = prompt.max_new_tokens(inputs.cfg.max_new_tokens), self.inputs.plan.capacity
        if len(prompt.ids) + new > room:
            raise ConfigError(f"the request asks for max_new_tokens={new} after a prompt of {len(prompt.ids)} tokens, "
                              f"above the {room} positions a row has in the plan (max_prompt_tokens + max_new_tokens):"
                              f" ask for fewer, or raise max_new_tokens in the config")

    def results(self, wait: bool = False) -> Iterator[tuple[Batch, BatchResult]]:
        """Each micro-batch as it finishes, with its result (generation.BatchResult), until nothing
        is queued or in flight; with wait=True, until close() (from another thread). Raises
        generation.Aborted on a stop request, on every rank."""
        self._waiting = wait
        while True:
            with self._wake:
                idle = False
                while wait and not self._queue and not self._closed and not idle:
                    idle = not self._wake.wait(self.keepalive_s)
                if not self._queue and not idle:
                    break
            if not self._queue:
                self._announce({"kind": "alive"})
                self.comm.drain_sends()  # a dead next rank fails it here, not at the next request
                continue
            self._announce({"kind": "round"})
            for batch, result in self._round():
                yield batch, result
                for i in batch.indices:  # handed back: a long-lived engine keeps only what is queued or running
                    self.prompts.pop(i, None)
                    self._cancelled.discard(i)  # a cancel that came as it finished
        if wait:
            self._end()

    def generate(self, requests: Iterable) -> Iterator[dict]:
        """submit() each request, then every prompt record (the results file's, record/metrics.py)
        as each finishes: output ids and text, finish_reason, times, log-probabilities."""
        for r in requests:
            self.submit(r)
        for batch, result in self.results():
            yield from batch_records(batch, result, self.prompts, self.inputs.tokenizer)

    def close(self) -> None:
        """No more requests: the other ranks leave serve(). Idempotent; a no-op on the other ranks."""
        with self._wake:
            self._closed = True
            self._wake.notify_all()
            waiting = self._waiting  # a results(wait=True) loop ends the work itself
        if self.is_first and not waiting:
            self._queue.clear()  # submitted but never run: no results() was asked for them
            self._end()

    def _end(self) -> None:
        if not self._ended:
            self._ended = True
            self._announce({"kind": "end"})
            self.comm.drain_sends()

    # -- every rank ------------------------------------------------------------------------------

    def serve(self) -> None:
        """The other ranks' loop: run each round the first rank announces, until it ends the work."""
        while (kind := self._hear("waiting for the first rank's next work")["kind"]) in ("round", "alive"):
            if kind == "alive":
                self.comm.drain_sends()
                continue
            for _ in self._round():
                pass

    def _round(self) -> Iterator[tuple[Batch, BatchResult]]:
        if self.rows:
            yield from self._row_round()
            return
        work = _AnnouncedWork(self._queue, list(self.sizes), self._make, engine=self)
        try:
            yield from generate(self.stage, self.comm, work, self.inputs.gen, self.inputs.model_config.hidden_size,
                                self.inputs.dtype, self.abort_requested)
        except Aborted:
            self._ended = True  # every rank left at the same frame: nothing more to announce
            raise
        finally:
            self.max_in_flight = max(self.max_in_flight, work.max_in_flight)
            self.rows_computed += work.rows_computed

    def _row_round(self) -> Iterator[tuple[Batch, BatchResult]]:
        inputs = self.inputs
        sched = RowSchedule(self.stage, self.comm, list(self.sizes), inputs.gen, inputs.model_config.hidden_size,
                            inputs.dtype, inputs.plan.capacity, inputs.tokenizer.pad_token_id,
                            self.on_token, self._cancelled, packed=inputs.cfg.packed_prefill,
                            spread=inputs.cfg.spread_prefill)
        queue = self._queue

        def take():
            with self._wake:  # cancel() may remove from the queue on another thread
                return (i := queue.popleft(), self.prompts[i]) if queue else None

        try:
            if self.is_first:
                yield from sched.run(take, self._make, self.abort_requested)
            else:
                sched.serve()
        except Aborted:
            self._ended = True
            raise
        finally:
            self.max_in_flight = max(self.max_in_flight, sched.max_in_flight)
            self.rows_computed += sched.rows_computed
            self.kv_positions_max = max(self.kv_positions_max, sched.kv_positions_max)
            self.rows_moved += sched.rows_moved
            self.prefill_chunks += sched.chunks_run
            self.packed_visits += sched.packed_visits

    def _make(self, indices: list[int]) -> Batch:
        return make_batch(self.prompts, indices, self.inputs.tokenizer.pad_token_id)

    def _announce(self, head: dict) -> None:
        self.comm.send_bytes(json.dumps(head).encode(), f"announcing the {head['kind']} to the next stage")

    def _hear(self, doing: str) -> dict:
        """The previous stage's header, passed on to the next stage as it came."""
        payload = self.comm.recv_bytes(doing)
        self.comm.send_bytes(payload, "passing the first rank's header on")
        try:
            return json.loads(payload)
        except ValueError:
            raise PipelineProtocolError(f"{doing}: pipeline protocol error: the header is not JSON ({payload[:60]!r}): "
                                        f"the ranks disagree on the schedule (a bug: report it with every rank's log)"
                                        ) from None


class _AnnouncedWork(MicroBatches):
    """generation.generate()'s work queue: on the first rank it takes the engine's queued requests
    and announces each micro-batch (or the slot's retirement) down the pipe; on the other ranks it
    takes what the previous stage announced."""

    def __init__(self, todo: deque, sizes: list[int], make, engine: Engine):
        super().__init__(todo, sizes, make)
        self.engine = engine

    def take(self, slot: int) -> Batch | None:
        engine = self.engine
        if engine.is_first:
            with engine._wake:  # submit() and cancel() change the queue from other threads
                most = self._fitting(slot)
                batch = super().take(slot, most) if most else None
            engine._announce({"kind": "batch", **_describe(batch, engine.prompts)} if batch else {"kind": "retire"})
            return batch
        head = engine._hear(f"waiting for slot {slot}'s next micro-batch from the first rank")
        if head["kind"] == "retire":
            return None
        if head["kind"] != "batch":
            raise PipelineProtocolError(f"slot {slot}: pipeline protocol error: a {head['kind']!r} header where this "
                                        f"rank's schedule expects a micro-batch (a bug: report it with every rank's log)")
        for i, ids, stops, limits, nxt in zip(head["indices"], head["ids"], head["stops"], head["limits"],
                                              head["next"]):
            engine.prompts[i] = Prompt(None, "", ids, Stops(*map(tuple, stops)), Limits(*limits), score_next=nxt)
        self.todo = deque(head["indices"])
        return super().take(slot)

    def _fitting(self, slot: int) -> int:
        """How many of the next queued prompts one micro-batch takes: its cache holds its longest
        prompt plus its largest max_new_tokens, which must stay within the plan's positions per row
        (a request may trade prompt room for new tokens, Engine._check_room: two such requests
        in one micro-batch would need both). A prompt that does not fit waits for the next slot."""
        engine = self.engine
        room, default = engine.inputs.plan.capacity, engine.inputs.cfg.max_new_tokens
        n = longest = most_new = 0
        for i in itertools.islice(self.todo, self.sizes[slot]):
            p = engine.prompts[i]
            longest, most_new = max(longest, len(p.ids)), max(most_new, p.max_new_tokens(default))
            if n and longest + most_new > room:
                break
            n += 1
        return n

    def done(self, batch: Batch) -> None:
        super().done(batch)
        if not self.engine.is_first:  # what this rank heard is not needed any more
            for i in batch.indices:
                self.engine.prompts.pop(i, None)


def _describe(batch: Batch, prompts: dict[int, Prompt]) -> dict:
    """What another stage needs to take the same micro-batch: ids, stops and limits per row."""
    rows = [prompts[i] for i in batch.indices]
    return {"indices": batch.indices, "ids": [p.ids for p in rows],
            "stops": [[list(p.stops.strings), list(p.stops.token_ids)] for p in rows],
            "limits": [[p.limits.max_new_tokens, p.limits.temperature, p.limits.top_p, p.limits.top_k, p.limits.seed]
                       for p in rows], "next": [p.score_next for p in rows]}


