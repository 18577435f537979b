"""The benchmarks still run: every bench/ script imports, and decode_scaling runs end to end, short.

    pytest tests/test_bench_smoke.py

Timings are the benchmarks' business; this only keeps them from rotting as the runner changes.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT

BENCH = os.path.join(ROOT, "bench")


@pytest.mark.parametrize("name", sorted(f for f in os.listdir(BENCH) if f.endswith(".py")))
def test_bench_script_imports(name):
    spec = importlib.util.spec_from_file_location(name[:-3], os.path.join(BENCH, name))
    spec.loader.exec_module(importlib.util.module_from_spec(spec))


def test_decode_scaling_runs_with_right_tokens(tmp_path):
    """A smoke test: the script runs, times one decode step per position, and its tokens (through the
    in-place KV cache) equal generate()'s. Its timings are not asserted: they are the benchmark's."""
    out = tmp_path / "decode.json"
    res = subprocess.run([sys.executable, os.path.join(BENCH, "decode_scaling.py"), "--tokens", "48",
                          "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert res.returncode == 0, res.stderr[-2000:]
    result = json.loads(out.read_text())
    assert len(result["windows"]) == 3 and result["decode_steps"] == 48 - 1
    assert result["output_matches_generate"] is True


def _filesystem(path: str) -> str:
    """The type of the filesystem holding path (/proc/mounts: the longest mount point above it)."""
    path, best = os.path.realpath(path), ("", "?")
    with open("/proc/mounts") as f:
        for line in f:
            _, mount, kind = line.split()[:3]
            if (path == mount or path.startswith(mount.rstrip("/") + "/")) and len(mount) > len(best[0]):
                best = (mount, kind)
    return best[1]


def test_offload_bench_reads_the_cold_disk_cell_with_the_pages_dropped(tmp_path):
    """bench/offload.py's cold disk cell and cold limit: the checkpoint's pages are out of the page
    cache (mincore) as each streamed layer's read begins, the warm limit's are in; and the cold
    cell's tokens equal generate()'s."""
    from conftest import TINY, reference_outputs, require
    from pipeinfer.config import build_config
    from pipeinfer.plan.make import plan_for_run
    from pipeinfer.plan.model import read_model_config
    from pipeinfer.models.tiny import make_model

    kind = _filesystem(str(tmp_path))
    require(None if kind not in ("tmpfs", "ramfs", "overlay") else
            f"the temporary directory is on {kind}, whose pages are its storage (DONTNEED cannot drop them): "
            f"set TMPDIR to a disk-backed directory")
    sys.path.insert(0, BENCH)
    import offload as bench

    model = make_model(str(tmp_path / "llama"), seed=1, **TINY)
    prompts, tokens = ["Hello", "a"], 6
    free = plan_for_run(build_config(dict(model_path=model, prompts=prompts, max_new_tokens=tokens)),
                        read_model_config(model), 16, "float32", "cpu").ranks[0]
    cell = bench.runner_cell("cold", model, prompts, tokens, "cpu", "float32", str(tmp_path), "0", cold=True,
                             max_memory=free.total - 2 * free.layer_bytes[0], max_cpu_memory=0)  # 3 or 4 of 5 streamed
    assert "error" not in cell, cell.get("error")
    disk = cell["offload"]["disk_layers"]
    assert len(disk) >= 3, cell["offload"]
    cache = cell["page_cache"]
    assert cache["cached_before"] == 0.0 and cache["cached_at_read_start_max"] == 0.0, cache
    assert cache["cold_layer_reads"] >= tokens * len(disk), cache  # every step's loads, warm-up included
    assert cell["output_ids"] == reference_outputs(model, prompts, tokens, ignore_eos=True)
    (_, cold), (_, warm) = bench.disk_limit(model, disk, repeats=2, cold=True), bench.disk_limit(model, disk, 2)
    assert cold == 0.0 and warm == 1.0, (cold, warm)


def test_continuous_smoke_runs_and_rows_waste_less(tmp_path):
    """bench/continuous.py --smoke: every cell runs, both schedules give the same greedy tokens (the
    script exits 1 otherwise), and the rows schedule computes fewer extra rows per useful token on
    the long-tailed workload than the micro_batches schedule. Its timings are not asserted."""
    out = tmp_path / "continuous.json"
    res = subprocess.run([sys.executable, os.path.join(BENCH, "continuous.py"), "--smoke", "--json", str(out),
                          "--workdir", str(tmp_path / "work")], cwd=ROOT, capture_output=True, text=True, timeout=600,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert res.returncode == 0, res.stderr[-2000:]
    result = json.loads(out.read_text())
    assert [(c["pipeline_size"], c["batch_size"]) for c in result["cells"]] == [(1, 4), (2, 4)]
    for c in result["cells"]:
        assert c["rows_varied"]["new_tokens"] == c["rows_equal"]["new_tokens"] == result["total_new_tokens"]
        assert c["rows_varied"]["extra_rows_per_useful_token"] < c["micro_varied"]["extra_rows_per_useful_token"]
        assert c["rows_varied"]["max_prompts_in_flight"] <= 4
        # refilled rows never take more steps than micro-batches waiting for their longest row
        assert c["if_steps_cost_alike"]["rows_over_micro_batches"] >= 1.0


def test_continuous_step_ratios_count_the_drain():
    """step_ratios(): first-come-first-served refill of 2 rows on lengths 4, 1, 1, 1 ends at step 4
    (the 4 in one row, the three 1s after each other in the other), as the equal lengths 2, 2, 2, 1
    do; micro-batches of two consecutive prompts take 4 + 1 steps."""
    spec = importlib.util.spec_from_file_location("continuous", os.path.join(BENCH, "continuous.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.step_ratios([4, 1, 1, 1], [2, 2, 2, 1], 2) == {"varied_over_equal": 1.0,
                                                              "rows_over_micro_batches": 1.25}
    # the long prompt last: its 8 steps start once the four 1s are done (step 2) and end at 10, while
    # the equal lengths end at 7 (3 + 2 + 2 in one row)
    assert mod.step_ratios([1, 1, 1, 1, 8], [3, 3, 2, 2, 2], 2)["varied_over_equal"] == 7 / 10
    # micro-batches of 2 take 4 + 4 steps on 4, 1, 1, 4 against refill's 6; two slots of one row
    # each (pipeline_size 2) are refilled rows already
    assert mod.step_ratios([4, 1, 1, 4], [3, 3, 2, 2], 2)["rows_over_micro_batches"] == 8 / 6
    assert mod.step_ratios([4, 1, 1, 4], [3, 3, 2, 2], 2, slots=2)["rows_over_micro_batches"] == 1.0


def test_continuous_before_cell_and_stall_workload(tmp_path):
    """--before REV runs the varied workload once more on that commit's batch runner, unpacked with
    git archive (HEAD here: a shallow clone has it too), whose greedy tokens must equal the rows
    schedule's (exit 1 otherwise); --workload stall runs long prompts whole and in chunks, with the
    same tokens, and counts the chunks."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    out = tmp_path / "before.json"
    res = subprocess.run([sys.executable, os.path.join(BENCH, "continuous.py"), "--smoke", "--pipeline-sizes", "2",
                          "--before", "HEAD", "--json", str(out), "--workdir", str(tmp_path / "work")], cwd=ROOT,
                         capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    (cell,) = json.loads(out.read_text())["cells"]
    assert cell["before_varied"]["new_tokens"] == cell["rows_varied"]["new_tokens"] and cell["rows_over_before"] > 0
    assert os.path.exists(tmp_path / "work" / "before-HEAD" / "run_distributed_inference.py")
    out = tmp_path / "stall.json"
    res = subprocess.run([sys.executable, os.path.join(BENCH, "continuous.py"), "--smoke", "--workload", "stall",
                          "--json", str(out), "--workdir", str(tmp_path / "work")], cwd=ROOT, capture_output=True,
                         text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stderr[-2000:]
    cells = json.loads(out.read_text())["cells"]
    assert [c["pipeline_size"] for c in cells] == [1, 2]
    for c in cells:
        assert c["whole"]["prefill_chunks"] == 0 < c["chunked"]["prefill_chunks"]
        assert c["whole"]["new_tokens"] == c["chunked"]["new_tokens"] and c["chunked"]["itl_max_ms"] > 0


def test_serving_bench_smoke(tmp_path):
    """bench/serving.py --smoke: a real server at pipeline_size 2 under Poisson and saturating
    arrivals from the openai client; its greedy texts equal the batch runner's (else exit 1)."""
    pytest.importorskip("openai")
    out = tmp_path / "serving.json"
    res = subprocess.run([sys.executable, os.path.join(BENCH, "serving.py"), "--smoke", "--json", str(out)], cwd=ROOT,
                         capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    cell = json.loads(out.read_text())["cells"][0]
    assert cell["pipeline_size"] == 2 and cell["texts_equal_runner"] is True
    assert [c["rate"] for c in cell["rates"]] == [8.0, "inf"]
    assert all(c["tokens"] == 8 * 8 and set(c["ttft_s"]) == {"p50", "p90", "p99"} for c in cell["rates"])


def test_profile_step_splits_every_stage_visit(tmp_path):
    """bench/profile_step.py --smoke: the runner's torch.profiler traces, one and two stages, split
    per decode visit into columns that add up to the visit (prefill visits left out)."""
    out = tmp_path / "profile.json"
    res = subprocess.run([sys.executable, os.path.join(BENCH, "profile_step.py"), "--smoke", "--compile", "false",
                          "--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert res.returncode == 0, res.stderr[-2000:]
    cells = json.loads(out.read_text())["cells"]
    assert set(cells) == {"off/1/2", "off/2/2"}
    for key, cell in cells.items():
        assert len(cell["stages"]) == int(key.split("/")[1])
        for s in cell["stages"]:
            assert s["visits"] >= 3, (key, s)
            parts = [s[k] for k in ("matmul", "attention", "layers", "schedule", "sampling", "messages")]
            assert min(parts) >= 0 and abs(sum(parts) - s["step"]) < 1e-6 and s["matmul"] > 0, (key, s)
        assert cell["stages"][-1]["sampling"] > 0  # the last stage samples
    assert "| off | 2 | 2 |" in res.stdout


def test_peers_smoke_runs_without_vllm(tmp_path):
    """bench/peers.py --smoke: no vLLM (the column is skipped, and it says so); transformers' PP mode
    and the runner with compile on and off each measure tokens/s, and the ratios print."""
    out = tmp_path / "peers.json"
    res = subprocess.run([sys.executable, os.path.join(BENCH, "peers.py"), "--smoke", "--only",
                          "vllm_1,generate,tf_pp2,pp1c,pp2", "--json", str(out)], cwd=ROOT, capture_output=True,
                         text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert "vLLM columns skipped: no --vllm-python given" in res.stdout
    got = json.loads(out.read_text())
    assert got["vllm_skipped"] == "no --vllm-python given"
    assert set(got["best"]) == {"generate", "tf_pp2", "pp1c", "pp2"}
    assert all(v["2"] > 0 for v in got["best"].values()), got["best"]
    assert {r["ratio"] for r in got["ratios"]} == {"pp2/tf_pp2", "pp1c/generate"}
    compiled = got["runs"]["pp1c"]["2"][0]["stages"][0]["compile"]
    assert compiled["compile_s"] > 0 and compiled["eager_fallback"] is None
