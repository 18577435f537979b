"""The report: summary numbers against hand-worked percentiles, side-by-side comparison, the PNGs,
and bad input (one line, exit 2). Runs on the JSONL files in tests/data/report, no pipeline needed.

    python -m pytest -q tests/test_report.py
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from pipeinfer.report import cli as report_cli, summary as report, tables

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA = os.path.join(ROOT, "tests", "data", "report")
SMALL_PP2 = os.path.join(DATA, "small_pp2.jsonl")
SMALL_PP1 = os.path.join(DATA, "small_pp1.jsonl")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_report(*args, env=None):
    return subprocess.run([sys.executable, "-m", "pipeinfer.report", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("values, q, expected", [
    # position (n - 1) * q / 100, interpolated between its neighbours (numpy's default, "linear")
    ([1, 2, 3, 4, 5], 50, 3.0),          # pos 2
    ([1, 2, 3, 4, 5], 90, 4.6),          # pos 3.6: 4 + 0.6 * (5 - 4)
    ([5, 3, 1, 4, 2], 99, 4.96),         # unsorted input; pos 3.96: 4 + 0.96 * 1
    ([1, 2, 3, 4], 50, 2.5),             # pos 1.5
    ([7.0], 99, 7.0),
    ([], 50, None),
])
def test_percentile_is_linear_interpolation(values, q, expected):
    got = report.percentile(values, q)
    assert got is None if expected is None else got == pytest.approx(expected)


def test_summary_matches_hand_computation():
    s = report.summarize(report.load_run(SMALL_PP2))
    assert s["label"] == "small_pp2 pp=2"
    assert (s["prompts"], s["new_tokens"], s["pipeline_size"]) == (5, 11, 2)
    # latency_s of prompts 0..4 = 2, 4, 1, 5, 3 -> sorted 1 2 3 4 5:
    #   p50 pos 2 -> 3; p90 pos 3.6 -> 4 + 0.6*1 = 4.6; p99 pos 3.96 -> 4.96
    assert s["latency_s"] == pytest.approx({"p50": 3.0, "p90": 4.6, "p99": 4.96})
    # ttft_s = 0.1 0.2 0.5 0.3 3.0 -> sorted 0.1 0.2 0.3 0.5 3.0:
    #   p50 0.3; p90 pos 3.6 -> 0.5 + 0.6*2.5 = 2.0; p99 pos 3.96 -> 0.5 + 0.96*2.5 = 2.9
    assert s["ttft_s"] == pytest.approx({"p50": 0.3, "p90": 2.0, "p99": 2.9})
    # tpot_s = 0.95 3.8 0.25 4.7 (prompt 4 has one token: null, left out) -> sorted 0.25 0.95 3.8 4.7:
    #   p50 pos 1.5 -> 0.95 + 0.5*2.85 = 2.375; p90 pos 2.7 -> 3.8 + 0.7*0.9 = 4.43;
    #   p99 pos 2.97 -> 3.8 + 0.97*0.9 = 4.673
    assert s["tpot_s"] == pytest.approx({"p50": 2.375, "p90": 4.43, "p99": 4.673})
    # itl_s pooled: [0.9, 1.0] [3.8] [0.2, 0.3] [4.7] [] -> sorted 0.2 0.3 0.9 1.0 3.8 4.7 (n = 6):
    #   p50 pos 2.5 -> 0.9 + 0.5*0.1 = 0.95; p90 pos 4.5 -> 3.8 + 0.5*0.9 = 4.25; p99 pos 4.95 -> 3.8 + 0.95*0.9 = 4.655
    assert s["itl_s"] == pytest.approx({"p50": 0.95, "p90": 4.25, "p99": 4.655})
    # throughput from the summary record; mean per prompt (1.5 + 0.5 + 3 + 0.4 + 1/3) / 5 = 1.14667
    assert s["tokens_per_s"] == pytest.approx(1.1)
    assert s["mean_prompt_tokens_per_s"] == pytest.approx((1.5 + 0.5 + 3 + 0.4 + 1 / 3) / 5)
    assert s["wall_s"] == pytest.approx(10.0)
    # sacct: the job row's state and elapsed time, the largest MaxRSS of its steps
    assert s["sacct"] == [{"job_id": "77", "state": "COMPLETED", "elapsed_s": 12, "max_rss_bytes": 3145728}]


def test_stage_shares_add_up_to_wall():
    stages = report.summarize(report.load_run(SMALL_PP2))["stages"]
    assert [st["rank"] for st in stages] == [0, 1]  # sorted, though the file lists rank 1 first
    # rank 0: wall 10 = compute 4 + recv 3 + send 2 + other 1; rank 1: 5 + 4.5 + 0.5 + 0
    shares = [st[k] for st in stages for k in ("compute_pct", "recv_wait_pct", "send_pct", "other_pct")]
    assert shares == pytest.approx([40, 30, 20, 10, 50, 45, 5, 0])
    assert [(st["bytes_sent"], st["peak_memory_bytes"]) for st in stages] == [(2048, 1048576), (40, 2097152)]


def test_resumed_file_with_torn_tail():
    # attempt 1 (pp=2, interrupted): prompt 0; attempt 2 (pp=1): prompts 10 and 2; then a torn line
    run = report.load_run(os.path.join(DATA, "resumed.jsonl"))
    assert [p["prompt_index"] for p in run.prompts] == [0, 2, 10]
    s = report.summarize(run)
    assert s["label"] == "resumed pp=1" and [st["rank"] for st in s["stages"]] == [0]  # the last attempt's stages
    # throughput over both summaries: (2 + 6) tokens / (2 + 4) s
    assert (s["new_tokens"], s["wall_s"], s["tokens_per_s"]) == pytest.approx((8, 6.0, 8 / 6))
    assert s["latency_s"]["p90"] == pytest.approx(1.8)  # 1 1 2: pos 1.8 -> 1 + 0.8 * 1
    assert len(s["notes"]) == 3 and any("torn last line" in n for n in s["notes"])


def test_table_compares_runs_side_by_side(capsys):
    assert report_cli.main([SMALL_PP2, SMALL_PP1]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert "small_pp2 pp=2" in lines[0] and "small_pp1 pp=1" in lines[0]
    rows = {line[:34].strip(): line[34:].split() for line in lines[2:] if not line.startswith(("percentiles", "sacct"))}
    assert rows["prompts"] == ["5", "2"]
    assert rows["latency p90 (ms)"] == ["4600.00", "1900.00"]  # pp1: 1, 2 -> p90 = 1 + 0.9*1 = 1.9 s
    assert rows["ITL p50 (ms)"] == ["950.00", "1200.00"]        # pp1: 0.6, 1.8 -> p50 = 1.2 s
    assert rows["rank 0 compute/recv/send/other %"] == "40 / 30 / 20 / 10 90 / 0 / 0 / 10".split()
    assert rows["rank 1 peak memory"] == ["2.0", "MiB", "-"]    # no rank 1 in the pp=1 run
    assert "sacct small_pp2 pp=2: job 77 COMPLETED" in out


def test_same_file_twice_gets_two_columns(capsys):
    assert report_cli.main([SMALL_PP1, SMALL_PP1]) == 0
    header = capsys.readouterr().out.splitlines()[0]
    assert "small_pp1 pp=1 #2" in header


def _stage(rank, events):
    return {"rank": rank, "events": events}


def test_timeline_window():
    few = [_stage(0, [["prefill", 10.0, 10.5], ["decode", 11.0, 12.0]]), _stage(1, [["recv", 10.0, 12.5]])]
    assert report.timeline_window(few)[:2] == (10.0, 12.5)
    assert "whole run" in report.timeline_window(few)[2]
    assert report.timeline_window(few, window_s=1.0)[:2] == (10.0, 11.0)
    # two batches, 6 events each on rank 0: with max_events=4 the first batch (ends at rank 0's
    # second prefill, t=3) is still too long, so the window ends with the busiest rank's 4th event
    batch = lambda t: [["prefill", t, t + 0.5]] + [["decode", t + 0.5 + i * 0.5, t + 1.0 + i * 0.5] for i in range(5)]
    many = [_stage(0, batch(0.0) + batch(3.0)), _stage(1, [["recv", 0.0, 6.0]])]
    t0, t1, what = report.timeline_window(many, max_events=4)
    assert (t0, t1) == (0.0, 2.0) and "first 4 events" in what
    t0, t1, what = report.timeline_window(many, max_events=10)
    assert (t0, t1) == (0.0, 3.0) and what.startswith("first batch")
    assert report.timeline_window([_stage(0, [])])[2] == "no events recorded"


def test_plots_are_written(tmp_path):
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        pytest.skip("matplotlib not installed: the report's plots need it (pip install matplotlib)")
    done = run_report(SMALL_PP2, SMALL_PP1, "--out", str(tmp_path / "plots"))
    assert done.returncode == 0, done.stderr
    for name in report.PLOTS:
        path = tmp_path / "plots" / name
        assert path.is_file(), f"{name} not written; stdout: {done.stdout}"
        data = path.read_bytes()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000, f"{name}: {len(data)} bytes"


def test_without_matplotlib_the_table_still_prints(tmp_path):
    shim = tmp_path / "shim" / "matplotlib"
    shim.mkdir(parents=True)
    (shim / "__init__.py").write_text("raise ImportError('matplotlib hidden by the test')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(shim.parent), ROOT]))
    done = run_report(SMALL_PP2, "--out", str(tmp_path / "plots"), env=env)
    assert done.returncode == 0, done.stderr
    assert "TTFT p50 (ms)" in done.stdout
    assert [line for line in done.stdout.splitlines() if "matplotlib" in line] == [report.MPL_HINT]
    assert list((tmp_path / "plots").iterdir()) == []


@pytest.mark.parametrize("args, names", [
    (["tests/data/report/missing.jsonl"], "missing.jsonl: no such file"),
    (["tests/data/report/not_jsonl.jsonl"], "not_jsonl.jsonl: line 1 is not JSON"),
    (["tests/data/report/no_prompts.jsonl"], "no_prompts.jsonl: no prompt records"),
    (["tests/data/report"], "tests/data/report: is a directory"),
    ([SMALL_PP2, "tests/data/report/not_jsonl.jsonl"], "not_jsonl.jsonl"),  # one bad file among good ones
    ([SMALL_PP1, "--out", "tests/data/report/small_pp2.jsonl"], "--out tests/data/report/small_pp2.jsonl: is a file"),
])
def test_bad_input_is_one_line_exit_2(args, names):
    done = run_report(*args)
    assert done.returncode == 2
    assert done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert lines[0].startswith("report: error: ") and names in lines[0]


def test_planned_memory_beside_peak(tmp_path, capsys):
    """The run record's plan (pipeinfer/plan/make.py) gives each rank's planned total beside its measured peak."""
    recs = [{"type": "run", "config": {"pipeline_size": 2},
             "plan": {"ranks": [{"rank": 0, "total": 3 * 2**20}, {"rank": 1, "total": 5 * 2**20}]}},
            {"type": "prompt", "prompt_index": 0, "new_tokens": 2, "latency_s": 1.0, "itl_s": [0.5]},
            {"type": "stage", "rank": 0, "layers": [0, 1], "wall_s": 1.0, "peak_memory_bytes": 4 * 2**20},
            {"type": "stage", "rank": 1, "layers": [2, 3], "wall_s": 1.0, "peak_memory_bytes": 6 * 2**20},
            {"type": "summary", "new_tokens": 2, "wall_s": 1.0, "tokens_per_s": 2.0}]
    path = tmp_path / "planned.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    assert report_cli.main([str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = {line[:34].strip(): line[34:].split() for line in lines[2:]}
    assert rows["rank 0 planned memory"] == ["3.0", "MiB"] and rows["rank 1 planned memory"] == ["5.0", "MiB"]
    assert rows["rank 1 peak memory"] == ["6.0", "MiB"]


def test_perplexity_shown_for_scoring_runs(tmp_path):
    """prompt_logprobs records: perplexity over all scored tokens, exp(-(sum of sums) / (sum of
    counts)); runs without them show no such row."""
    import json
    import math

    recs = [{"type": "run", "config": {"pipeline_size": 1}},
            {"type": "prompt", "prompt_index": 0, "new_tokens": 0, "prompt_logprob_sum": -6.0,
             "prompt_logprob_count": 3},
            {"type": "prompt", "prompt_index": 1, "new_tokens": 0, "prompt_logprob_sum": -2.0,
             "prompt_logprob_count": 1},
            {"type": "prompt", "prompt_index": 2, "new_tokens": 0, "prompt_logprob_sum": 0.0,
             "prompt_logprob_count": 0},  # a one-token prompt: nothing scored
            {"type": "summary", "prompts": 3, "new_tokens": 0, "wall_s": 1.0, "tokens_per_s": 0.0}]
    path = tmp_path / "score.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    s = report.summarize(report.load_run(str(path)))
    assert s["perplexity"] == pytest.approx(math.exp(8.0 / 4))
    rows = dict(tables.table_rows([s]))
    assert rows["prompt perplexity"] == [f"{math.exp(2.0):.3f}"]
    assert "prompt perplexity" not in dict(tables.table_rows([report.summarize(report.load_run(SMALL_PP2))]))
