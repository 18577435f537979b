"""Which layers and modules each pipeline stage owns: pure functions, no model loading here.

    layer ranges = split_layers(num_layers, pipeline_size)                       # layer_split="even"
    layer ranges = plan_split(num_layers, pipeline_size, layer_split, costs, budgets)  # any layer_split
    device_map   = stage_device_map(modules, family, layers=ranges[rank], ...)

The device_map is derived from the layer ranges, never computed twice, and is *complete*: every
module of the model goes either to this rank's device or to "disk" (an offload index into the
checkpoint's own safetensors files, so nothing is read or copied). check_complete() verifies that
against every parameter and buffer name before from_pretrained runs, which is what rules out
"model.layers.0.self_attn.q_proj.weight doesn't have any device set".
"""

from __future__ import annotations

from dataclasses import dataclass

from pipeinfer.models.families import Family


def split_layers(num_layers: int, pipeline_size: int) -> list[range]:
    """Split layers 0..num_layers-1 into pipeline_size contiguous ranges, evenly by count.

    Remainder rule: each stage gets num_layers // pipeline_size layers, and the r = num_layers %
    pipeline_size left over go one each to the r stages just before the last, walking backwards.
    The last stage, which also runs the final norm, the lm_head and sampling, never gets an extra
    layer; with two stages the extra one lands on the first. E.g. 7 layers on 3 stages -> 2, 3, 2;
    10 on 4 -> 2, 3, 3, 2; 5 on 2 -> 3, 2.
    """
    if pipeline_size < 1:
        raise ValueError(f"pipeline_size={pipeline_size} must be >= 1")
    if pipeline_size > num_layers:
        raise ValueError(f"pipeline_size={pipeline_size} > num_layers={num_layers}: every stage needs a layer")
    counts = [num_layers // pipeline_size] * pipeline_size
    for i in range(2, num_layers % pipeline_size + 2):
        counts[-i] += 1
    return _ranges(counts)


@dataclass(frozen=True)
class StageCosts:
    """Bytes a stage must hold, per part: the input to a byte-balanced split.

    layers: per decoder layer, its parameters plus its KV-cache headroom;
    first:  what only the first stage holds (embeddings, learned positions, OPT's project_in);
    last:   what only the last stage holds (final norm, project_out, lm_head; a tied lm_head counts
            the embedding's bytes here too, since the last stage materialises them as well).
    """
    layers: list[int]
    first: int = 0
    last: int = 0

    def stage_bytes(self, ranges: list[range]) -> list[int]:
        out = [sum(self.layers[i] for i in r) for r in ranges]
        out[0] += self.first
        out[-1] += self.last
        return out


def _ranges(counts: list[int]) -> list[range]:
    ranges, start = [], 0
    for n in counts:
        ranges.append(range(start, start + n))
        start += n
    return ranges


def _contiguous_dp(n: int, s: int, value, combine) -> tuple[float, list[int]]:
    """Best split of n layers into s contiguous non-empty stages: value(stage, i, j) scores stage
    `stage` holding layers i..j-1 (inf: not allowed), combine() folds the scores (max or +).
    Ties go to the latest start, i.e. the fewest layers on the later stage. Returns (score, counts)."""
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(s)]  # best[k][j]: layers 0..j-1 on stages 0..k
    cut = [[0] * (n + 1) for _ in range(s)]     # cut[k][j]: where stage k starts in that split
    for j in range(1, n - s + 2):
        best[0][j] = value(0, 0, j)
    for k in range(1, s):
        for j in range(k + 1, n - (s - k - 1) + 1):
            for i in range(j - 1, k - 1, -1):
                v = combine(best[k - 1][i], value(k, i, j))
                if v < best[k][j]:
                    best[k][j], cut[k][j] = v, i
    counts, j = [], n
    for k in range(s - 1, 0, -1):
        counts.append(j - cut[k][j])
        j = cut[k][j]
    return best[s - 1][n], [j, *counts[::-1]]


def balance_bytes(costs: StageCosts, pipeline_size: int, budgets: list[int] | None = None) -> list[range]:
    """Contiguous ranges, each of >= 1 layer, minimising the largest stage's bytes (StageCosts.stage_bytes).

    Exact, by dynamic programming over (stage, where it ends), O(S * L^2): the largest stage is never
    above the best possible contiguous split (so within the issue's bound of one decoder layer).
    Among the splits that reach that largest stage, the one with the smallest sum of squared stage
    bytes (the most even) wins; remaining ties give later stages fewer layers. With `budgets` (bytes
    per rank) only splits in which every stage fits its rank's budget count; if none does, ValueError
    names a rank whose budget cannot hold its stage in the unconstrained best split.
    """
    n, s = len(costs.layers), pipeline_size
    if s < 1 or s > n:
        raise ValueError(f"pipeline_size={s} must be in 1..num_layers={n}: every stage needs a layer")
    if budgets is not None and len(budgets) != s:
        raise ValueError(f"{len(budgets)} memory budgets for pipeline_size={s}: give one per rank")
    prefix = [0]
    for b in costs.layers:
        prefix.append(prefix[-1] + b)

    def stage_bytes(k: int, i: int, j: int) -> int:
        return prefix[j] - prefix[i] + (costs.first if k == 0 else 0) + (costs.last if k == s - 1 else 0)

    def capped(cap: list[float]):
        return lambda k, i, j: stage_bytes(k, i, j) if stage_bytes(k, i, j) <= cap[k] else float("inf")

    caps = [float("inf")] * s if budgets is None else list(budgets)
    largest, _ = _contiguous_dp(n, s, capped(caps), max)
    if largest == float("inf"):
        free = balance_bytes(costs, s)
        for r, (got, limit) in enumerate(zip(costs.stage_bytes(free), budgets)):
            if got > limit:
                raise ValueError(f"max_memory[{r}]={limit} bytes cannot hold rank {r}'s stage: the best split "
                                 f"{[len(x) for x in free]} gives it {got} bytes (weights + KV-cache headroom); "
                                 f"raise the budget, lower batch_size or max_new_tokens, or add ranks")
    squares = capped([min(c, largest) for c in caps])
    _, counts = _contiguous_dp(n, s, lambda k, i, j: squares(k, i, j) ** 2, lambda a, b: a + b)
    return _ranges(counts)


def plan_split(num_layers: int, pipeline_size: int, layer_split: str | list[int] = "even",
               costs: StageCosts | None = None, budgets: list[int] | None = None) -> list[range]:
    """The layer ranges for config key layer_split; costs are needed for "auto" and for budgets.

      "even"         split_layers(): by count, remainder on the stages before the last;
      "auto"         balance_bytes(): minimise the largest stage's bytes (first/last extras included);
      [n0, n1, ...]  exactly these counts: one per stage, each >= 1, summing to num_layers.

    With budgets (max_memory, bytes per rank) every stage of the chosen split must fit its rank's
    budget, else ValueError names the rank.
    """
    if isinstance(layer_split, list):
        if len(layer_split) != pipeline_size:
            raise ValueError(f"layer_split={layer_split} has {len(layer_split)} entries for "
                             f"pipeline_size={pipeline_size}: give one layer count per stage")
        if any(not isinstance(c, int) or isinstance(c, bool) or c < 1 for c in layer_split):
            raise ValueError(f"layer_split={layer_split}: every stage needs an integer >= 1 layers")
        if sum(layer_split) != num_layers:
            raise ValueError(f"layer_split={layer_split} sums to {sum(layer_split)}, "
                             f"but the model has num_hidden_layers={num_layers}")
        ranges = _ranges(list(layer_split))
    elif layer_split == "even":
        ranges = split_layers(num_layers, pipeline_size)
    elif layer_split == "auto":
        if costs is None:
            raise ValueError('layer_split="auto" needs the per-layer bytes (costs)')
        return balance_bytes(costs, pipeline_size, budgets)
    else:
        raise ValueError(f'layer_split={layer_split!r}: expected "even", "auto" or a list of layer counts')
    if budgets is not None and costs is not None:
        if len(budgets) != pipeline_size:
            raise ValueError(f"{len(budgets)} memory budgets for pipeline_size={pipeline_size}: give one per rank")
        for r, (got, limit) in enumerate(zip(costs.stage_bytes(ranges), budgets)):
            if got > limit:
                raise ValueError(f"max_memory[{r}]={limit} bytes cannot hold rank {r}'s stage "
                                 f"(layers {ranges[r].start}..{ranges[r].stop - 1}, {got} bytes with KV-cache "
                                 f"headroom): raise the budget, use layer_split=\"auto\", or add ranks")
    return ranges


@dataclass
class Rank:
    """Where a rank sits in the pipeline: the one definition of the rank facts, which both the
    stage's plan (StagePlan) and the stage-to-stage messaging (comm.Comm) are."""
    rank: int
    world_size: int

    @property
    def is_first(self) -> bool:
        return self.rank == 0

    @property
    def is_last(self) -> bool:
        return self.rank == self.world_size - 1

    @property
    def prev(self) -> int | None:
        return None if self.is_first else self.rank - 1

    @property
    def next(self) -> int | None:
        return None if self.is_last else self.rank + 1


@dataclass
class StagePlan(Rank):
    """What one rank owns. `layers` are global layer indices."""
    layers: range = range(0)


def stage_device_map(top_modules: list[str], base_modules: list[str], num_layers: int, family: Family,
                     plan: StagePlan, tied: bool, device: str) -> dict[str, str]:
    """Map every module to `device` (owned by this stage) or "disk" (owned by another).

    top_modules: child names of the *ForCausalLM; base_modules: child names of its base model.
    Modules the family does not name (rotary embeddings, dropout) are shared by every stage.
    With tied embeddings the last stage also keeps the input embeddings: they are its lm_head.
    For a nested base ("model.decoder") the base's root child is covered by base_modules; any other
    module inside the root would be left unplaced, which check_complete() reports.
    """
    def place(owned: bool) -> str:
        return device if owned else "disk"

    dmap: dict[str, str] = {}
    for child in top_modules:
        if child == family.root:
            continue
        dmap[child] = place(plan.is_last) if child in family.heads else device
    for child in base_modules:
        key = f"{family.base}.{child}"
        if child == family.layers:
            for i in range(num_layers):
                dmap[f"{key}.{i}"] = place(i in plan.layers)
        elif child in family.first:
            keeps_tied_head = tied and plan.is_last and child == family.embeddings
            dmap[key] = place(plan.is_first or keeps_tied_head)
        elif child in family.last:
            dmap[key] = place(plan.is_last)
        else:
            dmap[key] = device
    return dmap


def check_complete(device_map: dict[str, str], names: list[str], what: str) -> None:
    """Raise if any parameter/buffer name has no device_map entry that is it or a prefix of it."""
    missing = [n for n in names if not any(n == k or n.startswith(k + ".") for k in device_map)]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ValueError(f"device_map does not place {len(missing)} {what} ({shown}): "
                         f"the model family's module layout in pipeinfer/models/families.py does not match this checkpoint")


def missing_weights(device_map: dict[str, str], param_names: list[str], stored: set[str], device: str) -> list[str]:
    """The parameters this stage owns (placed on `device`) that the checkpoint has no tensor for:
    transformers would initialise them randomly, with only a warning."""
    def placement(name: str) -> str | None:
        key = max((k for k in device_map if name == k or name.startswith(k + ".")), key=len, default=None)
        return device_map.get(key) if key is not None else None
    return [n for n in param_names if n not in stored and placement(n) == device]
