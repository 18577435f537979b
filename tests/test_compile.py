"""compile=true (load/compiled.py): greedy output_ids equal whole-model generate() in float32, the
compile time is in the stage record, and a compile that fails runs eager with one logged line.

    pytest tests/test_compile.py

Every family at pipeline_size 1, 2 and 3, batched (4 prompts in one slot) and unbatched
(batch_size 1). Compiling is the cost (a trace per part class and row count); the traces of one
family's parts are the same at every pipeline size, so after its first run the others mostly hit
inductor's cache. docs/tests.md.
"""

from __future__ import annotations

import logging

import pytest
import torch

from conftest import PROMPTS, base_config, prompt_records, reference_outputs, run_pipeline
from test_families import FAMILY_MODELS, SMALL

CASES = [(mt, pp, batch) for mt in FAMILY_MODELS for pp in (1, 2, 3) for batch in (4, 1)]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from pipeinfer.models.tiny import make_model

    root = tmp_path_factory.mktemp("compile")
    return {mt: make_model(str(root / mt), seed=3, model_type=mt, **SMALL, **cfg) for mt, cfg in FAMILY_MODELS.items()}


@pytest.mark.parametrize("model_type,pipeline_size,batch_size", CASES)
def test_compiled_greedy_matches_generate(models, tmp_path, model_type, pipeline_size, batch_size):
    cfg = base_config(models[model_type], tmp_path, pipeline_size=pipeline_size, batch_size=batch_size,
                      compile=True, micro_batch_size=batch_size)
    records = run_pipeline(cfg, tmp_path, pipeline_size, timeout=600)
    assert [p["output_ids"] for p in prompt_records(records)] == reference_outputs(models[model_type], PROMPTS, 12)
    stages = [r for r in records if r.get("type") == "stage"]
    assert len(stages) == pipeline_size
    for s in stages:  # compiled for real: parts found, time spent, no fallback to eager
        assert s["compile"]["parts"] > 0 and s["compile"]["compile_s"] > 0, s["compile"]
        assert s["compile"]["eager_fallback"] is None and s["compile"]["cache_dir"]


def _stage(path: str, **over):
    from pipeinfer.config import build_config
    from pipeinfer.load.stage import partition_model
    from pipeinfer.plan.partition import StagePlan

    cfg = build_config(dict(model_path=path, prompts=["x"], pipeline_size=1, **over))
    return partition_model(path, StagePlan(0, 1, range(0)), torch.device("cpu"), torch.float32,
                           f"{path}-offload", cfg=cfg)[0]


def _decode(stage, steps: int = 3) -> list[torch.Tensor]:
    cache = stage.new_cache(capacity=16)
    outs = [stage(torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]]), None, torch.arange(4)[None].expand(2, 4), cache)]
    for i in range(steps):
        outs.append(stage(torch.tensor([[3], [4]]), None, torch.full((2, 1), 4 + i), cache))
    return outs


def test_a_failing_compile_runs_eager_with_one_line(models, monkeypatch, caplog):
    """What a compiler error does: the stage's logits stay eager's, value for value, and one warning says why."""
    eager = _decode(_stage(models["llama"], compile=False))

    def broken(fn, **kw):
        def call(*a, **k):
            raise RuntimeError("inductor cannot lower this\nsecond line")
        return call

    monkeypatch.setattr(torch, "compile", broken)
    stage = _stage(models["llama"], compile=True)
    with caplog.at_level(logging.WARNING, logger="pipeinfer.load.compiled"):
        got = _decode(stage)
    for a, b in zip(got, eager):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    lines = [r.getMessage() for r in caplog.records if "compile" in r.getMessage()]
    assert lines == ["compile: torch.compile failed (RuntimeError: inductor cannot lower this): this stage runs eager"]
    assert stage.compiled.record()["eager_fallback"] == "RuntimeError: inductor cannot lower this"


def test_compile_false_and_auto_on_cpu_leave_the_stage_eager(models):
    """compile=false is today's path: no module is wrapped; "auto" on a CPU is the same."""
    for setting in (False, "auto"):
        stage = _stage(models["llama"], compile=setting)
        assert stage.compiled is None
        assert all("forward" not in vars(m) for m in stage.modules())


def test_cudagraphs_on_a_cpu_stage_compiles_without_them_and_says_so(models, caplog):
    """compile="cudagraphs" is CUDA's (bench/gpu_check.sh runs it against generate()); a CPU stage
    compiles its parts as compile=true does, with one warning."""
    with caplog.at_level(logging.WARNING, logger="pipeinfer.load.compiled"):
        stage = _stage(models["llama"], compile="cudagraphs")
    assert stage.compiled is not None and stage.compiled.record()["cudagraphs"] is False
    assert [r.getMessage() for r in caplog.records] == [
        'compile: "cudagraphs" needs a CUDA device: this cpu stage compiles without CUDA graphs']


def test_compiled_parts_are_the_norms_and_mlps(models):
    stage = _stage(models["llama"], compile=True)
    names = {n.split(".")[-1] for n, m in stage.named_modules() if m in stage.compiled.parts}
    assert names == {"input_layernorm", "post_attention_layernorm", "mlp", "norm"}
    stage = _stage(models["gpt2"], compile=True)
    names = {n.split(".")[-1] for n, m in stage.named_modules() if m in stage.compiled.parts}
    assert names == {"ln_1", "ln_2", "mlp", "ln_f"}
