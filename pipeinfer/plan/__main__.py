"""The dry run: what each rank will hold, printed before a job is submitted.

    python -m pipeinfer.plan exp_config.json [--device-memory 16GiB] [--set KEY=VALUE] [--json]

Reads config.json and the safetensors headers only (never a weight), so it runs on a login node
in seconds even for a checkpoint larger than the machine's memory. Exit 0: every rank fits;
1: a rank does not fit (the table shows which); 2: bad input.
"""

from __future__ import annotations

import dataclasses
import json

from pipeinfer.config import ConfigError, ExpConfig, micro_batching, parse_bytes, per_rank
from pipeinfer.plan.checkpoint import read_headers
from pipeinfer.plan.fit import largest_batch, smallest_pipeline
from pipeinfer.plan.layout import CUDA_CONTEXT_BYTES
from pipeinfer.plan.make import make_plan
from pipeinfer.plan.model import model_shape


def dry_run(cfg: ExpConfig, device_memory: int | None = None, device_type: str | None = None,
            prompt_tokens: int | None = None) -> dict:
    """Everything the dry run reports, as one JSON-ready dict; headers only, no weights.

    The budget per rank: device_memory for every rank, else max_memory, else none (nothing can fail).
    The device: device_type, else cfg.device ("auto": cuda, the target the budget usually describes).
    The longest prompt: prompt_tokens, else max_prompt_tokens, else the configured prompts through the
    checkpoint's tokenizer, else (none) the model's positions less max_new_tokens (inputs.prompt_room).
    """
    from pipeinfer.plan.model import read_model_config

    model_config = read_model_config(cfg.model_path, cfg.trust_remote_code)
    device_type = device_type or (cfg.device if cfg.device != "auto" else "cuda")
    if cfg.dtype != "auto":
        dtype = cfg.dtype
    elif device_type == "cuda":
        dtype = "bfloat16"  # what "auto" gives on a GPU with bf16 (compute capability 8.0+); set dtype for older
    else:
        from pipeinfer.plan.model import saved_dtype
        dtype = "bfloat16" if saved_dtype(model_config) == "bfloat16" else "float32"
    if prompt_tokens is None:
        from pipeinfer.run.inputs import prompt_room
        from pipeinfer.run.prompts import check_lengths, load_prompts, load_tokenizer, prepare
        specs = load_prompts(cfg)
        prompts = prepare(load_tokenizer(cfg.model_path, cfg.trust_remote_code), specs, cfg) if specs else []
        max_positions = getattr(model_config, "max_position_embeddings", None)
        prompt_tokens = prompt_room(cfg, check_lengths(prompts, max_positions, cfg.max_new_tokens), max_positions)
    budgets = None
    if device_memory is not None:
        budgets = [device_memory] * cfg.pipeline_size
        cfg = dataclasses.replace(cfg, max_memory=None)
    elif cfg.max_memory is not None:
        budgets = per_rank(cfg.max_memory, cfg.pipeline_size)
    tensors = read_headers(cfg.model_path, cfg.allow_pickle)
    m = model_shape(model_config, cfg.trust_remote_code)
    out = {"model_path": cfg.model_path, "pipeline_size": cfg.pipeline_size, "batch_size": cfg.batch_size,
           "max_new_tokens": cfg.max_new_tokens, "budgets": budgets, "offload": cfg.max_cpu_memory is not None}
    try:
        plan = make_plan(cfg, model_config, tensors, prompt_tokens, dtype, device_type, budgets, model=m)
        out.update(plan.record(), fits=True)
    except ConfigError as e:
        if budgets is None or "cannot hold" not in str(e):
            raise
        # the same numbers without the budget check, to show which rank is over and by how much
        plan = make_plan(dataclasses.replace(cfg, max_memory=None, max_cpu_memory=None), model_config, tensors,
                         prompt_tokens, dtype, device_type, None, model=m)
        rec = plan.record()
        for r, b in zip(rec["ranks"], budgets):
            r["budget"], r["fits"] = b, r["total"] <= b
        out.update(rec, fits=False, error=str(e))
    if budgets is not None:
        reserve = CUDA_CONTEXT_BYTES if device_type == "cuda" else 0
        local = "cpu" if device_type == "cpu" else device_type
        out["largest_batch_size"] = largest_batch(cfg, m, plan.sizes, prompt_tokens, budgets, reserve, local)
        out["smallest_pipeline_size"] = smallest_pipeline(cfg, m, plan.sizes, micro_batching(cfg), prompt_tokens,
                                                          prompt_tokens + cfg.max_new_tokens, min(budgets), reserve,
                                                          local)
    return out


def _spans(layers: list[int]) -> str:
    return f"layers {layers[0]}..{layers[-1]}" if len(layers) > 1 else f"layer {layers[0]}"


def format_table(out: dict) -> str:
    mib = 2**20
    lines = [f"{out['model_path']} ({out['family']}): pipeline_size={out['pipeline_size']}, "
             f"batch_size={out['batch_size']} in slots {out['slots']}, longest prompt {out['longest_prompt']} + "
             f"max_new_tokens {out['max_new_tokens']} tokens, {out['dtype']} on {out['device_type']}"
             + (f", weights quantized {out['quantization']['method']} ({out['quantization']['source']})"
                if out.get("quantization") else ""),
             "| rank | layers | weights MiB | KV cache MiB | transient MiB | reserve MiB | total MiB | budget MiB "
             "| fits |", "|---|---|---|---|---|---|---|---|---|"]
    for r in out["ranks"]:
        budget = "-" if r["budget"] is None else f"{r['budget'] / mib:.0f}"
        fits = "-" if r["budget"] is None else ("yes" if r["fits"] else "NO")
        lines.append(f"| {r['rank']} | {r['layers'][0]}..{r['layers'][1]} | {r['weights'] / mib:.1f} | "
                     f"{r['kv_cache'] / mib:.1f} | {r['transient'] / mib:.1f} | {r['reserve'] / mib:.0f} | "
                     f"{r['total'] / mib:.1f} | {budget} | {fits} |")
    for r in out["ranks"]:
        if "offload" in r:
            o = r["offload"]
            lines.append(f"rank {r['rank']} offloads: " + ", ".join(
                f"{tier} {_spans(o[tier]['layers'])} ({o[tier]['bytes'] / mib:.1f} MiB)"
                for tier in ("device", "host", "disk") if o[tier]["layers"])
                + f"; stream buffers {o['stream_buffers'] / mib:.1f} MiB (counted in total)"
                + (f", pinned staging {o['staging'] / mib:.1f} MiB" if o["staging"] else "")
                + (f", dtype-conversion buffer {o['scratch'] / mib:.1f} MiB (host)" if o.get("scratch") else ""))
    for r in out["ranks"]:
        if r.get("scoring"):  # the last stage with prompt_logprobs
            lines.append(f"rank {r['rank']} scores the prompts (prompt_logprobs): {r['scoring'] / mib:.1f} MiB at its "
                         f"peak, a chunk of float32 logits and their log-softmax; its transient is the larger of "
                         f"this and the layers' activations, + the last position's logits")
    if out["budgets"] is None:
        lines.append("no budget: pass --device-memory 16GiB (or set max_memory) to check the fit")
    else:
        resident = " with every layer resident" if out.get("offload") else ""  # the search does not offload
        lines.append(f"largest batch_size that fits{resident} at pipeline_size={out['pipeline_size']}: "
                     f"{out['largest_batch_size'] or 'none'}")
        lines.append(f"smallest pipeline_size that fits{resident} at batch_size={out['batch_size']}: "
                     f"{out['smallest_pipeline_size'] or 'none (more ranks than layers would be needed)'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    import argparse
    import sys

    from pipeinfer.config import load_config

    ap = argparse.ArgumentParser(description="Dry run: what each rank will hold, from config.json and the "
                                             "safetensors headers only (no weights are read).")
    ap.add_argument("config")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--device-memory", metavar="BYTES", help='budget per rank, e.g. "16GiB" (default: max_memory)')
    ap.add_argument("--device", choices=("cpu", "cuda"), help="the target device (default: the config's; auto: cuda)")
    ap.add_argument("--prompt-tokens", type=int, metavar="N", help="plan for prompts of N tokens (default: the "
                                                                  "longest configured prompt, tokenized)")
    ap.add_argument("--json", action="store_true", help="print the plan as JSON")
    args = ap.parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
        memory = None
        if args.device_memory is not None:
            try:
                memory = parse_bytes(args.device_memory)
            except ValueError as e:
                raise ConfigError(f"--device-memory {args.device_memory!r}: {e}; write e.g. 16GiB") from None
        out = dry_run(cfg, memory, args.device, args.prompt_tokens)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(out, indent=2) if args.json else format_table(out))
    if not out["fits"]:
        print(f"error: {out['error']}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
