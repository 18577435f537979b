"""Stage-to-stage communication over torch.distributed (gloo, and NCCL between GPUs).

Two messages travel, both with shapes the receiver already knows from the schedule:
  hidden frame  stage i -> i+1: (B, T, H) hidden states plus one trailing control element:
                CONTINUE (hidden states follow), STOP (the batch is finished) or ABORT (the run
                was asked to stop by SIGTERM/SIGUSR1: drop this batch and exit)
  token message last -> first: (B,) sampled token ids plus one trailing stop flag

The stop decision is made by the last stage (the only one that sees the tokens); it travels with
the token to the first stage, which sends a STOP frame down the pipe, so every stage ends the
batch at the same step and nobody waits for a message that will never come.

Sends are asynchronous: a stage hands its output to isend and goes on computing the next
micro-batch. A gloo send completes only once the peer has posted the matching recv, so a rank
must never block on its own send while the peer may be blocked on one of its own: that is a
deadlock as soon as two micro-batches are in flight. Sends are therefore only reaped when already
complete, and waited for at drain_sends(), when every frame has been received. The schedule bounds
what can be outstanding (one frame or token message per micro-batch in flight).
Every wait is bounded by timeout_s. Over gloo a peer that died closes its connections and the
wait fails at once; a stuck peer (or, over NCCL, a dead one too) fails it after timeout_s. Either
way a PeerFailure names the peer and what this rank was doing.
With pipeline_size 1 there is no process group and the functions are pass-throughs.

Backends. The process group is gloo: it carries the small collectives (broadcasts, the exit
barrier) on every device. Stage-to-stage messages between GPUs go over an NCCL group when every
rank has a GPU of its own; NCCL cannot pair two ranks on one GPU, so ranks that share one (or
comm_backend="gloo") send through gloo, staging each message in host memory (`wire` below).
Token messages always go over gloo (see send_tokens): over NCCL, one direction per pair of ranks.
"""

from __future__ import annotations

import datetime
import logging
import math
import os
import socket
import sys
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from pipeinfer.config import ConfigError
from pipeinfer.timeline import Timeline

CONTINUE, STOP, ABORT = 0, 1, 2
log = logging.getLogger(__name__)


class PeerFailure(RuntimeError):
    pass


@dataclass
class Comm:
    rank: int
    world_size: int
    device: torch.device
    timeout_s: float
    timeline: Timeline = field(default_factory=Timeline)
    wire: torch.device | None = None  # where messages travel from: `device` over NCCL, host memory over gloo
    group: object = None              # the stage-to-stage group (None: the default, gloo)
    bytes_sent: int = 0
    _pending: deque = field(default_factory=deque)  # (work, tensor kept alive, what, peer)

    def __post_init__(self):
        if self.wire is None:
            self.wire = self.device

    @property
    def backend(self) -> str | None:
        """What carries stage-to-stage messages: "nccl", "gloo", or None with one stage."""
        return None if self.world_size == 1 else "nccl" if self.group is not None else "gloo"

    @property
    def is_first(self) -> bool:
        return self.rank == 0

    @property
    def is_last(self) -> bool:
        return self.rank == self.world_size - 1

    @property
    def prev(self) -> int | None:
        return None if self.is_first else self.rank - 1

    @property
    def next(self) -> int | None:
        return None if self.is_last else self.rank + 1

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

    def send_tokens(self, tokens: torch.Tensor, stop: bool) -> torch.Tensor | None:
        """From the last stage. Returns the message itself when this rank is also the first."""
        msg = torch.cat([tokens.to(torch.int64), torch.tensor([int(stop)], device=tokens.device)])
        if self.is_first:
            return msg
        self._send(msg, 0, "sending sampled tokens", group=None)
        return None

    def recv_tokens(self, batch: int, local: torch.Tensor | None, doing: str) -> tuple[torch.Tensor, bool]:
        """On the first stage: (B,) tokens and the stop flag, from the last stage (or `local`)."""
        if local is None:
            local = torch.empty(batch + 1, dtype=torch.int64)
            self._recv(local, self.world_size - 1, doing, group=None)
        return local[:-1], bool(local[-1].item())

    # -- plumbing ----------------------------------------------------------------------------

    def _send(self, tensor: torch.Tensor, dst: int, doing: str, group=...) -> None:
        """isend to dst over `group` (default: the stage-to-stage group; None: the default gloo group,
        from host memory)."""
        group = self.group if group is ... else group
        wire = self.wire if group is self.group else torch.device("cpu")
        with self.timeline.span("send"):
            tensor = tensor.to(wire).contiguous()  # a GPU -> host copy waits for the tensor
            self._pending.append((dist.isend(tensor, dst, group=group), tensor, f"{doing} to rank {dst}", dst))
            while self._pending and self._pending[0][0].is_completed():
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
            _wait(dist.irecv(buf, src, group=self.group if group is ... else group), self.timeout_s, doing, src)

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


@contextmanager
def _collective(doing: str, timeout_s: float):
    """A collective on the default group: its failure (a rank gone, or one that did not join within
    timeout_s) becomes a one-line PeerFailure instead of gloo's RuntimeError."""
    t0 = time.monotonic()
    try:
        yield
    except RuntimeError as e:
        waited = time.monotonic() - t0
        said = _first_line(e)
        why = (f"a rank did not join within timeout_s={timeout_s:g}" if waited >= 0.9 * timeout_s
               else f"a rank is gone after {waited:.1f}s")
        raise PeerFailure(f"{doing}: {why} ({said}); see the other ranks' messages") from None


def _first_line(e: Exception) -> str:
    """The first non-empty line of a torch.distributed error (the rest is often a C++ stack)."""
    return next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)[:200]


def _frame(hidden: torch.Tensor, control: float) -> torch.Tensor:
    return torch.cat([hidden.reshape(-1), hidden.new_tensor([control])])


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


def p2p_backend(choice: str, placements: list[tuple[str, str | None, int | None]]) -> str:
    """The backend for stage-to-stage messages, from each rank's (hostname, GPU UUID or None on
    CPU, CUDA index or None). GPUs are told apart by UUID: under per-task GPU isolation two ranks
    of one node both see their own GPU as cuda:0.

    "auto" is NCCL when every rank has a GPU and no two share one, else gloo. An explicit "nccl"
    with a CPU rank, or with two ranks on one GPU, is refused: NCCL would fail or hang."""
    gpus = [(host, uuid) for host, uuid, _ in placements]
    on_gpu = all(uuid is not None for _, uuid in gpus)
    shared = on_gpu and len(set(gpus)) < len(gpus)
    if choice == "nccl" and not on_gpu:
        cpu = [r for r, (_, uuid) in enumerate(gpus) if uuid is None]
        raise ConfigError(f'comm_backend="nccl" but rank(s) {cpu} run on CPU: NCCL moves GPU tensors only; '
                          f'use comm_backend="auto" or "gloo"')
    if choice == "nccl" and shared:
        first = next(p for p in gpus if gpus.count(p) > 1)
        ranks = [r for r, p in enumerate(gpus) if p == first]
        raise ConfigError(f'comm_backend="nccl" but ranks {ranks} share one GPU (cuda:{placements[ranks[0]][2]}) on '
                          f'{first[0]}: NCCL cannot pair two ranks on one GPU; use comm_backend="auto" (gloo through '
                          f'host memory) or give each rank its own GPU')
    if choice == "auto":
        return "nccl" if on_gpu and not shared else "gloo"
    return choice


def _placement(device: torch.device) -> tuple[str, str | None, int | None]:
    if device.type != "cuda":
        return socket.gethostname(), None, None
    props = torch.cuda.get_device_properties(device)
    return socket.gethostname(), str(getattr(props, "uuid", device.index)), device.index


class _native_stderr_held:
    """Holds what C++ code writes to stderr (fd 2) in a temporary file while the block runs.

    release() writes it out, as if it had never been held (the rendezvous succeeded: torch's
    retry warnings stay visible). Without release() it is dropped: a failed rendezvous makes
    torch's c10d log each attempt with its C++ stack, dozens of lines that the one-line
    PeerFailure replaces (it quotes their first line). Where stderr cannot be held (closed, or
    no temporary file can be made) nothing is held, and nothing changes."""

    def __enter__(self) -> "_native_stderr_held":
        import tempfile

        self._saved = self._file = None
        self._released = False
        try:
            if sys.stderr is not None:
                sys.stderr.flush()
            self._file = tempfile.TemporaryFile()
            self._saved = os.dup(2)
            os.dup2(self._file.fileno(), 2)
        except (OSError, ValueError):  # fd 2 closed, no room for a temporary file: hold nothing
            if self._saved is not None:
                os.close(self._saved)
            if self._file is not None:
                self._file.close()
            self._saved = self._file = None
        return self

    def release(self) -> None:
        self._released = True

    def __exit__(self, *exc) -> None:
        if self._saved is None:
            return
        try:
            if sys.stderr is not None:
                sys.stderr.flush()
            os.dup2(self._saved, 2)
            if self._released:
                self._file.seek(0)
                held = memoryview(self._file.read())
                while held:
                    held = held[os.write(2, held):]
        except (OSError, ValueError):
            pass  # stderr went away (a closed pipe): there is no one to show it to
        finally:
            os.close(self._saved)
            self._file.close()


def init(rank: int, world_size: int, device: torch.device, timeout_s: float, master_port: int,
         timeline: Timeline | None = None, backend: str = "auto") -> Comm:
    """Join the process group (skipped when world_size is 1). MASTER_ADDR/PORT come from the
    environment as torchrun and submit.sbatch set them; defaults suit ranks on one machine.
    Raises ConfigError (on every rank alike) when `backend` cannot serve this placement."""
    timeline = timeline or Timeline(device)
    if world_size == 1:
        return Comm(rank, world_size, device, timeout_s, timeline)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(master_port))
    timeout = datetime.timedelta(seconds=timeout_s)
    placements: list = [None] * world_size
    here = _placement(device)
    try:
        with _native_stderr_held() as held:
            dist.init_process_group("gloo", rank=rank, world_size=world_size, timeout=timeout)
            dist.all_gather_object(placements, here)
            held.release()
    except RuntimeError as e:  # torch's DistNetworkError / DistStoreError / gloo errors; the text ends in C++ frames
        where = f"{os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}"
        said = _first_line(e)
        raise PeerFailure(f"could not join the {world_size} ranks at {where} ({said}): check that every rank started, "
                          f"with the same MASTER_ADDR and MASTER_PORT, that rank 0's host is reachable on that port, "
                          f"and that nothing else listens there (master_port)") from None
    chosen = p2p_backend(backend, [tuple(p) for p in placements])  # the same on every rank
    if rank == 0:
        log.info("stage-to-stage messages over %s (comm_backend=%s; ranks on %s)", chosen, backend,
                 ", ".join(f"{host}:{'cpu' if i is None else f'cuda:{i}'}" for host, _, i in placements))
    if chosen == "nccl":
        return Comm(rank, world_size, device, timeout_s, timeline, wire=device,
                    group=dist.new_group(backend="nccl", timeout=timeout))
    return Comm(rank, world_size, device, timeout_s, timeline, wire=torch.device("cpu"))


def shutdown(clean: bool = True) -> None:
    """Leave the process group. On a clean exit every rank first meets at a barrier: a rank that
    tears down while a peer still finishes its last collective can abort that peer (gloo)."""
    if dist.is_initialized():
        if clean:
            try:
                dist.barrier()
            except RuntimeError as e:  # everything is written by now; a peer that died at the very end
                log.warning("the exit barrier failed (%s): another rank ended early; this rank's work is complete",
                            _first_line(e))
        dist.destroy_process_group()
