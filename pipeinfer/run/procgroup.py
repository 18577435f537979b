"""Joining and leaving the process group: the rendezvous, the stage-to-stage backend, the exit barrier.

    comm = procgroup.init(rank, world_size, device, timeout_s, master_port, timeline, "auto")
    ...                                   # comm.py: stage-to-stage messages and small collectives
    procgroup.shutdown(clean=True)

The process group is gloo: it carries the small collectives (broadcasts, the exit barrier) on
every device. Stage-to-stage messages between GPUs go over an NCCL group when every rank has a GPU
of its own; NCCL cannot pair two ranks on one GPU, so ranks that share one (or
comm_backend="gloo") send through gloo, staging each message in host memory.
"""

from __future__ import annotations

import datetime
import logging
import os
import socket
import sys

import torch
import torch.distributed as dist

from pipeinfer.run.comm import Comm, PeerFailure
from pipeinfer.config import ConfigError, first_line
from pipeinfer.record.timeline import Timeline

log = logging.getLogger(__name__)


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
        said = first_line(e)
        raise PeerFailure(f"could not join the {world_size} ranks at {where} ({said}): check that every rank started, "
                          f"with the same MASTER_ADDR and MASTER_PORT, that rank 0's host is reachable on that port, "
                          f"and that nothing else listens there (master_port){_loopback_hint()}") from None
    chosen = p2p_backend(backend, [tuple(p) for p in placements])  # the same on every rank
    if rank == 0:
        log.info("stage-to-stage messages over %s (comm_backend=%s; ranks on %s)", chosen, backend,
                 ", ".join(f"{host}:{'cpu' if i is None else f'cuda:{i}'}" for host, _, i in placements))
    if chosen == "nccl":
        return Comm(rank, world_size, device, timeout_s, timeline, wire=device, group=_nccl_group(timeout))
    return Comm(rank, world_size, device, timeout_s, timeline, wire=torch.device("cpu"))


# ProcessGroupNCCL reads these once, in its constructor: set before new_group(backend="nccl").
# Without blocking wait, WorkNCCL.wait(timeout) only makes the current CUDA stream wait for the
# transfer and returns at once, so a recv's wait measures nothing (recv_wait_s near 0) and the host
# then blocks with no bound in the first .item() on the received tensor; a dead or stuck peer ends
# the process only by the watchdog's SIGABRT, not with a PeerFailure. With blocking wait, wait()
# holds the calling thread until the work completes or `timeout` passes, then raises (a timeout
# error, which _wait turns into the one-line PeerFailure), and torch turns its asynchronous error
# handling (the watchdog tearing the process down) off. TORCH_NCCL_BLOCKING_WAIT is the current
# name; releases before the TORCH_ prefix read NCCL_BLOCKING_WAIT, which later ones still accept as
# a deprecated fallback. Both are set, so every torch that requirements.txt admits sees one.
NCCL_BLOCKING_WAIT = ("TORCH_NCCL_BLOCKING_WAIT", "NCCL_BLOCKING_WAIT")


def _nccl_group(timeout: datetime.timedelta):
    """The stage-to-stage NCCL group, in blocking-wait mode so that every wait is bounded by timeout_s."""
    for name in NCCL_BLOCKING_WAIT:
        os.environ[name] = "1"
    return dist.new_group(backend="nccl", timeout=timeout)


def _loopback_hint() -> str:
    """Where this host's name resolves to loopback (127.0.1.1 in Debian's /etc/hosts) and no
    interface is named, gloo binds there and ranks on other nodes cannot reach it."""
    if os.environ.get("GLOO_SOCKET_IFNAME"):
        return ""
    try:
        address = socket.gethostbyname(socket.gethostname())
    except OSError:
        return ""
    if not address.startswith("127."):
        return ""
    return (f"; this host's name {socket.gethostname()} resolves to {address}, where gloo then listens: with ranks "
            f"on several nodes set GLOO_SOCKET_IFNAME (and NCCL_SOCKET_IFNAME) to the interface that reaches "
            f"MASTER_ADDR (ip route get <MASTER_ADDR>)")


def shutdown(clean: bool = True) -> None:
    """Leave the process group. On a clean exit every rank first meets at a barrier: a rank that
    tears down while a peer still finishes its last collective can abort that peer (gloo)."""
    if dist.is_initialized():
        if clean:
            try:
                dist.barrier()
            except RuntimeError as e:  # everything is written by now; a peer that died at the very end
                log.warning("the exit barrier failed (%s): another rank ended early; this rank's work is complete",
                            first_line(e))
        dist.destroy_process_group()
