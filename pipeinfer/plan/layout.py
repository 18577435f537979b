"""Each rank's bytes for one split: what a plan holds (RankPlan, Plan) and how the layers of one
pipeline_size are laid out over its ranks (layout). make.py checks the result against the budgets;
fit.py searches other pipeline sizes and batch sizes with the same layout.

What each number counts is in make.py's docstring.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from pipeinfer.plan.checkpoint import Tensor
from pipeinfer.plan.model import ModelShape, layer_of
from pipeinfer.plan.partition import StageCosts, StagePlan, balance_bytes, plan_split, stage_device_map
from pipeinfer.plan.quantization import Quantization

CUDA_CONTEXT_BYTES = 512 * 2**20  # CUDA context + cuBLAS workspace per process: about 0.4-0.6 GiB on recent GPUs
ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8}


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
    scratch: int = 0                   # host bytes a tensor stored in another dtype is read into, then converted
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
            rec["offload"] = {"stream_buffers": self.stream, "staging": self.staging, "scratch": self.scratch,
                              "cpu_budget": self.cpu_budget,
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
    sizes: "Sizes | None" = field(default=None, repr=False)

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


def placement(dmap: dict[str, str], name: str) -> str | None:
    key = max((k for k in dmap if name == k or name.startswith(k + ".")), key=len, default=None)
    return dmap.get(key) if key is not None else None


def device_maps(m: ModelShape, ranges: list[range], local: str) -> list[dict[str, str]]:
    return [stage_device_map(m.top, m.base_children, m.num_layers, m.family, StagePlan(r, len(ranges), ranges[r]),
                             m.tied, local) for r in range(len(ranges))]


@dataclass(frozen=True)
class Sizes:
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


def stage_costs(m: ModelShape, sizes: Sizes, kv_per_layer: int) -> StageCosts:
    """Weights (+ KV cache per layer) by part, for layer_split="auto": a tied head counts the embedding
    on the last stage too (balancing only; the plan's weights count each stage's own exactly)."""
    layers = [kv_per_layer] * m.num_layers
    first = last = 0
    fam = m.family
    for name, shape in m.params.items():
        nbytes = sizes.of(name, shape)
        i = layer_of(name, m)
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


def score_chunk(cfg) -> int:
    """Prompt positions whose logits the last stage holds at once while scoring; 0: no scoring."""
    return cfg.prompt_logprobs_chunk if cfg.prompt_logprobs else 0


def scoring_bytes(m: ModelShape, b: int, t: int, itemsize: int, chunk: int) -> int:
    """What scoring.prompt_logprobs holds at its peak for a (b, t) prefill: the (b, t, H) final hidden
    states, the (b, 3, t - 1) float64 result (log-probabilities, argmax ids and theirs: scoring.FIELDS),
    and one chunk's (b, c, V) logits, 8 bytes each at the peak
    (float32 and their float32 log-softmax; a 16-bit head's output is gone by then)."""
    if not chunk or t < 2:
        return 0
    return b * t * m.hidden * itemsize + b * 3 * (t - 1) * 8 + b * min(chunk, t - 1) * m.vocab * 8


def transient_bytes(m: ModelShape, b: int, t: int, itemsize: int, last: bool, chunk: int) -> int:
    """The largest transient of a stage (see make.py's docstring) for a (b, t) prefill."""
    layer = b * t * (4 * m.hidden + 3 * m.intermediate) * itemsize + b * t * t
    if not last:
        return layer
    # scoring runs after the layers, whose activations are gone by then: the larger of the two
    return max(layer, scoring_bytes(m, b, t, itemsize, chunk)) + b * m.vocab * (itemsize + 4)  # + (B, V) logits


def joiner_positions(slots: list[int], longest: int, prefill: int | None, spread: bool = False) -> int:
    """KV positions the row schedule's joining prompts hold beside their slot's cache (run/rows.py):
    a visit's whole joiners prefill into a cache of their own, then it is spliced into their rows
    (at most a slot's rows x the longest prompt); prompts longer than the prefill chunk, and with
    several slots and `spread` (spread_joins()) every prompt, keep theirs across visits: every
    prompt in flight may hold one. prefill: prefill_joins(); None: the slot's own cache."""
    if prefill is None:
        return 0
    return longest * (sum(slots) if prefill and (longest > prefill or spread and len(slots) > 1) else max(slots))


def spread_joins(cfg) -> bool:
    """Whether the row schedule may spread a joiner's prefill over the slots' visits (run/rows.py)."""
    return cfg.spread_prefill and cfg.packed_prefill


def prefill_joins(cfg, m: ModelShape) -> int | None:
    """How joining prompts prefill: None into their slot's own cache (the micro_batches schedule, and
    families the row schedule leaves to it), else the chunk of the row schedule (0: whole)."""
    if cfg.schedule != "rows" or not m.plain_cache:
        return None
    return 0 if cfg.prompt_logprobs else cfg.prefill_chunk_size  # scoring a prompt prefills it whole


def layout(m: ModelShape, size: int, layer_split, sizes: Sizes, slots: list[int], longest: int, capacity: int,
           budgets: list[int] | None, reserve: int, local: str, chunk: int = 0,
           prefill: int | None = None, spread: bool = False) -> tuple[list[range], list[RankPlan]]:
    """The split and each rank's bytes for one pipeline_size; raises ValueError for an invalid split.
    chunk: score_chunk(cfg); prefill: prefill_joins(cfg, m); spread: spread_joins(cfg)."""
    itemsize = sizes.itemsize
    kv_per_layer = 2 * sum(slots) * m.kv_width * capacity * itemsize  # keys + values
    # the joiners' own caches live beside the prefill's activations: in the transient, layer by layer
    join_per_layer = 2 * m.kv_width * joiner_positions(slots, longest, prefill, spread) * itemsize
    costs = stage_costs(m, sizes, kv_per_layer + join_per_layer)
    if layer_split != "auto":
        ranges = plan_split(m.num_layers, size, layer_split)
    elif layer_split == "auto":
        # stage_bytes minus what every stage holds anyway, so that budgets compare like with like
        b, t = max(slots), longest
        extra = [transient_bytes(m, b, t, itemsize, r == size - 1, chunk) + reserve for r in range(size)]
        room = None if budgets is None else [max(0, bud - e) for bud, e in zip(budgets, extra)]
        try:
            ranges = balance_bytes(costs, size, room)
        except ValueError:
            ranges = balance_bytes(costs, size)  # nothing fits: plan the best split, the fit check reports it
    maps = device_maps(m, ranges, local)
    b, t = max(slots), longest
    ranks = []
    per_layer = [c - kv_per_layer - join_per_layer for c in costs.layers]  # each layer's weights alone
    for r, (rng, dmap) in enumerate(zip(ranges, maps)):
        weights = sum(sizes.of(n, s) for n, s in m.params.items() if placement(dmap, n) == local)
        last = r == size - 1
        transient = transient_bytes(m, b, t, itemsize, last, chunk) + len(rng) * join_per_layer
        ranks.append(RankPlan(r, rng, weights, len(rng) * kv_per_layer, transient,
                              reserve, None if budgets is None else budgets[r], dmap,
                              tuple(per_layer[i] for i in rng), ("device",) * len(rng),
                              scoring=scoring_bytes(m, b, t, itemsize, chunk) if last else 0))
    return ranges, ranks
