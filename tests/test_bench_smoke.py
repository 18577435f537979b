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
