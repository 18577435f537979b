"""Summarise pipeinfer results: a table in the terminal and PNG plots, one run or several side by side.

    python -m pipeinfer.report results/demo.jsonl --out report/
    python -m pipeinfer.report results/demo.jsonl results/demo-pp1.jsonl --out report/   # compare runs

Computing and presenting are separate: load_run() and summarize() turn records into a plain summary
dict (pure, no printing), tables.format_table() prints those dicts, plots.write_plots() draws them; cli.main() is the command. Percentiles
use linear interpolation between closest ranks, numpy's default: the q-th percentile of n sorted
values sits at position (n - 1) * q / 100. matplotlib is needed for the plots only; without it the
table still prints. Bad input (missing file, not JSONL, no prompt records) exits 2 with one line.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field

PERCENTILES = (50, 90, 99)
LATENCY_METRICS = (("ttft_s", "TTFT"), ("tpot_s", "TPOT"), ("latency_s", "latency"), ("itl_s", "ITL"))
EVENT_COLORS = {"prefill": "#1f4e9c", "decode": "#6fa8dc", "send": "#f0a000", "recv": "#d62728"}
PLOTS = ("latency.png", "tokens_per_s.png", "stages.png", "timeline.png")
MPL_HINT = "plots skipped: they need matplotlib (pip install matplotlib)"


class ReportError(ValueError):
    """Bad input: a one-line message naming the file and the fix."""


@dataclass
class Run:
    path: str
    label: str
    run: dict | None
    prompts: list[dict]
    stages: list[dict]
    summary: dict | None
    sacct: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what the reader should know about this file


def percentile(values: list[float], q: float) -> float | None:
    """Linear interpolation between closest ranks (numpy's default); None for no values."""
    xs = sorted(values)
    if not xs:
        return None
    pos = (len(xs) - 1) * q / 100
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def read_records(path: str) -> tuple[list[dict], bool]:
    """The file's records, and whether a torn last line (a writer killed mid-line) was left out."""
    fix = "pass the .jsonl a pipeinfer run wrote (its output_path)"
    if not os.path.exists(path):
        raise ReportError(f"{path}: no such file: check the path, or {fix}")
    if os.path.isdir(path):
        raise ReportError(f"{path}: is a directory: {fix}")
    try:
        with open(path, encoding="utf-8", errors="replace", newline="") as f:
            # records end at "\n" only: a JSON string written with ensure_ascii=False may hold U+2028, U+2029 or
            # NEL raw, where str.splitlines() would cut the record in two
            lines = f.read().split("\n")
    except OSError as e:
        raise ReportError(f"{path}: cannot read ({e.strerror}): check its permissions") from None
    while lines and not lines[-1].strip():
        lines.pop()
    records, torn = [], False
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if n == len(lines) and records:
                torn = True  # the run was killed mid-write; a resumed run cuts this line off too
                break
            raise ReportError(f"{path}: line {n} is not JSON, so this is not a results file: {fix}") from None
        if not isinstance(rec, dict):
            raise ReportError(f"{path}: line {n} is not a JSON object: {fix}")
        records.append(rec)
    return records, torn


def _index_order(k) -> tuple:
    return (0, k, "") if isinstance(k, int) else (1, 0, str(k))


def _of(records: list[dict], kind: str) -> list[dict]:
    return [r for r in records if r.get("type") == kind]


def load_run(path: str) -> Run:
    """A results file's records by type; unknown types and extra fields are ignored.

    A resumed file holds several attempts, each starting with a run record. Prompts come from all
    of them; throughput sums the summaries' tokens and wall times; the stage records (and the
    timeline) are those of the last attempt that wrote any, as ranks may differ between attempts.
    """
    records, torn = read_records(path)
    prompts = {p.get("prompt_index", i): p for i, p in enumerate(_of(records, "prompt"))}
    if not prompts:
        raise ReportError(f"{path}: no prompt records ({len(records)} records of other types): "
                          "the run did not finish a prompt; rerun it, or pass the .jsonl of a finished run")
    attempts: list[list[dict]] = []
    for rec in records:
        if rec.get("type") == "run" or not attempts:
            attempts.append([])
        attempts[-1].append(rec)
    last = next((a for a in reversed(attempts) if _of(a, "stage")), attempts[-1])
    run = (_of(last, "run") or _of(records, "run") or [None])[0]
    stages = sorted(_of(last, "stage"), key=lambda s: s.get("rank", 0))
    summaries = _of(records, "summary")
    summary = summaries[0] if len(summaries) == 1 else None
    if len(summaries) > 1:
        tokens, wall = (sum(num(s.get(k)) or 0 for s in summaries) for k in ("new_tokens", "wall_s"))
        summary = {"new_tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall if wall > 0 else None}
    notes = []
    if _of(records, "merge"):  # python -m pipeinfer.record.replicas: replicas side by side, not attempts
        stages, summary, notes = _merged(records)
    elif len(_of(records, "run")) > 1:
        notes.append(f"{len(_of(records, 'run'))} attempts (resumed): prompts from all, throughput over "
                     f"{len(summaries)} summaries, stages and timeline from the last attempt")
    if any(s.get("interrupted") for s in summaries):
        notes.append("an attempt was interrupted (its summary says interrupted=true)")
    if torn:
        notes.append("torn last line left out (the run was killed mid-write)")
    sacct = [row for rec in _of(records, "sacct") for row in rec.get("rows", [])]
    return Run(path, run_label(path, run, stages), run, [prompts[k] for k in sorted(prompts, key=_index_order)],
               stages, summary, sacct, notes)


def _merged(records: list[dict]) -> tuple[list[dict], dict, list[str]]:
    """A merged replicas file: the replicas ran side by side, so throughput is the sum of each
    replica's tokens/s (its tokens over its wall time, attempts summed) and wall time the longest
    replica's; the stage records shown are replica 0's (every replica's are in the file)."""
    per: dict = {}
    for s in _of(records, "summary"):
        tokens, wall = per.get(s.get("replica"), (0, 0.0))
        per[s.get("replica")] = (tokens + (num(s.get("new_tokens")) or 0), wall + (num(s.get("wall_s")) or 0))
    first = min((r for r in per if isinstance(r, int)), default=None)
    stages = sorted((s for s in _of(records, "stage") if s.get("replica") == first), key=lambda s: s.get("rank", 0))
    summary = {"new_tokens": sum(t for t, _ in per.values()), "wall_s": max((w for _, w in per.values()), default=0.0),
               "tokens_per_s": sum(t / w for t, w in per.values() if w > 0) or None}
    merge = _of(records, "merge")[0]
    return stages, summary, [f"merged from {merge.get('replicas')} replicas: throughput is the sum of the replicas' "
                             f"tokens/s (side by side), wall the longest replica's; stages are replica {first}'s"]


def run_label(path: str, run: dict | None, stages: list[dict]) -> str:
    name = os.path.basename(path).removesuffix(".jsonl")
    pp = ((run or {}).get("config") or {}).get("pipeline_size") or (run or {}).get("world_size") or len(stages)
    return f"{name} pp={pp}" if pp else name


def _pcts(values: list[float]) -> dict[str, float | None]:
    return {f"p{q}": percentile(values, q) for q in PERCENTILES}


def num(x) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) else None


def stage_summary(stage: dict) -> dict:
    """A rank's wall time split into compute / recv wait / send / other (the untimed rest), s and %."""
    wall = num(stage.get("wall_s")) or 0.0
    parts = {k: num(stage.get(k)) or 0.0 for k in ("compute_s", "recv_wait_s", "send_s")}
    parts["other_s"] = max(wall - sum(parts.values()), 0.0)
    share = {k.removesuffix("_s") + "_pct": (100 * v / wall if wall > 0 else None) for k, v in parts.items()}
    return {"rank": stage.get("rank"), "layers": stage.get("layers"), "wall_s": wall, **parts, **share,
            "bytes_sent": stage.get("bytes_sent"), "peak_memory_bytes": stage.get("peak_memory_bytes"),
            "events": len(stage.get("events") or []), "events_dropped": stage.get("events_dropped") or 0,
            "offload": _offload_summary(stage.get("offload"), wall)}


def _offload_summary(o: dict | None, wall: float) -> dict | None:
    """An offloaded stage (offload.Streamer.record): its layers per tier, the wait for weights (s and
    % of wall) and the bytes streamed in."""
    if not isinstance(o, dict):
        return None
    wait = num(o.get("weights_wait_s")) or 0.0
    return {"tiers": {t: len(o.get(f"{t}_layers") or []) for t in ("device", "host", "disk")},
            "wait_s": wait, "wait_pct": 100 * wait / wall if wall > 0 else None,
            "moved_bytes": o.get("weights_moved_bytes")}


def sacct_summary(rows: list[dict]) -> list[dict]:
    """Per job: the job row's state and elapsed time, and the largest MaxRSS of any of its steps."""
    jobs = []
    for job in (r for r in rows if r.get("step") is None):
        rss = [r["max_rss_bytes"] for r in rows
               if r.get("job_id") == job.get("job_id") and num(r.get("max_rss_bytes"))]
        jobs.append({"job_id": job.get("job_id"), "state": job.get("state"), "elapsed_s": num(job.get("elapsed_s")),
                     "max_rss_bytes": max(rss) if rss else None})
    return jobs


def summarize(run: Run) -> dict:
    """The numbers the table shows, from the records alone. ITL is pooled over all prompts' gaps."""
    prompts = run.prompts

    def values(key):
        return [v for p in prompts if (v := num(p.get(key))) is not None]

    itl = [v for p in prompts for x in (p.get("itl_s") or []) if (v := num(x)) is not None]
    per_prompt_tps = values("tokens_per_s")
    summary = run.summary or {}
    # the plan the run record carries (pipeinfer/plan/make.py): each rank's planned total, beside its peak
    planned = {r.get("rank"): num(r.get("total")) for r in (((run.run or {}).get("plan") or {}).get("ranks") or [])}
    # prompt_logprobs runs: the perplexity of all scored prompt tokens together (a token-weighted
    # mean, as evaluations report it), from each record's sum and count
    scored = [(num(p.get("prompt_logprob_sum")), num(p.get("prompt_logprob_count"))) for p in prompts]
    scored = [(s, n) for s, n in scored if s is not None and n]
    out = {
        "label": run.label,
        "path": run.path,
        "pipeline_size": ((run.run or {}).get("config") or {}).get("pipeline_size") or len(run.stages) or None,
        "prompts": len(prompts),
        "new_tokens": sum(int(p.get("new_tokens") or 0) for p in prompts),
        "wall_s": num(summary.get("wall_s")),
        "tokens_per_s": num(summary.get("tokens_per_s")),
        "mean_prompt_tokens_per_s": sum(per_prompt_tps) / len(per_prompt_tps) if per_prompt_tps else None,
        "stages": [dict(stage_summary(s), planned_bytes=planned.get(s.get("rank"))) for s in run.stages],
        "sacct": sacct_summary(run.sacct),
        "notes": list(run.notes),
        "perplexity": math.exp(-sum(s for s, _ in scored) / sum(n for _, n in scored)) if scored else None,
    }
    for key, _ in LATENCY_METRICS:
        out[key] = _pcts(itl if key == "itl_s" else values(key))
    return out


def timeline_window(stages: list[dict], max_events: int = 300,
                    window_s: float | None = None) -> tuple[float, float, str]:
    """(t0, t1, what is shown) for the Gantt chart, in unix seconds.

    The whole run when no rank has more than max_events events; otherwise the first batch (up to
    rank 0's second prefill), cut further at the end of the busiest rank's max_events-th event.
    window_s, when given, shows the first window_s seconds instead.
    """
    events = {s.get("rank", i): sorted(s.get("events") or [], key=lambda e: e[1]) for i, s in enumerate(stages)}
    flat = [e for evs in events.values() for e in evs]
    if not flat:
        return 0.0, 0.0, "no events recorded"
    t0, end = min(e[1] for e in flat), max(e[2] for e in flat)
    total = end - t0
    if window_s is not None:
        t1 = min(end, t0 + window_s)
        return t0, t1, "whole run" if t1 >= end else f"first {t1 - t0:.3g} s of {total:.3g} s"
    if max(len(evs) for evs in events.values()) <= max_events:
        return t0, end, f"whole run, {total:.3g} s"
    first = events[min(events)]
    prefills = [e[1] for e in first if e[0] == "prefill"]
    t1, what = (prefills[1], "first batch") if len(prefills) > 1 else (end, "whole run")
    busiest = max(events.values(), key=len)
    if len(busiest) > max_events and busiest[max_events - 1][2] < t1:
        t1, what = busiest[max_events - 1][2], f"first {max_events} events of the busiest rank"
    return t0, t1, f"{what}: {t1 - t0:.3g} s of {total:.3g} s"
