"""Offloaded stages (max_cpu_memory): the plan keeps the first layers resident and streams the rest
from host memory and, in place, from the checkpoint on disk; greedy output_ids equal whole-model
generate() at pipeline_size 1 and 2, batched and not; the records show where each layer was and
what streaming cost; a rank's peak stays within its budgets; bad input ends with one line.

    pytest tests/test_offload.py
"""

from __future__ import annotations

import json
import os
import shutil
import sys

import pytest
import torch

from conftest import PROMPTS, ROOT, TINY, base_config, launch, prompt_records, reference_outputs, run_pipeline
from pipeinfer.report import summary as report, tables
from pipeinfer.config import ConfigError, build_config
from pipeinfer.plan.__main__ import dry_run
from pipeinfer.plan.make import plan_for_run
from pipeinfer.plan.model import read_model_config


@pytest.fixture(scope="module")
def llama8(tmp_path_factory):
    """Eight layers, so that a four-layer stage can keep one resident, one in host memory and two on
    disk (two streamed layers need the same two buffers that keeping them would)."""
    from pipeinfer.models.tiny import make_model

    return make_model(str(tmp_path_factory.mktemp("models") / "llama8"), seed=3, **dict(TINY, num_hidden_layers=8))


@pytest.fixture(scope="module")
def reference(llama8):
    return reference_outputs(llama8, PROMPTS, 12)


def _budgets(cfg: dict) -> dict:
    """max_memory a layer below what every layer resident needs (per rank), max_cpu_memory one layer:
    each stage then keeps what fits, puts one streamed layer in host memory and the rest on disk."""
    ranks = dry_run(build_config(cfg), device_type="cpu")["ranks"]
    probe = dry_run(build_config(dict(cfg, max_memory=[r["total"] - 1 for r in ranks], max_cpu_memory=0)),
                    device_type="cpu")
    layer = max(max(r["offload"]["layer_bytes"].values()) for r in probe["ranks"] if "offload" in r)
    return dict(max_memory=[r["total"] - layer for r in ranks], max_cpu_memory=layer)


@pytest.mark.parametrize("pipeline_size,batch_size", [(1, 1), (1, 3), (2, 1), (2, 3)])
def test_offloaded_stages_match_generate(llama8, reference, tmp_path, pipeline_size, batch_size):
    cfg = base_config(llama8, tmp_path, pipeline_size=pipeline_size, batch_size=batch_size, dtype="float32")
    cfg.update(_budgets(cfg))
    records = run_pipeline(cfg, tmp_path, pipeline_size)
    assert [p["output_ids"] for p in prompt_records(records)] == reference
    planned = next(r for r in records if r["type"] == "run")["plan"]["ranks"]
    stages = sorted((r for r in records if r["type"] == "stage"), key=lambda r: r["rank"])
    for plan, stage in zip(planned, stages):
        o = plan["offload"]
        assert o["device"]["layers"] and o["host"]["layers"] and o["disk"]["layers"], o  # every tier, every stage
        assert plan["total"] <= plan["budget"] and o["host"]["bytes"] <= o["cpu_budget"]
        assert sorted(o["device"]["layers"] + o["host"]["layers"] + o["disk"]["layers"]) == \
            list(range(plan["layers"][0], plan["layers"][1] + 1))
        assert o["disk"]["bytes"] == sum(o["layer_bytes"][str(i)] for i in o["disk"]["layers"])
        s = stage["offload"]
        assert (s["device_layers"], s["host_layers"], s["disk_layers"]) == \
            (o["device"]["layers"], o["host"]["layers"], o["disk"]["layers"])
        # every streamed layer came in at every step: 12 new tokens, one prefill and 11 decode steps
        # per micro-batch at least (loads run ahead, so the count is not exact)
        streamed = o["host"]["bytes"] + o["disk"]["bytes"]
        assert s["weights_moved_bytes"] >= 12 * streamed
        assert s["layer_loads"] >= 12 * len(o["host"]["layers"] + o["disk"]["layers"])
        assert s["weights_wait_s"] < stage["wall_s"] and s["weights_load_s"] > 0
        assert stage["param_bytes"] == plan["weights"]  # only the resident layers are held
    # the disk tier is read in place from the checkpoint: nothing written to the offload folder
    assert not os.path.exists(cfg["offload_folder"]) or not any(os.scandir(cfg["offload_folder"]))
    text = tables.format_table([report.summarize(report.load_run(cfg["output_path"]))])
    assert "rank 0 layers device/host/disk" in text and "rank 0 waiting for weights" in text, text


def test_every_layer_streamed(llama8, reference, tmp_path):
    """The smallest budget that works streams every layer of each stage (none resident)."""
    from pipeinfer.plan.offload import least_budget

    cfg = base_config(llama8, tmp_path, pipeline_size=2, batch_size=2, dtype="float32")
    free = plan_for_run(build_config(cfg), read_model_config(llama8), max(len(p) for p in PROMPTS) + 2, "float32",
                        "cpu").ranks  # the byte tokenizer: a token per byte, plus BOS/EOS at most
    cfg.update(max_memory=[least_budget(r) for r in free], max_cpu_memory=free[0].layer_bytes[0])
    records = run_pipeline(cfg, tmp_path, 2)
    assert [p["output_ids"] for p in prompt_records(records)] == reference
    for plan in next(r for r in records if r["type"] == "run")["plan"]["ranks"]:
        assert not plan["offload"]["device"]["layers"] and plan["offload"]["host"]["layers"], plan


def test_a_checkpoint_in_another_dtype_is_converted_as_it_streams(tmp_path_factory, tmp_path):
    """A bfloat16 checkpoint run in float32: the disk tier converts each tensor as it reads it (as a
    bfloat16 checkpoint runs in float16 on a T4), and the tokens still equal generate()'s."""
    from pipeinfer.models.tiny import make_model

    model = make_model(str(tmp_path_factory.mktemp("models") / "llama8-bf16"), seed=4, dtype="bfloat16",
                       **dict(TINY, num_hidden_layers=8))
    cfg = base_config(model, tmp_path, dtype="float32")
    cfg.update(_budgets(cfg), max_cpu_memory=0)  # every streamed layer from disk
    records = run_pipeline(cfg, tmp_path, 1)
    assert [p["output_ids"] for p in prompt_records(records)] == reference_outputs(model, PROMPTS, 12)
    plan = next(r for r in records if r["type"] == "run")["plan"]["ranks"][0]["offload"]
    stage = next(r for r in records if r["type"] == "stage")["offload"]
    assert plan["disk"]["layers"] and not plan["host"]["layers"]
    # 2 bytes read per 4 held: equal but for a load that straddled the reset after warm-up
    layer = max(plan["layer_bytes"].values())
    assert stage["weights_read_bytes"] > 0 and abs(stage["weights_moved_bytes"] - 2 * stage["weights_read_bytes"]) \
        <= layer


def test_plan_placement_and_smallest_budget(llama8):
    """The first layers resident as budget allows after KV cache, transient and two stream buffers;
    the next in host memory up to max_cpu_memory; the rest on disk. Too small a budget names the
    smallest that works, which then plans every layer streamed."""
    mc = read_model_config(llama8)
    cfg = dict(model_path=llama8, prompts=["x"], max_new_tokens=8, batch_size=2)
    free = plan_for_run(build_config(cfg), mc, 16, "float32", "cpu").ranks[0]
    layer = free.layer_bytes[0]
    fixed = free.total - sum(free.layer_bytes)
    plan = plan_for_run(build_config(dict(cfg, max_memory=fixed + 5 * layer, max_cpu_memory=2 * layer)), mc, 16,
                        "float32", "cpu").ranks[0]
    assert plan.placement == ("device",) * 3 + ("host",) * 2 + ("disk",) * 3
    assert plan.stream == 2 * layer and plan.weights == free.weights - 5 * layer and plan.total == fixed + 5 * layer
    assert plan.tier_bytes("host") == 2 * layer and plan.tier_bytes("disk") == 3 * layer
    with pytest.raises(ConfigError, match=rf"cannot hold rank 0's stage even with all its layers offloaded .*"
                                          rf"raise it to at least {fixed + 2 * layer} bytes"):
        plan_for_run(build_config(dict(cfg, max_memory=fixed + 2 * layer - 1, max_cpu_memory=0)), mc, 16, "float32",
                     "cpu")
    least = plan_for_run(build_config(dict(cfg, max_memory=fixed + 2 * layer, max_cpu_memory=0)), mc, 16, "float32",
                         "cpu").ranks[0]
    assert least.placement == ("disk",) * 8 and least.total == fixed + 2 * layer
    # a stage that fits is left alone; without max_cpu_memory a stage over budget is refused as before
    assert plan_for_run(build_config(dict(cfg, max_memory=free.total, max_cpu_memory=0)), mc, 16, "float32",
                        "cpu").ranks[0].placement == ("device",) * 8
    with pytest.raises(ConfigError, match=r"cannot hold rank 0's stage \(layers 0..7"):
        plan_for_run(build_config(dict(cfg, max_memory=fixed + 5 * layer)), mc, 16, "float32", "cpu")


def test_cuda_plan_counts_pinned_staging(llama8):
    """On CUDA, disk reads pass through two pinned staging buffers: the plan takes them out of
    max_cpu_memory first, and refuses a max_cpu_memory that cannot hold them. (A plan only: it reads
    headers, so it runs without a GPU.)"""
    mc = read_model_config(llama8)
    cfg = dict(model_path=llama8, prompts=["x"], max_new_tokens=8, dtype="float16")
    free = plan_for_run(build_config(cfg), mc, 16, "float16", "cuda").ranks[0]
    layer = free.layer_bytes[0]
    budget = free.total - 2 * layer  # keeps 4 of 8 layers
    plan = plan_for_run(build_config(dict(cfg, max_memory=budget, max_cpu_memory=3 * layer)), mc, 16, "float16",
                        "cuda").ranks[0]
    assert plan.staging == 2 * layer and plan.reserve > 0
    assert plan.placement == ("device",) * 4 + ("host",) + ("disk",) * 3  # 3 layers of host memory - staging = 1
    everything = plan_for_run(build_config(dict(cfg, max_memory=budget, max_cpu_memory=4 * layer)), mc, 16, "float16",
                              "cuda").ranks[0]
    assert everything.placement == ("device",) * 4 + ("host",) * 4 and everything.staging == 0  # no disk, no staging
    with pytest.raises(ConfigError, match=rf"max_cpu_memory\[0\]=0 bytes cannot hold the pinned buffers .* "
                                          rf"raise it to at least {2 * layer} bytes"):
        plan_for_run(build_config(dict(cfg, max_memory=budget, max_cpu_memory=0)), mc, 16, "float16", "cuda")


def test_one_budget_for_all_ranks_names_what_the_neediest_needs(llama8):
    """With one max_memory for every rank, the least budget in the refusal holds for every rank."""
    from pipeinfer.plan.offload import least_budget

    mc = read_model_config(llama8)
    cfg = dict(model_path=llama8, prompts=["x"], max_new_tokens=8, pipeline_size=2)
    ranks = plan_for_run(build_config(cfg), mc, 16, "float32", "cpu").ranks
    need = max(least_budget(r) for r in ranks)
    with pytest.raises(ConfigError, match=rf"raise it to at least {need} bytes"):
        plan_for_run(build_config(dict(cfg, max_memory=1000, max_cpu_memory=0)), mc, 16, "float32", "cpu")
    plan = plan_for_run(build_config(dict(cfg, max_memory=need, max_cpu_memory=0)), mc, 16, "float32", "cpu")
    assert all(r.fits and "disk" in r.placement for r in plan.ranks)


def test_dry_run_shows_the_placement(llama8, tmp_path, capsys):
    from pipeinfer.plan.__main__ import main

    cfg = dict(model_path=llama8, prompts=PROMPTS, max_new_tokens=8, pipeline_size=2, device="cpu")
    cfg.update(_budgets(cfg))
    path = tmp_path / "c.json"
    path.write_text(json.dumps(cfg))
    assert main([str(path)]) == 0
    out = capsys.readouterr().out
    assert "rank 0 offloads: device layer 0 (" in out and ", host layer 1 (" in out and ", disk layers 2..3 (" in out
    assert "rank 1 offloads: device layer 4 (" in out


@pytest.mark.parametrize("over,message", [
    (dict(max_cpu_memory="1GiB"), "max_cpu_memory offloads the layers that max_memory cannot hold, but max_memory "
                                  "is not set"),
    (dict(max_memory="300KB", max_cpu_memory="1GiB", quantization="int8"),
     "quantization='int8' with max_cpu_memory: quantized layers cannot be offloaded"),
])
def test_offload_config_errors(llama8, over, message):
    mc = read_model_config(llama8)
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        plan_for_run(build_config(dict(model_path=llama8, prompts=["x"], **over)), mc, 8, "float32", "cpu")


def test_pickle_checkpoints_are_not_offloaded(llama8, tmp_path):
    """Streaming reads tensors at their offsets in safetensors files; a pickle checkpoint has none."""
    from safetensors.torch import load_file

    path = str(tmp_path / "bin")
    shutil.copytree(llama8, path)
    torch.save(load_file(os.path.join(path, "model.safetensors")), os.path.join(path, "pytorch_model.bin"))
    os.remove(os.path.join(path, "model.safetensors"))
    cfg = build_config(dict(model_path=path, prompts=["x"], allow_pickle=True, max_memory="300KB",
                            max_cpu_memory="1GiB"))
    with pytest.raises(ConfigError, match=r"max_cpu_memory streams layers from safetensors files, and .* holds "
                                          r"pickle .bin weights: convert them"):
        plan_for_run(cfg, read_model_config(path), 8, "float32", "cpu")


@pytest.mark.parametrize("over,message", [
    (dict(max_cpu_memory="lots"), 'max_cpu_memory="lots" is out of range'),
    (dict(max_cpu_memory=-1), "max_cpu_memory=-1 is out of range"),
    (dict(max_cpu_memory=[1, 2]), r"max_cpu_memory=\[1, 2\] has 2 entries but pipeline_size=1"),
])
def test_budget_values_are_checked(over, message):
    with pytest.raises(ConfigError, match=message):
        build_config(dict(model_path="m", prompts=["x"], **over))


def test_budgets_take_one_value_for_every_rank():
    cfg = build_config(dict(model_path="m", prompts=["x"], pipeline_size=3, max_memory="2GiB", max_cpu_memory=0))
    from pipeinfer.config import per_rank
    assert per_rank(cfg.max_memory, 3) == [2 * 2**30] * 3 and per_rank(cfg.max_cpu_memory, 3) == [0, 0, 0]


def _offloaded_stage(model: str, **budgets):
    from pipeinfer.load.stage import load_stage

    mc = read_model_config(model)
    cfg = build_config(dict(model_path=model, prompts=["x"], max_new_tokens=8, **budgets))
    plan = plan_for_run(cfg, mc, 16, "float32", "cpu")
    stage, _ = load_stage(plan, 0, mc, torch.device("cpu"), torch.float32, "unused")
    return stage, plan.ranks[0]


def test_a_forward_that_fails_half_way_leaves_the_streamer_consistent(llama8):
    """A layer that raises mid-stage (as an abort would) leaves loads in flight; the next forward
    starts again from the first streamed layer and gives the logits of the whole model."""
    from transformers import AutoModelForCausalLM

    whole = AutoModelForCausalLM.from_pretrained(llama8, local_files_only=True, dtype=torch.float32).eval()
    free = plan_for_run(build_config(dict(model_path=llama8, prompts=["x"], max_new_tokens=8)),
                        read_model_config(llama8), 16, "float32", "cpu").ranks[0]
    stage, plan = _offloaded_stage(llama8, max_memory=free.total - 2 * free.layer_bytes[0],
                                   max_cpu_memory=free.layer_bytes[0])
    assert plan.tier("host") and plan.tier("disk")
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    pos = torch.arange(5)[None]
    victim = stage.base.layers[plan.tier("disk")[0]]

    def boom(module, args):
        raise RuntimeError("stop here")
    handle = victim.register_forward_pre_hook(boom)
    with pytest.raises(RuntimeError, match="stop here"):
        stage(ids, None, pos, stage.new_cache())
    handle.remove()
    for _ in range(2):
        got = stage(ids, None, pos, stage.new_cache())  # (1, V) last-position logits
        with torch.no_grad():
            want = whole(ids).logits[:, -1].float()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    stage.streamer.close()


def test_a_checkpoint_cut_short_mid_run_is_an_offload_error(llama8, tmp_path):
    """The disk tier reads the checkpoint at every step: a file truncated under a running job raises
    OffloadError naming the file and what to do (the runner prints such errors as one line and
    exits 1), not a traceback from deep inside or wrong tokens."""
    from pipeinfer.load.streamer import OffloadError

    model = str(tmp_path / "copy")
    shutil.copytree(llama8, model)
    free = plan_for_run(build_config(dict(model_path=model, prompts=["x"], max_new_tokens=8)),
                        read_model_config(model), 16, "float32", "cpu").ranks[0]
    stage, plan = _offloaded_stage(model, max_memory=free.total - 2 * free.layer_bytes[0], max_cpu_memory=0)
    assert plan.tier("disk")
    os.truncate(os.path.join(model, "model.safetensors"), 4096)
    with pytest.raises(OffloadError, match="ended .* bytes early while streaming an offloaded layer: the checkpoint "
                                           "changed during the run"):
        stage(torch.tensor([[5, 6, 7]]), None, torch.arange(3)[None], stage.new_cache())
    stage.streamer.close()


def test_runner_exits_with_one_line_when_the_budget_is_too_small(llama8, tmp_path):
    cfg = base_config(llama8, tmp_path, max_memory="10KB", max_cpu_memory="1GiB")
    results = launch(cfg, tmp_path, 1)
    assert results[0].returncode == 2
    lines = results[0].stderr.strip().splitlines()
    assert len(lines) == 1 and "even with all its layers offloaded" in lines[0] and "raise it to at least" in lines[0]


def test_offloaded_peak_within_budgets(tmp_path):
    """bench/memory.py --check-offload on CPU: each offloaded rank's peak RSS over the runtime
    baseline within max_memory plus its host tier, to the plan's accuracy (10%); and offloading
    saves, measured, most of what the plan says it saves."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import memory

    rows = memory.check_offload(str(tmp_path))
    assert len(rows) == 3
    for r in rows:
        assert r["placement"]["host"] and r["placement"]["disk"], r
        assert r["measured"] <= 1.10 * r["bound"], r
        assert r["measured_saving"] >= 0.8 * r["planned_saving"] > 0, r
