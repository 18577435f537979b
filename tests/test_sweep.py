"""Sweeps: a grid of configs checked (bad sweep files are one line, before anything runs), planned
(cells that cannot fit are listed and not run), run locally, resumed without rerunning finished
cells, and reported: the report's numbers are the cells' own summaries.

    pytest tests/test_sweep.py
"""

import importlib.util
import json
import os
import subprocess
import sys

import pytest
from conftest import PROMPTS, ROOT, reference_outputs

from pipeinfer.plan.__main__ import dry_run
from pipeinfer.config import build_config
from pipeinfer.report.summary import load_run, percentile, summarize
from pipeinfer.sweep.__main__ import main as sweep_main

MAX_NEW_TOKENS = 4


def sweep(path, *args, timeout=900):
    return subprocess.run([sys.executable, "-m", "pipeinfer.sweep", str(path), *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env=dict(os.environ, OMP_NUM_THREADS="1"))


def write_sweep(tmp_path, model, axes, **extra):
    base = {"model_path": model, "prompts": PROMPTS[:3], "max_new_tokens": MAX_NEW_TOKENS, "device": "cpu",
            "dtype": "float32", "prompt_logprobs": True, "timeout_s": 120}
    (tmp_path / "base.json").write_text(json.dumps(base))
    spec = {"base": str(tmp_path / "base.json"), "axes": axes, "out": str(tmp_path / "sweep"), **extra}
    (tmp_path / "sweep.json").write_text(json.dumps(spec))
    return tmp_path / "sweep.json", base


@pytest.mark.parametrize("axes, extra, message", [
    ({"batch_sise": [1, 2]}, {}, "unknown config key 'batch_sise' (did you mean 'batch_size'?)"),
    ({"batch_size": []}, {}, "axis 'batch_size' is []: give a non-empty list of values"),
    ({"batch_size": [1, 0]}, {}, "batch_size=0 is out of range: expected an integer >= 1"),
    ({"batch_size": [1], "micro_batch_size": [2]}, {}, "micro_batch_size=2 > batch_size=1"),
    ({"output_path": ["a.jsonl"]}, {}, "output_path is set by the sweep for each cell: remove it"),
    ({"batch_size": [1]}, {"nodes": 3}, "unknown sweep key 'nodes'"),
    ({"batch_size": [1, 1]}, {}, "axis 'batch_size' repeats a value"),
    ({"pipeline_size": [1, 2]}, {"set": {"layer_split": [2, 3]}}, "cell 00-pp1 (pipeline_size=1): layer_split=[2, 3] has 2 "
                                                                   "entries but pipeline_size=1"),
    ({"batch_size": [1]}, {"reference": {"batch_size": 8}}, "no cell has reference"),
    ({"batch_size": [1]}, {"device_memory": "lots"}, "device_memory=\"lots\" is not a byte count"),
])
def test_bad_sweep_file_is_one_line_before_anything_runs(tiny_llama, tmp_path, capsys, axes, extra, message):
    path, _ = write_sweep(tmp_path, tiny_llama, axes, **extra)
    assert sweep_main([str(path), "--submit"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and len(err.strip().splitlines()) == 1 and message in err, err
    assert err.startswith("sweep: error: ") and not (tmp_path / "sweep").exists()


# the third axis: quantization, or where bitsandbytes is missing, offload (every layer resident, or streamed)
THIRD = (("quantization", ["none", "int8"], "q") if importlib.util.find_spec("bitsandbytes") else
         ("max_cpu_memory", [None, 0], "cpu"))


def test_local_sweep_drops_what_cannot_fit_resumes_and_reports(tiny_llama, tmp_path):
    key, values, short = THIRD
    axes = {"pipeline_size": [1, 2], "batch_size": [1, 4], key: values}
    path, base = write_sweep(tmp_path, tiny_llama, axes)
    # a budget (max_memory, which offloading needs set) between the two largest planned peaks with every
    # layer resident: exactly the largest cell cannot fit
    resident = values if key == "quantization" else [None]
    totals = sorted(max(r["total"] for r in dry_run(build_config(dict(base, pipeline_size=pp, batch_size=bs,
                                                                      **{key: v})))["ranks"])
                    for pp in (1, 2) for bs in (1, 4) for v in resident)
    base["max_memory"] = (totals[-1] + totals[-2]) // 2
    (tmp_path / "base.json").write_text(json.dumps(base))
    res = sweep(path, "--local")
    assert res.returncode == 0, res.stdout + res.stderr
    meta = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert len(meta["cells"]) == 8
    dropped = [c for c in meta["cells"] if not c["fits"]]
    name = f"02-pp1-bs4-{short}{json.dumps(values[0]).strip(chr(34))}"  # 02-pp1-bs4-qnone
    assert [c["name"] for c in dropped] == [name] and "cannot hold rank 0's stage" in dropped[0]["dropped"]
    assert f"dropped {name}: " in res.stdout and not os.path.exists(dropped[0]["results"])
    reference = reference_outputs(tiny_llama, PROMPTS[:3], MAX_NEW_TOKENS)
    ran = [c for c in meta["cells"] if c["fits"]]
    for c in ran:
        outs = [r["output_ids"] for r in map(json.loads, open(c["results"])) if r["type"] == "prompt"]
        assert len(outs) == 3
        if c["values"].get("quantization") != "int8":
            assert outs == reference, c["name"]
    # rerun: nothing runs again
    mtimes = {c["name"]: os.path.getmtime(c["results"]) for c in ran}
    again = sweep(path, "--local")
    assert again.returncode == 0 and "+ cell" not in again.stdout, again.stdout
    assert {c["name"]: os.path.getmtime(c["results"]) for c in ran} == mtimes
    # the report: each cell's numbers are its own summary's
    rep = subprocess.run([sys.executable, "-m", "pipeinfer.report", str(tmp_path / "sweep")], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert rep.returncode == 0, rep.stderr
    out = json.loads((tmp_path / "sweep" / "report" / "sweep.json").read_text())
    assert os.path.getsize(tmp_path / "sweep" / "report" / "sweep.png") > 10_000
    rows = {r["name"]: r for r in out["cells"]}
    assert rows[name]["state"].startswith("dropped")
    assert meta["reference"] == out["reference"] == f"00-pp1-bs1-{name[11:]}"  # unquantized, resident, model's dtype
    ref = summarize(load_run(next(c["results"] for c in ran if c["name"] == meta["reference"])))
    for c in ran:
        run = load_run(c["results"])
        s, row = summarize(run), rows[c["name"]]
        assert row["tokens_per_s"] == s["tokens_per_s"] and row["tokens_per_s_per_node"] == s["tokens_per_s"] / c["nodes"]
        for key in ("ttft_s", "tpot_s"):
            assert row[key]["p50"] == s[key]["p50"]
            assert row[key]["p95"] == percentile([p[key] for p in run.prompts if p[key] is not None], 95)
        assert row["perplexity"] == s["perplexity"] and row["perplexity_vs_reference"] == s["perplexity"] / ref["perplexity"]
        assert [st["bubble"] for st in row["stages"]] == [st["recv_wait_s"] / st["wall_s"] for st in s["stages"]]
        assert [(st["planned_bytes"], st["peak_bytes"]) for st in row["stages"]] == \
            [(st["planned_bytes"], st["peak_memory_bytes"]) for st in s["stages"]]
        assert all(st["planned_bytes"] for st in row["stages"])
    best = max(ran, key=lambda c: rows[c["name"]]["tokens_per_s"])["name"]
    assert out["best_throughput"]["cell"] == best and f"best for throughput: {best} (" in rep.stdout
    assert "best for latency: " in rep.stdout and "% better than " in rep.stdout
