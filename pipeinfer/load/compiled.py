"""compile=true: the stage's decode step through torch.compile (inductor), attention and KV cache left eager.

What is compiled: in every decoder layer, each child module that holds weights and is neither
attention (a module with a `layer_idx`: it writes the KV cache) nor a bare nn.Linear (nothing to
fuse), so the norms and the MLP (Llama: input_layernorm, mlp, post_attention_layernorm; GPT-2:
ln_1, ln_2, mlp), plus the base model's final norm on the last stage. Why not the whole step:
the row schedule's cache length grows by one position per decode step and its rows are spliced
and compacted in Python (kvcache.py); a whole-model graph either retraces every step (about a
minute per trace of SmolLM2's 30 layers on one core here) or, traced with dynamic shapes, fails
inside inductor for bfloat16 on torch 2.13 ("Expected !size_bytes_is_heap_allocated_"). The
parts compiled here see the same shape at every decode step of a slot, (rows, 1, hidden), so each
traces once per row count a slot may hold (1 to its most rows: rows leave and join), and one trace
serves all layers (torch.compile inlines nn.Modules and passes the weights as inputs). Prefill
(more than one position) stays eager: its length changes with every join, and it is a small share
of a generation's steps.

compile="cudagraphs" (CUDA only; on a CPU stage it compiles without them and says so once):
inductor's "reduce-overhead" mode, which records each compiled part once per row count and replays
it as a CUDA graph, saving the launches of its kernels. A replay reuses its output buffer, so each
part's output is copied out before the next layer's replay of the same graph. Prepared for the GPU
check (bench/gpu_check.sh) but never yet run on a GPU: no GPU has been lent.

A compile that fails (an operator inductor cannot lower, a quantized layer) logs one line and the
stage runs eager from then on, never a failure: the compiled parts are pure functions of their
input, so the failed call is simply run again eagerly. The inductor cache lives in
TORCHINDUCTOR_CACHE_DIR (inductor's default: /tmp/torchinductor_<user>), where a rerun on the same
machine finds the compiled kernels; set it to a shared path on a cluster.
"""

from __future__ import annotations

import logging
import os
import time

import torch
from torch import nn

log = logging.getLogger(__name__)


def wanted(setting: bool | str, device: torch.device) -> bool:
    """compile="auto": on CUDA only, where fused kernels save launches; on CPU the measured gain
    (bench/peers.py, README) does not pay for the compile time of a short run."""
    if setting == "auto":
        return device.type == "cuda"
    return bool(setting)  # true, "cudagraphs"


def compiled_parts(stage: nn.Module, layers: nn.ModuleList) -> list[nn.Module]:
    """The modules compile=true compiles (see the module docstring)."""
    parts = []
    for layer in layers:
        for child in layer.children():
            attention = any(isinstance(getattr(m, "layer_idx", None), int) for m in child.modules())
            if attention or type(child) is nn.Linear or not any(True for _ in child.parameters()):
                continue
            parts.append(child)
    final = [getattr(stage.base, n, None) for n in ("norm", "ln_f", "final_layer_norm")]
    parts += [m for m in final if isinstance(m, nn.Module) and any(True for _ in m.parameters())]
    return parts


class Compiled:
    """The compiled decode parts of one stage and what their compilation cost."""

    def __init__(self, parts: list[nn.Module], graphs: bool = False):
        self.parts = parts
        self.graphs = graphs  # replayed as CUDA graphs (inductor's "reduce-overhead")
        self.failed: str | None = None
        self.compile_s = 0.0
        self.cache_dir = os.environ.get("TORCHINDUCTOR_CACHE_DIR") or _default_cache_dir()
        for part in parts:
            self._wrap(part)

    def _wrap(self, part: nn.Module) -> None:
        eager = part.forward
        fast = torch.compile(eager, dynamic=False, mode="reduce-overhead" if self.graphs else None)

        def forward(*args, **kwargs):
            x = args[0] if args else next(iter(kwargs.values()))
            if self.failed is not None or x.dim() != 3 or x.shape[1] != 1:
                return eager(*args, **kwargs)  # prefill, or compiling failed
            try:
                out = fast(*args, **kwargs)
                return _copied(out) if self.graphs else out  # the next replay overwrites a graph's output
            except Exception as e:  # noqa: BLE001 -- any compiler failure: eager, with its reason
                self.fail(e)
                return eager(*args, **kwargs)

        part.forward = forward

    def fail(self, e: BaseException) -> None:
        if self.failed is None:
            self.failed = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"
            log.warning("compile: torch.compile failed (%s): this stage runs eager", self.failed)

    def timed(self, fn):
        """Run fn (a warm-up decode step, which traces and compiles) and count its time as compile time."""
        t0 = time.perf_counter()
        out = fn()
        self.compile_s += time.perf_counter() - t0
        return out

    def record(self) -> dict:
        return {"parts": len(self.parts), "compile_s": round(self.compile_s, 3), "cache_dir": self.cache_dir,
                "eager_fallback": self.failed, "cudagraphs": self.graphs}


def _copied(out):
    """A CUDA-graph replay's output (a tensor, or a tuple of them) copied out of the graph's buffer."""
    if isinstance(out, torch.Tensor):
        return out.clone()
    return type(out)(_copied(v) for v in out) if isinstance(out, (tuple, list)) else out


def _default_cache_dir() -> str:
    try:
        from torch._inductor.runtime.cache_dir_utils import default_cache_dir
        return default_cache_dir()
    except Exception:  # noqa: BLE001 -- only for the record
        return "inductor default"


def compile_stage(stage: nn.Module, layers: nn.ModuleList, setting: bool | str, device: torch.device,
                  why_not: str | None = None, rows: int = 64) -> Compiled | None:
    """Compile the stage's decode parts when `setting` asks for it; None when it stays eager.
    why_not: a feature of this stage that compiling does not cover (offloaded or quantized layers).
    rows: the most rows a slot holds (the plan's largest slot)."""
    if not wanted(setting, device):
        return None
    if why_not:
        log.warning("compile: %s: this stage runs eager", why_not)
        return None
    # One trace per row count a slot can hold (1 .. its most rows: the rows schedule keeps only live
    # rows) and per part class; past the limit dynamo would silently run a new shape eager.
    conf = torch._dynamo.config
    name = "recompile_limit" if hasattr(conf, "recompile_limit") else "cache_size_limit"
    setattr(conf, name, max(getattr(conf, name), rows + 8))
    graphs = setting == "cudagraphs"
    if graphs and device.type != "cuda":
        log.warning('compile: "cudagraphs" needs a CUDA device: this %s stage compiles without CUDA graphs',
                    device.type)
        graphs = False
    return Compiled(compiled_parts(stage, layers), graphs)
