"""The records of a run, as dicts: built here, written by results.py on rank 0.

Records, in order: {"type": "run"} (resolved config and environment), one {"type": "prompt"} per
prompt, {"type": "stage"} per rank (timeline.py), and a closing {"type": "summary"}; results.py
writes them. Metric names follow vLLM's benchmarks: ttft_s, tpot_s (per output token after the
first), itl_s (inter-token latencies), latency_s (end to end), tokens_per_s.
"""

from __future__ import annotations

import math
import os
import platform
import resource
import socket
import sys

import torch

from pipeinfer.record.results import prompt_hash

ENV_PREFIXES = ("NCCL_", "GLOO_", "SLURM_", "CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS", "MASTER_ADDR", "MASTER_PORT",
                "TORCH_NCCL_")


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"


def peak_memory_bytes(device: torch.device) -> int:
    """The device's peak: the GPU allocator's on CUDA (since reset_peak_memory), else the process's RSS."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return cpu_peak_rss_bytes()


def cpu_peak_rss_bytes() -> int:
    """The process's peak resident set size, loading included: VmHWM, its own memory's high-water
    mark. Not ru_maxrss where /proc has it: Linux carries that over exec from the process that
    started this one, so a rank launched by a process holding 500 MiB reported at least 500 MiB."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def reset_peak_memory(device: torch.device) -> None:
    """Called after warm-up: the GPU peaks then count the measured run, not loading and warm-up."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def memory_record(device: torch.device) -> dict:
    """The stage record's memory fields, named by where they were measured.

    peak_memory_bytes is the device's peak as before (readers such as report.py use it). On CUDA
    the allocator's peaks since reset_peak_memory (allocated: tensors; reserved: what the caching
    allocator holds, which nvidia-smi counts) and the device's used memory (total - free, all
    processes and the CUDA context included), to check the plan against what nvidia-smi shows."""
    rec = {"peak_memory_bytes": peak_memory_bytes(device), "cpu_peak_rss_bytes": cpu_peak_rss_bytes()}
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        rec.update(gpu_peak_allocated_bytes=int(torch.cuda.max_memory_allocated(device)),
                   gpu_peak_reserved_bytes=int(torch.cuda.max_memory_reserved(device)),
                   gpu_used_bytes=int(total - free), gpu_total_bytes=int(total))
    return rec


def network_record() -> dict:
    """Which addresses this rank's sockets use between nodes (docs/slurm.md, Troubleshooting).

    gloo binds to GLOO_SOCKET_IFNAME's address when that is set; else to the address the hostname
    resolves to, whenever that address can be bound, even 127.0.1.1 (Debian's /etc/hosts entry
    for the machine's own name), which the other nodes then try to reach on their own loopback.
    NCCL picks its interface by NCCL_SOCKET_IFNAME, else by its own rules (ib* first, never lo).
    route_to_master: the source address the kernel uses toward MASTER_ADDR, i.e. the right one."""
    host = socket.gethostname()
    try:
        resolved = socket.gethostbyname(host)
    except OSError:
        resolved = None
    gloo_if = os.environ.get("GLOO_SOCKET_IFNAME") or None
    return {"hostname_address": resolved, "gloo_socket_ifname": gloo_if,
            "nccl_socket_ifname": os.environ.get("NCCL_SOCKET_IFNAME") or None,
            "gloo_address": _interface_address(gloo_if.split(",")[0]) if gloo_if else resolved,
            "route_to_master": _source_address(os.environ.get("MASTER_ADDR"))}


def _interface_address(name: str) -> str | None:
    """The IPv4 address of a network interface (Linux SIOCGIFADDR), or None."""
    import fcntl
    import struct

    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            packed = fcntl.ioctl(s.fileno(), 0x8915, struct.pack("256s", name[:15].encode()))
        return socket.inet_ntoa(packed[20:24])
    except OSError:
        return None


def _source_address(peer: str | None) -> str | None:
    """The local address the kernel routes from toward `peer` (a UDP connect sends nothing)."""
    if not peer:
        return None
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect((peer, 9))
            return s.getsockname()[0]
    except OSError:
        return None


def run_record(config: dict, world_size: int, layer_ranges: list[range], device: torch.device,
               dtype: torch.dtype, family: str, plan: dict | None = None) -> dict:
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
    if plan is not None:
        rec["plan"] = plan  # plan.Plan.record(): each rank's planned bytes, for the report beside measured peaks
    if device.type == "cuda":
        rec.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                   nccl=".".join(map(str, torch.cuda.nccl.version())))
    return rec


def prompt_record(index: int, prompt: str | list[dict], text: str, ids: list[int], prompt_tokens: int,
                  times: list[float], start_s: float = 0.0, rendered: str | None = None,
                  micro_batch: list[int] | None = None) -> dict:
    """times: seconds from the start of the prompt's micro-batch to the arrival of each new token
    at rank 0; start_s: when that micro-batch started, in seconds since generation began.
    prompt: as the input gave it (a string or chat messages); rendered: the text that was
    tokenized (the messages through the chat template), whose hash resume matches; default prompt.
    micro_batch: the prompt indices computed together with this one (see results.py on resuming)."""
    n = len(ids)
    latency = times[-1] if times else 0.0
    return {
        "type": "prompt",
        "prompt_index": index,
        "prompt": prompt,
        "prompt_sha256": prompt_hash(rendered if rendered is not None else prompt),
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
        "micro_batch": micro_batch if micro_batch is not None else [index],
    }


def logprob_entries(ids: list[int], rows: list, decode) -> list[dict]:
    """Per new token: its id, text and log-probability, and the top-k alternatives, from the
    (1 + 2k,) rows of generation.logprob_rows; decode(id) -> text. A token that sampling's filters
    ruled out has log-probability -inf, written as null (JSON has no infinity)."""
    def num(v: float) -> float | None:
        return float(v) if v != float("-inf") else None

    out = []
    for t, row in zip(ids, rows):
        row = [float(v) for v in row]
        k = (len(row) - 1) // 2
        top = [{"id": int(i), "text": decode(int(i)), "logprob": num(v)} for i, v in zip(row[1:1 + k], row[1 + k:])]
        out.append({"id": t, "text": decode(t), "logprob": num(row[0]), "top": top})
    return out


def summary_record(prompts: int, new_tokens: int, wall_s: float, total_prompts: int, interrupted: bool) -> dict:
    """This attempt's prompts and their new tokens; total_prompts counts those of earlier attempts in the file too."""
    return {
        "type": "summary",
        "prompts": prompts,
        "prompts_total": total_prompts,
        "interrupted": interrupted,
        "new_tokens": new_tokens,
        "wall_s": wall_s,
        "tokens_per_s": new_tokens / wall_s if wall_s > 0 else None,
    }


def batch_records(batch, result, prompts: list, tokenizer) -> list[dict]:
    """The prompt records of one finished micro-batch (rank 0): outputs, latencies, why each
    prompt ended, and its log-probabilities and prompt scores when the run asks for them.
    batch: prompts.Batch; result: generation.BatchResult; prompts: the run's prompts.Prompt list."""
    out = []
    for b, (i, ids, times, n) in enumerate(zip(batch.indices, result.output_ids, result.token_times,
                                               batch.prompt_tokens)):
        rec = prompt_record(i, prompts[i].given, tokenizer.decode(ids, skip_special_tokens=True), ids, n, times,
                            result.start_s, prompts[i].text, batch.indices)
        rec["settings"] = prompts[i].settings  # its .jsonl line's own (stop, ...), which resume compares
        rec["finish_reason"], rec["stop_reason"] = result.finish[b]
        if result.logprobs is not None:
            rec["logprobs"] = logprob_entries(ids, result.logprobs[b], lambda t: tokenizer.decode([t]))
        if result.prompt_logprobs is not None:
            rec.update(prompt_scores(result.prompt_logprobs[b], n))
        out.append(rec)
    return out


def stage_record(rank: int, layers: range, param_bytes: int, device: torch.device, wall_s: float, comm,
                 max_prompts_in_flight: int, offload: dict | None = None) -> dict:
    """One rank's {"type": "stage"} record: what it held, where its wall time went (the timeline's
    spans), what it sent, its memory and its network; comm: the rank's comm.Comm. offload: the
    streamer's record (offload.Streamer.record: placement, time waiting for weights, bytes moved)."""
    return {**({"offload": offload} if offload else {}), "type": "stage", "rank": rank,
            "hostname": socket.gethostname(), "device": device_name(device),
            "layers": [layers.start, layers.stop - 1], "param_bytes": param_bytes, "wall_s": wall_s,
            "bytes_sent": comm.bytes_sent, "comm_backend": comm.backend,
            "max_prompts_in_flight": max_prompts_in_flight, "links_warmed_at": comm.links_warmed_at,
            "network": network_record(), **memory_record(device), **comm.timeline.record()}


def prompt_scores(row: list[float], n: int) -> dict:
    """One prompt's record fields from its row of prompt_logprobs (padded length T - 1) and its n
    tokens: a value per prompt token (None for the first, which has no prefix), their sum and
    count, and the perplexity exp(-sum / count)."""
    values = [float(v) for v in row[len(row) - (n - 1):]] if n > 1 else []
    total = sum(values)
    return {"prompt_logprobs": [None, *values], "prompt_logprob_sum": total, "prompt_logprob_count": len(values),
            "perplexity": math.exp(-total / len(values)) if values else None}
