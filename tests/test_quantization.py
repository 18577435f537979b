"""Quantized stages (bitsandbytes on CPU): greedy output_ids equal generate() on the whole model
quantized the same way by transformers, quantized at load and pre-quantized; the plan counts the
quantized bytes each rank holds; bad input ends with one line and exit 2.

    pytest tests/test_quantization.py
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from conftest import PROMPTS, base_config, launch, prompt_records, reference_outputs, require, run_pipeline
from pipeinfer.config import ConfigError, build_config
from pipeinfer.plan.quantization import Quantization

try:
    import bitsandbytes as bnb
except ImportError:  # requirements-dev.txt installs it; CI must not skip these tests
    bnb = None


@pytest.fixture(autouse=True)
def _bitsandbytes():
    require(None if bnb is not None else "bitsandbytes is not installed: pip install -r requirements-dev.txt")


def _q(method: str, double_quant: bool = False) -> Quantization:
    return Quantization(method, "load", double_quant=double_quant, compute_dtype="float32")


VARIANTS = [("int8", False), ("nf4", False), ("fp4", False), ("nf4", True)]  # (method, double quantization)


@pytest.fixture(scope="module")
def references(tiny_llama):
    return {v: reference_outputs(tiny_llama, PROMPTS, 12, quantization_config=_q(*v).bnb_config(), device_map="cpu")
            for v in VARIANTS}


def test_quantized_reference_differs_from_full_precision(tiny_llama, references):
    """Otherwise the equivalence tests below could not tell a quantized stage from a plain one."""
    full = reference_outputs(tiny_llama, PROMPTS, 12)
    assert all(references[v] != full for v in VARIANTS)
    assert len({json.dumps(references[v]) for v in VARIANTS}) == len(VARIANTS)


# Every method at pipeline_size 2 and 3, one prompt and several at a time (5 layers: 3+2 and 2+2+1).
@pytest.mark.parametrize("method,double_quant,pipeline_size,batch_size", [
    ("int8", False, 2, 1), ("int8", False, 3, 3), ("nf4", False, 2, 3), ("nf4", True, 3, 1),
    ("fp4", False, 2, 1), ("fp4", False, 3, 3)])
def test_quantized_at_load_matches_generate(tiny_llama, references, tmp_path, method, double_quant, pipeline_size,
                                            batch_size):
    cfg = base_config(tiny_llama, tmp_path, pipeline_size=pipeline_size, batch_size=batch_size, dtype="float32",
                      quantization=method, quantization_options={"bnb_4bit_use_double_quant": double_quant})
    records = run_pipeline(cfg, tmp_path, pipeline_size)
    assert [p["output_ids"] for p in prompt_records(records)] == references[(method, double_quant)]
    q = records[0]["plan"]["quantization"]
    assert (q["method"], q["source"]) == (method, "load") and q["library"].startswith("bitsandbytes ")


@pytest.fixture(scope="module")
def prequantized(tiny_llama, tmp_path_factory):
    """The tiny model quantized by transformers and saved with save_pretrained, per method."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = {}
    for method in ("int8", "nf4"):
        path = str(tmp_path_factory.mktemp("prequantized") / method)
        model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32, device_map="cpu",
                                                     quantization_config=_q(method).bnb_config())
        model.save_pretrained(path)
        AutoTokenizer.from_pretrained(tiny_llama).save_pretrained(path)
        out[method] = path
    return out


@pytest.mark.parametrize("method,batch_size", [("int8", 3), ("nf4", 1)])
def test_prequantized_checkpoint_matches_generate(prequantized, tmp_path, method, batch_size):
    path = prequantized[method]
    want = reference_outputs(path, PROMPTS, 12, device_map="cpu")
    records = run_pipeline(base_config(path, tmp_path, pipeline_size=2, batch_size=batch_size, dtype="float32"),
                           tmp_path, 2)
    assert [p["output_ids"] for p in prompt_records(records)] == want
    assert records[0]["plan"]["quantization"]["source"] == "checkpoint"


@pytest.mark.parametrize("method", ["int8", "nf4"])
def test_prequantized_ranks_read_only_their_own_tensors(prequantized, monkeypatch, method):
    """Every tensor a rank reads belongs to its stage, and together the ranks read the checkpoint once."""
    from safetensors import safe_open

    from pipeinfer.load import stage as stage_mod, weights
    from pipeinfer.plan.layout import placement
    from pipeinfer.plan.make import plan_for_run
    from pipeinfer.plan.model import read_model_config

    path = prequantized[method]
    cfg = build_config(dict(model_path=path, prompts=["x"], pipeline_size=2, max_new_tokens=4))
    mc = read_model_config(path)
    plan = plan_for_run(cfg, mc, 8, "float32", "cpu")
    read = []
    real = weights.read_tensor
    monkeypatch.setattr(weights, "read_tensor", lambda t, key, *a: read.append(key) or real(t, key, *a))
    per_rank = []
    for rank in range(2):
        read.clear()
        _, info = stage_mod.load_stage(plan, rank, mc, torch.device("cpu"), torch.float32, "unused")
        per_rank.append(set(read))
        assert plan.ranks[rank].weights == info.param_bytes  # planned as stored, scales included
        assert len(read) == len(set(read))
        layers = plan.ranks[rank].layers
        for key in read:  # a decoder layer's tensor is one of this rank's layers
            if key.startswith("model.layers."):
                assert int(key.split(".")[2]) in layers, key
        assert all(placement(plan.ranks[rank].device_map, k) == "cpu" for k in read if k in plan.keys.values())
    with safe_open(os.path.join(path, "model.safetensors"), framework="pt") as f:
        stored = set(f.keys())
    unread = stored - per_rank[0] - per_rank[1]
    assert not per_rank[0] & per_rank[1]
    assert all(k.endswith("weight_format") for k in unread), unread  # int8's format tag, not needed to load


@pytest.mark.parametrize("method,double_quant", [("int8", False), ("nf4", False), ("nf4", True), ("fp4", False)])
def test_plan_counts_quantized_bytes(tiny_llama, method, double_quant):
    """The plan's weights per rank equal the bytes the loaded quantized stage holds, scales included."""
    from pipeinfer.plan.make import plan_for_run
    from pipeinfer.load.quantize import held_bytes
    from pipeinfer.plan.model import read_model_config
    from pipeinfer.load.stage import load_stage

    options = {"bnb_4bit_use_double_quant": double_quant} if double_quant else None
    cfg = build_config(dict(model_path=tiny_llama, prompts=["x"], pipeline_size=2, max_new_tokens=4,
                            quantization=method, quantization_options=options))
    mc = read_model_config(tiny_llama)
    plan = plan_for_run(cfg, mc, 8, "float32", "cpu")
    full = plan_for_run(build_config(dict(model_path=tiny_llama, prompts=["x"], pipeline_size=2, max_new_tokens=4)),
                        mc, 8, "float32", "cpu")
    for rank in range(2):
        stage, info = load_stage(plan, rank, mc, torch.device("cpu"), torch.float32, "unused")
        assert plan.ranks[rank].weights == info.param_bytes == held_bytes(stage)
        assert plan.ranks[rank].weights < full.ranks[rank].weights * (0.45 if method == "int8" else 0.35)
        linear = [m for m in stage.base.modules() if isinstance(m, (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit))]
        assert len(linear) == 7 * len(plan.ranks[rank].layers)  # q k v o gate up down, in every layer
        assert not isinstance(stage.head, (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit))


def test_skip_modules_stay_in_full_precision(tiny_llama):
    from pipeinfer.plan.make import plan_for_run
    from pipeinfer.plan.model import read_model_config

    cfg = build_config(dict(model_path=tiny_llama, prompts=["x"], quantization="nf4",
                            quantization_options={"llm_int8_skip_modules": ["mlp.down_proj"]}))
    plan = plan_for_run(cfg, read_model_config(tiny_llama), 8, "float32", "cpu")
    assert plan.quantized and not any(n.endswith("mlp.down_proj.weight") for n in plan.quantized)
    assert any(n.endswith("mlp.up_proj.weight") for n in plan.quantized)


def test_quantization_shrinks_the_plan_until_it_fits(tiny_llama):
    """A budget the float32 stage overflows: the refusal suggests quantizing, and nf4 then fits."""
    from pipeinfer.plan.make import plan_for_run
    from pipeinfer.plan.model import read_model_config

    mc = read_model_config(tiny_llama)
    raw = dict(model_path=tiny_llama, prompts=["x"], pipeline_size=1, max_new_tokens=4, max_memory=["300KB"])
    with pytest.raises(ConfigError, match='quantization="int8"'):
        plan_for_run(build_config(raw), mc, 8, "float32", "cpu")
    assert plan_for_run(build_config(dict(raw, quantization="nf4")), mc, 8, "float32", "cpu").ranks[0].fits


# --- bad input: one line, exit 2, before any rank waits ---------------------------------------------


def test_unknown_method_is_a_config_error(tiny_llama):
    with pytest.raises(ConfigError, match=r'quantization="int4" is out of range: expected one of none, int8, nf4'):
        build_config(dict(model_path=tiny_llama, prompts=["x"], quantization="int4"))
    with pytest.raises(ConfigError, match="quantization_options"):
        build_config(dict(model_path=tiny_llama, prompts=["x"], quantization="nf4",
                          quantization_options={"bnb_4bit_quant_type": "nf4"}))


def test_missing_library_names_the_package(tiny_llama, monkeypatch):
    import importlib.util

    from pipeinfer.plan.make import plan_for_run
    from pipeinfer.plan.model import read_model_config

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    cfg = build_config(dict(model_path=tiny_llama, prompts=["x"], quantization="int8"))
    with pytest.raises(ConfigError, match=r"needs the bitsandbytes package, which is not installed: pip install"):
        plan_for_run(cfg, read_model_config(tiny_llama), 8, "float32", "cpu")


def test_checkpoint_quantized_otherwise_is_refused(prequantized, tmp_path):
    import shutil

    from pipeinfer.plan.make import plan_for_run
    from pipeinfer.plan.model import read_model_config

    path = prequantized["nf4"]
    cfg = build_config(dict(model_path=path, prompts=["x"], quantization="int8"))
    with pytest.raises(ConfigError, match=r"quantization='int8' but the checkpoint is already quantized as 'nf4'"):
        plan_for_run(cfg, read_model_config(path), 8, "float32", "cpu")
    gptq = str(tmp_path / "gptq")
    shutil.copytree(path, gptq)
    with open(os.path.join(gptq, "config.json")) as f:
        conf = json.load(f)
    conf["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    with open(os.path.join(gptq, "config.json"), "w") as f:
        json.dump(conf, f)
    with pytest.raises(ConfigError, match=r"quantized with 'gptq', which this runner does not load"):
        plan_for_run(build_config(dict(model_path=gptq, prompts=["x"])), read_model_config(gptq), 8, "float32", "cpu")


def test_bad_quantization_exits_2_with_one_line_on_every_rank(tiny_llama, tmp_path, monkeypatch):
    """Through the entry script with real ranks: the refusal comes before the rendezvous."""
    cfg = base_config(tiny_llama, tmp_path, pipeline_size=2, quantization="int8",
                      quantization_options={"llm_int8_threshold": -1})
    for res in launch(cfg, tmp_path, 2, timeout=120):
        lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
        assert res.returncode == 2, res.stderr[-2000:]
        assert len(lines) == 1 and "quantization_options" in lines[0] and "llm_int8_threshold" in lines[0], lines



def test_skip_module_that_is_no_regular_expression_exits_2_on_every_rank(tiny_llama, tmp_path):
    """llm_int8_skip_modules entries are matched as regular expressions (as transformers matches
    them): one that does not compile is one line naming it, exit 2 on every rank, not re.error."""
    cfg = base_config(tiny_llama, tmp_path, pipeline_size=2, quantization="nf4",
                      quantization_options={"llm_int8_skip_modules": ["mlp.down_proj", "mlp.("]})
    for res in launch(cfg, tmp_path, 2, timeout=120):
        lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
        assert res.returncode == 2, res.stderr[-2000:]
        assert len(lines) == 1 and "llm_int8_skip_modules" in lines[0] and "'mlp.('" in lines[0], lines
    assert not os.path.exists(cfg["output_path"])


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory):
    from pipeinfer.models.tiny import make_model

    return make_model(str(tmp_path_factory.mktemp("models") / "gpt2"), seed=4, model_type="gpt2", n_embd=64,
                      n_layer=3, n_head=4, n_positions=256)


@pytest.mark.parametrize("method", ["int8", "nf4"])
def test_gpt2_conv1d_weights_quantize_like_transformers(tiny_gpt2, tmp_path, method):
    """GPT-2's Conv1D stores (in, out): transposed before quantizing, as transformers does; the plan
    counts int8's scales per output feature."""
    from pipeinfer.plan.make import plan_for_run
    from pipeinfer.plan.model import read_model_config
    from pipeinfer.load.stage import load_stage

    want = reference_outputs(tiny_gpt2, PROMPTS, 8, quantization_config=_q(method).bnb_config(), device_map="cpu")
    records = run_pipeline(base_config(tiny_gpt2, tmp_path, pipeline_size=2, batch_size=4, max_new_tokens=8,
                                       dtype="float32", quantization=method), tmp_path, 2)
    assert [p["output_ids"] for p in prompt_records(records)] == want
    mc = read_model_config(tiny_gpt2)
    plan = plan_for_run(build_config(dict(model_path=tiny_gpt2, prompts=["x"], pipeline_size=2, max_new_tokens=4,
                                          quantization=method)), mc, 8, "float32", "cpu")
    for rank in range(2):
        _, info = load_stage(plan, rank, mc, torch.device("cpu"), torch.float32, "unused")
        assert plan.ranks[rank].weights == info.param_bytes
