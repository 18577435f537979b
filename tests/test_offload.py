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
import subprocess
import sys
import time

import pytest
import torch

from conftest import (ENTRY, PROMPTS, ROOT, TINY, base_config, free_port, launch, prompt_records, rank_env,
                      reference_outputs, run_pipeline)
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
    probe = dry_run(build_config(dict(cfg, max_memory=[r["total"] - 1 for r in ranks], max_cpu_memory="1GiB")),
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


@pytest.fixture(scope="module")
def llama8_bf16(tmp_path_factory):
    from pipeinfer.models.tiny import make_model

    return make_model(str(tmp_path_factory.mktemp("models") / "llama8-bf16"), seed=4, dtype="bfloat16",
                      **dict(TINY, num_hidden_layers=8))


def _largest_layer_tensor(model: str, itemsize: int) -> int:
    """Bytes of the largest tensor of a decoder layer, stored at `itemsize` bytes per value (from the
    whole model: every layer has the same shapes)."""
    from transformers import AutoModelForCausalLM

    whole = AutoModelForCausalLM.from_pretrained(model, local_files_only=True)
    return max(p.numel() for n, p in whole.named_parameters() if ".layers." in n) * itemsize


def test_a_checkpoint_in_another_dtype_is_converted_as_it_streams(llama8_bf16, tmp_path):
    """A bfloat16 checkpoint run in float32: the disk tier converts each tensor as it reads it (as a
    bfloat16 checkpoint runs in float16 on a T4), and the tokens still equal generate()'s."""
    model = llama8_bf16
    cfg = base_config(model, tmp_path, dtype="float32")
    # every streamed layer from disk: max_cpu_memory holds only the conversion buffer
    cfg.update(_budgets(cfg), max_cpu_memory=_largest_layer_tensor(model, 2))
    records = run_pipeline(cfg, tmp_path, 1)
    assert [p["output_ids"] for p in prompt_records(records)] == reference_outputs(model, PROMPTS, 12)
    plan = next(r for r in records if r["type"] == "run")["plan"]["ranks"][0]["offload"]
    stage = next(r for r in records if r["type"] == "stage")["offload"]
    assert plan["disk"]["layers"] and not plan["host"]["layers"]
    assert plan["scratch"] == stage["scratch_bytes"] == cfg["max_cpu_memory"]
    # 2 bytes read per 4 held: equal but for a load that straddled the reset after warm-up
    layer = max(plan["layer_bytes"].values())
    assert stage["weights_read_bytes"] > 0 and abs(stage["weights_moved_bytes"] - 2 * stage["weights_read_bytes"]) \
        <= layer


@pytest.mark.parametrize("model,dtype,scratch", [("llama8_bf16", "float32", 2), ("llama8", "float32", 0)])
def test_the_conversion_buffer_is_planned_in_max_cpu_memory(request, capsys, tmp_path, model, dtype, scratch):
    """The buffer a tensor stored in another dtype is read into before conversion (the largest such
    tensor: 117 MB for a 7B's MLP weight in bfloat16) is host memory: the plan takes it out of
    max_cpu_memory, as the CUDA staging, lists it in the records and the dry run, and the loaded
    streamer holds what the plan says, as it does for the stream buffers and the host tier."""
    from pipeinfer.plan.__main__ import main

    model = request.getfixturevalue(model)
    largest = _largest_layer_tensor(model, scratch)  # 0 when nothing is converted
    mc = read_model_config(model)
    base = dict(model_path=model, prompts=["x"], max_new_tokens=8, dtype=dtype)
    free = plan_for_run(build_config(base), mc, 16, dtype, "cpu").ranks[0]
    layer = free.layer_bytes[0]
    budgets = dict(max_memory=free.total - 3 * layer, max_cpu_memory=layer + largest)
    plan = plan_for_run(build_config(dict(base, **budgets)), mc, 16, dtype, "cpu").ranks[0]
    assert plan.scratch == largest and len(plan.tier("host")) == 1 and plan.tier("disk")
    assert plan.record()["offload"]["scratch"] == largest
    if largest:
        with pytest.raises(ConfigError, match=rf"max_cpu_memory\[0\]=0 bytes cannot hold the buffer that .* "
                                              rf"raise it to at least {largest} bytes"):
            plan_for_run(build_config(dict(base, max_memory=budgets["max_memory"], max_cpu_memory=0)), mc, 16,
                         dtype, "cpu")
        # one layer less in host memory when the budget is one byte short of both
        short = plan_for_run(build_config(dict(base, max_memory=budgets["max_memory"],
                                               max_cpu_memory=layer + largest - 1)), mc, 16, dtype, "cpu").ranks[0]
        assert not short.tier("host") and short.scratch == largest
    stage, _ = _offloaded_stage(model, dtype=dtype, **budgets)
    s = stage.streamer
    stage(torch.tensor([[5, 6, 7]]), None, torch.arange(3)[None], stage.new_cache())  # reads convert through it
    assert s.scratch.nbytes == plan.scratch and sum(b.nbytes for b in s.slots) == plan.stream
    assert sum(x.host.nbytes for x in s.layers if x.tier == "host") == plan.tier_bytes("host")
    s.close()
    path = tmp_path / "c.json"
    path.write_text(json.dumps(dict(base, **budgets, device="cpu")))
    assert main([str(path)]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("rank 0 offloads:"))
    assert ("dtype-conversion buffer" in line) == bool(largest), line


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
    """On CUDA, disk reads pass through two pinned staging buffers, and this float32 checkpoint run
    in float16 through the conversion buffer (its largest layer tensor, host memory too): the plan
    takes both out of max_cpu_memory first, and refuses a max_cpu_memory that cannot hold them. (A
    plan only: it reads headers, so it runs without a GPU.)"""
    mc = read_model_config(llama8)
    cfg = dict(model_path=llama8, prompts=["x"], max_new_tokens=8, dtype="float16")
    free = plan_for_run(build_config(cfg), mc, 16, "float16", "cuda").ranks[0]
    layer = free.layer_bytes[0]
    scratch = _largest_layer_tensor(llama8, 4)
    budget = free.total - 2 * layer  # keeps 4 of 8 layers
    plan = plan_for_run(build_config(dict(cfg, max_memory=budget, max_cpu_memory=3 * layer + scratch)), mc, 16,
                        "float16", "cuda").ranks[0]
    assert plan.staging == 2 * layer and plan.scratch == scratch and plan.reserve > 0
    assert plan.placement == ("device",) * 4 + ("host",) + ("disk",) * 3  # 3 layers of host memory - staging = 1
    everything = plan_for_run(build_config(dict(cfg, max_memory=budget, max_cpu_memory=4 * layer + scratch)), mc,
                              16, "float16", "cuda").ranks[0]
    assert everything.placement == ("device",) * 4 + ("host",) * 4 and everything.staging == 0  # no disk, no staging
    with pytest.raises(ConfigError, match=rf"max_cpu_memory\[0\]=0 bytes cannot hold the pinned buffers .* and the "
                                          rf"buffer that a tensor stored in another dtype .* raise it to at least "
                                          rf"{2 * layer + scratch} bytes"):
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


def _offloaded_stage(model: str, dtype: str = "float32", **budgets):
    from pipeinfer.load.stage import load_stage

    mc = read_model_config(model)
    cfg = build_config(dict(model_path=model, prompts=["x"], max_new_tokens=8, dtype=dtype, **budgets))
    plan = plan_for_run(cfg, mc, 16, dtype, "cpu")
    stage, _ = load_stage(plan, 0, mc, torch.device("cpu"), getattr(torch, dtype), "unused")
    return stage, plan.ranks[0]


@pytest.mark.parametrize("victim", ["first disk layer", "last streamed layer"])
def test_a_forward_that_fails_half_way_leaves_the_streamer_consistent(llama8, victim):
    """A layer that raises mid-stage (as an abort would) leaves loads in flight and its buffer bound;
    the next forwards give the logits of the whole model, and every buffer is back in the prefetch:
    after a forward, both hold the next step's first streamed layers, loading (when the last
    streamed layer raised, the next step's first was already loading, and its buffer was lost)."""
    from transformers import AutoModelForCausalLM

    whole = AutoModelForCausalLM.from_pretrained(llama8, local_files_only=True, dtype=torch.float32).eval()
    free = plan_for_run(build_config(dict(model_path=llama8, prompts=["x"], max_new_tokens=8)),
                        read_model_config(llama8), 16, "float32", "cpu").ranks[0]
    stage, plan = _offloaded_stage(llama8, max_memory=free.total - 2 * free.layer_bytes[0],
                                   max_cpu_memory=free.layer_bytes[0])
    assert plan.tier("host") and plan.tier("disk")
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    pos = torch.arange(5)[None]
    streamed = plan.tier("host") + plan.tier("disk")
    victim = stage.base.layers[plan.tier("disk")[0] if victim == "first disk layer" else streamed[-1]]

    def boom(module, args):
        raise RuntimeError("stop here")
    handle = victim.register_forward_pre_hook(boom)
    with pytest.raises(RuntimeError, match="stop here"):
        stage(ids, None, pos, stage.new_cache())
    handle.remove()
    s = stage.streamer
    for _ in range(3):
        got = stage(ids, None, pos, stage.new_cache())  # (1, V) last-position logits
        with torch.no_grad():
            want = whole(ids).logits[:, -1].float()
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        assert not s.active and sorted(s.pending) == streamed[:2], (s.active, s.pending)
        assert sorted(job.slot for job in s.pending.values()) == [0, 1] and not s.free
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


HANG_READS = """
import os, runpy, sys, threading, time
import pipeinfer.load.stage as stage
when, armed = %r, threading.Event()
real_preadv, real_warm_up = os.preadv, stage.Stage.warm_up
def preadv(*args):  # the streamer's reader thread; resident weights are read on the main thread
    if threading.current_thread() is not threading.main_thread() and (when == "load" or armed.is_set()):
        print(f"read hangs at {time.time()!r}", file=sys.stderr, flush=True)
        threading.Event().wait()  # a read that never returns, as on a stuck network filesystem
    return real_preadv(*args)
def warm_up(self, *args):
    real_warm_up(self, *args)
    armed.set()
os.preadv, stage.Stage.warm_up = preadv, warm_up
runpy.run_path(%r, run_name="__main__")
"""


@pytest.mark.parametrize("when", ["load", "run"])
def test_a_read_that_hangs_ends_the_rank_within_timeout_s(llama8, tmp_path, when):
    """A checkpoint read that never returns, while the host tier is read in (load) or a streamed
    layer mid-run: the rank ends after timeout_s with one line naming the file and the fix, exit 1,
    instead of waiting forever (its peers would give up after timeout_s; SIGTERM only sets a flag)."""
    timeout_s = 3
    cfg = base_config(llama8, tmp_path, timeout_s=timeout_s, max_new_tokens=4)
    cfg.update(_budgets(cfg))
    path = tmp_path / "c.json"
    path.write_text(json.dumps(cfg))
    env = dict(rank_env(0, 1, free_port()), PYTHONPATH=ROOT)
    proc = subprocess.Popen([sys.executable, "-c", HANG_READS % (when, ENTRY), "--config", str(path)], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    ended = time.time()
    hung = float(next(line for line in err.splitlines() if line.startswith("read hangs at ")).split()[-1])
    assert proc.returncode == 1, err[-3000:]
    assert timeout_s <= ended - hung < timeout_s + 20, ended - hung  # process exit included
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert f"did not arrive within timeout_s={timeout_s}" in lines[0] and "model.safetensors" in lines[0], lines
    assert "raise timeout_s" in lines[0], lines


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
