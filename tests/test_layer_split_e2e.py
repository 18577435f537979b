"""layer_split, max_memory and allow_pickle through the runner, ranks as separate processes.

    pytest tests/test_layer_split_e2e.py
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from conftest import PROMPTS, base_config, launch, prompt_records, reference_outputs, run_pipeline


@pytest.fixture(scope="module")
def neox5(tmp_path_factory):
    from pipeinfer.models.tiny import make_model

    return make_model(str(tmp_path_factory.mktemp("split") / "neox5"), seed=4, model_type="gpt_neox", hidden_size=64,
                      intermediate_size=128, num_hidden_layers=5, num_attention_heads=4, max_position_embeddings=256)


@pytest.mark.parametrize("layer_split,size,expected", [([4, 1], 2, [[0, 3], [4, 4]]), ("auto", 3, None)])
def test_split_runs_and_matches_generate(neox5, tmp_path, layer_split, size, expected):
    cfg = base_config(neox5, tmp_path, pipeline_size=size, batch_size=len(PROMPTS), layer_split=layer_split)
    records = run_pipeline(cfg, tmp_path, size)
    assert [p["output_ids"] for p in prompt_records(records)] == reference_outputs(neox5, PROMPTS, 12)
    layers = records[0]["layers_per_rank"]
    assert len(layers) == size and (expected is None or layers == expected)


def test_budget_too_small_exits_2_naming_the_rank(neox5, tmp_path):
    cfg = base_config(neox5, tmp_path, pipeline_size=2, layer_split="auto", max_memory=["1GiB", "10KB"])
    results = launch(cfg, tmp_path, 2)
    assert [r.returncode for r in results] == [2, 2]
    assert any("max_memory[1]=10000 bytes cannot hold rank 1's stage" in r.stderr for r in results)
    assert not any("Traceback" in r.stderr for r in results)


def test_pickle_checkpoint_needs_allow_pickle(neox5, tmp_path):
    from safetensors.torch import load_file

    path = str(tmp_path / "neox-bin")
    shutil.copytree(neox5, path)
    torch.save(load_file(os.path.join(path, "model.safetensors")), os.path.join(path, "pytorch_model.bin"))
    os.remove(os.path.join(path, "model.safetensors"))
    refused = launch(base_config(path, tmp_path / "a", pipeline_size=2), tmp_path, 2)
    assert [r.returncode for r in refused] == [2, 2] and any("allow_pickle=true" in r.stderr for r in refused)
    cfg = base_config(path, tmp_path / "b", pipeline_size=2, allow_pickle=True, batch_size=len(PROMPTS))
    got = [p["output_ids"] for p in prompt_records(run_pipeline(cfg, tmp_path, 2))]
    assert got == reference_outputs(neox5, PROMPTS, 12)
    left = [str(f) for f in Path(cfg["offload_folder"]).rglob("*") if f.is_file()]
    assert not left, f"{len(left)} copies of other stages' weights left after loading, e.g. {left[:2]}"
