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
