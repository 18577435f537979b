"""Structured results: one JSONL writer on rank 0, and the records it writes.

Records, in order: {"type": "run"} (resolved config and environment), one {"type": "prompt"} per
prompt, {"type": "stage"} per rank (timeline.py), and a closing {"type": "summary"}. Metric names
follow vLLM's benchmarks: ttft_s, tpot_s (per output token after the first), itl_s (inter-token
latencies), latency_s (end to end), tokens_per_s. The file is written as
<output_path>.partial and renamed when the run completes, so an interrupted run never leaves a
file that looks finished.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import socket
import sys

import torch

ENV_PREFIXES = ("NCCL_", "SLURM_", "CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS", "MASTER_ADDR", "MASTER_PORT")


class JsonlWriter:
    def __init__(self, path: str):
        self.path = path
        self.partial = path + ".partial"
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self._f = open(self.partial, "w", encoding="utf-8")

    def write(self, record: dict) -> None:
        """One complete line, on disk before the call returns."""
        self._f.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._f.flush()
        os.fsync(self._f.fileno())

    def commit(self) -> None:
        self._f.close()
        os.replace(self.partial, self.path)

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()


def check_writable(path: str) -> str | None:
    """None if output_path can be written, else a one-line reason with the fix."""
    parent = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(parent, exist_ok=True)
        probe = os.path.join(parent, f".pipeinfer-write-test-{os.getpid()}")
        with open(probe, "w"):
            pass
        os.remove(probe)
    except OSError as e:
        return f"output_path={path!r} is not writable ({e.strerror}): choose a writable directory with --set output_path=..."
    if os.path.isdir(path):
        return f"output_path={path!r} is a directory: give a file path such as {os.path.join(path, 'run.jsonl')!r}"
    return None


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def run_record(config: dict, world_size: int, layer_ranges: list[range], device: torch.device,
               dtype: torch.dtype, family: str) -> dict:
    import transformers

    env = {k: v for k, v in sorted(os.environ.items()) if k.startswith(ENV_PREFIXES)}
    rec = {
        "type": "run",
        "config": config,
        "world_size": world_size,
        "layers_per_rank": [[r.start, r.stop - 1] for r in layer_ranges],
        "family": family,
        "device": str(device),
        "dtype": str(dtype).removeprefix("torch."),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "hostname": socket.gethostname(),
        "argv": sys.argv,
        "env": env,
    }
    if device.type == "cuda":
        rec.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                   nccl=".".join(map(str, torch.cuda.nccl.version())))
    return rec


def prompt_record(index: int, prompt: str, text: str, ids: list[int], prompt_tokens: int,
                  times: list[float]) -> dict:
    """times: seconds from the batch's start to the arrival of each new token at rank 0."""
    n = len(ids)
    latency = times[-1] if times else 0.0
    return {
        "type": "prompt",
        "prompt_index": index,
        "prompt": prompt,
        "output_text": text,
        "output_ids": ids,
        "prompt_tokens": prompt_tokens,
        "new_tokens": n,
        "ttft_s": times[0] if times else None,
        "tpot_s": (latency - times[0]) / (n - 1) if n > 1 else None,
        "itl_s": [b - a for a, b in zip(times, times[1:])],
        "latency_s": latency,
        "tokens_per_s": n / latency if latency > 0 else None,
    }


def summary_record(prompts: list[dict], wall_s: float) -> dict:
    new_tokens = sum(p["new_tokens"] for p in prompts)
    return {
        "type": "summary",
        "prompts": len(prompts),
        "new_tokens": new_tokens,
        "wall_s": wall_s,
        "tokens_per_s": new_tokens / wall_s if wall_s > 0 else None,
    }
