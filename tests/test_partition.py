"""Layer split (golden table) and the complete device_map derived from it.

    pytest tests/test_partition.py
"""

from __future__ import annotations

import pytest
import torch

from pipeinfer.models.families import family_for
from pipeinfer.plan.partition import StagePlan, check_complete, split_layers, stage_device_map

GOLDEN = [
    # (num_layers, pipeline_size) -> layer counts per stage
    ((4, 1), [4]),
    ((4, 2), [2, 2]),
    ((5, 2), [3, 2]),
    ((5, 3), [2, 2, 1]),
    ((5, 4), [1, 1, 2, 1]),
    ((7, 3), [2, 3, 2]),
    ((10, 4), [2, 3, 3, 2]),
    ((32, 2), [16, 16]),
    ((30, 4), [7, 8, 8, 7]),
    ((5, 5), [1, 1, 1, 1, 1]),
]


@pytest.mark.parametrize("args,counts", GOLDEN)
def test_split_layers_golden(args, counts):
    ranges = split_layers(*args)
    assert [len(r) for r in ranges] == counts
    assert ranges[0].start == 0 and ranges[-1].stop == args[0]
    assert all(a.stop == b.start for a, b in zip(ranges, ranges[1:]))


def test_last_stage_never_gets_the_remainder():
    for layers in range(1, 40):
        for size in range(1, layers + 1):
            counts = [len(r) for r in split_layers(layers, size)]
            assert counts[-1] == layers // size and max(counts) - min(counts) <= 1


@pytest.mark.parametrize("layers,size", [(4, 0), (4, 5), (1, 2), (3, -1)])
def test_split_layers_invalid(layers, size):
    with pytest.raises(ValueError):
        split_layers(layers, size)


def skeleton(model_path):
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_path)
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    return config, model


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("size", [1, 2, 3])
def test_device_map_is_complete_and_places_only_owned_modules(tiny_llama, tiny_llama_tied, tied, size):
    config, model = skeleton(tiny_llama_tied if tied else tiny_llama)
    fam = family_for(config.model_type)
    ranges = split_layers(config.num_hidden_layers, size)
    for rank in range(size):
        plan = StagePlan(rank, size, ranges[rank])
        dmap = stage_device_map([n for n, _ in model.named_children()], [n for n, _ in model.model.named_children()],
                                config.num_hidden_layers, fam, plan, tied, "cpu")
        check_complete(dmap, list(model.state_dict()), "parameters")
        local = {k for k, v in dmap.items() if v == "cpu"}
        assert {f"model.layers.{i}" for i in ranges[rank]} == {k for k in local if k.startswith("model.layers.")}
        assert ("model.embed_tokens" in local) == (plan.is_first or (tied and plan.is_last))
        assert ("lm_head" in local) == plan.is_last and ("model.norm" in local) == plan.is_last
        assert "model.rotary_emb" in local  # shared by every stage
        assert set(dmap.values()) <= {"cpu", "disk"}


def test_check_complete_names_what_is_missing():
    with pytest.raises(ValueError, match=r"does not place 1 tensors \(model.layers.0.q.weight\)"):
        check_complete({"model.embed_tokens": "cpu", "model.layers.1": "cpu"},
                       ["model.embed_tokens.weight", "model.layers.0.q.weight", "model.layers.1.q.weight"], "tensors")
    # a prefix must end at a dot: "model.layers.1" does not cover "model.layers.10"
    with pytest.raises(ValueError):
        check_complete({"model.layers.1": "cpu"}, ["model.layers.10.w"], "tensors")


def test_stage_loads_only_its_own_weights(tiny_llama, tmp_path):
    """Rank 1 of 3 materialises exactly its layers: no embeddings, no head, nothing on meta."""
    from pipeinfer.load.stage import partition_model

    stage, info = partition_model(tiny_llama, StagePlan(1, 3, range(0)), torch.device("cpu"), torch.float32,
                                  str(tmp_path / "off"))
    names = [n for n, _ in stage.named_parameters()]
    assert names and all(n.startswith(("base.layers.", "base.rotary_emb")) for n in names), names
    assert len(stage.base.layers) == len(info.layer_ranges[1]) == 2
    assert all(p.device.type == "cpu" for p in stage.parameters())
    assert stage.head is None
    assert [layer.self_attn.layer_idx for layer in stage.base.layers] == [0, 1]
    expected = sum(p.numel() * 4 for n, p in skeleton(tiny_llama)[1].named_parameters()
                   if n.startswith(("model.layers.2.", "model.layers.3.")))
    assert info.param_bytes == expected
    assert not [f for f in (tmp_path / "off").rglob("*") if f.is_file()], "nothing may stay in the offload folder"


def test_bin_only_checkpoint_is_refused(tmp_path):
    from pipeinfer.plan.checkpoint import read_headers
    from pipeinfer.config import ConfigError

    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ConfigError, match="pickle"):
        read_headers(str(tmp_path))
    assert read_headers(str(tmp_path), allow_pickle=True) is None


def test_dtype_auto():
    from pipeinfer.run.runtime import resolve_dtype

    cpu = torch.device("cpu")
    assert resolve_dtype("auto", cpu, "bfloat16") == torch.bfloat16  # no conversion: only this stage is read
    assert resolve_dtype("auto", cpu, "float32") == torch.float32
    assert resolve_dtype("auto", cpu, "float16") == torch.float32    # fp16 matmuls are slow or missing on CPU
    assert resolve_dtype("auto", cpu, None) == torch.float32
    assert resolve_dtype("float16", cpu, "bfloat16") == torch.float16
