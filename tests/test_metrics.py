"""Metrics a researcher can trust: stage time accounting, profiler traces, NVTX detection.

    pytest tests/test_metrics.py
"""

from __future__ import annotations

import json

from conftest import base_config, prompt_records, run_pipeline
from pipeinfer.config import build_config, micro_batching
from pipeinfer.record.metrics import prompt_record
from pipeinfer.record.timeline import Timeline, profiler_attached

# Stated tolerance: per stage, compute + recv wait + send (+ rank 0's fsynced writes of the prompt
# records) covers at least 85% of the stage's wall time (the rest is Python bookkeeping between
# steps) and never more than all of it.
COVERAGE = 0.85


def split_into_slots(prompts: int, sizes: list[int]) -> list[int]:
    """Micro-batch sizes when every micro-batch runs equally long: slots refill in visit order."""
    out = []
    while prompts > sum(out):
        out.append(min(sizes[len(out) % len(sizes)], prompts - sum(out)))
    return out


def test_stage_time_adds_up_to_wall_time(tiny_llama, tmp_path):
    # each prompt's prefill whole in one visit, so that the step counts below are known
    cfg = base_config(tiny_llama, tmp_path, pipeline_size=3, max_new_tokens=60, ignore_eos=True, batch_size=4,
                      spread_prefill=False)
    records = run_pipeline(cfg, tmp_path, 3)
    stages = [r for r in records if r["type"] == "stage"]
    assert len(stages) == 3
    for s in stages:
        covered = s["compute_s"] + s["recv_wait_s"] + s["send_s"] + s["write_s"]
        assert COVERAGE * s["wall_s"] <= covered <= s["wall_s"] * 1.001 + 1e-3, s
        micro_batches = len(split_into_slots(len(cfg["prompts"]), micro_batching(build_config(cfg))))
        assert s["prefill_steps"] == micro_batches and s["decode_steps"] == 59 * micro_batches
        kinds = {e[0] for e in s["events"]}
        assert {"prefill", "decode"} <= kinds and all(e[1] <= e[2] for e in s["events"])
        assert s["peak_memory_bytes"] > 0 and s["hostname"]
    assert stages[0]["bytes_sent"] > stages[2]["bytes_sent"] > 0  # hidden states vs. token ids
    summary = records[-1]
    assert summary["new_tokens"] == 60 * len(cfg["prompts"]) and summary["interrupted"] is False


def test_prompt_record_latency_fields():
    rec = prompt_record(3, "p", "t", [5, 6, 7, 8], 2, [0.5, 0.75, 1.0, 1.5])
    assert rec["ttft_s"] == 0.5 and rec["latency_s"] == 1.5
    assert rec["tpot_s"] == (1.5 - 0.5) / 3
    assert rec["itl_s"] == [0.25, 0.25, 0.5]
    assert rec["tokens_per_s"] == 4 / 1.5
    one = prompt_record(0, "p", "t", [5], 2, [0.2])
    assert one["tpot_s"] is None and one["itl_s"] == []


def test_torch_profiler_trace_per_rank(tiny_llama, tmp_path):
    cfg = base_config(tiny_llama, tmp_path, pipeline_size=2, profile_steps=3)
    run_pipeline(cfg, tmp_path, 2)
    for rank in range(2):
        trace = json.loads((tmp_path / f"out.jsonl.rank{rank}.trace.json").read_text())
        names = {e.get("name", "") for e in trace["traceEvents"]}
        assert any("aten::" in n for n in names), "the trace should hold the stage's operators"


def test_nvtx_detection(monkeypatch):
    for var in ("PIPEINFER_NVTX", "CUDA_INJECTION64_PATH", "NSYS_PROFILING_SESSION_ID"):
        monkeypatch.delenv(var, raising=False)
    assert not profiler_attached()
    monkeypatch.setenv("NSYS_PROFILING_SESSION_ID", "1")
    assert profiler_attached()
    # NVTX needs CUDA: on a CPU-only machine it stays off even when asked for
    assert Timeline(nvtx=True).nvtx is False


def test_progress_bar_is_silent_off_a_terminal(tiny_llama, tmp_path):
    cfg = base_config(tiny_llama, tmp_path, pipeline_size=1)
    from conftest import launch
    res = launch(cfg, tmp_path, 1)[0]
    assert res.returncode == 0 and "generating" not in res.stderr and "prompt/s" not in res.stderr
    assert len(prompt_records([json.loads(x) for x in open(cfg["output_path"])])) == len(cfg["prompts"])
