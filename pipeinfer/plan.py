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
             with their log-softmax, c = min(prompt_logprobs_chunk, T - 1); RankPlan.scoring)
  reserve    what the runtime holds before any weight: on CUDA the context (CUDA_CONTEXT_BYTES, a
             stated constant); on CPU 0, since the runtime baseline is measured apart (bench/memory.py;
             --check-runner: a real rank's peak is this plan plus that runtime, within 3%)
  stream     offload only: the device buffers streamed layers arrive in (two of the largest, so that
             the next layer's weights move while one computes; one when a single layer streams)

Offload (max_cpu_memory set; offload.offload_ranks): a stage that does not fit max_memory keeps its
first layers resident, as many as fit beside everything else and the stream buffers; the layers
after them stream in (offload.Streamer), from pinned host memory up to max_cpu_memory, the rest
read in place from the checkpoint on disk. Embeddings, final norm and head stay resident.
`weights` then counts what is resident only; each layer's bytes and placement are in
RankPlan.layer_bytes and .placement.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from pipeinfer.checkpoint import Tensor, check_checkpoint, checkpoint_keys, read_headers
from pipeinfer.config import ConfigError, ExpConfig, check_model, human_bytes, micro_batching, per_rank
from pipeinfer.families import Family, family_for
from pipeinfer.quantization import Quantization, resolve, select, stats_keys
from pipeinfer.partition import StageCosts, StagePlan, balance_bytes, check_complete, plan_split, stage_device_map

CUDA_CONTEXT_BYTES = 512 * 2**20  # CUDA context + cuBLAS workspace per process: about 0.4-0.6 GiB on recent GPUs
_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}


@dataclass(frozen=True)
class RankPlan:
    rank: int
    layers: range
    weights: int
    kv_cache: int
    transient: int
    reserve: int
    budget: int | None
    device_map: dict[str, str] = field(repr=False)
    layer_bytes: tuple[int, ...] = ()  # each of the stage's layers' weights, in stage order
    placement: tuple[str, ...] = ()    # each layer's: "device" (resident), "host" or "disk" (streamed)
    stream: int = 0                    # device bytes of the buffers streamed layers arrive in
    scoring: int = 0                   # prompt_logprobs: scoring's peak bytes (transient holds the larger)
    staging: int = 0                   # pinned host bytes disk reads pass through on CUDA
    cpu_budget: int | None = None      # max_cpu_memory: host bytes for offloaded layers (+ staging)

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.transient + self.reserve + self.stream

    def tier(self, name: str) -> list[int]:
        """The stage's layers (global indices) placed on `name`: "device", "host" or "disk"."""
        return [i for i, p in zip(self.layers, self.placement) if p == name]

    def tier_bytes(self, name: str) -> int:
        return sum(b for b, p in zip(self.layer_bytes, self.placement) if p == name)

    @property
    def offloaded(self) -> bool:
        return any(p != "device" for p in self.placement)

    def record(self) -> dict:
        rec = {"rank": self.rank, "layers": [self.layers.start, self.layers.stop - 1], "weights": self.weights,
               "kv_cache": self.kv_cache, "transient": self.transient, "scoring": self.scoring,
               "reserve": self.reserve, "total": self.total, "budget": self.budget, "fits": self.fits}
        if self.offloaded:
            rec["offload"] = {"stream_buffers": self.stream, "staging": self.staging, "cpu_budget": self.cpu_budget,
                              **{tier: {"layers": self.tier(tier), "bytes": self.tier_bytes(tier)}
                                 for tier in ("device", "host", "disk")},
                              "layer_bytes": dict(zip(map(str, self.layers), self.layer_bytes))}
        return rec

    @property
    def fits(self) -> bool:
        return self.budget is None or self.total <= self.budget


@dataclass(frozen=True)
class Plan:
    model_path: str
    family: str
    num_layers: int
    dtype: str
    device_type: str
    layer_split: str | list[int]
    slots: tuple[int, ...]     # prompts per micro-batch slot in flight
    longest_prompt: int
    capacity: int              # KV positions per slot: longest_prompt + max_new_tokens
    ranks: tuple[RankPlan, ...]
    keys: dict[str, str] | None = field(default=None, repr=False)  # parameter name -> checkpoint tensor name
    tensors: dict[str, Tensor] | None = field(default=None, repr=False)
    quantization: Quantization | None = None
    sizes: "_Sizes | None" = field(default=None, repr=False)

    @property
    def quantized(self) -> frozenset[str]:
        """The weights the plan quantizes (or that the checkpoint stores quantized)."""
        return self.sizes.quantized if self.sizes is not None else frozenset()

    @property
    def pipeline_size(self) -> int:
        return len(self.ranks)

    @property
    def layer_ranges(self) -> list[range]:
        return [r.layers for r in self.ranks]

    def stage(self, rank: int) -> StagePlan:
        return StagePlan(rank, self.pipeline_size, self.ranks[rank].layers)

    def record(self) -> dict:
        """JSON-ready: what the run record carries (device maps left out: derived, and long)."""
        return {"family": self.family, "dtype": self.dtype, "device_type": self.device_type,
                "slots": list(self.slots), "longest_prompt": self.longest_prompt, "capacity": self.capacity,
                "quantization": self.quantization.record() if self.quantization else None,
                "ranks": [r.record() for r in self.ranks]}


@dataclass(frozen=True)
class _Model:
    """What planning needs from the model, computed once from its config on the meta device."""
    family: Family
    num_layers: int
    top: list[str]
    base_children: list[str]
    params: dict[str, tuple[int, ...]]  # unique parameters (a tied head appears once, as the embedding)
    buffers: list[str]
    linears: dict[str, int]            # nn.Linear / Conv1D weights but the head (what bnb quantizes): out features
    tied: bool
    hidden: int
    intermediate: int
    vocab: int
    kv_width: int                      # num_key_value_heads x head_dim


def _model(model_config, trust_remote_code: bool = False) -> _Model:
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    family = family_for(model_config.model_type)
    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(model_config, trust_remote_code=trust_remote_code)
    base = skeleton.get_submodule(family.base)
    c = model_config
    kv_heads = getattr(c, "num_key_value_heads", None) or c.num_attention_heads
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    inter = getattr(c, "intermediate_size", None) or getattr(c, "ffn_dim", None) or \
        getattr(c, "n_inner", None) or 4 * c.hidden_size
    tied = bool(getattr(c, "tie_word_embeddings", False))
    heads = {f"{h}.weight" for h in family.heads}  # tied: the embedding itself (some releases tie only at load)
    from pipeinfer.quantization import linear_weights
    return _Model(family, c.num_hidden_layers, [n for n, _ in skeleton.named_children()],
                  [n for n, _ in base.named_children()],
                  {n: tuple(p.shape) for n, p in skeleton.named_parameters() if not (tied and n in heads)},
                  [n for n, _ in skeleton.named_buffers()], linear_weights(skeleton, family.heads), tied,
                  c.hidden_size, inter, c.vocab_size, kv_heads * head_dim)


def _placement(dmap: dict[str, str], name: str) -> str | None:
    key = max((k for k in dmap if name == k or name.startswith(k + ".")), key=len, default=None)
    return dmap.get(key) if key is not None else None


def _device_maps(m: _Model, ranges: list[range], local: str) -> list[dict[str, str]]:
    return [stage_device_map(m.top, m.base_children, m.num_layers, m.family, StagePlan(r, len(ranges), ranges[r]),
                             m.tied, local) for r in range(len(ranges))]


def _layer_of(name: str, m: _Model) -> int | None:
    prefix = f"{m.family.base}.{m.family.layers}."
    if name.startswith(prefix):
        return int(name[len(prefix):].split(".")[0])
    return None


@dataclass(frozen=True)
class _Sizes:
    """Bytes each parameter holds once loaded: the run's dtype, or its quantized form."""
    itemsize: int                                  # the run's dtype (also the KV cache's and activations')
    q: Quantization | None = None
    quantized: frozenset[str] = frozenset()
    out_features: dict[str, int] = field(default_factory=dict)  # of each linear weight
    stored: dict[str, int] = field(default_factory=dict)  # pre-quantized: bytes as stored, statistics included

    def of(self, name: str, shape: tuple[int, ...]) -> int:
        if name in self.stored:
            return self.stored[name]
        if name in self.quantized:
            return self.q.weight_bytes(shape, self.out_features[name])
        return math.prod(shape) * self.itemsize


def _costs(m: _Model, sizes: _Sizes, kv_per_layer: int) -> StageCosts:
    """Weights (+ KV cache per layer) by part, for layer_split="auto": a tied head counts the embedding
    on the last stage too (balancing only; the plan's weights count each stage's own exactly)."""
    layers = [kv_per_layer] * m.num_layers
    first = last = 0
    fam = m.family
    for name, shape in m.params.items():
        nbytes = sizes.of(name, shape)
        i = _layer_of(name, m)
        child = name[len(fam.base) + 1:].split(".")[0] if name.startswith(fam.base + ".") else None
        if i is not None:
            layers[i] += nbytes
        elif child in fam.first:
            first += nbytes
            if m.tied and child == fam.embeddings:
                last += nbytes
        elif child in fam.last or name.split(".")[0] in fam.heads:
            last += nbytes
    return StageCosts(layers, first, last)


def score_chunk(cfg: ExpConfig) -> int:
    """Prompt positions whose logits the last stage holds at once while scoring; 0: no scoring."""
    return cfg.prompt_logprobs_chunk if cfg.prompt_logprobs else 0


def _scoring(m: _Model, b: int, t: int, itemsize: int, chunk: int) -> int:
    """What scoring.prompt_logprobs holds at its peak for a (b, t) prefill: the (b, t, H) final hidden
    states, the (b, t - 1) float64 result, and one chunk's (b, c, V) logits, 8 bytes each at the peak
    (float32 and their float32 log-softmax; a 16-bit head's output is gone by then)."""
    if not chunk or t < 2:
        return 0
    return b * t * m.hidden * itemsize + b * (t - 1) * 8 + b * min(chunk, t - 1) * m.vocab * 8


def _transient(m: _Model, b: int, t: int, itemsize: int, last: bool, chunk: int) -> int:
    """The largest transient of a stage (see the module docstring) for a (b, t) prefill."""
    layer = b * t * (4 * m.hidden + 3 * m.intermediate) * itemsize + b * t * t
    if not last:
        return layer
    # scoring runs after the layers, whose activations are gone by then: the larger of the two
    return max(layer, _scoring(m, b, t, itemsize, chunk)) + b * m.vocab * (itemsize + 4)  # + (B, V) logits


def _layout(m: _Model, size: int, layer_split, sizes: _Sizes, slots: list[int], longest: int, capacity: int,
            budgets: list[int] | None, reserve: int, local: str, chunk: int = 0) -> tuple[list[range], list[RankPlan]]:
    """The split and each rank's bytes for one pipeline_size; raises ValueError for an invalid split.
    chunk: score_chunk(cfg)."""
    itemsize = sizes.itemsize
    kv_per_layer = 2 * sum(slots) * m.kv_width * capacity * itemsize  # keys + values
    costs = _costs(m, sizes, kv_per_layer)
    if layer_split != "auto":
        ranges = plan_split(m.num_layers, size, layer_split)
    elif layer_split == "auto":
        # stage_bytes minus what every stage holds anyway, so that budgets compare like with like
        b, t = max(slots), longest
        extra = [_transient(m, b, t, itemsize, r == size - 1, chunk) + reserve for r in range(size)]
        room = None if budgets is None else [max(0, bud - e) for bud, e in zip(budgets, extra)]
        try:
            ranges = balance_bytes(costs, size, room)
        except ValueError:
            ranges = balance_bytes(costs, size)  # nothing fits: plan the best split, the fit check reports it
    maps = _device_maps(m, ranges, local)
    b, t = max(slots), longest
    ranks = []
    per_layer = [c - kv_per_layer for c in costs.layers]  # each layer's weights alone
    for r, (rng, dmap) in enumerate(zip(ranges, maps)):
        weights = sum(sizes.of(n, s) for n, s in m.params.items() if _placement(dmap, n) == local)
        last = r == size - 1
        ranks.append(RankPlan(r, rng, weights, len(rng) * kv_per_layer, _transient(m, b, t, itemsize, last, chunk),
                              reserve, None if budgets is None else budgets[r], dmap,
                              tuple(per_layer[i] for i in rng), ("device",) * len(rng),
                              scoring=_scoring(m, b, t, itemsize, chunk) if last else 0))
    return ranges, ranks


def make_plan(cfg: ExpConfig, model_config, tensors: dict[str, Tensor] | None, longest_prompt: int, dtype: str,
              device_type: str, budgets: list[int] | None = None, model: _Model | None = None) -> Plan:
    """The plan of the run; ConfigError when the split is invalid, the checkpoint does not match the
    model, or a stage does not fit its budget (max_memory, else `budgets`).

    tensors: read_headers() (None for a pickle checkpoint: names and shapes are then not checked).
    dtype: the run's dtype name ("float16", ...); device_type: "cpu" or "cuda".
    """
    m = model or _model(model_config, cfg.trust_remote_code)
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
    sizes = _sizes(m, q, dtype, keys, tensors)
    slots = micro_batching(cfg)
    capacity = longest_prompt + cfg.max_new_tokens
    reserve = CUDA_CONTEXT_BYTES if device_type == "cuda" else 0
    local = "cpu" if device_type == "cpu" else device_type
    try:
        ranges, ranks = _layout(m, size, cfg.layer_split, sizes, slots, longest_prompt, capacity, budgets,
                                reserve, local, score_chunk(cfg))
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
        from pipeinfer.offload import offload_ranks
        ranks = offload_ranks(cfg, ranks, budgets, q, tensors, device_type)
    plan = Plan(cfg.model_path, m.family.name, m.num_layers, dtype, device_type, cfg.layer_split, tuple(slots),
                longest_prompt, capacity, tuple(ranks), keys, tensors, q, sizes)
    bad = [r for r in ranks if not r.fits]
    if bad:
        r = bad[0]
        name = f"max_memory[{r.rank}]={r.budget} bytes" if cfg.max_memory is not None else \
            f"the device memory ({r.budget} bytes)"
        fix = [f"raise it to at least {r.total} bytes ({human_bytes(r.total)})"]
        from pipeinfer.fit import largest_batch, smallest_pipeline

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


def _sizes(m: _Model, q: Quantization | None, dtype: str, keys: dict[str, str] | None,
           tensors: dict[str, Tensor] | None) -> _Sizes:
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
    return _Sizes(_ITEMSIZE[dtype], q, quantized, m.linears, stored)


def plan_for_run(cfg: ExpConfig, model_config, longest_prompt: int, dtype: str, device_type: str,
                 budgets: list[int] | None = None) -> Plan:
    """read_headers() + make_plan(): what every rank runs before the process group."""
    return make_plan(cfg, model_config, read_headers(cfg.model_path, cfg.allow_pickle), longest_prompt, dtype,
                     device_type, budgets)


if __name__ == "__main__":  # python -m pipeinfer.plan: the dry run
    from pipeinfer.dryrun import main

    raise SystemExit(main())
