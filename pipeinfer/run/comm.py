"""Stage-to-stage communication over torch.distributed (gloo, and NCCL between GPUs).
Over 300 lines: the messages, their bounded waits and the error each wait raises are one protocol;
split, a message's send and its receive would live in different files.

Three messages travel; the receiver knows each one's shape from the schedule, or reads its length first:
  hidden frame  stage i -> i+1: (B, T, H) hidden states plus one trailing control element:
                CONTINUE (hidden states follow), STOP (the batch is finished) or ABORT (the run
                was asked to stop by SIGTERM/SIGUSR1: drop this batch and exit)
  token message last -> first: (B,) sampled token ids, (B,) stop codes, the stop flag and the
                length of the float message that follows (log-probabilities; 0: none follows),
                which the receiver checks against its own count (PipelineProtocolError)
  header        stage i -> i+1, over gloo: a length, then that many bytes (JSON): the work a slot
                takes or a visit's rows (engine/engine.py, run/rows.py), which every stage checks

The stop decision is made by the last stage (the only one that sees the tokens); it travels with
the token to the first stage, which sends a STOP frame down the pipe, so every stage ends the
batch at the same step and nobody waits for a message that will never come.

Sends are asynchronous: a stage hands its output to isend and goes on computing the next
micro-batch. A gloo send completes only once the peer has posted the matching recv, so a rank
must never block on its own send while the peer may be blocked on one of its own: that is a
deadlock as soon as two micro-batches are in flight. Sends are therefore only reaped when already
complete, and waited for at drain_sends(), when every frame has been received. The schedule bounds
what can be outstanding: a slot is visited again only once its previous visit's tokens are back,
so every send of that visit has been received; what a rank sends in one round of its slots (a
frame, a STOP frame and a header of two sends per slot, a round's header; tokens and their floats
from the last stage) is below max_pending (pending_bound(), set by either schedule), and past it
the oldest send has been received, and is reaped. Not only by is_completed(): a gloo send reports it
only once waited for, so every frame a rank sent stayed in memory until the end of the run.
Every wait is bounded by timeout_s. Over gloo a peer that died closes its connections and the
wait fails at once; a stuck peer (or, over NCCL, a dead one too) fails it after timeout_s. Either
way a PeerFailure names the peer and what this rank was doing.
With pipeline_size 1 there is no process group and the functions are pass-throughs.

Hidden states go over the stage-to-stage group, NCCL or gloo (`group`, `wire` below), which
procgroup.init() chose when the ranks joined; token messages always go over gloo (see send_tokens).
"""

from __future__ import annotations

import datetime
import logging
import math
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from pipeinfer.config import first_line
from pipeinfer.plan.partition import Rank
from pipeinfer.record.timeline import Timeline

CONTINUE, STOP, ABORT = 0, 1, 2
log = logging.getLogger(__name__)


class PeerFailure(RuntimeError):
    pass


class PipelineProtocolError(PeerFailure):
    """A message is not the length this rank's schedule expects: the ranks disagree on the schedule
    (a bug, not bad input). Raised before the message is read, so nothing wrong reaches a record; a
    PeerFailure, so the rank exits with one line and its peers' waits on it fail at once."""


class PostFailure(PeerFailure):
    """Posting a send or receive raised something other than a closed connection (NCCL could not
    make the pair's communicator, CUDA out of memory, ...): the message names what, not the peer."""


# What gloo says at a post once a peer's connection is gone ("Connection closed by peer [addr]:port",
# or the socket's own "Connection reset by peer" / "Broken pipe" in a read or write error).
_CLOSED = ("connection closed", "connection reset", "broken pipe")


@dataclass
class Comm(Rank):
    """This rank's end of the stage-to-stage messages (its rank facts from partition.Rank)."""
    device: torch.device
    timeout_s: float
    timeline: Timeline = field(default_factory=Timeline)
    wire: torch.device | None = None  # where messages travel from: `device` over NCCL, host memory over gloo
    group: object = None              # the stage-to-stage group (None: the default, gloo)
    bytes_sent: int = 0
    links_warmed_at: float | None = None  # wall clock when warm_up_links() finished
    _pending: deque = field(default_factory=deque)  # (work, tensor kept alive, what, peer)
    max_pending: int = 0  # sends outstanding at most, by the schedule (0: no bound); see the module docstring

    def __post_init__(self):
        if self.wire is None:
            self.wire = self.device

    @property
    def backend(self) -> str | None:
        """What carries stage-to-stage messages: "nccl", "gloo", or None with one stage."""
        return None if self.world_size == 1 else "nccl" if self.group is not None else "gloo"

    # -- hidden states, stage i -> i+1 -------------------------------------------------------

    def send_hidden(self, hidden: torch.Tensor, doing: str = "sending hidden states") -> None:
        self._send(_frame(hidden, CONTINUE), self.next, doing)

    def send_control(self, control: int, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        """STOP or ABORT for every later stage, in a frame of the shape they expect; no-op on the last."""
        if not self.is_last:
            self._send(_frame(torch.zeros(shape, dtype=dtype, device=self.wire), control), self.next,
                       "sending the end of the batch")

    def recv_hidden(self, shape: tuple[int, ...], dtype: torch.dtype, doing: str) -> tuple[torch.Tensor, int]:
        """(B, T, H) hidden states from the previous stage, and the frame's control value."""
        buf = torch.empty(math.prod(shape) + 1, dtype=dtype, device=self.wire)
        self._recv(buf, self.prev, doing)
        return buf[:-1].view(shape).to(self.device), int(buf[-1].item())

    # -- sampled tokens, last stage -> first -------------------------------------------------

    # Token messages always go over the default group, gloo, in host memory, even where hidden
    # states go over NCCL: NCCL runs a pair's sends and receives in one queue per rank, so with two
    # micro-batches in flight between two stages, rank 0's send of frame B and rank 1's send of
    # token A would each wait for a receive queued behind the other (a deadlock). Over gloo every
    # message is matched on its own; and the first stage needs the tokens on the host anyway.

    def send_tokens(self, tokens: torch.Tensor, codes: torch.Tensor, stop: bool,
                    floats: torch.Tensor | None = None) -> tuple | None:
        """From the last stage: (B,) tokens, (B,) stop codes (stops.py), the micro-batch's stop flag
        and the float count n in one int64 message; then, only when n > 0, the n floats (log-
        probabilities) as one float64 message. The receiver checks n against the length its schedule
        gives (GenParams.floats) before it reads on; an empty float message is never sent, as no recv
        is posted for it. Returns the messages when this rank is also the first."""
        n = 0 if floats is None else floats.numel()
        floats = floats if n else None
        msg = torch.cat([tokens.to(torch.int64), codes.to(torch.int64),
                         torch.tensor([int(stop), n], device=tokens.device)])  # (2B + 2,)
        if self.is_first:
            return msg, floats
        self._send(msg, 0, "sending sampled tokens", group=None)
        if floats is not None:  # float64 holds top-k ids exactly, beside the float32 values
            self._send(floats.to(torch.float64).reshape(-1), 0, "sending log-probabilities", group=None)
        return None

    def recv_tokens(self, batch: int, local: tuple | None, doing: str, n_floats: int = 0
                    ) -> tuple[torch.Tensor, torch.Tensor, bool, torch.Tensor | None]:
        """On the first stage: (B,) tokens, (B,) stop codes, the stop flag and, when n_floats > 0,
        the float64 message of that length, from the last stage (or `local`). PipelineProtocolError
        when the last stage says it sent another number of floats than n_floats."""
        if local is None:
            msg = torch.empty(2 * batch + 2, dtype=torch.int64)
            self._recv(msg, self.world_size - 1, doing, group=None)
            _check_floats(int(msg[-1].item()), n_floats, doing)
            floats = None
            if n_floats:
                floats = torch.empty(n_floats, dtype=torch.float64)
                self._recv(floats, self.world_size - 1, doing, group=None)
        else:
            msg, floats = local
            _check_floats(int(msg[-1].item()), n_floats, doing)
        return msg[:batch], msg[batch:2 * batch], bool(msg[-2].item()), floats

    # -- headers, stage i -> i+1: what a stage cannot know by itself (engine requests) --------

    def send_bytes(self, payload: bytes, doing: str) -> None:
        """A small header for the next stage (no-op on the last): its length, then its bytes, over gloo."""
        if not self.is_last:
            self._send(torch.tensor([len(payload)], dtype=torch.int64), self.next, doing, group=None)
            if payload:
                self._send(torch.frombuffer(bytearray(payload), dtype=torch.uint8), self.next, doing, group=None)

    def recv_bytes(self, doing: str) -> bytes:
        """The previous stage's send_bytes()."""
        n = torch.empty(1, dtype=torch.int64)
        self._recv(n, self.prev, doing, group=None)
        buf = torch.empty(int(n.item()), dtype=torch.uint8)
        if buf.numel():
            self._recv(buf, self.prev, doing, group=None)
        return buf.numpy().tobytes()

    # -- plumbing ----------------------------------------------------------------------------

    def _send(self, tensor: torch.Tensor, dst: int, doing: str, group=...) -> None:
        """isend to dst over `group` (default: the stage-to-stage group; None: the default gloo group,
        from host memory)."""
        group = self.group if group is ... else group
        wire = self.wire if group is self.group else torch.device("cpu")
        with self.timeline.span("send"):
            tensor = tensor.to(wire).contiguous()  # a GPU -> host copy waits for the tensor
            work = _post(dist.isend, tensor, dst, group, f"{doing} to rank {dst}")
            self._pending.append((work, tensor, f"{doing} to rank {dst}", dst))
            while self._pending and (self._pending[0][0].is_completed() or 0 < self.max_pending < len(self._pending)):
                self._wait_oldest()  # completed: returns at once, or raises the send's error
        self.bytes_sent += tensor.numel() * tensor.element_size()

    def _wait_oldest(self) -> None:
        # a bounded wait: a send to a dead or stuck peer fails instead of blocking forever
        work, _, doing, dst = self._pending.popleft()
        _wait(work, self.timeout_s, doing, dst)

    def drain_sends(self) -> None:
        """Wait for every outstanding send (end of a run, before teardown)."""
        with self.timeline.span("send"):
            while self._pending:
                self._wait_oldest()

    def _recv(self, buf: torch.Tensor, src: int, doing: str, group=...) -> None:
        with self.timeline.span("recv"):
            work = _post(dist.irecv, buf, src, self.group if group is ... else group, doing)
            _wait(work, self.timeout_s, doing, src)

    def warm_up_links(self, dtype: torch.dtype) -> None:
        """One small frame along the chain (0 -> 1 -> ... -> last), before the clock starts.

        NCCL creates a pair's communicator at that pair's first send/recv (seconds across nodes),
        which would otherwise land in the first micro-batch's TTFT and in wall_s. Gloo connected
        every pair when the group was made, so there this costs one round trip. Token messages go
        over gloo only (see send_tokens): they need no warming. Outside the timeline: not part of
        the run's recv/send totals. Bounded like every wait."""
        if self.world_size == 1:
            return
        buf = torch.zeros(1, dtype=dtype, device=self.wire)
        if not self.is_first:
            doing = "warming the link from the previous stage"
            _wait(_post(dist.irecv, buf, self.prev, self.group, doing), self.timeout_s, doing, self.prev)
        if not self.is_last:
            doing = "warming the link to the next stage"
            _wait(_post(dist.isend, buf, self.next, self.group, doing), self.timeout_s, doing, self.next)
        self.links_warmed_at = time.time()

    def broadcast(self, obj, doing: str = "receiving the list of prompts to run from rank 0"):
        """Rank 0's small picklable object, on every rank."""
        if self.world_size == 1:
            return obj
        box = [obj]
        with _collective(doing, self.timeout_s):
            dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_ok(self, ok: bool, doing: str = "agreeing that every rank passed its checks") -> bool:
        """True when every rank's ok is true: lets a rank's local failure stop everybody cleanly."""
        if self.world_size == 1:
            return ok
        flag = torch.tensor([0 if ok else 1], dtype=torch.int32)
        with _collective(doing, self.timeout_s):
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return flag.item() == 0

    def gather(self, obj, doing: str = "gathering every rank's stage record") -> list | None:
        """Collect a small picklable object from every rank onto rank 0 (None elsewhere)."""
        if self.world_size == 1:
            return [obj]
        out = [None] * self.world_size if self.rank == 0 else None
        with _collective(doing, self.timeout_s):
            dist.gather_object(obj, out, dst=0)
        return out


def pending_bound(slots: int) -> int:
    """Comm.max_pending for a schedule of `slots` slots: above the sends one round leaves outstanding
    (at most 4 per slot and 2 per round on any rank, see the module docstring), with room to spare;
    it only has to be finite to keep a rank's memory flat."""
    return 8 * slots + 8


@contextmanager
def _collective(doing: str, timeout_s: float):
    """A collective on the default group: its failure (a rank gone, or one that did not join within
    timeout_s) becomes a one-line PeerFailure instead of gloo's RuntimeError."""
    t0 = time.monotonic()
    try:
        yield
    except RuntimeError as e:
        waited = time.monotonic() - t0
        said = first_line(e)
        why = (f"a rank did not join within timeout_s={timeout_s:g}" if waited >= 0.9 * timeout_s
               else f"a rank is gone after {waited:.1f}s")
        raise PeerFailure(f"{doing}: {why} ({said}); see the other ranks' messages") from None


def _check_floats(sent: int, expected: int, doing: str) -> None:
    if sent != expected:
        raise PipelineProtocolError(f"{doing}: pipeline protocol error: the last stage sent {sent} log-probability "
                                    f"values, this rank's schedule expects {expected}: the ranks disagree on the "
                                    f"micro-batch's shape or on logprobs/prompt_logprobs (a bug: report it with "
                                    f"every rank's log)")


def _frame(hidden: torch.Tensor, control: float) -> torch.Tensor:
    return torch.cat([hidden.reshape(-1), hidden.new_tensor([control])])


def _post(op, tensor: torch.Tensor, peer: int, group, doing: str):
    """dist.isend / dist.irecv. gloo raises at the post itself, not only in the wait, once it has seen
    the peer's connection close: that too is a PeerFailure, never a traceback. Anything else raised
    there is a PostFailure that names it: the peer is not to blame for this rank's NCCL or memory."""
    try:
        return op(tensor, peer, group=group)
    except RuntimeError as e:
        if any(s in str(e).lower() for s in _CLOSED):
            raise PeerFailure(f"{doing}: rank {peer} is gone (connection closed: it exited, crashed or was killed; "
                              f"see its log)") from None
        raise PostFailure(f"{doing}: {type(e).__name__}: {first_line(e)}") from None


def _wait(work, timeout_s: float, doing: str, peer: int) -> None:
    t0 = time.monotonic()
    try:
        ok = work.wait(datetime.timedelta(seconds=timeout_s))
    except RuntimeError as e:
        waited = time.monotonic() - t0
        if waited < 0.9 * timeout_s and "timed out" not in str(e).lower():
            raise PeerFailure(f"{doing}: rank {peer} is gone after {waited:.1f}s (connection closed: it exited, "
                              f"crashed or was killed; see its log)") from None
        raise PeerFailure(f"{doing}: rank {peer} did not answer within timeout_s={timeout_s:g} "
                          f"(stuck, stopped or unreachable)") from None
    if ok is False:
        raise PeerFailure(f"{doing}: rank {peer} did not answer within timeout_s={timeout_s:g}")
