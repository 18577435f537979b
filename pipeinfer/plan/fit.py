"""What would fit: the smallest pipeline_size and the largest batch_size whose every rank fits its
budget, searched with the plan's own layout (layout.layout). For the refusal's fix and the dry run."""

from __future__ import annotations

import dataclasses

from pipeinfer.config import micro_batching
from pipeinfer.plan.layout import layout, prefill_joins, score_chunk, spread_joins


def smallest_pipeline(cfg, m, sizes, slots, longest, capacity, budget, reserve, local) -> int | None:
    """The fewest stages whose every rank fits `budget` (layer_split "auto", or cfg's mode when a string)."""
    mode = cfg.layer_split if isinstance(cfg.layer_split, str) else "auto"
    for size in range(1, m.num_layers + 1):
        s = slots if cfg.micro_batch_size != "auto" else \
            micro_batching(dataclasses.replace(cfg, pipeline_size=size))
        _, ranks = layout(m, size, mode, sizes, s, longest, capacity, [budget] * size, reserve, local,
                          score_chunk(cfg), prefill_joins(cfg, m), spread_joins(cfg))
        if all(r.fits for r in ranks):
            return size
    return None


def largest_batch(cfg, m, sizes, longest, budgets, reserve, local, limit: int = 4096) -> int:
    """The largest batch_size (<= limit) at which every rank fits, with this pipeline_size and split; 0 if none."""
    def fits(b: int) -> bool:
        c = dataclasses.replace(cfg, batch_size=b, micro_batch_size=cfg.micro_batch_size if cfg.micro_batch_size == "auto"
                     else min(cfg.micro_batch_size, b))
        _, ranks = layout(m, cfg.pipeline_size, cfg.layer_split, sizes, micro_batching(c), longest,
                           longest + cfg.max_new_tokens, budgets, reserve, local, score_chunk(cfg),
                           prefill_joins(cfg, m), spread_joins(cfg))
        return all(r.fits for r in ranks)
    if not fits(1):
        return 0
    lo, hi = 1, 2
    while hi <= limit and fits(hi):
        lo, hi = hi, hi * 2
    hi = min(hi, limit + 1)
    while hi - lo > 1:  # fits(lo), not fits(hi)
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo

