"""layer_split: the byte-balanced and explicit splits (pure), and the config keys that choose them.

    pytest tests/test_split.py
"""

from __future__ import annotations

import itertools
import random

import pytest

from pipeinfer.config import ConfigError, build_config, check_model, parse_bytes
from pipeinfer.plan.partition import StageCosts, balance_bytes, plan_split, split_layers

GOLDEN = [
    # (num_layers, pipeline_size, layer_split, costs, budgets) -> layer counts per stage
    ((5, 2, "even", None, None), [3, 2]),
    ((7, 3, "even", StageCosts([1] * 7, 100, 100), None), [2, 3, 2]),  # "even" ignores bytes
    ((5, 3, [1, 3, 1], None, None), [1, 3, 1]),
    ((4, 4, [1, 1, 1, 1], None, None), [1, 1, 1, 1]),
    ((4, 2, "auto", StageCosts([10] * 4), None), [2, 2]),
    ((4, 1, "auto", StageCosts([10] * 4, 5, 5), None), [4]),
    # heavy embeddings on the first stage: 2 layers + 25 = 45 beats 1 + 25 = 35 vs 5 layers = 50
    ((6, 2, "auto", StageCosts([10] * 6, first=25), None), [2, 4]),
    # a big (e.g. tied) lm_head on the last stage: 40 is the best largest stage; the last gets 1 layer
    ((6, 3, "auto", StageCosts([10] * 6, first=5, last=30), None), [2, 3, 1]),
    # embeddings and lm_head each as big as 4 layers (a small model with a large vocabulary)
    ((8, 2, "auto", StageCosts([10] * 8, first=40, last=40), None), [4, 4]),
    ((8, 4, "auto", StageCosts([10] * 8, first=40, last=40), None), [1, 3, 3, 1]),
    # uneven layers: the 50-byte layer gets a stage to itself
    ((5, 3, "auto", StageCosts([10, 10, 50, 10, 10]), None), [2, 1, 2]),
    # budgets: rank 0 holds at most 30 bytes, so it gets 2 layers + 10 of embeddings; rank 1 the rest
    ((6, 2, "auto", StageCosts([10] * 6, first=10), [30, 1000]), [2, 4]),
    ((6, 2, "auto", StageCosts([10] * 6, first=10), ["1KiB", 25]), [4, 2]),
    ((6, 2, [5, 1], StageCosts([10] * 6), [60, 10]), [5, 1]),  # an explicit split that fits its budgets
]


@pytest.mark.parametrize("args,counts", GOLDEN)
def test_plan_split_golden(args, counts):
    num_layers, size, mode, costs, budgets = args
    budgets = [parse_bytes(b) for b in budgets] if budgets else None
    ranges = plan_split(num_layers, size, mode, costs, budgets)
    assert [len(r) for r in ranges] == counts
    assert ranges[0].start == 0 and ranges[-1].stop == num_layers
    assert all(a.stop == b.start for a, b in zip(ranges, ranges[1:]))


INVALID = [
    ((5, 3, [1, 3], None, None), "has 2 entries for pipeline_size=3"),
    ((5, 2, [3, 3], None, None), "sums to 6, but the model has num_hidden_layers=5"),
    ((5, 2, [5, 0], None, None), "integer >= 1"),
    ((5, 2, "balanced", None, None), "expected \"even\", \"auto\""),
    ((5, 2, "auto", None, None), "needs the per-layer bytes"),
    ((3, 4, "auto", StageCosts([1] * 3), None), "pipeline_size=4 must be in 1..num_layers=3"),
    ((3, 0, "auto", StageCosts([1] * 3), None), "pipeline_size=0"),
    ((4, 2, "auto", StageCosts([10] * 4), [10]), "1 memory budgets for pipeline_size=2"),
    # no split fits: rank 1's stage needs >= 10 + 50 bytes of lm_head but may have only 40
    ((4, 2, "auto", StageCosts([10] * 4, last=50), [1000, 40]), r"max_memory\[1\]=40 bytes cannot hold rank 1's"),
    ((4, 2, "even", StageCosts([10] * 4, first=5), [20, 100]), r"max_memory\[0\]=20 bytes cannot hold rank 0's"),
]


@pytest.mark.parametrize("args,match", INVALID)
def test_plan_split_invalid(args, match):
    with pytest.raises(ValueError, match=match):
        plan_split(*args)


def brute_force(costs: StageCosts, size: int, budgets=None) -> float:
    """The smallest largest-stage bytes over every contiguous split (inf when no split fits the budgets)."""
    n, best = len(costs.layers), float("inf")
    for cuts in itertools.combinations(range(1, n), size - 1):
        bounds = (0, *cuts, n)
        ranges = [range(a, b) for a, b in zip(bounds, bounds[1:])]
        got = costs.stage_bytes(ranges)
        if budgets is None or all(g <= b for g, b in zip(got, budgets)):
            best = min(best, max(got))
    return best


def test_auto_split_is_within_one_layer_of_the_best_split():
    """The issue's bound: under "auto" the largest stage exceeds the best contiguous split by at most one
    decoder layer. The DP is exact, so it meets the best split itself; checked against brute force."""
    rng = random.Random(0)
    for _ in range(400):
        n = rng.randint(1, 9)
        size = rng.randint(1, n)
        costs = StageCosts([rng.randint(1, 100) for _ in range(n)], rng.randint(0, 300), rng.randint(0, 300))
        got = max(costs.stage_bytes(balance_bytes(costs, size)))
        best = brute_force(costs, size)
        assert got <= best + max(costs.layers)
        assert got == best, (costs, size)


def test_auto_split_with_budgets_matches_brute_force():
    rng = random.Random(1)
    for _ in range(300):
        n = rng.randint(1, 8)
        size = rng.randint(1, n)
        costs = StageCosts([rng.randint(1, 50) for _ in range(n)], rng.randint(0, 100), rng.randint(0, 100))
        budgets = [rng.randint(40, 250) for _ in range(size)]
        best = brute_force(costs, size, budgets)
        if best == float("inf"):
            with pytest.raises(ValueError, match="cannot hold rank"):
                balance_bytes(costs, size, budgets)
        else:
            got = costs.stage_bytes(balance_bytes(costs, size, budgets))
            assert max(got) == best and all(g <= b for g, b in zip(got, budgets))


def test_even_equals_split_layers():
    for n in range(1, 12):
        for size in range(1, n + 1):
            assert plan_split(n, size, "even") == split_layers(n, size)


@pytest.mark.parametrize("text,value", [(1024, 1024), ("1024", 1024), ("12GiB", 12 * 2**30), ("500MB", 500 * 10**6),
                                        ("1.5 GB", 1_500_000_000), ("64kib", 65536), ("2TB", 2 * 10**12)])
def test_parse_bytes(text, value):
    assert parse_bytes(text) == value


def cfg(**over):
    return build_config(dict(model_path="m", prompts=["x"], **over))


@pytest.mark.parametrize("over", [dict(layer_split="even"), dict(layer_split="auto"),
                                  dict(pipeline_size=2, layer_split=[3, 2]),
                                  dict(pipeline_size=2, max_memory=["12GiB", 1000]),
                                  dict(pipeline_size=2, max_memory="12GiB"),
                                  dict(allow_pickle=True), dict(trust_remote_code=True)])
def test_new_keys_accept(over):
    c = cfg(**over)
    assert all(getattr(c, k) == v for k, v in over.items())


@pytest.mark.parametrize("over,match", [
    (dict(layer_split="balanced"), "layer_split=\"balanced\" is out of range"),
    (dict(layer_split=[]), "layer_split=\\[\\] is out of range"),
    (dict(layer_split=[2, 0], pipeline_size=2), "layer_split=\\[2, 0\\] is out of range"),
    (dict(layer_split=[1.5]), "out of range"),
    (dict(layer_split=True), "layer_split=true has the wrong type"),
    (dict(layer_split=[2, 3]), "has 2 entries but pipeline_size=1"),
    (dict(max_memory=["12 parsecs"]), "max_memory=.* is out of range"),
    (dict(max_memory=True), "max_memory=true has the wrong type"),
    (dict(max_memory=[1, 2]), "max_memory=\\[1, 2\\] has 2 entries but pipeline_size=1"),
    (dict(allow_pickle="yes"), "allow_pickle=\"yes\" has the wrong type"),
    (dict(trust_remote_code=1), "trust_remote_code=1 has the wrong type"),
])
def test_new_keys_reject(over, match):
    with pytest.raises(ConfigError, match=match):
        cfg(**over)


def test_explicit_split_must_sum_to_the_model_layers():
    c = cfg(pipeline_size=2, layer_split=[3, 3])
    with pytest.raises(ConfigError, match=r"layer_split=\[3, 3\] sums to 6 but m has num_hidden_layers=5"):
        check_model(c, 5)
    check_model(c, 6)
