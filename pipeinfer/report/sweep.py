"""One report for a sweep (python -m pipeinfer.sweep): a table and a picture comparing its cells.

    python -m pipeinfer.report sweeps/t4-llama            # -> sweeps/t4-llama/report/{report.md, sweep.json, sweep.png}

Each cell's numbers are its own results file's, through summary.summarize() (tokens/s, TTFT and
TPOT p50, perplexity), with p95 by the same percentile rule; per stage the bubble fraction
(recv_wait_s / wall_s: waiting on the neighbour stage) and the planned bytes (the run record's plan)
beside the measured peak. With prompt_logprobs the cells' perplexity is set against the sweep's
reference cell, so that what a quantized or offloaded cell gains in speed shows beside what it
costs in quality. The best cell for throughput (tokens/s) and for latency (p50 of each prompt's
end-to-end latency) is named, with its margin over the next.
"""

from __future__ import annotations

import json
import os

from pipeinfer.report.summary import ReportError, load_run, num, percentile, read_records, summarize


def is_sweep(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "sweep.json"))


def _pct(values: list, q: float) -> float | None:
    return percentile([v for x in values if (v := num(x)) is not None], q)


def cell_row(cell: dict) -> dict:
    """One cell's numbers, from its results file (or why there are none)."""
    row = {"name": cell["name"], "values": cell["values"], "nodes": cell["nodes"], "state": "finished"}
    if not cell.get("fits", True):
        return dict(row, state="dropped: " + str(cell.get("dropped")))
    if not os.path.exists(cell["results"]):
        return dict(row, state="not run")
    try:
        run = load_run(cell["results"])
    except ReportError as e:
        return dict(row, state=f"no results ({e})")
    s = summarize(run)
    summaries = [r for r in read_records(cell["results"])[0] if r.get("type") == "summary"]
    if not summaries or summaries[-1].get("interrupted") is not False:
        row["state"] = "partial: rerun the sweep to finish it"
    tps = s["tokens_per_s"]
    row.update(prompts=s["prompts"], new_tokens=s["new_tokens"], tokens_per_s=tps,
               tokens_per_s_per_node=tps / cell["nodes"] if tps is not None else None, perplexity=s["perplexity"])
    for key in ("ttft_s", "tpot_s", "latency_s"):
        row[key] = {"p50": s[key]["p50"], "p95": _pct([p.get(key) for p in run.prompts], 95)}
    row["stages"] = [{"rank": st["rank"], "bubble": st["recv_wait_s"] / st["wall_s"] if st["wall_s"] else None,
                      "planned_bytes": st["planned_bytes"], "peak_bytes": st["peak_memory_bytes"]} for st in s["stages"]]
    return row


def _best(rows: list[dict], value, higher: bool, unit: str) -> dict | None:
    ranked = sorted((r for r in rows if value(r) is not None), key=value, reverse=higher)
    if not ranked:
        return None
    best = {"cell": ranked[0]["name"], "value": value(ranked[0]), "unit": unit}
    if len(ranked) > 1:
        a, b = value(ranked[0]), value(ranked[1])
        best.update(next=ranked[1]["name"], next_value=b,
                    better_pct=100 * ((a / b - 1) if higher else (b / a - 1)) if a and b else None)
    return best


def sweep_report(sweep_dir: str) -> dict:
    """Every cell's row, the reference's perplexity ratios and the best cells, as one JSON-ready dict."""
    try:
        with open(os.path.join(sweep_dir, "sweep.json"), encoding="utf-8") as f:
            meta = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ReportError(f"{sweep_dir}/sweep.json cannot be read ({e}): pass the folder python -m pipeinfer.sweep "
                          f"wrote (its \"out\")") from None
    rows = [cell_row(c) for c in meta["cells"]]
    done = [r for r in rows if r["state"] == "finished"]
    ref = next((r for r in done if r["name"] == meta.get("reference")), None)
    for r in done:
        r["perplexity_vs_reference"] = (r["perplexity"] / ref["perplexity"]
                                        if ref and ref.get("perplexity") and r.get("perplexity") else None)
    return {"sweep_dir": sweep_dir, "axes": meta["axes"], "reference": meta.get("reference"), "cells": rows,
            "best_throughput": _best(done, lambda r: r["tokens_per_s"], True, "tokens/s"),
            "best_latency": _best(done, lambda r: r["latency_s"]["p50"], False, "s p50 latency")}


def _f(x, fmt="{:.1f}") -> str:
    return "-" if x is None else fmt.format(x)


def _ms(d: dict) -> str:
    return f"{_f(d['p50'] and 1000 * d['p50'], '{:.1f}')} / {_f(d['p95'] and 1000 * d['p95'], '{:.1f}')}"


def format_report(rep: dict) -> str:
    mib = 2**20
    lines = [f"sweep {rep['sweep_dir']}: axes " + ", ".join(f"{k} {json.dumps(v)}" for k, v in rep["axes"].items())
             + f"; reference cell {rep['reference']}", "",
             "| cell | nodes | tok/s | tok/s/node | TTFT p50/p95 ms | TPOT p50/p95 ms | bubble per stage | "
             "planned / peak MiB per rank | perplexity (x ref) | state |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rep["cells"]:
        if r["state"] != "finished":
            lines.append(f"| {r['name']} | {r['nodes']} | - | - | - | - | - | - | - | {r['state'][:160]} |")
            continue
        bubble = " ".join(_f(st["bubble"] and 100 * st["bubble"], "{:.0f}%") for st in r["stages"])
        mem = " ".join(f"{_f(st['planned_bytes'] and st['planned_bytes'] / mib)}/"
                       f"{_f(st['peak_bytes'] and st['peak_bytes'] / mib)}" for st in r["stages"])
        ppl = "-" if r["perplexity"] is None else (f"{r['perplexity']:.3f} (x{r['perplexity_vs_reference']:.3f})"
                                                  if r["perplexity_vs_reference"] else f"{r['perplexity']:.3f}")
        lines.append(f"| {r['name']} | {r['nodes']} | {_f(r['tokens_per_s'])} | {_f(r['tokens_per_s_per_node'])} | "
                     f"{_ms(r['ttft_s'])} | {_ms(r['tpot_s'])} | {bubble} | {mem} | {ppl} | {r['state']} |")
    lines.append("")
    for what, key in (("throughput", "best_throughput"), ("latency", "best_latency")):
        b = rep[key]
        if b is None:
            lines.append(f"best for {what}: no finished cell")
            continue
        ahead = (f", {b['better_pct']:.1f}% better than {b['next']} ({b['next_value']:.4g})"
                 if b.get("better_pct") is not None else "")
        lines.append(f"best for {what}: {b['cell']} ({b['value']:.4g} {b['unit']}){ahead}")
    return "\n".join(lines)


def write_sweep_plot(rep: dict, path: str) -> str:
    """One picture: tokens/s against nodes (and per node), TTFT/TPOT per cell, the bubble per
    stage, planned against measured peak memory per rank, and perplexity against tokens/s."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [r for r in rep["cells"] if r["state"] == "finished"]
    names = [r["name"] for r in done]
    x = range(len(done))
    fig, axes = plt.subplots(2, 3, figsize=(21, 11))
    axes = axes.flatten()
    ax = axes[0]
    for r in done:
        ax.scatter(r["nodes"], r["tokens_per_s"], color="#1f4e9c")
        ax.scatter(r["nodes"], r["tokens_per_s_per_node"], color="#f0a000", marker="x")
        ax.annotate(r["name"], (r["nodes"], r["tokens_per_s"]), fontsize=7)
    ax.set(title="tokens/s against nodes (dots; crosses: per node)", xlabel="nodes", ylabel="tokens/s")
    ax.set_xticks(sorted({r["nodes"] for r in done}))
    for ax, key, title in ((axes[1], "ttft_s", "TTFT"), (axes[2], "tpot_s", "TPOT")):
        ax.bar([i - 0.2 for i in x], [1000 * (r[key]["p50"] or 0) for r in done], 0.4, label="p50")
        ax.bar([i + 0.2 for i in x], [1000 * (r[key]["p95"] or 0) for r in done], 0.4, label="p95")
        ax.set(title=f"{title} per cell", ylabel="ms")
        ax.set_xticks(list(x), names, rotation=60, ha="right", fontsize=7)
        ax.legend()
    ax = axes[3]
    width, seen = 0.8 / max([len(r["stages"]) for r in done] + [1]), set()
    for i, r in enumerate(done):
        for st in r["stages"]:
            ax.bar(i + st["rank"] * width, 100 * (st["bubble"] or 0), width, color=f"C{st['rank']}",
                   label=None if st["rank"] in seen else f"stage {st['rank']}")
            seen.add(st["rank"])
    ax.set_xticks(list(x), names, rotation=60, ha="right", fontsize=7)
    ax.set(title="bubble per stage (waiting on the neighbour stage, % of wall)", ylabel="%")
    ax.legend(fontsize=7)
    ax = axes[4]
    for i, r in enumerate(done):
        for st in r["stages"]:
            if st["planned_bytes"] is not None and st["peak_bytes"] is not None:
                ax.scatter(st["planned_bytes"] / 2**20, st["peak_bytes"] / 2**20, color=f"C{i % 10}",
                           label=r["name"] if st["rank"] == 0 else None)
    ax.axline((0, 0), slope=1, color="grey", lw=0.8)
    ax.set(title="peak memory per rank: measured against planned", xlabel="planned MiB", ylabel="measured MiB")
    ax.legend(fontsize=6)
    ax = axes[5]
    scored = [r for r in done if r.get("perplexity_vs_reference")]
    for r in scored:
        ax.scatter(r["tokens_per_s"], r["perplexity_vs_reference"])
        ax.annotate(r["name"], (r["tokens_per_s"], r["perplexity_vs_reference"]), fontsize=7)
    ax.set(title=f"quality against speed (reference {rep['reference']})" if scored else
           "quality: no scoring set (prompt_logprobs=true scores the prompts)", xlabel="tokens/s",
           ylabel="perplexity / the reference's")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
