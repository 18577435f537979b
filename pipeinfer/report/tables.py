"""The report's terminal table: summary dicts (summary.py) as aligned rows, one column per run."""

from __future__ import annotations

from pipeinfer.report.summary import LATENCY_METRICS, PERCENTILES


def _ms(x):
    return "-" if x is None else f"{1000 * x:.2f}"


def _bytes(n):
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def _f(x, fmt="{:.1f}"):
    return "-" if x is None else fmt.format(x)


def table_rows(summaries: list[dict]) -> list[tuple[str, list[str]]]:
    rows = [("prompts", [str(s["prompts"]) for s in summaries]),
            ("new tokens", [str(s["new_tokens"]) for s in summaries]),
            ("wall (s)", [_f(s["wall_s"], "{:.3f}") for s in summaries])]
    for key, name in LATENCY_METRICS:
        for q in PERCENTILES:
            rows.append((f"{name} p{q} (ms)", [_ms(s[key][f"p{q}"]) for s in summaries]))
    rows += [("throughput (tok/s)", [_f(s["tokens_per_s"]) for s in summaries]),
             ("mean per-prompt tok/s", [_f(s["mean_prompt_tokens_per_s"]) for s in summaries])]
    if any(s.get("perplexity") is not None for s in summaries):
        rows.append(("prompt perplexity", [_f(s.get("perplexity"), "{:.3f}") for s in summaries]))
    ranks = sorted({st["rank"] for s in summaries for st in s["stages"]}, key=lambda r: (r is None, r))
    for r in ranks:
        stage = [next((st for st in s["stages"] if st["rank"] == r), None) for s in summaries]
        rows += [
            (f"rank {r} layers",
             ["-" if st is None or not st["layers"] else "{}-{}".format(*st["layers"]) for st in stage]),
            (f"rank {r} compute/recv/send/other %",
             ["-" if st is None or st["wall_s"] <= 0 else
              " / ".join(f"{st[k]:.0f}" for k in ("compute_pct", "recv_wait_pct", "send_pct", "other_pct"))
              for st in stage]),
            (f"rank {r} bytes sent", ["-" if st is None else _bytes(st["bytes_sent"]) for st in stage]),
            (f"rank {r} peak memory", ["-" if st is None else _bytes(st["peak_memory_bytes"]) for st in stage]),
        ]
        if any(st is not None and st.get("offload") for st in stage):
            rows += [
                (f"rank {r} layers device/host/disk",
                 ["-" if st is None or not st.get("offload") else
                  "/".join(str(st["offload"]["tiers"][t]) for t in ("device", "host", "disk")) for st in stage]),
                (f"rank {r} waiting for weights",
                 ["-" if st is None or not st.get("offload") else
                  f"{st['offload']['wait_s']:.2f} s ({_f(st['offload']['wait_pct'], '{:.0f}')}%)" for st in stage]),
                (f"rank {r} weights streamed in",
                 ["-" if st is None or not st.get("offload") else _bytes(st["offload"]["moved_bytes"])
                  for st in stage])]
        if any(st is not None and st.get("planned_bytes") is not None for st in stage):
            # planned: weights + KV cache + transient + reserve; a CPU peak (RSS) also holds the runtime
            rows.append((f"rank {r} planned memory",
                         ["-" if st is None or st.get("planned_bytes") is None else _bytes(st["planned_bytes"])
                          for st in stage]))
    return rows


def format_table(summaries: list[dict]) -> str:
    rows = [("", [s["label"] for s in summaries])] + table_rows(summaries)
    w0 = max(len(name) for name, _ in rows)
    widths = [max(len(cells[i]) for _, cells in rows) for i in range(len(summaries))]
    lines = ["  ".join([name.ljust(w0)] + [c.rjust(w) for c, w in zip(cells, widths)]) for name, cells in rows]
    lines.insert(1, "-" * len(lines[0]))
    lines.append("percentiles: linear interpolation (numpy's default); ITL pooled over all prompts; "
                 "rank shares are % of that rank's wall_s, other = wall - compute - recv - send")
    for s in summaries:
        lines += [f"note {s['label']}: {note}" for note in s["notes"]]
        for row in s["sacct"]:
            lines.append(f"sacct {s['label']}: job {row.get('job_id')} {row.get('state')}, "
                         f"elapsed {_f(row['elapsed_s'], '{:.0f}')} s, "
                         f"max RSS of its steps {_bytes(row['max_rss_bytes'])}")
    return "\n".join(lines)
