"""Process-level setup shared by the entry script: logging, signals, device and dtype choice, the
model's config, and steady host memory."""

from __future__ import annotations

import logging
import os
import signal

import torch

from pipeinfer.config import ConfigError

# Exit status when SIGTERM or SIGUSR1 (Slurm's warning before the time limit) stopped the run
# early with its finished prompts saved: "try again later" (EX_TEMPFAIL), so a batch script requeues.
EXIT_REQUEUE = 75


class StopRequest:
    """Set by SIGTERM / SIGUSR1; polled by the first stage between steps."""

    def __init__(self):
        self.signal: str | None = None

    def install(self) -> "StopRequest":
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.signal = signal.Signals(signum).name
        logging.getLogger("pipeinfer").warning("%s received: stopping after the current step", self.signal)

    def __call__(self) -> bool:
        return self.signal is not None


def setup_logging(rank: int) -> None:
    logging.basicConfig(level=logging.INFO, format=f"[rank {rank}] %(levelname)s %(name)s: %(message)s")
    # Loading progress bars and accelerate's note about meta tensors are noise here: the meta
    # tensors are the other stages' weights, dropped on purpose.
    logging.getLogger("accelerate").setLevel(logging.ERROR)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def progress_bar(total: int, done: int, enabled: bool):
    """Prompts done and tokens/s on rank 0's stderr; silent when stderr is not a terminal."""
    import shutil

    from tqdm import tqdm

    # shutil falls back to 80 columns where a terminal reports a width of 0 (some ptys do)
    return tqdm(total=total, initial=done, unit="prompt", desc="generating", disable=None if enabled else True,
                ncols=shutil.get_terminal_size().columns)


def pick_device(name: str, local_rank: int) -> torch.device:
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise ConfigError("device=\"cuda\" but torch sees no GPU (in Apptainer, pass --nv): use device=\"cpu\" or \"auto\"")
    torch.cuda.set_device(local_rank % torch.cuda.device_count())
    return torch.device("cuda", local_rank % torch.cuda.device_count())


def native_bf16(device: torch.device) -> bool:
    """Whether this GPU computes in bfloat16 natively: compute capability 8.0 (Ampere) and later.

    Not torch.cuda.is_bf16_supported(): since torch 2.3 it defaults to including_emulation=True and
    answers True on a T4 (7.5) as soon as a bf16 tensor can be made there, where every bf16 matmul
    is then emulated (several times slower than float16). The capability is asked directly, the
    same way on every torch version requirements.txt admits. ROCm reports its own numbering
    (gfx9xx as 9.x): there torch's own answer without emulation is taken."""
    if torch.version.hip:
        try:
            return bool(torch.cuda.is_bf16_supported(including_emulation=False))
        except TypeError:  # a torch without the argument: its answer did not count emulation yet
            return bool(torch.cuda.is_bf16_supported())
    return torch.cuda.get_device_capability(device) >= (8, 0)


def resolve_dtype(name: str, device: torch.device, saved: str | None = None) -> torch.dtype:
    """"auto": on CUDA bf16 where the GPU computes it natively (native_bf16: compute capability 8.0
    and later), else float16 (T4-class cards, 7.5, and V100, 7.0); load_stage() warns when float16
    meets a checkpoint saved in bfloat16 (values beyond float16's range, 65504, overflow to inf).
    On CPU the checkpoint's own dtype when it is float32 or bfloat16, else float32."""
    if name != "auto":
        return getattr(torch, name)
    if device.type == "cuda":
        return torch.bfloat16 if native_bf16(device) else torch.float16
    return torch.bfloat16 if saved == "bfloat16" else torch.float32


MMAP_THRESHOLD_BYTES = 2**20


def steady_host_memory() -> None:
    """Serve every host allocation of 1 MiB or more by its own mmap, returned to the kernel when freed.

    glibc raises its mmap threshold each time such a block is freed (up to 32 MiB), after which
    prefill activations come from the heap, whose freed middle stays resident: measured on CPU
    (bench/memory.py --check-plan), a rank's peak RSS then overshoots its live bytes by 20-65%
    at batch 8 with long prompts, and no plan can predict it. With the threshold fixed, peaks are
    within 3-8% of the plan. Linux/glibc only; elsewhere a no-op."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        if libc is not None and hasattr(libc, "mallopt"):
            libc.mallopt(-3, MMAP_THRESHOLD_BYTES)  # M_MMAP_THRESHOLD; also turns the dynamic raise off
    except OSError:
        pass
