"""Sampling is a pure function: greedy is argmax; top-k/top-p filter like transformers' warpers.

    pytest tests/test_sampling.py
"""

from __future__ import annotations

import pytest
import torch

from pipeinfer.run.sampling import (NonFiniteLogits, SamplingParams, check_finite, filter_logits, prompt_generator,
                                     sample)


def test_greedy_is_argmax():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sample(logits, SamplingParams(), []), logits.argmax(-1))


def test_filters_match_transformers_warpers():
    from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper)

    logits = torch.randn(4, 100, generator=torch.Generator().manual_seed(1))
    ids = torch.zeros(4, 1, dtype=torch.long)
    for t, k, p in [(0.7, 10, 1.0), (1.0, 0, 0.9), (1.3, 20, 0.8), (1.0, 0, 1.0)]:
        ref = TemperatureLogitsWarper(t)(ids, logits.clone())
        if k:
            ref = TopKLogitsWarper(k)(ids, ref)
        if p < 1:
            ref = TopPLogitsWarper(p)(ids, ref)
        got = filter_logits(logits, SamplingParams(True, t, k, p))
        assert torch.equal(torch.isinf(got), torch.isinf(ref))
        assert torch.allclose(got[~torch.isinf(got)], ref[~torch.isinf(ref)])


def test_per_prompt_generators_are_deterministic_and_distinct():
    probs_logits = torch.zeros(2, 1000)
    p = SamplingParams(do_sample=True)
    a = sample(probs_logits, p, [prompt_generator(7, 0, torch.device("cpu")), prompt_generator(7, 1, torch.device("cpu"))])
    b = sample(probs_logits, p, [prompt_generator(7, 0, torch.device("cpu")), prompt_generator(7, 1, torch.device("cpu"))])
    assert torch.equal(a, b) and a[0] != a[1]


def test_top_k_one_is_greedy():
    logits = torch.randn(5, 30, generator=torch.Generator().manual_seed(2))
    gens = [prompt_generator(0, i, torch.device("cpu")) for i in range(5)]
    assert torch.equal(sample(logits, SamplingParams(True, 1.0, 1, 1.0), gens), logits.argmax(-1))


def test_temperature_floor_keeps_the_scaled_logits_finite():
    """Below MIN_TEMPERATURE logits / temperature overflow float32 (1e-40: inf, and multinomial
    raises; on CUDA the device-side assert): the config refuses it. At the floor, float32 logits far
    larger than any model's stay finite, and sampling is greedy in effect."""
    import pytest

    from pipeinfer.config import MIN_TEMPERATURE, ConfigError, build_config

    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(3)) * 1e4  # (B, V) float32
    assert not torch.isfinite(filter_logits(logits, SamplingParams(True, 1e-40))).all()
    assert torch.isfinite(filter_logits(logits, SamplingParams(True, MIN_TEMPERATURE))).all()
    gens = [prompt_generator(0, i, torch.device("cpu")) for i in range(3)]
    assert torch.equal(sample(logits, SamplingParams(True, MIN_TEMPERATURE), gens), logits.argmax(-1))
    assert build_config({"model_path": "m", "prompts": ["a"], "temperature": MIN_TEMPERATURE}).temperature == 1e-5
    with pytest.raises(ConfigError, match=r"temperature=1e-40 is out of range: expected a number >= 1e-05"):
        build_config({"model_path": "m", "prompts": ["a"], "do_sample": True, "temperature": 1e-40})


def test_check_finite_names_the_row_with_nan_or_inf_and_passes_finite_logits_whose_sum_overflows():
    """check_finite reduces each row's sum first (one pass); a finite row whose sum overflows float32
    still passes, and a NaN, +inf or -inf anywhere names its prompt."""
    huge = torch.full((2, 8), 3e38)  # finite; the row sums overflow to inf
    check_finite(huge, 0, [5, 6], torch.float32)
    for bad in (float("nan"), float("inf"), float("-inf")):
        logits = torch.randn(3, 16)
        logits[1, 7] = bad
        with pytest.raises(NonFiniteLogits, match="step 4: the logits for prompt 9 are not finite"):
            check_finite(logits, 4, [8, 9, 10], torch.float32)
