"""The plan of a run, known before any rank waits on another, and a dry run that prints it.

    python -m pipeinfer.plan exp_config.json [--device-memory 16GiB] [--set KEY=VALUE] [--json]   # dryrun.py

make_plan() is pure: from the config, the model's config and the checkpoint's safetensors headers
(names, dtypes, shapes; never tensor data) it returns each rank's layer range, parameter bytes in
the run's dtype, KV-cache bytes, largest transient, runtime reserve and device_map. Every split and
budget rule is checked here and only here, raising ConfigError (one line, with the numbers and the
smallest budget or pipeline size that works) on every rank alike, before the process group exists.
Loading (stage.load_stage) takes the plan and only loads.

What each number counts (bytes, in the run's dtype):
  weights    the parameters the loaded stage holds: its layers, the embeddings on the first stage,
             the final norm and lm_head on the last (a tied lm_head is the embedding: once per stage);
             a quantized weight (quantization.py) counts its 8- or 4-bit values and their scales
  kv_cache   what kvcache.PreallocatedLayer allocates: keys + values, num_key_value_heads x head_dim,
             for every prompt in flight (the micro-batch slots) at capacity longest prompt +
             max_new_tokens (generation.py sizes each slot's cache so), per layer of the stage
  transient  the prefill of the largest micro-batch: (B, T) x (4 hidden + 3 intermediate) activations
             live at once in a decoder layer, plus the (B, T, T) mask; on the last stage also the
             (B, V) logits in the run's dtype and in float32, and with prompt_logprobs the larger of
             the layers' and scoring's (scoring.py, after the layers: the (B, T, H) final hidden
             states, the (B, T - 1) float64 log-probabilities and one chunk's (B, c, V) float32 logits
             with their log-softmax, c = min(prompt_logprobs_chunk, T - 1); RankPlan.scoring); with the
             rows schedule also the joining prompts' own KV cache, kept beside their slot's until their
             prefill is spliced in: B x T positions per layer, or every slot's rows x T when prompts
             longer than prefill_chunk_size can prefill in chunks, or prefills spread over several
             slots' visits (spread_prefill; layout.joiner_positions)
  reserve    what the runtime holds before any weight: on CUDA the context (CUDA_CONTEXT_BYTES, a
             stated constant); on CPU 0, since the runtime baseline is measured apart (bench/memory.py;
             --check-runner: a real rank's peak is this plan plus that runtime, within 3%)
  stream     offload only: the device buffers streamed layers arrive in (two of the largest, so that
             the next layer's weights move while one computes; one when a single layer streams)
  scratch    offload only, in max_cpu_memory: the host buffer a streamed tensor stored in another
             dtype is read into before conversion (the largest such tensor; 0 when none is)

Offload (max_cpu_memory set; offload.offload_ranks): a stage that does not fit max_memory keeps its
first layers resident, as many as fit beside everything else and the stream buffers; the layers
after them stream in (offload.Streamer), from pinned host memory up to max_cpu_memory, the rest
read in place from the checkpoint on disk. Embeddings, final norm and head stay resident.
`weights` then counts what is resident only; each layer's bytes and placement are in
RankPlan.layer_bytes and .placement.
"""

from __future__ import annotations

from pipeinfer.config import ConfigError, ExpConfig, check_model, human_bytes, micro_batching, per_rank
from pipeinfer.plan.checkpoint import Tensor, check_checkpoint, checkpoint_keys, read_headers
from pipeinfer.plan.fit import largest_batch, smallest_pipeline
from pipeinfer.plan.layout import (CUDA_CONTEXT_BYTES, ITEMSIZE, Plan, Sizes, layout, prefill_joins, score_chunk,
                                   spread_joins)
from pipeinfer.plan.model import ModelShape, model_shape
from pipeinfer.plan.offload import offload_ranks
from pipeinfer.plan.partition import check_complete
from pipeinfer.plan.quantization import Quantization, resolve, select, stats_keys


def make_plan(cfg: ExpConfig, model_config, tensors: dict[str, Tensor] | None, longest_prompt: int, dtype: str,
              device_type: str, budgets: list[int] | None = None, model: ModelShape | None = None) -> Plan:
    """The plan of the run; ConfigError when the split is invalid, the checkpoint does not match the
    model, or a stage does not fit its budget (max_memory, else `budgets`).

    tensors: read_headers() (None for a pickle checkpoint: names and shapes are then not checked).
    dtype: the run's dtype name ("float16", ...); device_type: "cpu" or "cuda".
    """
    m = model or model_shape(model_config, cfg.trust_remote_code)
    size = cfg.pipeline_size
    check_model(cfg, m.num_layers)
    if cfg.max_memory is not None:
        budgets = per_rank(cfg.max_memory, size)
    q = resolve(cfg.quantization, cfg.quantization_options or {}, model_config, device_type, dtype)
    if q is not None and tensors is None:
        raise ConfigError(f"quantization={q.method!r} reads safetensors checkpoints only, and {cfg.model_path} "
                          f"holds pickle .bin weights: convert them on a trusted machine (from_pretrained(dir)"
                          f".save_pretrained(new_dir) writes safetensors)")
    keys = None if tensors is None else checkpoint_keys(sorted(tensors), m.top, m.family)
    sizes = plan_sizes(m, q, dtype, keys, tensors)
    slots = micro_batching(cfg)
    capacity = longest_prompt + cfg.max_new_tokens
    reserve = CUDA_CONTEXT_BYTES if device_type == "cuda" else 0
    local = "cpu" if device_type == "cpu" else device_type
    try:
        ranges, ranks = layout(m, size, cfg.layer_split, sizes, slots, longest_prompt, capacity, budgets,
                               reserve, local, score_chunk(cfg), prefill_joins(cfg, m), spread_joins(cfg))
    except ValueError as e:
        raise ConfigError(str(e)) from None

    if tensors is not None:
        check_checkpoint(cfg.model_path, m, keys, tensors, ranks, local, sizes)
    else:
        try:
            for r in ranks:
                check_complete(r.device_map, list(m.params) + m.buffers, "model parameters and buffers")
        except ValueError as e:
            raise ConfigError(str(e)) from None

    if cfg.max_cpu_memory is not None:
        ranks = offload_ranks(cfg, ranks, budgets, q, tensors, device_type, keys, dtype,
                              f"{m.family.base}.{m.family.layers}.")
    plan = Plan(cfg.model_path, m.family.name, m.num_layers, dtype, device_type, cfg.layer_split, tuple(slots),
                longest_prompt, capacity, tuple(ranks), keys, tensors, q, sizes)
    bad = [r for r in ranks if not r.fits]
    if bad:
        r = bad[0]
        name = f"max_memory[{r.rank}]={r.budget} bytes" if cfg.max_memory is not None else \
            f"the device memory ({r.budget} bytes)"
        fix = [f"raise it to at least {r.total} bytes ({human_bytes(r.total)})"]
        fewest = smallest_pipeline(cfg, m, sizes, slots, longest_prompt, capacity, min(budgets), reserve, local)
        if fewest is not None and fewest > size:
            fix.append(f"use pipeline_size={fewest}")
        most = largest_batch(cfg, m, sizes, longest_prompt, budgets, reserve, local)
        if most:
            fix.append(f"lower batch_size to {most}")
        if cfg.layer_split != "auto":
            fix.append('use layer_split="auto"')
        if q is None:
            fix.append('quantize it (quantization="int8", about half the weight bytes of 16-bit, or "nf4", a quarter)')
        raise ConfigError(f"{name} cannot hold rank {r.rank}'s stage (layers {r.layers.start}..{r.layers.stop - 1}: "
                          f"weights {r.weights} + KV cache {r.kv_cache} + transient {r.transient} + reserve "
                          f"{r.reserve} = {r.total} bytes): {', or '.join(fix)}")
    return plan


def plan_sizes(m: ModelShape, q: Quantization | None, dtype: str, keys: dict[str, str] | None,
           tensors: dict[str, Tensor] | None) -> Sizes:
    quantized = frozenset(select(m.linears, q))
    stored = {}
    if q is not None and q.source == "checkpoint":
        # what the checkpoint stores quantized (int8, or 4-bit packed in uint8), whatever its config says
        quantized = frozenset(n for n in m.linears if n in keys and tensors[keys[n]].dtype in ("I8", "U8"))
        stats = stats_keys(tensors)
        for name in quantized:
            key = keys[name]
            # the quant_state entry is JSON the loader reads, not a tensor the stage keeps
            stored[name] = sum(tensors[k].nbytes for k in [key, *stats.get(key, ())] if ".quant_state." not in k)
    return Sizes(ITEMSIZE[dtype], q, quantized, m.linears, stored)


def plan_for_run(cfg: ExpConfig, model_config, longest_prompt: int, dtype: str, device_type: str,
                 budgets: list[int] | None = None) -> Plan:
    """read_headers() + make_plan(): what every rank runs before the process group."""
    return make_plan(cfg, model_config, read_headers(cfg.model_path, cfg.allow_pickle), longest_prompt, dtype,
                     device_type, budgets)

