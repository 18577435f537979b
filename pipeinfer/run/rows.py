"""Row-level refill: a finished prompt frees its row at once and the next waiting prompt takes it.
(Over 300 lines: the first stage's decisions, the other stages' checks and one visit's compute
share the slot state, and read best side by side.)

The batch_size rows are split into slots (config.micro_batching), each with one KV cache per stage
whose rows are independent prompts: row r holds its prompt's positions contiguously at the end of
the cache's L positions, with a (R, L) attention mask that is 1 on them only, so attention sees
only the row's own positions, and its own position ids (the family's own forward, as generate()
runs a left-padded batch). Slots are visited round-robin as in generation.py; a visit is decided
on the first stage and announced to every stage in a header (the rows kept and moved, which rows
decode at which position, which prompts join, the cache length), before its frame:

  reshape  the slot keeps only its live rows (finished rows go, the last rows fill their places:
           one row copy each, kvcache.keep_rows), so a slot holds R live rows and computes R; rows
           may move to another slot (kvcache.take_rows, copy_rows): to make room for a prompt whose
           prefill ends in this visit, and once the queue is dry to the slot with the fewest
           running rows until they differ by at most one, so the last long rows keep a slot per
           stage in flight
  decode   one position for every row of the slot, the new column masked in
  join     the joining prompts' prefill (left-padded among themselves, a cache of their own),
           placed in rows after the live ones at the end of the slot's positions (kvcache.add_rows,
           splice_rows)

A prompt's prefill may also run in parts, one a visit, in a cache of its own (_Chunked): a prompt
longer than the prefill chunk, and with several slots and spread_prefill every prompt. A slot's
next visit waits for its last visit's tokens, so a round lasts as long as its longest slot's
round trip, and a visit carrying more prefill than the others makes the stages wait for it in
turn; spread, a visit runs no more prompt positions than the visit before it, or its 1 / K share
of those due, and the rest rides the next visits. Parts ride every slot's visits (the prompts under
way are one list, the oldest first, the same on every stage), and a prompt joins the slot whose
visit runs its last part, live rows moving out to another slot where that one is full.

Decode and join run in the same visit, so new rows' prefill interleaves with the others' decode,
in the same forward (load/packed.py: one pass over the stage's weights, each prompt attending to its
own cache; the header's "packed"); the frame carries the decode hidden states then the prefill's
(packed: every prompt's own positions, unpadded; else the joiners left-padded among themselves).
The last stage samples each active row with its own generator and parameters, decides its stop
code, and sends (R,) tokens and codes back; the first stage cuts each row at its own
max_new_tokens or stop and hands the prompt back at once. Every stage checks the header against
its own copy of the slots (row counts, rows kept and moved, cache length, positions, packing): a
disagreement is a PipelineProtocolError. Only plain append-only KV layers qualify
(plan.model.plain_rows); other families use generation.py's schedule.
"""

from __future__ import annotations

import json
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from pipeinfer.load.kvcache import (add_rows, copy_rows, drop_left, grow_left, keep_rows, reserve_rows, splice_rows,
                                    take_rows)
from pipeinfer.load.packed import Segment, packable, packed_forward
from pipeinfer.load.stage import Stage
from pipeinfer.run.comm import Comm, PipelineProtocolError, pending_bound
from pipeinfer.run.generation import Aborted, BatchResult, GenParams, logprob_rows, position_ids
from pipeinfer.run.prompts import Batch, Limits, Prompt
from pipeinfer.run.sampling import check_finite, checkpoint_processors, prompt_generator, row_settings, sample
from pipeinfer.run.scoring import FIELDS, prompt_logprobs, scored_fields
from pipeinfer.run.stops import Stops, finish

COMPACT = 64  # drop the leading positions no live row attends to once there are this many


@dataclass
class _Row:
    """One prompt in a row. First stage: what it has produced; last stage: how it samples."""
    index: int
    prompt_tokens: int
    max_new: int
    stops: Stops | None
    t0: float = 0.0
    tokens: list = field(default_factory=list)
    codes: list = field(default_factory=list)
    arrivals: list = field(default_factory=list)
    logprobs: list = field(default_factory=list)
    prompt_lp: list | None = None
    prompt_greedy: list | None = None
    prompt_argmax: list | None = None
    new: int = 0          # last stage: tokens sampled so far
    params: object = None
    gen: object = None
    processors: object = None
    history: torch.Tensor | None = None


@dataclass
class _Chunked:
    """A prompt longer than the prefill chunk (GenParams.prefill_chunk): every visit of its slot
    runs its next chunk into a cache of its own, beside the others' decode, until its last chunk
    makes it a row like any joiner. The same list, in the same order, on every stage."""
    index: int
    n: int                  # its prompt's tokens
    cache: object = None    # this stage's keys and values of its first `done` positions
    done: int = 0
    prompt: object = None   # first stage: the Prompt
    t0: float = 0.0         # first stage: when its prefill began


@dataclass
class _Slot:
    cap: int                         # the most rows it holds (config.micro_batching)
    cache: object
    mask: torch.Tensor               # (R, L) 1 where a row's own positions are
    pos: list[int]                   # per row: its next position (its length so far)
    rows: list[int | None]           # every stage: the prompt index in each row, None when free
    firsts: list[_Row | None]        # first stage: what each row's prompt has produced
    tails: list[_Row | None]         # last stage: how each row samples
    busy: bool = False               # first stage: a visit is on its way round the pipe

    @property
    def size(self) -> int:
        """The rows the cache holds now: the live ones after each visit's compaction, and joiners."""
        return len(self.rows)

    @property
    def length(self) -> int:
        return self.mask.shape[1]


class RowSchedule:
    """One round of the row schedule on this rank: run() on the first stage (takes prompts from
    `take` until it returns None, yields (one-row Batch, BatchResult) as each prompt finishes),
    serve() on the others (until the first stage ends the round)."""

    def __init__(self, stage: Stage, comm: Comm, sizes: list[int], gp: GenParams, hidden_size: int,
                 dtype: torch.dtype, capacity: int, pad_id: int,
                 on_token: Callable[[int, int, object], None] | None = None, cancelled: set[int] | None = None,
                 packed: bool = True, spread: bool = True):
        self.stage, self.comm, self.gp, self.H, self.dtype, self.pad = stage, comm, gp, hidden_size, dtype, pad_id
        # first stage: each token as it arrives (index, token id, log-probability row or None); and
        # the requests to end at their row's next visit (another thread adds to it: Engine.cancel)
        self.on_token, self.cancelled = on_token, set() if cancelled is None else cancelled
        self.capacity = capacity  # the plan's KV positions per slot
        dev = comm.device
        self.slots = [_Slot(n, None, None, [], [], [], []) for n in sizes]
        for s in self.slots:
            self._clear(s)
        self.eos = torch.tensor(gp.eos_ids, dtype=torch.long, device=dev)
        self.rows_computed = 0     # positions run through this stage (decode rows + prompt positions)
        self.kv_positions_max = 0  # the most positions a slot's KV cache held (the plan's capacity bounds it)
        self.max_in_flight = 0
        self.rows_moved = 0        # rows moved between slots once the queue ran dry
        self.chunks_run = 0        # prefill chunks of prompts longer than the chunk (_Chunked)
        # prompts longer than this prefill in chunks of it (0: whole); scoring the prompt needs it whole
        self.chunk = 0 if gp.prompt_logprobs else gp.prefill_chunk
        # a visit's prefills run in its decode's forward (load/packed.py), but for scoring (all positions' logits)
        self.pack = packed and not gp.prompt_logprobs and packable(stage)
        # With several slots a joiner's prefill spreads over as many visits, one part in each (so that
        # no slot's round trip is longer than another's), and it joins the slot of its last part.
        self.spread = spread and self.pack and self.chunk > 0 and len(sizes) > 1
        self.batch = sum(sizes)
        self.chunked: list[_Chunked] = []  # prompts whose prefill is under way in parts, the oldest first
        self.last_prefill = 0  # first stage: prompt positions the last visit ran
        self.packed_visits = 0
        self.run_t0 = time.perf_counter()
        comm.max_pending = pending_bound(len(sizes))  # sends past it have been received: reaped

    # -- first stage ------------------------------------------------------------------------------

    def run(self, take: Callable[[], tuple[int, Prompt] | None], make: Callable[[list[int]], Batch],
            abort_requested: Callable[[], bool]) -> Iterator[tuple[Batch, BatchResult]]:
        inflight: deque = deque()  # (slot, header, local token message) per visit on its way
        k, K = 0, len(self.slots)
        dry = False  # the queue had nothing the last time a free row asked
        while True:
            if abort_requested():
                self._announce({"kind": "abort"})
                while inflight:  # the tokens of visits on their way; their prompts rerun on resume
                    for _ in self._receive(*inflight.popleft(), make):
                        pass
                self.comm.drain_sends()
                raise Aborted()
            s = self.slots[k]
            while s.busy:  # token messages come back in visit order
                yield from self._receive(*inflight.popleft(), make)
            for r, row in enumerate(s.firsts):
                if row is not None and row.index in self.cancelled:  # freed here; the header drops it
                    self.cancelled.discard(row.index)
                    s.firsts[r] = None
                    result = self._result(row)
                    result.finish[0] = ("abort", None)
                    yield make([row.index]), result
            live = [r for r, row in enumerate(s.firsts) if row is not None]
            running = len(live) + sum(row is not None for t in self.slots if t is not s for row in t.firsts)
            got = []  # never more than batch_size prompts in flight; a whole joiner needs a row of this slot
            while running + len(self.chunked) + len(got) < self.batch and (self.spread or len(live) + len(got) < s.cap):
                if dry := (one := take()) is None:
                    break
                got.append(one)
            whole = []
            for i, p in got:  # a prompt longer than the chunk, or every prompt when prefills spread, in parts
                if self._in_parts(len(p.ids)):
                    self.chunked.append(_Chunked(i, len(p.ids), prompt=p, t0=time.perf_counter()))
                else:
                    whole.append((i, p))
            if not live and not got and not self.chunked:
                if not inflight and all(all(row is None for row in t.firsts) for t in self.slots):
                    self._announce({"kind": "done"})
                    self.comm.drain_sends()
                    return
                k = (k + 1) % K
                continue
            # The oldest prompts' parts first, at most C positions a visit; spread, no more than the last
            # visit ran or a 1 / K share of what is due, the rest in the next visits. A prompt whose last
            # part runs now joins this slot: where its rows are full, as many live rows move to the slot
            # with the most room (they decode at its next visit); with no room anywhere, its last position waits.
            to, room = self._roomiest(k)
            free = s.cap - len(live) - len(whole) + min(len(live), room)
            chunks, left, finals = [], self.chunk, []
            if self.spread:
                left = min(left, max(self.last_prefill, -(-sum(c.n - c.done for c in self.chunked) // K)))
            for c in self.chunked:
                n = min(left, c.n - c.done)
                if c.done + n == c.n:
                    if len(finals) == free:  # no room for it to join: all but its last position
                        n -= 1
                    else:
                        finals.append(c)
                chunks.append((c, n))
                left -= n
            self.last_prefill = sum(n for _, n in chunks) + sum(len(p.ids) for _, p in whole)
            excess = len(live) + len(whole) + len(finals) - s.cap
            if excess > 0:
                rows = sorted(sorted(live, key=lambda r: s.pos[r])[:excess])  # the shortest: the least to copy
                move = self._moving(s, rows, to)
            else:  # once the queue is dry some rows may move to the slot with the fewest
                move = self._move(k, s, live) if dry and not got else None
            shape = {"n": s.size, "keep": _holes_filled([r for r in live if move is None or r not in move["rows"]]),
                     "move": move}
            self._reshape(s, shape)
            decode = list(range(s.size))
            # joiners take rows after the live ones: the whole prompts, then those whose last part runs now
            joins = [(s.size + j, i, p) for j, (i, p) in enumerate(whole + [(c.index, c.prompt) for c in finals])]
            head = self._header(k, s, decode, joins, shape, chunks)
            self._announce(head)
            began = {c.index: c.t0 for c in finals}
            for r, i, p in joins:
                s.firsts.append(_Row(i, len(p.ids), p.max_new_tokens(self.gp.max_new_tokens),
                                     p.stops if (p.stops.strings or p.stops.token_ids) else None,
                                     began.get(i) or time.perf_counter()))
            dev = self.comm.device
            last = [s.firsts[r].tokens[-1] for r in decode]
            if head["packed"]:  # the rows' last tokens, the whole joiners' prompts, then the chunks: (1, N)
                ids = last + [t for _, p in whole for t in p.ids] + [t for c in head["chunks"] for t in c["ids"]]
                local = self._visit_packed(s, head, torch.tensor(ids, dtype=torch.long, device=dev)[None])
            else:
                x_dec = torch.tensor(last, dtype=torch.long, device=dev)[:, None] if decode else None  # (R, 1)
                x_join = _left_padded([p.ids for _, p in whole], self.pad, dev) if whole else None
                x_chunks = [torch.tensor(c.prompt.ids[c.done:c.done + n], dtype=torch.long, device=dev)[None]
                            for c, n in chunks]  # (1, n) each
                local = self._visit(s, head, x_dec, x_join, x_chunks)
            if joins or decode:  # a visit of chunks only has no tokens coming back
                s.busy = True
                inflight.append((k, head, local))
            k = (k + 1) % K

    def _move(self, k: int, s: _Slot, live: list[int]) -> dict | None:
        """Once the queue has run dry, rows of this slot move to the slot with the fewest running
        rows until the two differ by at most one, so that the pipe keeps a balanced slot per stage
        in flight instead of running the last long rows in one (the other stages idle). A slot with
        a visit on its way takes them after its rows (it decodes them at its next visit); one with
        none running and none on its way starts over with them. Rows are dealt by what they may
        still produce, longest first, alternately, so that both slots last about as long."""
        if len(live) < 2 or len(self.slots) < 2:
            return None
        running = [sum(f is not None for f in t.firsts) for t in self.slots]
        to = min((j for j in range(len(self.slots)) if j != k), key=lambda j: running[j])
        t = self.slots[to]
        count = min((len(live) - running[to]) // 2, t.cap - (0 if self._starts_over(t) else t.size))
        if count < 1:
            return None
        left = sorted(live, key=lambda r: s.firsts[r].max_new - len(s.firsts[r].tokens), reverse=True)
        return self._moving(s, sorted(left[1::2][:count]), to)

    def _moving(self, s: _Slot, rows: list[int], to: int) -> dict:
        """The header's move of slot s's `rows` to slot `to`."""
        t = self.slots[to]
        return {"slot": to, "rows": rows, "n": t.size, "pos": [s.pos[r] for r in rows], "clear": self._starts_over(t)}

    @staticmethod
    def _starts_over(t: _Slot) -> bool:
        """Whether rows moved to slot t replace its cache: none running and no visit on its way."""
        return t.size == 0 or (not t.busy and all(f is None for f in t.firsts))

    def _roomiest(self, k: int) -> tuple[int | None, int]:
        """The other slot with the most free rows: (slot, free rows); (None, 0) with one slot."""
        best = (None, 0)
        for j, t in enumerate(self.slots):
            if j != k and (room := t.cap - (0 if self._starts_over(t) else t.size)) > best[1]:
                best = (j, room)
        return best

    def _in_parts(self, n: int) -> bool:
        """Whether an n-token prompt prefills in parts (a visit's share of at most the chunk, in a
        cache of its own): a prompt longer than the chunk, and every prompt where prefills spread."""
        return bool(self.chunk and n > self.chunk or self.spread)

    @torch.inference_mode()  # the caches are inference tensors: edited in place
    def _reshape(self, s: _Slot, shape: dict) -> None:
        """Every stage, before a visit's compute: move rows to another slot, then keep the live
        rows (row i becomes row keep[i]); a slot left with no rows starts over with an empty cache."""
        move = shape["move"]
        if move is not None:
            t, rows = self.slots[move["slot"]], move["rows"]
            n = max(s.pos[r] for r in rows)  # a row's positions are the last pos[r] of the slot's
            if move["clear"]:
                self._clear(t)
                take_rows(t.cache, s.cache, rows, n)
                t.mask = s.mask[rows, s.length - n:]
            else:  # after t's rows: its cache grows on the left where a moved row is longer
                if n > t.length:
                    grow_left(t.cache, t.size, n - t.length, s.cache)
                    t.mask = torch.cat([torch.zeros(t.size, n - t.length, dtype=t.mask.dtype, device=t.mask.device),
                                        t.mask], 1)
                b, L = t.size, t.length
                add_rows(t.cache, len(rows))
                copy_rows(t.cache, s.cache, rows, range(b, b + len(rows)), [s.pos[r] for r in rows])
                t.mask = torch.cat([t.mask, torch.zeros(len(rows), L, dtype=t.mask.dtype, device=t.mask.device)])
                for j, r in enumerate(rows):
                    t.mask[b + j, L - s.pos[r]:] = 1
            for name in ("pos", "rows", "firsts", "tails"):
                getattr(t, name).extend(getattr(s, name)[r] for r in rows)
            self.rows_moved += len(rows)
        keep = shape["keep"]
        if keep == list(range(s.size)):
            return
        if not keep:
            self._clear(s)
            return
        keep_rows(s.cache, keep)
        s.mask = s.mask[keep]
        for name in ("pos", "rows", "firsts", "tails"):
            setattr(s, name, [getattr(s, name)[r] for r in keep])

    def _clear(self, s: _Slot) -> None:
        """No rows, and a fresh cache with room for the slot's most rows (its buffer is allocated at the first join)."""
        s.cache = self.stage.new_cache(capacity=self.capacity)
        reserve_rows(s.cache, s.cap)
        s.mask = torch.zeros(0, 0, dtype=torch.long, device=self.comm.device)
        s.pos, s.rows, s.firsts, s.tails = [], [], [], []

    def _header(self, k: int, s: _Slot, decode: list[int], joins: list, shape: dict, chunks: list) -> dict:
        first = min((int(s.mask[r].nonzero()[0]) for r in decode if s.mask[r].any()), default=s.length)
        # Drop what no live row attends to once there is enough of it, and always before the slot's cache
        # would outgrow the plan's capacity (a row spans at most prompt + max_new_tokens - 1 positions
        # before its last decode, so there is then something to drop; growing would double the cache).
        drop = first if first >= COMPACT or s.length + 1 > self.capacity else 0
        last = {c.index for c, n in chunks if n and c.done + n == c.n}
        head = {"kind": "visit", "slot": k, **shape, "L": s.length, "drop": drop, "decode": decode,
                "pos": [s.pos[r] for r in decode],
                "join": [{"row": r, "index": i, "ids": p.ids, "next": p.score_next,
                          "stops": [list(p.stops.strings), list(p.stops.token_ids)],
                          "limits": [p.limits.max_new_tokens, p.limits.temperature, p.limits.top_p, p.limits.top_k,
                                     p.limits.seed], **({"chunked": True} if i in last else {})} for r, i, p in joins],
                "chunks": [{"index": c.index, "start": c.done, "n": c.n, "ids": c.prompt.ids[c.done:c.done + n]}
                           for c, n in chunks]}
        head["packed"] = self._packs(head)
        return head

    def _packs(self, head: dict) -> bool:
        """Whether a visit runs its prefills in its decode's forward: when this stage packs
        (load/packed.py) and the visit has a whole joiner or a chunk with positions."""
        return self.pack and (any(not j.get("chunked") for j in head["join"]) or any(c["ids"] for c in head["chunks"]))

    def _receive(self, k: int, head: dict, local, make) -> Iterator[tuple[Batch, BatchResult]]:
        """A visit's token message: each active row's token; a row that finished is handed back."""
        s = self.slots[k]
        s.busy = False
        active = sorted(head["decode"] + [j["row"] for j in head["join"]])
        n_floats = self._floats(head)
        tokens, codes, _, floats = self.comm.recv_tokens(len(active), local, f"waiting for slot {k}'s tokens", n_floats)
        tokens, codes = tokens.tolist(), codes.tolist()
        w = self.gp.logprob_width
        lp = floats.cpu().reshape(-1) if floats is not None else None
        now = time.perf_counter()
        for a, r in enumerate(active):
            row = s.firsts[r]
            row.tokens.append(tokens[r])
            row.codes.append(codes[r])
            row.arrivals.append(now - row.t0)
            if w:
                row.logprobs.append(lp[a * w:(a + 1) * w])
            if self.on_token is not None and len(row.tokens) <= row.max_new:
                self.on_token(row.index, tokens[r], row.logprobs[-1] if w else None)
        if self.gp.prompt_logprobs and head["join"]:
            T = max(len(j["ids"]) for j in head["join"])
            width = T - 1 + any(j.get("next") is not None for j in head["join"])  # scoring.py: (J, FIELDS, width)
            rest = lp[len(active) * w:].reshape(len(head["join"]), FIELDS, width) if width else None
            for j, join in enumerate(head["join"]):
                row = s.firsts[join["row"]]
                row.prompt_lp, row.prompt_greedy, row.prompt_argmax = scored_fields(rest, j, T, join["ids"],
                                                                                    join.get("next"))
        for r in active:
            row = s.firsts[r]
            if row.codes[-1] or len(row.tokens) >= max(row.max_new, 1):
                s.firsts[r] = None
                self.cancelled.discard(row.index)
                yield make([row.index]), self._result(row)

    def _result(self, row: _Row) -> BatchResult:
        n = min(next((i + 1 for i, c in enumerate(row.codes) if c), len(row.tokens)), row.max_new)
        code = row.codes[n - 1] if n else 0
        return BatchResult([row.tokens[:n]], [row.arrivals[:n]], row.t0 - self.run_t0, [finish(code, row.stops)],
                           [[v.double() for v in row.logprobs[:n]]] if self.gp.logprobs else None,
                           [row.prompt_lp] if self.gp.prompt_logprobs else None,
                           [row.prompt_greedy] if self.gp.prompt_logprobs else None,
                           [row.prompt_argmax] if self.gp.prompt_logprobs else None)

    def _floats(self, head: dict) -> int:
        active = len(head["decode"]) + len(head["join"])
        n = active * self.gp.logprob_width
        if self.gp.prompt_logprobs and head["join"]:
            nxt = any(j.get("next") is not None for j in head["join"])
            n += len(head["join"]) * FIELDS * (max(len(j["ids"]) for j in head["join"]) - 1 + nxt)
        return n

    def _announce(self, head: dict) -> None:
        self.comm.send_bytes(json.dumps(head).encode(), f"announcing a {head['kind']} to the next stage")

    # -- the other stages -------------------------------------------------------------------------

    def serve(self) -> None:
        while True:
            payload = self.comm.recv_bytes("waiting for the first stage's next visit")
            self.comm.send_bytes(payload, "passing the visit header on")
            head = json.loads(payload)
            if head["kind"] in ("done", "abort"):
                self.comm.drain_sends()  # not in a `finally`: after a PeerFailure it would only wait longer
                if head["kind"] == "abort":
                    raise Aborted()
                return
            if head["kind"] != "visit" or not 0 <= head.get("slot", -1) < len(self.slots):
                raise PipelineProtocolError(f"pipeline protocol error: a {head['kind']!r} header where this rank's "
                                            f"schedule expects a visit of one of its {len(self.slots)} slots (a bug: "
                                            f"report it with every rank's log)")
            s = self.slots[head["slot"]]
            self._check_shape(s, head)
            self._reshape(s, head)
            self._check(s, head)
            self.chunked += [_Chunked(c["index"], c["n"]) for c in head["chunks"][len(self.chunked):]]
            whole = [j for j in head["join"] if not j.get("chunked")]
            R, J, H = s.size, len(whole), self.H
            if head["packed"]:  # (N, H): the rows' positions, each whole joiner's, each chunk's
                n = (R if head["decode"] else 0) + sum(len(j["ids"]) for j in whole + head["chunks"])
                frame, _ = self.comm.recv_hidden((n * H,), self.dtype,
                                                 f"waiting for slot {head['slot']}'s hidden states")
                self._visit_packed(s, head, frame.view(1, n, H))
                continue
            T = max((len(j["ids"]) for j in whole), default=0)
            sizes = [R * H if head["decode"] else 0, J * T * H] + [len(c["ids"]) * H for c in head["chunks"]]
            frame, _ = self.comm.recv_hidden((sum(sizes),), self.dtype,
                                             f"waiting for slot {head['slot']}'s hidden states")
            parts = list(frame.split(sizes))  # decode, whole joiners, then each chunk
            x_dec = parts[0].view(R, 1, H) if head["decode"] else None
            x_join = parts[1].view(J, T, H) if J else None
            x_chunks = [x.view(1, len(c["ids"]), H) for x, c in zip(parts[2:], head["chunks"])]
            self._visit(s, head, x_dec, x_join, x_chunks)

    def _check_shape(self, s: _Slot, head: dict) -> None:
        """Before the rows change: the slot's row count, the rows kept and moved, and the moved rows'
        positions and destination as this stage has them."""
        problems, n, keep, move = [], head["n"], head["keep"], head["move"]
        if n != s.size:
            problems.append(f"{n} rows (this stage has {s.size})")
        moved = move["rows"] if move else []
        if len(set(keep + moved)) < len(keep + moved) or not set(keep + moved) <= set(range(s.size)):
            problems.append(f"rows kept {keep} and moved {moved} (this stage has rows 0..{s.size - 1})")
        elif move:
            to = move["slot"]
            if to == head["slot"] or not 0 <= to < len(self.slots):
                problems.append(f"a move to slot {to}")
            elif move["n"] != self.slots[to].size or len(moved) > (self.slots[to].cap
                                                                  - (0 if move["clear"] else move["n"])):
                problems.append(f"{len(moved)} rows moved to slot {to} of {move['n']} rows (this stage's has "
                                f"{self.slots[to].size}, at most {self.slots[to].cap})")
            elif move["pos"] != [s.pos[r] for r in moved]:
                problems.append(f"moved rows' positions {move['pos']} (this stage has {[s.pos[r] for r in moved]})")
        self._protocol(head, problems)

    def _check(self, s: _Slot, head: dict) -> None:
        """After: the cache length, every row decoding at its position, the joiners after them, and
        the chunked prefills: every one under way, each from where it stopped, new ones from 0."""
        problems, rows = [], list(range(s.size))
        chunks, known = head["chunks"], self.chunked
        got = [(c["index"], c["start"], c["n"]) for c in chunks[:len(known)]]
        if len(chunks) < len(known) or got != [(c.index, c.done, c.n) for c in known] or any(
                c["start"] for c in chunks[len(known):]):
            problems.append(f"prefill chunks {[(c['index'], c['start']) for c in chunks]} (this stage's prompts under "
                            f"way, with the positions they have: {[(c.index, c.done) for c in known]})")
        elif sum(len(c["ids"]) for c in chunks) > self.chunk or any(
                c["start"] + len(c["ids"]) > c["n"] or not self._in_parts(c["n"]) for c in chunks):
            problems.append(f"prefill chunks of {[len(c['ids']) for c in chunks]} tokens of prompts of "
                            f"{[c['n'] for c in chunks]} (this stage's chunk is {self.chunk} a visit, "
                            f"{'every prompt' if self.spread else 'longer prompts'} in parts)")
        finals = [c["index"] for c in chunks if c["ids"] and c["start"] + len(c["ids"]) == c["n"]]
        chunked = [j["index"] for j in head["join"] if j.get("chunked")]
        if finals != chunked:
            problems.append(f"prompts joining from their last chunk {chunked} (their chunks say {finals})")
        if head["L"] != s.length:
            problems.append(f"cache length {head['L']} (this stage has {s.length})")
        if head["decode"] != rows:
            problems.append(f"decode rows {head['decode']} (this stage's rows are {rows})")
        elif head["pos"] != s.pos:
            problems.append(f"positions {head['pos']} (this stage has {s.pos})")
        joined = [j["row"] for j in head["join"]]
        packs = self._packs(head)
        if head["packed"] != packs:
            problems.append(f"a {'packed' if head['packed'] else 'separate'} prefill (this stage's would be "
                            f"{'packed' if packs else 'separate'})")
        if joined != list(range(s.size, s.size + len(joined))) or s.size + len(joined) > s.cap:
            problems.append(f"joining rows {joined} (this stage's slot has {s.size} rows, at most {s.cap})")
        self._protocol(head, problems)

    @staticmethod
    def _protocol(head: dict, problems: list[str]) -> None:
        if problems:
            raise PipelineProtocolError(f"slot {head['slot']}: pipeline protocol error: the first stage's header says "
                                        f"{'; '.join(problems)}: the ranks disagree on the schedule (a bug: report "
                                        f"it with every rank's log)")

    # -- one visit, on every stage ----------------------------------------------------------------

    @torch.inference_mode()  # the caches are inference tensors: edited in place here
    def _visit(self, s: _Slot, head: dict, x_dec, x_join, x_chunks):
        """Run a visit's decode, joins and prefill chunks on this stage; send the frame on, or sample
        (last stage). Returns the token message when this stage is also the first (None when the
        visit ran chunks only: no row has a token)."""
        stage, comm, gp = self.stage, self.comm, self.gp
        dev = comm.device
        mask = self._begin(s, head)
        outs, join_outs, dec_logits, join_logits, join_lp = [], [], None, None, None
        with comm.timeline.span("decode" if head["decode"] else "prefill"):
            if head["decode"]:
                pos = torch.tensor(s.pos, device=dev)[:, None]  # every row decodes: the slot holds live rows only
                out = stage(x_dec.to(dev), None if bool(mask.all()) else mask, pos, s.cache)  # (R, 1, H) | (R, V)
                self._decoded(s, head, mask)
                if comm.is_last:
                    dec_logits = out
                else:
                    outs.append(out.reshape(-1))
            whole = [j for j in head["join"] if not j.get("chunked")]
            if whole:
                lengths = [len(j["ids"]) for j in whole]
                T = max(lengths)
                jmask = torch.tensor([[0] * (T - n) + [1] * n for n in lengths], device=dev)  # (J, T)
                tmp = stage.new_cache(capacity=T)
                scoring = comm.is_last and gp.prompt_logprobs
                out = stage(x_join.to(dev), None if bool(jmask.all()) else jmask, position_ids(jmask), tmp,
                            all_positions=scoring)
                if scoring:
                    ids = _left_padded([j["ids"] for j in whole], self.pad, dev)
                    nxt = [j.get("next") for j in whole]
                    nxt = torch.tensor([t or 0 for t in nxt], device=dev) if any(t is not None for t in nxt) else None
                    out, join_lp = prompt_logprobs(stage.head, out, ids, gp.prompt_chunk, nxt)
                self._place(s, tmp, whole, lengths)
                self.rows_computed += len(whole) * T
                if comm.is_last:
                    join_outs.append(out)
                else:
                    outs.append(out.reshape(-1))
            finals = iter(j for j in head["join"] if j.get("chunked"))
            for c, x in zip(list(self.chunked), x_chunks):  # the same prompts, checked (_check)
                n = x.shape[1]
                if not n:  # the visit's chunk positions went to older prompts
                    continue
                if c.cache is None:
                    c.cache = stage.new_cache(capacity=c.n)
                out = stage(x.to(dev), None, torch.arange(c.done, c.done + n, device=dev)[None], c.cache)
                if not comm.is_last:
                    outs.append(out.reshape(-1))
                if self._chunk_ran(s, c, n, finals) and comm.is_last:  # its first token is sampled now
                    join_outs.append(out)
            if join_outs:
                join_logits = torch.cat(join_outs)  # (J, V) in head["join"]'s order
        return self._visited(s, head, outs, dec_logits, join_logits, join_lp)

    @torch.inference_mode()
    def _visit_packed(self, s: _Slot, head: dict, x: torch.Tensor):
        """_visit, with the rows' decode, the whole joiners' prefills and the chunks in one forward:
        x (1, N) token ids or (1, N, H) hidden states, in that order (load/packed.py)."""
        stage, comm = self.stage, self.comm
        dev = comm.device
        mask = self._begin(s, head)
        segments, pos, at = [], [], []  # at: the positions whose logits the last stage samples from
        R = s.size if head["decode"] else 0
        if head["decode"]:
            segments.append(Segment(s.cache, s.size, s.size, None if bool(mask.all()) else mask))
            pos += s.pos
            at += range(s.size)
        whole = [(j, Segment(stage.new_cache(capacity=len(j["ids"])), len(j["ids"])))
                 for j in head["join"] if not j.get("chunked")]  # each in a cache of its own, spliced in after
        for _, seg in whole:
            segments.append(seg)
            pos += range(seg.n)
            at.append(len(pos) - 1)
        chunked = [(c, len(ch["ids"])) for c, ch in zip(list(self.chunked), head["chunks"]) if ch["ids"]]
        for c, n in chunked:
            if c.cache is None:
                c.cache = stage.new_cache(capacity=c.n)
            segments.append(Segment(c.cache, n))
            pos += range(c.done, c.done + n)
            if c.done + n == c.n:
                at.append(len(pos) - 1)
        with comm.timeline.span("decode" if head["decode"] else "prefill"):
            out = packed_forward(stage, x.to(dev), torch.tensor(pos, device=dev)[None], segments,
                                 at if comm.is_last else None)
            self.packed_visits += 1
            if head["decode"]:
                self._decoded(s, head, mask)
            for j, seg in whole:
                self._place(s, seg.cache, [j], [seg.n])
                self.rows_computed += seg.n
            finals = iter(j for j in head["join"] if j.get("chunked"))
            for c, n in chunked:
                self._chunk_ran(s, c, n, finals)
        if not comm.is_last:
            return self._visited(s, head, [out.reshape(-1)], None, None, None)
        return self._visited(s, head, [], out[:R] if head["decode"] else None, out[R:] if head["join"] else None, None)

    def _begin(self, s: _Slot, head: dict) -> torch.Tensor | None:
        """A visit's first edit: drop the positions no row attends to; the decode step's (R, L + 1)
        mask, the new column masked in (None without decode rows)."""
        if head["drop"]:
            drop_left(s.cache, head["drop"])
            s.mask = s.mask[:, head["drop"]:]
        if not head["decode"]:
            return None
        return torch.cat([s.mask, torch.ones(s.size, 1, dtype=s.mask.dtype, device=s.mask.device)], dim=1)

    def _decoded(self, s: _Slot, head: dict, mask: torch.Tensor) -> None:
        """After the decode step: every row one position longer."""
        s.mask = mask
        for r in head["decode"]:
            s.pos[r] += 1
        self.rows_computed += s.size
        self.kv_positions_max = max(self.kv_positions_max, s.length)

    def _chunk_ran(self, s: _Slot, c: _Chunked, n: int, finals: Iterator[dict]) -> bool:
        """After a prompt's chunk of n positions; its last makes it a row like the joiners' (True),
        taking the next of the visit's join entries that say "chunked"."""
        c.done += n
        self.rows_computed += n
        self.chunks_run += 1
        if c.done < c.n:
            return False
        self.chunked.remove(c)
        self._place(s, c.cache, [next(finals)], [c.n])
        return True

    def _visited(self, s: _Slot, head: dict, outs: list, dec_logits, join_logits, join_lp):
        """After a visit's compute: send its frame on, or sample (last stage); the token message on the first stage."""
        comm = self.comm
        self.max_in_flight = max(self.max_in_flight, sum(r is not None for t in self.slots for r in t.rows)
                                 + len(self.chunked))
        if not comm.is_last:
            comm.send_hidden(torch.cat(outs), f"sending slot {head['slot']}'s hidden states")
            comm.timeline.step()
            return None
        if not head["decode"] and not head["join"]:  # chunks only: no row to sample
            comm.timeline.step()
            return None
        with comm.timeline.label("sample"):  # for bench/profile_step.py
            local = self._sample(s, head, dec_logits, join_logits, join_lp)
        comm.timeline.step()
        return local

    def _place(self, s: _Slot, tmp, joins: list[dict], lengths: list[int]) -> None:
        """Joiners' rows after the slot's: each takes the last lengths[j] positions of row j of `tmp`
        (their prefill's cache), right-aligned at the end of the slot's positions."""
        dev = self.comm.device
        if s.size:  # (an empty slot's cache is made by grow_left)
            add_rows(s.cache, len(joins))
        s.mask = torch.cat([s.mask, torch.zeros(len(joins), s.length, dtype=s.mask.dtype, device=dev)])
        s.pos += [0] * len(joins)
        s.rows += [None] * len(joins)
        s.tails += [None] * len(joins)
        s.firsts += [None] * (s.size - len(s.firsts))  # the first stage has its joiners' already
        T = max(lengths)
        if T > s.length:
            grow_left(s.cache, s.size, T - s.length, tmp)
            s.mask = torch.cat([torch.zeros(s.size, T - s.length, dtype=s.mask.dtype, device=dev), s.mask], 1)
        splice_rows(s.cache, tmp, [j["row"] for j in joins], lengths)
        for j, n in zip(joins, lengths):
            r = j["row"]
            s.mask[r] = 0
            s.mask[r, s.length - n:] = 1
            s.pos[r] = n
            s.rows[r] = j["index"]
            if self.comm.is_last:
                s.tails[r] = self._tail(j)
        self.kv_positions_max = max(self.kv_positions_max, s.length)

    def _tail(self, j: dict) -> _Row:
        """A joining row's sampling state on the last stage."""
        gp, dev = self.gp, self.comm.device
        limits = Limits(*j["limits"])
        (max_new,), params, (seed,) = row_settings([j["index"]], [limits], gp.max_new_tokens, gp.sampling, gp.seed)
        stops = Stops(*map(tuple, j["stops"]))
        row = _Row(j["index"], len(j["ids"]), max_new, stops if (stops.strings or stops.token_ids) else None,
                   params=params[0] if isinstance(params, list) else params,
                   gen=prompt_generator(*seed, dev) if gp.sampling.do_sample else None)
        ids = torch.tensor(j["ids"], device=dev)
        if gp.score_config is not None:
            row.processors = checkpoint_processors(self.stage.lm, gp.score_config, ids[None], torch.ones_like(ids)[None],
                                                   max_new, None if gp.ignore_eos else gp.eos_ids)
        if row.processors is not None or stops.strings:
            row.history = ids
        return row

    def _sample(self, s: _Slot, head: dict, dec_logits, join_logits, join_lp):
        gp, dev = self.gp, self.comm.device
        joined = {j["row"]: a for a, j in enumerate(head["join"])}
        active = sorted(head["decode"] + list(joined))
        out = dec_logits if not joined else torch.stack(  # (A, V)
            [join_logits[joined[r]] if r in joined else dec_logits[r] for r in active])
        rows = [s.tails[r] for r in active]
        check_finite(out, rows[0].new, [row.index for row in rows], self.dtype)
        if any(row.processors is not None for row in rows):
            out = torch.cat([row.processors(row.history[None], out[a:a + 1]) if row.processors is not None
                             else out[a:a + 1] for a, row in enumerate(rows)])
        params = [row.params for row in rows]
        tokens = sample(out, params, [row.gen for row in rows])  # (A,)
        logprobs = logprob_rows(out, tokens, gp, params) if gp.logprobs else None
        for a, row in enumerate(rows):
            row.new += 1
            if row.history is not None:
                row.history = torch.cat([row.history, tokens[a:a + 1]])
        if gp.stopper is not None:
            generated = [row.history[-row.new:] if row.history is not None else None for row in rows]
            codes = gp.stopper.codes(tokens, torch.zeros_like(tokens, dtype=torch.bool),
                                     [row.stops or Stops() for row in rows], generated)
        elif gp.ignore_eos:
            codes = torch.zeros_like(tokens)
        else:
            codes = torch.isin(tokens, self.eos).long()
        full_t = torch.full((s.size,), gp.pad_id, dtype=torch.long, device=dev)
        full_c = torch.zeros(s.size, dtype=torch.long, device=dev)
        idx = torch.tensor(active, device=dev)
        full_t[idx], full_c[idx] = tokens, codes
        floats = [f.reshape(-1) for f in (logprobs, join_lp) if f is not None]
        return self.comm.send_tokens(full_t, full_c, False, torch.cat(floats) if floats else None)


def _holes_filled(live: list[int]) -> list[int]:
    """The order that keeps `live` rows (ascending) in the first len(live) rows: a row in place
    stays, the free rows below len(live) take the live rows from past it (one row copy each)."""
    m = len(live)
    late = [r for r in live if r >= m]
    return [r if r in live else late.pop() for r in range(m)]


def _left_padded(rows: list[list[int]], pad: int, dev) -> torch.Tensor:
    T = max(len(r) for r in rows)
    return torch.tensor([[pad] * (T - len(r)) + list(r) for r in rows], dtype=torch.long, device=dev)  # (J, T)
