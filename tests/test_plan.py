"""The plan before the load: planned bytes against what loading really holds, a job that does not
fit refused before any rendezvous, and the dry run on a checkpoint larger than this machine's memory.

    pytest tests/test_plan.py
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import pytest
import torch

from conftest import ENTRY, PROMPTS, ROOT, TINY, base_config, rank_env, start_rank

SMALL = dict(hidden_size=64, num_attention_heads=4, max_position_embeddings=256)
MODELS = {  # tied and untied heads, GQA, a nested base (OPT with projections), a base saved without its root
    "llama": dict(SMALL, intermediate_size=128, num_key_value_heads=2, num_hidden_layers=5),
    "gemma": dict(SMALL, intermediate_size=128, num_key_value_heads=2, num_hidden_layers=3, head_dim=16),
    "gpt2": dict(SMALL, num_hidden_layers=3),
    "opt": dict(SMALL, ffn_dim=128, word_embed_proj_dim=32, num_hidden_layers=4),
    "gpt_neox": dict(SMALL, intermediate_size=128, num_hidden_layers=5),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from pipeinfer.models.tiny import make_model

    root = tmp_path_factory.mktemp("plan")
    return {mt: make_model(str(root / mt), seed=5, model_type=mt, **cfg) for mt, cfg in MODELS.items()}


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("model_type", list(MODELS))
def test_planned_weights_are_the_loaded_parameter_bytes(models, model_type, dtype):
    """Exactly, per rank, at pipeline_size 1..3, in the checkpoint's dtype and converted."""
    from pipeinfer.config import build_config
    from pipeinfer.plan.make import plan_for_run
    from pipeinfer.plan.model import read_model_config
    from pipeinfer.load.stage import load_stage

    path = models[model_type]
    mc = read_model_config(path)
    for size in (1, 2, 3):
        cfg = build_config(dict(model_path=path, prompts=["x"], pipeline_size=size, batch_size=3))
        plan = plan_for_run(cfg, mc, 9, dtype, "cpu")
        assert sum(len(r) for r in plan.layer_ranges) == mc.num_hidden_layers
        for rank in range(size):
            stage, info = load_stage(plan, rank, mc, torch.device("cpu"), getattr(torch, dtype), "unused")
            assert plan.ranks[rank].weights == info.param_bytes > 0, (size, rank)
            assert all(p.dtype == getattr(torch, dtype) for p in stage.parameters())
            # KV cache: keys + values, kv heads x head_dim, every prompt in flight at prompt + max_new_tokens
            kv_width = getattr(mc, "num_key_value_heads", None) or mc.num_attention_heads
            kv_width *= getattr(mc, "head_dim", None) or mc.hidden_size // mc.num_attention_heads
            assert plan.ranks[rank].kv_cache == len(plan.ranks[rank].layers) * 2 * 3 * kv_width * (9 + 32) * \
                torch.tensor([], dtype=getattr(torch, dtype)).element_size()


def test_tensors_read_in_chunks_are_the_stored_ones(models, monkeypatch, tmp_path):
    """weights.read_tensor (plain reads at the header's offsets, converted a chunk at a time) gives what
    safetensors' own loader gives, in every dtype; a file cut short after planning is a LoadError."""
    import shutil

    from safetensors.torch import load_file

    from pipeinfer.load import weights
    from pipeinfer.plan.checkpoint import read_headers

    monkeypatch.setattr(weights, "READ_CHUNK_BYTES", 1000)  # every tensor over several chunks
    path = models["gpt2"]
    ref = load_file(os.path.join(path, "model.safetensors"))
    for key, t in read_headers(path).items():
        for dtype in (None, torch.float32, torch.float16, torch.bfloat16):
            got = weights.read_tensor(t, key, torch.device("cpu"), dtype)
            assert got.dtype == (dtype or ref[key].dtype) and torch.equal(got, ref[key].to(got.dtype)), key
    cut = str(tmp_path / "cut")
    shutil.copytree(path, cut)
    tensors = read_headers(cut)
    key = max(tensors, key=lambda k: tensors[k].offset)
    os.truncate(os.path.join(cut, "model.safetensors"), tensors[key].offset + 10)
    with pytest.raises(weights.LoadError, match=rf"model.safetensors ended \d+ bytes early while reading {key}: the "
                                              r"checkpoint changed after the plan read its headers"):
        weights.read_tensor(tensors[key], key, torch.device("cpu"))


def test_kv_cache_plan_is_what_the_cache_allocates(models):
    """The planned KV bytes of a stage equal the buffers PreallocatedLayer holds after the slots'
    prefills, at the capacity generation.py gives them (padded prompt + max_new_tokens)."""
    from pipeinfer.config import build_config
    from pipeinfer.plan.make import plan_for_run
    from pipeinfer.plan.model import read_model_config
    from pipeinfer.load.stage import load_stage

    path = models["llama"]
    mc = read_model_config(path)
    cfg = build_config(dict(model_path=path, prompts=["x"], pipeline_size=2, batch_size=3, max_new_tokens=5))
    plan = plan_for_run(cfg, mc, 7, "float32", "cpu")
    assert plan.slots == (2, 1)
    for rank in range(2):
        stage, _ = load_stage(plan, rank, mc, torch.device("cpu"), torch.float32, "unused")
        held = 0
        for b in plan.slots:
            cache = stage.new_cache(capacity=7 + 5)
            x = torch.zeros(b, 7, dtype=torch.long) if rank == 0 else torch.zeros(b, 7, mc.hidden_size)
            stage(x, None, torch.arange(7).expand(b, 7), cache)
            held += sum(layer._k.nbytes + layer._v.nbytes for layer in cache.layers)
        assert plan.ranks[rank].kv_cache == held


def test_transient_counts_the_joiners_own_kv_cache(models):
    """Row schedule: a visit's whole joiners prefill into a KV cache of their own before it is spliced
    into their rows (rows.py), and prompts longer than prefill_chunk_size, or with several slots every
    prompt (its prefill spreads over their visits), keep one each across visits, in every slot at
    once. The plan's transient counts those buffers, as PreallocatedLayer allocates them, over what
    the micro_batches schedule's (which prefills into the slot's own cache) counts."""
    from pipeinfer.config import build_config
    from pipeinfer.plan.make import plan_for_run
    from pipeinfer.plan.model import read_model_config
    from pipeinfer.load.stage import load_stage

    path = models["llama"]
    mc = read_model_config(path)
    base = dict(model_path=path, prompts=["x"], pipeline_size=2, batch_size=3, max_new_tokens=5)
    plans = {name: plan_for_run(build_config({**base, **over}), mc, 7, "float32", "cpu") for name, over in
             (("micro", {"schedule": "micro_batches"}), ("whole", {"prefill_chunk_size": 0}),
              ("chunked", {"prefill_chunk_size": 4}), ("spread", {}), ("unspread", {"spread_prefill": False}),
              ("scoring", {"prefill_chunk_size": 4, "prompt_logprobs": True}),
              ("scoring micro", {"schedule": "micro_batches", "prompt_logprobs": True}))}
    assert plans["whole"].slots == (2, 1)
    for rank in range(2):
        stage, _ = load_stage(plans["whole"], rank, mc, torch.device("cpu"), torch.float32, "unused")

        def held(rows: int) -> int:  # what one prefill of `rows` prompts of 7 tokens leaves in its own cache
            cache = stage.new_cache(capacity=7)
            x = torch.zeros(rows, 7, dtype=torch.long) if rank == 0 else torch.zeros(rows, 7, mc.hidden_size)
            stage(x, None, torch.arange(7).expand(rows, 7), cache)
            return sum(layer._k.nbytes + layer._v.nbytes for layer in cache.layers)

        micro = plans["micro"].ranks[rank].transient
        assert held(1) > 0
        assert plans["whole"].ranks[rank].transient - micro == held(2)  # the largest slot's joiners, at once
        assert plans["chunked"].ranks[rank].transient - micro == 3 * held(1)  # one per prompt, every slot's
        assert plans["spread"].ranks[rank].transient - micro == 3 * held(1)  # 7 < 512 tokens, but two slots
        assert plans["unspread"].ranks[rank].transient - micro == held(2)
        # scoring a prompt prefills it whole (no chunks)
        assert plans["scoring"].ranks[rank].transient - plans["scoring micro"].ranks[rank].transient == held(2)


def test_budget_errors_name_the_fix(models):
    from pipeinfer.config import ConfigError, build_config
    from pipeinfer.plan.make import plan_for_run
    from pipeinfer.plan.model import read_model_config

    path = models["llama"]
    mc = read_model_config(path)
    cfg = build_config(dict(model_path=path, prompts=["x"], pipeline_size=1, batch_size=64, max_memory=["2MB"]))
    with pytest.raises(ConfigError, match=r"max_memory\[0\]=2000000 bytes cannot hold rank 0's stage \(layers 0..4: "
                                          r"weights \d+ \+ KV cache \d+ \+ transient \d+ \+ reserve 0 = \d+ bytes\): "
                                          r"raise it to at least \d+ bytes .*lower batch_size to \d+"):
        plan_for_run(cfg, mc, 20, "float32", "cpu")
    # the batch it names fits
    msg = ""
    try:
        plan_for_run(cfg, mc, 20, "float32", "cpu")
    except ConfigError as e:
        msg = str(e)
    fits = int(msg.split("lower batch_size to ")[1].split(",")[0].split()[0])
    plan_for_run(build_config(dict(cfg.to_dict(), batch_size=fits)), mc, 20, "float32", "cpu")
    with pytest.raises(ConfigError):
        plan_for_run(build_config(dict(cfg.to_dict(), batch_size=fits + 1)), mc, 20, "float32", "cpu")
    # a pipeline size that fits where one rank cannot hold the weights: the message names it
    small = build_config(dict(model_path=path, prompts=["x"], pipeline_size=1, max_memory=["600KB"]))
    with pytest.raises(ConfigError, match=r"use pipeline_size=[2-5]"):
        plan_for_run(small, mc, 4, "float32", "cpu")


def test_job_that_does_not_fit_exits_2_before_any_rendezvous(models, tmp_path):
    """Both ranks refuse with the numbers; nobody connects to MASTER_PORT (a socket the test owns
    listens there and counts connections), and nobody waits on anybody: the exit is quick."""
    cfg = base_config(models["llama"], tmp_path, pipeline_size=2, max_memory=["1GiB", "10KB"], timeout_s=600)
    path = tmp_path / "c.json"
    path.write_text(json.dumps(cfg))
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)
        listener.setblocking(False)
        port = listener.getsockname()[1]
        t0 = time.monotonic()
        procs = [start_rank([ENTRY, "--config", str(path)], rank_env(r, 2, port)) for r in range(2)]
        results = [p.communicate(timeout=300) for p in procs]
        elapsed = time.monotonic() - t0
        with pytest.raises(BlockingIOError):
            listener.accept()  # no rank tried to reach rank 0's store
    assert [p.returncode for p in procs] == [2, 2]
    for _, err in results:
        lines = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(lines) == 1 and "max_memory[1]=10000 bytes cannot hold rank 1's stage" in lines[0], err[-2000:]
        assert "raise it to at least" in lines[0] and "Traceback" not in err
    assert elapsed < 240  # far below timeout_s=600: nobody waited for a peer
    assert not os.path.exists(cfg["output_path"])


def _write_header_only_checkpoint(path: str, model_config, dtype: str = "BF16") -> int:
    """A model.safetensors whose header describes every tensor of the model, over a sparse file:
    the size of the real checkpoint, none of its data. Returns the file's size."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(model_config)
    header, offset = {}, 0
    for name, p in skeleton.state_dict().items():
        if name == "lm_head.weight" and model_config.tie_word_embeddings:
            continue
        n = p.numel() * 2
        header[name] = {"dtype": dtype, "shape": list(p.shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
    os.truncate(path, 8 + len(raw) + offset)
    return 8 + len(raw) + offset


def test_dry_run_on_a_checkpoint_larger_than_memory(tmp_path):
    """A 39 GB bfloat16 checkpoint (larger than this machine's memory) planned in seconds, from headers."""
    from transformers import AutoConfig

    from pipeinfer.config import build_config
    from pipeinfer.models.tiny import make_model
    from pipeinfer.plan.__main__ import dry_run

    path = make_model(str(tmp_path / "big"), seed=0, **TINY)  # for its tokenizer
    os.remove(os.path.join(path, "model.safetensors"))
    with open(os.path.join(path, "config.json")) as f:
        conf = json.load(f)
    conf.update(hidden_size=8192, intermediate_size=28672, num_hidden_layers=24, num_attention_heads=64,
                num_key_value_heads=8, head_dim=128, vocab_size=128256, max_position_embeddings=8192,
                dtype="bfloat16")
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(conf, f)
    size = _write_header_only_checkpoint(os.path.join(path, "model.safetensors"), AutoConfig.from_pretrained(path))
    total_memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert size > total_memory and size > 35e9

    cfg = build_config(dict(model_path=path, prompts=PROMPTS, pipeline_size=2, batch_size=8, max_new_tokens=1000))
    dry_run(cfg, 80 * 2**30, "cuda", 100)  # imports and first calls warmed
    t0 = time.perf_counter()
    out = dry_run(cfg, 20 * 2**30, "cuda", 1000)
    assert time.perf_counter() - t0 < 5
    weights = sum(r["weights"] for r in out["ranks"])
    # bf16 weights: the file's data, split between the ranks (untied: each copy once)
    with open(os.path.join(path, "model.safetensors"), "rb") as f:
        header_len = 8 + int.from_bytes(f.read(8), "little")
    assert weights == size - header_len
    assert out["fits"] is False and all(not r["fits"] for r in out["ranks"])
    assert out["smallest_pipeline_size"] == 3  # 39 GB of weights over 20 GiB ranks: 2 ranks miss, 3 fit
    assert out["largest_batch_size"] == 0
    # the KV cache, GQA-aware: 8 kv heads x 128 per layer, 8 prompts of 1000 + 1000 tokens
    first, last = out["ranks"][0]["layers"]
    assert out["ranks"][0]["kv_cache"] == (last - first + 1) * 2 * 8 * 8 * 128 * 2000 * 2

    cfg_path = tmp_path / "big.json"
    cfg_path.write_text(json.dumps({k: v for k, v in dict(cfg.to_dict(), pipeline_size=4).items() if v is not None}))
    t0 = time.perf_counter()
    res = subprocess.run([sys.executable, "-m", "pipeinfer.plan", str(cfg_path), "--device-memory", "20GiB",
                          "--json", "--prompt-tokens", "1000"], cwd=ROOT, capture_output=True, text=True,
                         env=dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1"), timeout=120)
    wall = time.perf_counter() - t0
    assert res.returncode == 0, res.stderr[-2000:]
    out = json.loads(res.stdout)
    assert out["fits"] and len(out["ranks"]) == 4 and all(r["fits"] for r in out["ranks"])
    assert out["largest_batch_size"] >= 8 and out["smallest_pipeline_size"] == 3
    print(f"dry run CLI on a {size / 1e9:.1f} GB checkpoint: {wall:.1f} s wall (python and torch imports included)")


def test_dry_run_table_and_exit_codes(models, tmp_path):
    cfg_path = tmp_path / "c.json"
    cfg_path.write_text(json.dumps(dict(model_path=models["gpt2"], prompts=PROMPTS, pipeline_size=2, batch_size=4)))
    env = dict(os.environ, PYTHONPATH=ROOT, OMP_NUM_THREADS="1")
    ok = subprocess.run([sys.executable, "-m", "pipeinfer.plan", str(cfg_path), "--device", "cpu",
                         "--device-memory", "1GiB"], cwd=ROOT, capture_output=True, text=True, env=env, timeout=120)
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert "| rank | layers | weights MiB | KV cache MiB | transient MiB |" in ok.stdout
    assert "largest batch_size that fits at pipeline_size=2: " in ok.stdout
    assert "smallest pipeline_size that fits at batch_size=4: 1" in ok.stdout
    over = subprocess.run([sys.executable, "-m", "pipeinfer.plan", str(cfg_path), "--device", "cpu",
                           "--device-memory", "1KB"], cwd=ROOT, capture_output=True, text=True, env=env, timeout=120)
    assert over.returncode == 1 and "| NO |" in over.stdout and "cannot hold rank 0's stage" in over.stderr
    bad = subprocess.run([sys.executable, "-m", "pipeinfer.plan", str(cfg_path), "--device-memory", "lots"],
                         cwd=ROOT, capture_output=True, text=True, env=env, timeout=120)
    assert bad.returncode == 2 and bad.stderr.startswith("error: --device-memory 'lots'")


def test_planned_total_matches_measured_peak(tmp_path):
    """bench/memory.py --check-plan on CPU: two families, pipeline_size 1 and 2, batch 1 and 8, a
    512-token prompt; every rank's planned total within 10% of its peak RSS over the runtime
    baseline, and planned weights exactly the loaded parameter bytes."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import memory

    rows = memory.check_plan(str(tmp_path))
    assert len(rows) == 5  # pp1 + pp2 + pp2 ranks
    for r in rows:
        assert r["planned_weights"] == r["param_bytes"], r
        assert 0.9 <= r["ratio"] <= 1.1, r


def test_planned_scoring_matches_measured_peak(tmp_path):
    """prompt_logprobs on the last stage (bench/memory.py --check-scoring, CPU): what scoring adds to
    the planned total within 10% of what it adds to the stage's peak RSS, with several chunks, with
    one chunk bounded by the prompt, and in bfloat16; the dry run shows it."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import memory

    rows = memory.check_scoring(str(tmp_path))
    assert len(rows) == 3
    for r in rows:
        assert r["measured"] > 100 * 2**20, r  # far above the noise between two processes
        assert 0.9 <= r["ratio"] <= 1.1, r

    from pipeinfer.config import build_config
    from pipeinfer.plan.__main__ import dry_run, format_table

    cfg = dict(model_path=os.path.join(str(tmp_path), "plan-llama-v32k"), prompts=["x"], pipeline_size=2,
               batch_size=4, prompt_logprobs=True, prompt_logprobs_chunk=512)
    out = dry_run(build_config(cfg), device_type="cpu", prompt_tokens=300)
    assert out["ranks"][0]["scoring"] == 0 and out["ranks"][1]["scoring"] == rows[1]["planned_scoring"]
    assert "rank 1 scores the prompts (prompt_logprobs): " in format_table(out)


def test_rank_host_memory_is_its_plan_and_the_runtime(tmp_path):
    """bench/memory.py --check-runner, real 2-rank runs on CPU: each rank's peak RSS over the runtime
    (the same run on a model with almost no weights, less that model's plan) within 10% of its
    planned total, on a model whose embedding and head are most of its stages (the loader held a
    mapped copy of each tensor beside the one it made: 2x the embedding on rank 0, stage + head on
    rank 1); and no rank's peak grows with the number of prompts, which the plan does not count
    (every frame a rank sent stayed queued until the end of the run, and rank 0 kept every prompt
    record, ~90 KB each with logprobs=20, for the summary): 120 prompts against 8."""
    sys.path.insert(0, os.path.join(ROOT, "bench"))
    import memory

    rows = memory.check_runner(str(tmp_path))
    assert len(rows) == 2
    for r in rows:
        assert r["planned"] > 60 * 2**20 and 0.9 <= r["ratio"] <= 1.1, r
        assert r["planned_many"] == r["planned"] and r["grown"] < 0.05 * r["planned"], r


def _offload_budget(cfg: dict) -> int:
    """A max_memory one layer short of the all-resident total: the stage offloads some layers and fits."""
    from pipeinfer.config import build_config
    from pipeinfer.plan.__main__ import dry_run

    total = dry_run(build_config(cfg))["ranks"][0]["total"]
    probe = dry_run(build_config(dict(cfg, max_memory=total - 1, max_cpu_memory=0)))
    return total - max(probe["ranks"][0]["offload"]["layer_bytes"].values())


# (name, config keys, dry-run arguments, the dry run's exit, the run's exit, what the one line says)
AGREE = [
    ("max_cpu_memory without max_memory, --device-memory", dict(max_cpu_memory="1GiB"), ["--device-memory", "600KiB"],
     2, 2, "max_cpu_memory offloads the layers that max_memory cannot hold, but max_memory is not set"),
    ("max_cpu_memory without max_memory", dict(max_cpu_memory="1GiB"), [], 2, 2, "but max_memory is not set"),
    ("offloaded, fits", dict(max_memory="offload", max_cpu_memory="1GiB"), [], 0, 0, None),
    ("offloaded, fits, --device-memory", dict(max_memory="offload", max_cpu_memory="1GiB"),
     ["--device-memory", "offload"], 0, 0, None),
    ("offloaded and quantized", dict(max_memory="offload", max_cpu_memory="1GiB", quantization="int8"), [], 2, 2,
     "quantization='int8' with max_cpu_memory"),
    # the dry run's own code for "does not fit" is 1 (its table shows by how much); the line is the run's
    ("too small even offloaded", dict(max_memory="10KB", max_cpu_memory="1GiB"), [], 1, 2,
     "max_memory[0]=10000 bytes cannot hold rank 0's stage even with all its layers offloaded"),
    ("resident, too small", dict(max_memory="10KB"), [], 1, 2, "max_memory[0]=10000 bytes cannot hold rank 0's stage"),
    ("resident, fits", dict(max_memory="1GiB"), [], 0, 0, None),
]


@pytest.mark.parametrize("name,over,args,dry_exit,run_exit,line", AGREE, ids=[a[0] for a in AGREE])
def test_dry_run_and_run_agree(models, tmp_path, capsys, name, over, args, dry_exit, run_exit, line):
    """python -m pipeinfer.plan CONFIG decides as the run of CONFIG does: both refuse with the same
    one line, or both accept (the dry run printing the placement the run then uses)."""
    from conftest import free_port, run_rank
    from pipeinfer.plan.__main__ import main

    from pipeinfer.plan.__main__ import _spans

    cfg = base_config(models["llama"], tmp_path, max_new_tokens=8, device="cpu")
    budget = _offload_budget(cfg) if "offload" in over.values() else None
    cfg.update({k: budget if v == "offload" else v for k, v in over.items()})
    args = [str(budget) if a == "offload" else a for a in args]
    cfg_path = tmp_path / "c.json"
    cfg_path.write_text(json.dumps(cfg))

    assert main([str(cfg_path), *args]) == dry_exit
    out, err = capsys.readouterr()
    res = run_rank(["--config", str(cfg_path)], rank_env(0, 1, free_port()), timeout=120)
    assert res.returncode == run_exit, res.stderr[-2000:]
    dry_lines = [x for x in err.splitlines() if x.startswith("error:")]
    run_lines = [x for x in res.stderr.splitlines() if x.startswith("error:")]
    if line is None:
        assert not dry_lines and not run_lines, (err, res.stderr[-2000:])
        if "max_cpu_memory" in over:  # the placement the dry run shows is the one the run records
            with open(cfg["output_path"]) as f:
                plan = json.loads(f.readline())["plan"]["ranks"][0]
            o = plan["offload"]
            assert o["device"]["layers"] and o["host"]["layers"] and plan["fits"], plan
            assert f"rank 0 offloads: device {_spans(o['device']['layers'])} " in out, out
            assert f", host {_spans(o['host']['layers'])} " in out, out
    else:
        assert len(dry_lines) == 1 and dry_lines == run_lines and line in run_lines[0], (err, res.stderr[-2000:])
