"""Every supported model family, end to end: greedy output_ids at pipeline_size 1, 2 and 3 equal
whole-model generate(), with ranks as separate processes over gloo; plus per-family checks that
need no processes (exact last-stage logits, placeholders) and the loading guards.

    pytest tests/test_families.py
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
import torch

from conftest import PROMPTS, base_config, launch, prompt_records, reference_outputs, run_pipeline

SMALL = dict(hidden_size=64, num_attention_heads=4, max_position_embeddings=256)
GQA = dict(intermediate_size=128, num_key_value_heads=2)
# Per model_type: a tiny config in that family's own keys. Layer counts vary (3, 4, 5: odd ones
# included); GPT-2, OPT and Gemma tie lm_head to the input embeddings by default; this OPT has
# project_in/project_out (word_embed_proj_dim != hidden_size).
FAMILY_MODELS = {
    "llama": dict(GQA, num_hidden_layers=5),
    "mistral": dict(GQA, num_hidden_layers=4),
    "qwen2": dict(GQA, num_hidden_layers=3),
    "qwen3": dict(GQA, num_hidden_layers=4, head_dim=16),
    "phi3": dict(GQA, num_hidden_layers=3),
    "gemma": dict(GQA, num_hidden_layers=3, head_dim=16),
    "gpt2": dict(num_hidden_layers=3),
    "opt": dict(ffn_dim=128, word_embed_proj_dim=32, num_hidden_layers=4),
    "gpt_neox": dict(intermediate_size=128, num_hidden_layers=5),
}
TIED = {"gemma", "gpt2", "opt"}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from pipeinfer.models.tiny import make_model

    root = tmp_path_factory.mktemp("families")
    return {mt: make_model(str(root / mt), seed=3, model_type=mt, **SMALL, **cfg) for mt, cfg in FAMILY_MODELS.items()}


@pytest.fixture(scope="module")
def references(models):
    return {mt: reference_outputs(path, PROMPTS, 12) for mt, path in models.items()}


def test_table_covers_tied_and_odd_layer_models(models):
    from transformers import AutoConfig

    configs = {mt: AutoConfig.from_pretrained(path) for mt, path in models.items()}
    assert {mt for mt, c in configs.items() if c.tie_word_embeddings} == TIED
    assert any(c.num_hidden_layers % 2 for c in configs.values())


@pytest.mark.parametrize("pipeline_size", [1, 2, 3])
@pytest.mark.parametrize("model_type", list(FAMILY_MODELS))
def test_greedy_matches_generate(models, references, tmp_path, model_type, pipeline_size):
    """One padded batch of all prompts per run: positions must skip the left padding exactly as
    generate() on each prompt alone has them."""
    cfg = base_config(models[model_type], tmp_path, pipeline_size=pipeline_size, batch_size=len(PROMPTS))
    records = run_pipeline(cfg, tmp_path, pipeline_size)
    assert [p["output_ids"] for p in prompt_records(records)] == references[model_type]


ROW_TEXTS = PROMPTS + ["Hi", "The end of the story"]
ROW_NEW = [7, 2, 11, 4, 3, 5]  # per prompt: rows leave at different steps and the next prompts join their slot


@pytest.mark.parametrize("model_type", list(FAMILY_MODELS))
def test_rows_joining_mid_run_match_generate(models, tmp_path, model_type):
    """The row schedule at pipeline_size 2, batch 4 (two slots of 2): prompts join as rows leave, their prefill packed
    into the visit's decode forward (prefill_chunk_size 3: the longer ones in chunks), in every family
    whose KV cache the row schedule takes (the others run the micro_batches schedule, said in the
    record). Each prompt's ids equal generate() on it alone with its own max_new_tokens."""
    texts = ROW_TEXTS
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"prompt": p, "max_new_tokens": n}) + "\n" for p, n in zip(texts, ROW_NEW)))
    cfg = base_config(models[model_type], tmp_path, prompts=None, prompts_file=str(path), pipeline_size=2,
                      batch_size=4, prefill_chunk_size=3)
    records = run_pipeline(cfg, tmp_path, 2)
    want = [reference_outputs(models[model_type], [p], n)[0] for p, n in zip(texts, ROW_NEW)]
    assert [p["output_ids"] for p in prompt_records(records)] == want
    stages = [r for r in records if r["type"] == "stage"]
    from transformers import AutoConfig
    from pipeinfer.plan.model import plain_rows

    rows = plain_rows(AutoConfig.from_pretrained(models[model_type]))
    assert all(s["schedule"] == ("rows" if rows else "micro_batches") for s in stages), stages
    assert all((s["packed_visits"] > 0 and s["prefill_chunks"] > 0) == rows for s in stages), stages


def stages_of(path: str, size: int, **cfg_over):
    from pipeinfer.config import build_config
    from pipeinfer.plan.partition import StagePlan
    from pipeinfer.load.stage import partition_model

    cfg = build_config(dict(model_path=path, prompts=["x"], pipeline_size=size, **cfg_over))
    return [partition_model(path, StagePlan(r, size, range(0)), torch.device("cpu"), torch.float32,
                            f"{path}-offload/rank{r}", cfg=cfg) for r in range(size)]


def run_stages(stages, enc):
    from pipeinfer.run.generation import position_ids

    h = enc["input_ids"]
    for stage, _ in stages:
        h = stage(h, enc["attention_mask"], position_ids(enc["attention_mask"]), stage.new_cache())
    return h  # (B, V) logits of the last position


@pytest.mark.parametrize("model_type", list(FAMILY_MODELS))
def test_three_stage_logits_equal_whole_model(models, model_type):
    """Stricter than token equality: a wrongly scaled or shifted stage input (Gemma's sqrt(hidden) factor
    under transformers < 5, a position embedding added twice) can leave greedy tokens unchanged."""
    from transformers import AutoModelForCausalLM

    from pipeinfer.models.tiny import make_tokenizer
    from pipeinfer.run.generation import position_ids

    path = models[model_type]
    enc = make_tokenizer()(PROMPTS, return_tensors="pt", padding=True)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        ref = model(**enc, position_ids=position_ids(enc["attention_mask"])).logits[:, -1]
    torch.testing.assert_close(run_stages(stages_of(path, 3), enc), ref, atol=1e-5, rtol=0)


def test_middle_stage_holds_only_its_layers(models):
    """OPT rank 1 of 3: no embeddings, positions, projections, final norm or head; placeholders instead."""
    (stage, info), = stages_of(models["opt"], 3)[1:2]
    base = stage.base
    assert stage.head is None and info.family == "opt"
    assert isinstance(base.embed_positions(None, 0, position_ids=None), torch.Tensor)
    assert base.embed_positions(None, 0).dim() == 0 and float(base.embed_positions(None, 0)) == 0.0
    assert all(n.startswith("base.layers.") for n, _ in stage.named_parameters())
    with pytest.raises(RuntimeError, match="belongs to another pipeline stage"):
        base.embed_tokens(torch.zeros(1, 1, dtype=torch.long))


def test_layer_split_auto_and_explicit(models):
    path = models["gpt_neox"]  # 5 layers
    explicit = stages_of(path, 3, layer_split=[1, 3, 1])
    assert [len(r) for r in explicit[0][1].layer_ranges] == [1, 3, 1]
    assert [len(s.base.layers) for s, _ in explicit] == [1, 3, 1]
    auto = stages_of(path, 2, layer_split="auto")
    info = auto[0][1]
    assert sum(len(r) for r in info.layer_ranges) == 5
    assert max(info.stage_bytes) - min(info.stage_bytes) <= max(info.stage_bytes) // 2
    # planned bytes are the parameters the ranks really hold (no KV headroom without kv_tokens)
    assert [i.param_bytes for _, i in auto] == info.stage_bytes


def test_max_memory_too_small_names_the_rank(models):
    from pipeinfer.load.stage import LoadError

    with pytest.raises(LoadError, match=r"max_memory\[1\]=1000 bytes cannot hold rank 1's stage"):
        stages_of(models["llama"], 2, layer_split="auto", max_memory=["1GiB", 1000])


def test_unsupported_architecture_fails_before_loading(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "t5"}))
    res = launch(base_config(str(tmp_path), tmp_path), tmp_path, 1)[0]
    assert res.returncode == 2
    assert "model_type='t5' is not supported" in res.stderr and "gpt_neox" in res.stderr and "opt" in res.stderr


def test_remote_code_needs_trust_remote_code(models, tmp_path):
    from pipeinfer.config import ConfigError
    from pipeinfer.plan.model import read_model_config

    path = str(tmp_path / "custom")
    shutil.copytree(models["llama"], path)
    with open(os.path.join(path, "config.json")) as f:
        data = json.load(f)
    data["auto_map"] = {"AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(data, f)
    with pytest.raises(ConfigError, match="auto_map.*set trust_remote_code=true"):
        read_model_config(path)
    assert read_model_config(path, trust_remote_code=True).model_type == "llama"
    res = launch(base_config(path, tmp_path), tmp_path, 1)[0]
    assert res.returncode == 2 and "trust_remote_code" in res.stderr and "Traceback" not in res.stderr


def test_pickle_checkpoint_only_with_allow_pickle(models, tmp_path):
    from safetensors.torch import load_file

    from pipeinfer.models.tiny import make_tokenizer
    from pipeinfer.load.stage import LoadError

    path = str(tmp_path / "gpt2-bin")
    shutil.copytree(models["gpt2"], path)
    weights = os.path.join(path, "model.safetensors")
    torch.save(load_file(weights), os.path.join(path, "pytorch_model.bin"))
    os.remove(weights)
    with pytest.raises(LoadError, match="pickle .bin weights.*save_pretrained.*allow_pickle=true"):
        stages_of(path, 2)
    enc = make_tokenizer()(PROMPTS, return_tensors="pt", padding=True)
    got = run_stages(stages_of(path, 2, allow_pickle=True), enc)
    torch.testing.assert_close(got, run_stages(stages_of(models["gpt2"], 2), enc), atol=0, rtol=0)


def test_kv_headroom_is_planned_per_layer(models):
    """stage_bytes = parameters + per layer 2 x batch_size x (longest prompt + max_new_tokens) x kv heads x head_dim."""
    from pipeinfer.config import build_config
    from pipeinfer.plan.partition import StagePlan
    from pipeinfer.load.stage import partition_model

    path = models["llama"]  # 5 layers, 2 kv heads of 16
    cfg = build_config(dict(model_path=path, prompts=["x"], pipeline_size=2, batch_size=3, max_new_tokens=7))
    _, info = partition_model(path, StagePlan(0, 2, range(0)), torch.device("cpu"), torch.float32,
                              f"{path}-offload/kv", cfg=cfg, longest_prompt=10)
    per_layer = 2 * 3 * (10 + 7) * 2 * 16 * 4
    assert info.stage_bytes[0] == info.param_bytes + len(info.layer_ranges[0]) * per_layer


def test_float16_on_a_bfloat16_checkpoint_warns(tmp_path, caplog):
    from pipeinfer.models.tiny import make_model
    from pipeinfer.plan.partition import StagePlan
    from pipeinfer.load.stage import partition_model

    path = make_model(str(tmp_path / "bf16"), dtype="bfloat16", **SMALL, **FAMILY_MODELS["qwen2"])
    with caplog.at_level("WARNING", logger="pipeinfer.load.stage"):
        partition_model(path, StagePlan(0, 1, range(0)), torch.device("cpu"), torch.float16, str(tmp_path / "o"))
    assert "bfloat16 checkpoint in float16" in caplog.text and "overflow" in caplog.text


@pytest.mark.parametrize("model_type", list(FAMILY_MODELS))
def test_every_family_attends_through_sdpa(models, model_type, monkeypatch):
    """Attention runs through torch's scaled_dot_product_attention in every layer (transformers picks
    "sdpa" for every family here; the equality tests above hold on it), not the eager matmul-softmax."""
    from pipeinfer.models.tiny import make_tokenizer

    (stage, _), = stages_of(models[model_type], 1)
    calls = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda *a, **k: calls.append(1) or sdpa(*a, **k))
    enc = make_tokenizer()(PROMPTS[:1], return_tensors="pt")
    stage(enc["input_ids"], None, torch.arange(enc["input_ids"].shape[1])[None], stage.new_cache())
    assert stage.config._attn_implementation == "sdpa"
    assert len(calls) == len(stage.base.get_submodule(FAMILY_LAYERS[model_type]))


FAMILY_LAYERS = {mt: "h" if mt == "gpt2" else "layers" for mt in FAMILY_MODELS}
