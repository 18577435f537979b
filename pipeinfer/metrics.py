"""The records of a run, as dicts: built here, written by results.py on rank 0.

Records, in order: {"type": "run"} (resolved config and environment), one {"type": "prompt"} per
prompt, {"type": "stage"} per rank (timeline.py), and a closing {"type": "summary"}; results.py
writes them. Metric names follow vLLM's benchmarks: ttft_s, tpot_s (per output token after the
first), itl_s (inter-token latencies), latency_s (end to end), tokens_per_s.
"""

from __future__ import annotations

import os
import platform
import resource
import socket
import sys

import torch

from pipeinfer.results import prompt_hash

ENV_PREFIXES = ("NCCL_", "SLURM_", "CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS", "MASTER_ADDR", "MASTER_PORT")


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"


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
                  times: list[float], start_s: float = 0.0) -> dict:
    """times: seconds from the start of the prompt's micro-batch to the arrival of each new token
    at rank 0; start_s: when that micro-batch started, in seconds since generation began."""
    n = len(ids)
    latency = times[-1] if times else 0.0
    return {
        "type": "prompt",
        "prompt_index": index,
        "prompt": prompt,
        "prompt_sha256": prompt_hash(prompt),
        "output_text": text,
        "output_ids": ids,
        "prompt_tokens": prompt_tokens,
        "new_tokens": n,
        "ttft_s": times[0] if times else None,
        "tpot_s": (latency - times[0]) / (n - 1) if n > 1 else None,
        "itl_s": [b - a for a, b in zip(times, times[1:])],
        "latency_s": latency,
        "tokens_per_s": n / latency if latency > 0 else None,
        "start_s": start_s,
    }


def summary_record(prompts: list[dict], wall_s: float, total_prompts: int, interrupted: bool) -> dict:
    """This attempt's prompts; total_prompts counts those of earlier attempts in the file too."""
    new_tokens = sum(p["new_tokens"] for p in prompts)
    return {
        "type": "summary",
        "prompts": len(prompts),
        "prompts_total": total_prompts,
        "interrupted": interrupted,
        "new_tokens": new_tokens,
        "wall_s": wall_s,
        "tokens_per_s": new_tokens / wall_s if wall_s > 0 else None,
    }
